"""adduser, passwd and deluser, run as a user runs them: a subprocess with the password piped in."""

from __future__ import annotations

import json
from pathlib import Path

import argon2
import psycopg2.extensions
import pytest

from conftest import PrivateCluster, run_command

FAST = {"passwords": {"time_cost": 1, "memory_cost": 256, "parallelism": 1}}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(FAST))
    return path


@pytest.fixture
def env(database_url: str, db: object) -> dict[str, str]:
    return {"DATABASE_URL": database_url}


def stored_hash(db: psycopg2.extensions.connection, username: str) -> str | None:
    with db.cursor() as cur:
        cur.execute("SELECT password_hash FROM users WHERE username = %s", (username,))
        row = cur.fetchone()
    return None if row is None else str(row[0])


def test_adduser_reads_the_password_from_stdin(
    config_file: Path, env: dict[str, str], db: psycopg2.extensions.connection
) -> None:
    result = run_command(["adduser", "alice", "--config", str(config_file)], "wonderland\n", env)
    assert result.returncode == 0, result.stderr
    assert "created user 'alice'" in result.stdout
    password_hash = stored_hash(db, "alice")
    assert password_hash is not None and argon2.PasswordHasher().verify(password_hash, "wonderland")


def test_config_may_come_before_the_command(
    config_file: Path, env: dict[str, str], db: psycopg2.extensions.connection
) -> None:
    result = run_command(["--config", str(config_file), "adduser", "alice"], "wonderland\n", env)
    assert result.returncode == 0, result.stderr
    assert stored_hash(db, "alice") is not None


def test_adduser_of_an_existing_user_fails_and_keeps_the_password(
    config_file: Path, env: dict[str, str], db: psycopg2.extensions.connection
) -> None:
    run_command(["adduser", "alice", "--config", str(config_file)], "first-password\n", env)
    before = stored_hash(db, "alice")
    result = run_command(["adduser", "alice", "--config", str(config_file)], "second-password\n", env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: user 'alice' already exists"
    assert stored_hash(db, "alice") == before


def test_passwd_sets_a_new_password(
    config_file: Path, env: dict[str, str], db: psycopg2.extensions.connection
) -> None:
    run_command(["adduser", "alice", "--config", str(config_file)], "first-password\n", env)
    result = run_command(["passwd", "alice", "--config", str(config_file)], "second-password\n", env)
    assert result.returncode == 0, result.stderr
    password_hash = stored_hash(db, "alice")
    assert password_hash is not None and argon2.PasswordHasher().verify(password_hash, "second-password")


def test_passwd_of_a_missing_user_fails(config_file: Path, env: dict[str, str]) -> None:
    result = run_command(["passwd", "nobody", "--config", str(config_file)], "secret-password\n", env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: no such user 'nobody'"


def test_deluser_deletes_the_user(
    config_file: Path, env: dict[str, str], db: psycopg2.extensions.connection
) -> None:
    run_command(["adduser", "alice", "--config", str(config_file)], "wonderland\n", env)
    result = run_command(["deluser", "alice", "--config", str(config_file)], "", env)
    assert result.returncode == 0, result.stderr
    assert stored_hash(db, "alice") is None


def test_deluser_of_a_missing_user_fails(config_file: Path, env: dict[str, str]) -> None:
    result = run_command(["deluser", "nobody", "--config", str(config_file)], "", env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: no such user 'nobody'"


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        pytest.param("", "error: 'password' must not be empty", id="empty-password"),
        pytest.param("\n", "error: 'password' must not be empty", id="blank-line"),
        pytest.param("x" * 1025 + "\n", "must be at most 1024 characters", id="password-too-long"),
    ],
)
def test_adduser_refuses_a_password_the_login_would_refuse(
    config_file: Path, env: dict[str, str], db: psycopg2.extensions.connection, stdin: str, message: str
) -> None:
    result = run_command(["adduser", "alice", "--config", str(config_file)], stdin, env)
    assert result.returncode == 1
    assert message in result.stderr
    assert stored_hash(db, "alice") is None


def test_adduser_refuses_a_username_the_login_would_refuse(config_file: Path, env: dict[str, str]) -> None:
    result = run_command(["adduser", "x" * 1025, "--config", str(config_file)], "secret-password\n", env)
    assert result.returncode == 1
    assert "'username' must be at most 1024 characters" in result.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(None, "no such config file", id="missing-file"),
        pytest.param("{oops", "not valid JSON", id="bad-json"),
        pytest.param('{"webserver": {"port": "80"}}', "'webserver.port' must be an integer", id="bad-type"),
        pytest.param('{"extra": {}}', "unknown section 'extra'", id="unknown-section"),
    ],
)
@pytest.mark.parametrize("command", ["adduser", "passwd", "deluser", None])
def test_a_bad_config_file_exits_1_with_one_line(
    tmp_path: Path, content: str | None, message: str, command: str | None
) -> None:
    path = tmp_path / "config.json"
    if content is not None:
        path.write_text(content)
    args = ["--config", str(path)] + ([command, "alice"] if command else [])
    result = run_command(args, "secret-password\n")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert message in result.stderr and str(path) in result.stderr


