"""Start-up as a new user meets it: every failure is one line on stderr and exit 1, quickly, and
never after the embedded PostgreSQL was started for nothing; what it serves and uses is logged."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psycopg2.extensions
import pytest

from conftest import PYTHON, SERVER, Start, free_port, run_command

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}
QUICKLY = 15  # seconds: generous for a loaded machine, far below the 30 s of retrying


def assert_one_line_failure(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 1, and stderr is one line naming the problem (no traceback, no usage block)."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@pytest.fixture
def embedded_config(tmp_path: Path) -> Path:
    """A config on the embedded PostgreSQL, so a test can see whether it was started (.pgdata)."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": free_port()}, "passwords": FAST}))
    return path


NO_DATABASE_URL = {"DATABASE_URL": ""}


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        pytest.param(["--port", "70000"], ["--port 70000", "from 0 to 65535"], id="port-too-large"),
        pytest.param(["--port", "-1"], ["--port -1", "from 0 to 65535"], id="port-negative"),
        pytest.param(["--port", "http"], ["--port http", "integer"], id="port-not-a-number"),
        pytest.param(["--workers", "0"], ["--workers 0", "at least 1"], id="no-workers"),
        pytest.param(["--workers", "9" * 30], ["--workers 999", "from 1 to 2147483647"], id="workers-huge"),
        pytest.param(["--workers", "2"], ["--workers", "shared session store"], id="workers-on-memory"),
        pytest.param(
            ["--host", "no-such-host.invalid"], ["no-such-host.invalid", "does not resolve"], id="host"
        ),
    ],
)
def test_a_bad_override_is_one_line_and_nothing_is_started(
    embedded_config: Path, args: list[str], fragments: list[str]
) -> None:
    started = time.monotonic()
    result = run_command(["--config", str(embedded_config), *args], env=NO_DATABASE_URL)
    assert_one_line_failure(result, *fragments)
    assert time.monotonic() - started < QUICKLY
    assert not (embedded_config.parent / ".pgdata").exists(), "PostgreSQL was started before the check"


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_port_in_use_is_one_line_before_postgres_starts(embedded_config: Path, busy_port: int) -> None:
    args = ["--config", str(embedded_config), "--host", "127.0.0.1", "--port", str(busy_port)]
    result = run_command(args, env=NO_DATABASE_URL)
    assert_one_line_failure(result, f"127.0.0.1:{busy_port}", "already in use")
    assert not (embedded_config.parent / ".pgdata").exists(), "PostgreSQL was started for nothing"


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["--port", "9000", "adduser", "bob"], id="before-the-command"),
        pytest.param(["adduser", "bob", "--port", "9000"], id="after-the-command"),
        pytest.param(["migrate", "--workers", "2"], id="migrate-workers"),
        pytest.param(["deluser", "bob", "--host", "0.0.0.0"], id="deluser-host"),
    ],
)
def test_serve_options_given_to_a_command_are_refused_with_one_line(args: list[str]) -> None:
    result = run_command(args, "secret-password\n")
    option = next(arg for arg in args if arg.startswith("--"))
    assert_one_line_failure(result, option, "serving")


def test_help_says_that_no_command_means_serve() -> None:
    result = run_command(["--help"])
    assert result.returncode == 0
    usage = result.stdout.splitlines()[0]
    assert "[COMMAND ...]" in usage  # optional, not required
    assert "Without a COMMAND it serves" in " ".join(result.stdout.split())
    for command in ("adduser", "passwd", "deluser", "migrate"):
        assert command in result.stdout


def test_without_a_config_file_the_message_says_how_to_name_one(tmp_path: Path) -> None:
    result = run_command([], cwd=tmp_path)  # `cd /tmp && python /path/to/server.py`
    assert_one_line_failure(result, "config.json: no such config file", str(tmp_path), "--config FILE")


def with_dbname(url: str, **changes: str) -> str:
    return str(psycopg2.extensions.make_dsn(url, **changes))


