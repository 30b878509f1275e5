"""schema.sql and the `users` Table in server.py describe the same table."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import server


@pytest.fixture
def inspector(database_url: str) -> Iterator[sa.engine.Inspector]:
    engine = sa.create_engine(database_url.replace("postgresql://", "postgresql+psycopg2://", 1))
    yield sa.inspect(engine)
    engine.dispose()


def test_schema_sql_creates_the_columns_of_the_table(inspector: sa.engine.Inspector) -> None:
    created = {column["name"]: column for column in inspector.get_columns("users")}
    assert list(created) == [column.name for column in server.users.columns]
    dialect = sa.dialects.postgresql.dialect()
    for column in server.users.columns:
        found = created[column.name]
        assert found["type"].compile(dialect) == column.type.compile(dialect), column.name
        assert found["nullable"] == column.nullable, column.name


def test_schema_sql_has_the_keys_of_the_table(inspector: sa.engine.Inspector) -> None:
    primary = inspector.get_pk_constraint("users")["constrained_columns"]
    assert primary == [column.name for column in server.users.primary_key]
    unique = [set(c["column_names"]) for c in inspector.get_unique_constraints("users")]
    declared = [{column.name} for column in server.users.columns if column.unique]
    assert unique == declared


async def test_creating_the_tables_twice_is_harmless(database_url: str, db: object) -> None:
    async with server.open_database(server.DatabaseConfig(dsn=database_url)) as engine:
        await server.create_tables(engine)
        await server.insert_user(engine, "alice", "hash")
        await server.create_tables(engine)
        assert await server.find_password_hash(engine, "alice") == "hash"


async def test_the_engine_is_closed_when_the_app_shuts_down(config: server.Config) -> None:
    app = await server.WebServer(config).initializer()
    runner = server.web.AppRunner(app)
    await runner.setup()
    engine = app[server.db_engine]
    assert not engine.closed
    await runner.cleanup()
    assert engine.closed