COMPOSED, DECOMPOSED = "Jos\u00e9", "Jose\u0301"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        pytest.param(COMPOSED, DECOMPOSED, id="composed-then-decomposed"),
        pytest.param(DECOMPOSED, COMPOSED, id="decomposed-then-composed"),
    ],
)
def test_a_name_in_its_other_unicode_form_is_the_same_user(
    config_file: Path, env: dict[str, str], db: psycopg2.extensions.connection, first: str, second: str
) -> None:
    assert run_command(["adduser", first, "--config", str(config_file)], "wonderland\n", env).returncode == 0
    again = run_command(["adduser", second, "--config", str(config_file)], "wonderland\n", env)
    assert again.returncode == 1
    assert again.stderr.strip() == f"error: user '{COMPOSED}' already exists"
    changed = run_command(["passwd", second, "--config", str(config_file)], "looking-glass\n", env)
    assert changed.returncode == 0, changed.stderr
    password_hash = stored_hash(db, COMPOSED)
    assert password_hash is not None and argon2.PasswordHasher().verify(password_hash, "looking-glass")
    assert run_command(["deluser", second, "--config", str(config_file)], "", env).returncode == 0
    assert stored_hash(db, COMPOSED) is None


@pytest.mark.parametrize("command", ["adduser", "passwd"])
@pytest.mark.parametrize(
    "password",
    [
        pytest.param("seven77", id="7-characters"),
        pytest.param("e\u0301" * 7, id="7-characters-in-14-code-points"),
    ],
)
def test_a_new_password_under_8_characters_is_refused_with_one_line(
    config_file: Path, env: dict[str, str], db: psycopg2.extensions.connection, command: str, password: str
) -> None:
    if command == "passwd":
        run_command(["adduser", "alice", "--config", str(config_file)], "wonderland\n", env)
    before = stored_hash(db, "alice")
    result = run_command([command, "alice", "--config", str(config_file)], password + "\n", env)
    assert result.returncode == 1
    assert result.stderr == "error: the password must have at least 8 characters\n"
    assert stored_hash(db, "alice") == before


def test_a_password_of_8_characters_is_accepted(config_file: Path, env: dict[str, str]) -> None:
    result = run_command(["adduser", "alice", "--config", str(config_file)], "eight888\n", env)
    assert result.returncode == 0, result.stderr


def test_no_password_hash_reaches_the_postgres_log(
    config_file: Path, private_cluster: PrivateCluster
) -> None:
    env = {"DATABASE_URL": private_cluster.url}
    args = ["--config", str(config_file)]
    assert run_command(["adduser", "alice", *args], "wonderland\n", env).returncode == 0
    # A taken name fails; so do a new user and a new password while an operator holds the table
    # locked against writes (reads go on, so each fails only once its hash is made).
    assert run_command(["adduser", "alice", *args], "wonderland\n", env).returncode == 1
    with psycopg2.connect(private_cluster.url) as locker, locker.cursor() as cur:
        cur.execute("LOCK TABLE users IN EXCLUSIVE MODE")
        blocked = [
            run_command(["adduser", "bob", *args], "wonderland\n", env),
            run_command(["passwd", "alice", *args], "looking-glass\n", env),
        ]
        locker.rollback()
    locker.close()
    for result in blocked:
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and "lock timeout" in result.stderr
    log = (private_cluster.data_dir / "log").read_text()
    assert "lock timeout" in log  # PostgreSQL logged the failure, with its statement
    assert "$argon2" not in log