def test_a_database_that_does_not_exist_stops_start_up_at_once(tmp_path: Path, database_url: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": free_port()}}))
    started = time.monotonic()
    result = run_command(
        ["--config", str(config)], env={"DATABASE_URL": with_dbname(database_url, dbname="nope")}
    )
    assert time.monotonic() - started < QUICKLY
    assert_one_line_failure(result, "error: database 'nope'", "does not exist")


def test_an_unknown_role_stops_start_up_at_once(tmp_path: Path, database_url: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": free_port()}}))
    started = time.monotonic()
    url = with_dbname(database_url, user="no_such_role", password="hunter2-secret")
    result = run_command(["--config", str(config)], env={"DATABASE_URL": url})
    assert time.monotonic() - started < QUICKLY
    line = assert_one_line_failure(result, 'role "no_such_role" does not exist')
    assert "hunter2-secret" not in line


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("mysql://app:hunter2-secret@localhost/app", id="other-database"),
        pytest.param("postgresql://app:hunter2-secret@localhost/app?sslmode=maybe=1&x", id="bad-query"),
        pytest.param("postgresql://app:hunter2-secret@127.0.0.1:99999/app", id="port-out-of-range"),
        pytest.param("postgresql://app:hunter2-secret@127.0.0.1:5432,h:0/app", id="port-in-a-list"),
        pytest.param("postgresql://app:hunter2-secret@127.0.0.1/app?sslmode=bogus", id="bad-sslmode"),
        pytest.param("postgresql://app:hunter2-secret@127.0.0.1/app?target_session_attrs=x", id="bad-option"),
    ],
)
def test_a_bad_database_url_is_one_line_without_the_password(tmp_path: Path, url: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": free_port()}}))
    started = time.monotonic()
    result = run_command(["--config", str(config)], env={"DATABASE_URL": url})
    line = assert_one_line_failure(result, "DATABASE_URL")
    assert "hunter2-secret" not in line
    assert time.monotonic() - started < QUICKLY


def test_a_connection_option_libpq_refuses_stops_start_up_at_once(tmp_path: Path, database_url: str) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": free_port()}}))
    started = time.monotonic()
    # An option libpq checks whatever the transport (a TCP-only one is not checked on a Unix socket).
    url = with_dbname(database_url, require_auth="bogus")
    result = run_command(["--config", str(config)], env={"DATABASE_URL": url})
    assert time.monotonic() - started < QUICKLY
    assert_one_line_failure(result, "require_auth")


def test_a_bad_redis_url_is_one_line_before_postgres_starts(embedded_config: Path) -> None:
    settings = json.loads(embedded_config.read_text())
    settings["sessions"] = {"store": "redis", "redis_url": "nonsense"}
    embedded_config.write_text(json.dumps(settings))
    started = time.monotonic()
    result = run_command(["--config", str(embedded_config)], env=NO_DATABASE_URL)
    assert_one_line_failure(result, "'sessions.redis_url' must be a Redis URL")
    assert time.monotonic() - started < QUICKLY
    assert not (embedded_config.parent / ".pgdata").exists(), "PostgreSQL was started before the check"


async def test_a_sqlalchemy_style_database_url_is_accepted(
    tmp_path: Path, database_url: str, db: object, start_server: Start
) -> None:
    params = psycopg2.extensions.parse_dsn(database_url)
    host = params["host"]
    address = host if not host.startswith("/") else ""
    query = f"?host={host}" if host.startswith("/") else ""
    port = f":{params['port']}" if "port" in params and address else ""
    url = f"postgresql+psycopg2://{params['user']}@{address}{port}/{params['dbname']}{query}"
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"passwords": FAST}))
    server = start_server(
        ["--config", str(config), "--host", "127.0.0.1", "--port", "0"], {"DATABASE_URL": url}
    )
    server.wait_until_serving()
    assert server.stop() == 0


async def test_port_0_logs_the_port_really_bound_and_the_database_without_its_password(
    tmp_path: Path, database_url: str, db: object, start_server: Start
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"passwords": FAST}))
    # Both test databases trust local connections, so any password gets in: it must not be logged.
    url = with_dbname(database_url, password="hunter2-secret")
    server = start_server(
        ["--config", str(config), "--host", "127.0.0.1", "--port", "0"], {"DATABASE_URL": url}
    )
    server.wait_until_serving()
    line = next(line for line in server.log.splitlines() if "serving on http://" in line)
    port = int(line.rsplit(":", 1)[1])
    assert port != 0
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/health") as response:
        assert response.status == 200
    dbname = psycopg2.extensions.parse_dsn(database_url)["dbname"]
    assert f"using database '{dbname}' on " in server.log
    assert server.stop() == 0
    assert "hunter2-secret" not in server.log


def test_hashing_parameters_this_machine_cannot_run_are_one_line_and_postgres_is_stopped(
    tmp_path: Path,
) -> None:
    config = tmp_path / "config.json"
    huge = {"time_cost": 1, "memory_cost": 2**31 - 1, "parallelism": 1}  # 2 TiB
    config.write_text(
        json.dumps({"webserver": {"host": "127.0.0.1", "port": free_port()}, "passwords": huge})
    )
    result = run_command(["--config", str(config)], env=NO_DATABASE_URL)
    assert_fails_in_one_error_line(result, "'passwords'", "cannot be used on this machine")
    assert not (tmp_path / ".pgdata" / "postmaster.pid").exists(), "the embedded PostgreSQL was left running"


@pytest.mark.parametrize("data_dir", ["/proc/no-such-place", "/proc/no-such-place/pg"])
@pytest.mark.parametrize("command", [[], ["who"]], ids=["serving", "a-command"])
def test_a_data_directory_that_cannot_be_made_is_one_line(
    tmp_path: Path, data_dir: str, command: list[str]
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"db": {"data_dir": data_dir}, "passwords": FAST}))
    result = run_command(["--config", str(config), *command], env=NO_DATABASE_URL)
    assert_fails_in_one_error_line(result, "/proc/no-such-place", "PostgreSQL")
    assert "could not write the output" not in result.stderr  # it was start-up that failed, not stdout


def assert_fails_in_one_error_line(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit 1 and one error line naming the problem after the server's log lines; no traceback."""
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(fragment in errors[0] for fragment in fragments), result.stderr
    assert "Traceback" not in result.stderr


def test_a_command_whose_output_cannot_be_written_says_so_in_one_line(embedded_config: Path) -> None:
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [PYTHON, SERVER, "adduser", "dave", "--config", str(embedded_config)],
            input="wonderland-password\n",
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **NO_DATABASE_URL},
            timeout=120,
        )
    assert_one_line_failure(result, "could not write the output")
