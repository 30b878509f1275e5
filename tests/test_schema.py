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


TABLES = [table.name for table in server.metadata.sorted_tables]


def test_the_code_defines_the_tables_schema_sql_creates() -> None:
    assert sorted(TABLES) == [
        "events",
        "events_dropped",
        "login_failures",
        "schema_version",
        "session_journal",
        "session_streams",
        "sessions",
        "topic_members",
        "users",
    ]


@pytest.mark.parametrize("name", TABLES)
def test_schema_sql_creates_the_columns_of_the_table(inspector: sa.engine.Inspector, name: str) -> None:
    table = server.metadata.tables[name]
    created = {column["name"]: column for column in inspector.get_columns(name)}
    assert list(created) == [column.name for column in table.columns]
    dialect = sa.dialects.postgresql.dialect()
    for column in table.columns:
        found = created[column.name]
        assert found["type"].compile(dialect) == column.type.compile(dialect), column.name
        assert found["nullable"] == column.nullable, column.name


@pytest.mark.parametrize("name", TABLES)
def test_schema_sql_has_the_keys_and_indexes_of_the_table(inspector: sa.engine.Inspector, name: str) -> None:
    table = server.metadata.tables[name]
    primary = inspector.get_pk_constraint(name)["constrained_columns"]
    assert primary == [column.name for column in table.primary_key]
    unique = [set(c["column_names"]) for c in inspector.get_unique_constraints(name)]
    assert unique == [{column.name} for column in table.columns if column.unique]
    indexed = sorted(
        tuple(index["column_names"]) for index in inspector.get_indexes(name) if not index["unique"]
    )
    declared = sorted(tuple(column.name for column in index.columns) for index in table.indexes)
    assert indexed == declared


async def test_creating_the_tables_twice_is_harmless(database_url: str, db: object) -> None:
    async with server.open_database(server.DatabaseConfig(dsn=database_url)) as engine:
        await server.create_tables(engine)
        await server.insert_user(engine, "alice", "hash")
        await server.create_tables(engine)
        assert (await server.find_account(engine, "alice"))[0] == "hash"


async def test_the_engine_is_closed_when_the_app_shuts_down(config: server.Config) -> None:
    app = await server.WebServer(config).initializer()
    runner = server.web.AppRunner(app)
    await runner.setup()
    engine = app[server.db_engine]
    assert not engine.closed
    await runner.cleanup()
    assert engine.closed
