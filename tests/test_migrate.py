"""The article's own database: `users(username, password)` with plain-text passwords.

Start-up refuses it with one line naming `python server.py migrate`; `migrate` converts it in place,
in one transaction, and every user then logs in with the password they had.
"""

from __future__ import annotations

import json
import secrets
import unicodedata
from collections.abc import Callable
from pathlib import Path

import aiohttp
import argon2
import psycopg2
import psycopg2.extensions
import pytest
import sqlalchemy as sa

from conftest import Start, apply_schema, free_port, run_command

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}

# The article gives the table as users(username, password); readers wrote it one of these ways.
ARTICLE_TABLES = [
    pytest.param(
        "CREATE TABLE users (username varchar(255) PRIMARY KEY, password varchar(255) NOT NULL)",
        id="username-key",
    ),
    pytest.param("CREATE TABLE users (username text, password text)", id="no-key"),
]

# Passwords as the article's readers stored them, including non-ASCII ones.
SPECIAL_USERS: dict[str, str | None] = {
    "alice": "wonderland",
    "josé": "contraseña",
    "山田": "パスワード",
    "Ωmega": "пароль-🔑",
    "spaces": "  two  spaces  ",
    "Rene\u0301e": "cafe\u0301 au lait",  # typed with combining accents, as macOS keyboards do
}
USER_COUNT = 300  # more than one hashing batch, so the progress line shows


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def article_users() -> dict[str, str | None]:
    users = {f"user{i:03d}": secrets.token_urlsafe(12) for i in range(USER_COUNT - len(SPECIAL_USERS))}
    return {**users, **SPECIAL_USERS}


def create_article_table(url: str, ddl: str, users: dict[str, str | None]) -> None:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(ddl)
        cur.executemany("INSERT INTO users (username, password) VALUES (%s, %s)", list(users.items()))
    conn.close()


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql)
        rows = cur.fetchall()
    conn.close()
    return rows


def describe_users_table(url: str) -> dict[str, object]:
    """The users table as the catalog sees it: columns, key and unique constraints (order aside)."""
    engine = sa.create_engine("postgresql+psycopg2://", creator=lambda: psycopg2.connect(url))
    inspector = sa.inspect(engine)
    dialect = sa.dialects.postgresql.dialect()
    shape = {
        "columns": sorted(
            (
                column["name"],
                column["type"].compile(dialect),
                column["nullable"],
                bool(column.get("identity")),
            )
            for column in inspector.get_columns("users")
        ),
        "primary_key": inspector.get_pk_constraint("users")["constrained_columns"],
        "unique": sorted(tuple(c["column_names"]) for c in inspector.get_unique_constraints("users")),
    }
    engine.dispose()
    return shape


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def config_file(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST}))
    return path


@pytest.fixture
def article_url(scratch_database: Callable[[str], str]) -> str:
    return scratch_database("article")


def test_start_up_refuses_the_articles_table_with_one_line_naming_migrate(
    config_file: Path, article_url: str
) -> None:
    create_article_table(article_url, "CREATE TABLE users (username text, password text)", SPECIAL_USERS)
    result = run_command(["--config", str(config_file)], env={"DATABASE_URL": article_url})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no log of the database or of closing it before the error
    assert lines[0].startswith("error: table 'users'") and "python server.py migrate" in lines[0]


@pytest.mark.parametrize("command", [["adduser", "bob"], ["passwd", "alice"], ["deluser", "alice"]])
def test_user_commands_on_the_articles_table_name_migrate(
    config_file: Path, article_url: str, command: list[str]
) -> None:
    create_article_table(article_url, "CREATE TABLE users (username text, password text)", SPECIAL_USERS)
    result = run_command(
        [*command, "--config", str(config_file)], "a new password\n", {"DATABASE_URL": article_url}
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "python server.py migrate" in result.stderr
    assert query(article_url, "SELECT count(*) FROM users") == [(len(SPECIAL_USERS),)]


@pytest.mark.parametrize("ddl", ARTICLE_TABLES)
async def test_migrate_converts_the_articles_table_and_every_user_keeps_their_password(
    config_file: Path,
    port: int,
    article_url: str,
    scratch_database: Callable[[str], str],
    start_server: Start,
    ddl: str,
) -> None:
    users = article_users()
    create_article_table(article_url, ddl, users)
    env = {"DATABASE_URL": article_url}

    result = run_command(["migrate", "--config", str(config_file)], env=env)
    assert result.returncode == 0, result.stderr
    assert f"{USER_COUNT} passwords are argon2id hashes" in result.stdout
    assert f"migrate: 250 of {USER_COUNT} passwords hashed" in result.stderr  # progress

    # The plain text is gone, and the table is what schema.sql describes.
    fresh_url = scratch_database("fresh")
    apply_schema(fresh_url)
    assert describe_users_table(article_url) == describe_users_table(fresh_url)
    stored = dict(query(article_url, "SELECT username, password_hash FROM users"))
    assert set(stored) == {nfc(username) for username in users}  # stored as the login looks them up
    hasher = argon2.PasswordHasher()
    for username, password in users.items():
        assert str(stored[nfc(username)]).startswith("$argon2id$"), username
        assert password is not None and hasher.verify(str(stored[nfc(username)]), nfc(password)), username

    # And the server, started on the converted table, logs each of them in with the old password.
    server = start_server(["--config", str(config_file)], env)
    server.wait_until_serving()
    async with aiohttp.ClientSession() as http:
        for username, password in SPECIAL_USERS.items():
            assert password is not None
            for typed in (username, nfc(username)):  # typed as before, or composed
                body = {"username": typed, "password": password}
                async with http.post(f"http://127.0.0.1:{port}/user", json=body) as response:
                    assert response.status == 200, (typed, await response.text())
        wrong = {"username": "alice", "password": "not-wonderland"}
        async with http.post(f"http://127.0.0.1:{port}/user", json=wrong) as response:
            assert response.status == 401
    assert server.stop() == 0


def test_migrate_again_or_on_a_current_database_has_nothing_to_do(
    config_file: Path, article_url: str
) -> None:
    env = {"DATABASE_URL": article_url}
    for _ in range(2):  # an empty database first (the tables are created), then the same again
        result = run_command(["migrate", "--config", str(config_file)], env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("nothing to migrate") and result.stdout.count("\n") == 1


def test_migrate_twice_converts_once(config_file: Path, article_url: str) -> None:
    create_article_table(article_url, "CREATE TABLE users (username text, password text)", SPECIAL_USERS)
    env = {"DATABASE_URL": article_url}
    first = run_command(["migrate", "--config", str(config_file)], env=env)
    assert first.returncode == 0, first.stderr
    before = query(article_url, "SELECT username, password_hash FROM users ORDER BY username")
    again = run_command(["migrate", "--config", str(config_file)], env=env)
    assert again.returncode == 0 and again.stdout.startswith("nothing to migrate")
    assert query(article_url, "SELECT username, password_hash FROM users ORDER BY username") == before


def test_a_user_without_a_password_is_locked_until_passwd(config_file: Path, article_url: str) -> None:
    create_article_table(
        article_url,
        "CREATE TABLE users (username text, password text)",
        {"alice": "wonderland", "ghost": None},
    )
    result = run_command(["migrate", "--config", str(config_file)], env={"DATABASE_URL": article_url})
    assert result.returncode == 0, result.stderr
    assert "1 had no password" in result.stdout and "passwd" in result.stdout
    (ghost_hash,) = query(article_url, "SELECT password_hash FROM users WHERE username = 'ghost'")[0]
    assert str(ghost_hash).startswith("$argon2id$")
    for guess in ("", "None", "null"):
        with pytest.raises(argon2.exceptions.VerifyMismatchError):
            argon2.PasswordHasher().verify(str(ghost_hash), guess)


def test_migrate_is_one_transaction_and_changes_nothing_when_it_fails(
    config_file: Path, article_url: str
) -> None:
    create_article_table(article_url, "CREATE TABLE users (username text, password text)", {"alice": "one"})
    with psycopg2.connect(article_url) as conn, conn.cursor() as cur:  # a duplicate username
        cur.execute("INSERT INTO users VALUES ('alice', 'two')")
    conn.close()
    result = run_command(["migrate", "--config", str(config_file)], env={"DATABASE_URL": article_url})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "nothing was changed" in result.stderr
    assert query(article_url, "SELECT username, password FROM users ORDER BY password") == [
        ("alice", "one"),
        ("alice", "two"),
    ]


def test_start_up_names_a_table_of_ours_that_lacks_columns(config_file: Path, article_url: str) -> None:
    with psycopg2.connect(article_url) as conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE sessions (id serial PRIMARY KEY, data text)")
    conn.close()
    result = run_command(["--config", str(config_file)], env={"DATABASE_URL": article_url})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: table 'sessions' lacks the column(s)")


def test_start_up_upgrades_a_sessions_table_from_before_public_ids(
    config_file: Path, article_url: str
) -> None:
    """The sessions table of the version before GET /user/sessions gains its columns; its
    sessions end (they have no public id), and the server serves."""
    with psycopg2.connect(article_url) as conn, conn.cursor() as cur:
        cur.execute(
            "CREATE TABLE sessions (token_hash bytea PRIMARY KEY, seq bigint GENERATED ALWAYS AS IDENTITY,"
            " username varchar(1024) NOT NULL, created_at double precision NOT NULL,"
            " last_seen double precision NOT NULL, expires_at double precision NOT NULL)"
        )
        cur.execute("INSERT INTO sessions (token_hash, username, created_at, last_seen, expires_at)"
                    " VALUES ('\\x00', 'alice', 1, 1, 9e9)")  # fmt: skip
    conn.close()
    result = run_command(
        ["adduser", "alice", "--config", str(config_file)], "wonderland\n", {"DATABASE_URL": article_url}
    )
    assert result.returncode == 0, result.stderr
    assert query(article_url, "SELECT count(*) FROM sessions") == [(0,)]
    columns = query(
        article_url, "SELECT column_name FROM information_schema.columns WHERE table_name = 'sessions'"
    )
    assert {"public_id", "address", "user_agent"} <= {name for (name,) in columns}


def test_migrate_names_the_usernames_that_are_taken_twice(config_file: Path, article_url: str) -> None:
    """Two rows of one name, or of one name in two Unicode forms, cannot both keep it: migrate
    names them, changes nothing, and says what to do."""
    users = {"alice": "one", "José": "two", "Jose\u0301": "three", "bob": "four"}
    create_article_table(article_url, "CREATE TABLE users (username text, password text)", users)
    with psycopg2.connect(article_url) as conn, conn.cursor() as cur:
        cur.execute("INSERT INTO users VALUES ('alice', 'five')")
    conn.close()
    result = run_command(["migrate", "--config", str(config_file)], env={"DATABASE_URL": article_url})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "nothing was changed" in result.stderr
    assert "2 username(s) are taken twice" in result.stderr
    assert "'alice' = 'alice'" in result.stderr and "'José' = 'Jose\u0301'" in result.stderr
    assert query(article_url, "SELECT count(*) FROM users WHERE password IS NOT NULL") == [(5,)]
