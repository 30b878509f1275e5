"""The server as a user starts it: `python server.py --config FILE`, used over HTTP, stopped by a signal."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
from pathlib import Path

import aiohttp
import psycopg2.extensions
import pytest

import server as server_py
from conftest import PYTHON, SERVER, Start, free_port, run_command

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}


async def login_cycle(base: str, username: str, password: str) -> None:
    """Log in, ask who I am, log out, and see the same logout refused."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/user", json={"username": username, "password": password}) as response:
            assert response.status == 200
            session_id = (await response.json())["session_id"]
        headers = {"Authorization": session_id}
        async with http.get(f"{base}/user", headers=headers) as response:
            assert (await response.json())["username"] == username
        async with http.delete(f"{base}/user", headers=headers) as response:
            assert response.status == 200
        async with http.delete(f"{base}/user", headers=headers) as response:
            assert response.status == 401


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])  # a hangup: a terminal closed
async def test_server_serves_then_exits_0_on_a_signal(
    tmp_path: Path, database_url: str, db: object, start_server: Start, sig: int
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"passwords": FAST}))
    env = {"DATABASE_URL": database_url}
    assert run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env).returncode == 0
    port = free_port()
    server = start_server(["--config", str(config), "--host", "127.0.0.1", "--port", str(port)], env)
    server.wait_until_serving()
    assert f"serving on http://127.0.0.1:{port}" in server.log
    await login_cycle(f"http://127.0.0.1:{port}", "alice", "wonderland")
    assert server.stop(sig) == 0
    assert "Traceback" not in server.log
    assert "shutting down" in server.log and "database engine closed" in server.log


def test_the_listen_queue_is_the_one_server_py_asks_for(
    tmp_path: Path, database_url: str, db: object, start_server: Start
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"passwords": FAST}))
    port = free_port()
    server = start_server(
        ["--config", str(config), "--host", "127.0.0.1", "--port", str(port)], {"DATABASE_URL": database_url}
    )
    server.wait_until_serving()
    listing = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True)
    send_queues = {int(line.split()[2]) for line in listing.stdout.splitlines()}
    assert send_queues == {min(server_py.LISTEN_BACKLOG, somaxconn())}, listing.stdout
    assert server.stop() == 0


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())


@pytest.mark.parametrize("reader", ["head -n 1", "head -c 0"])
def test_a_listing_piped_into_a_reader_that_stops_early_is_no_traceback(
    tmp_path: Path, database_url: str, db: psycopg2.extensions.connection, reader: str
) -> None:
    with db.cursor() as cur:
        cur.execute("TRUNCATE session_journal")
        cur.execute(
            "INSERT INTO session_journal (kind, username, user_id, session, address, user_agent, reason)"
            " SELECT 'login', 'alice', 1, md5(n::text), '127.0.0.1', 'test', NULL"
            " FROM generate_series(1, 3000) n"
        )
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"passwords": FAST}))
    command = f"{shlex.quote(PYTHON)} {shlex.quote(str(SERVER))} journal --config {shlex.quote(str(config))}"
    piped = subprocess.run(
        ["bash", "-c", f"{command} | {reader}"],
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": database_url},
        timeout=60,
    )
    assert piped.stderr == "", piped.stderr
    assert piped.stdout.count("\n") == (1 if reader == "head -n 1" else 0)


async def test_a_config_written_for_the_seed_article_works_unchanged(
    tmp_path: Path, database_url: str, db: object, start_server: Start
) -> None:
    params = psycopg2.extensions.parse_dsn(database_url)
    port = free_port()
    seed_config = {
        "webserver": {"host": "127.0.0.1", "port": port},
        "db": {
            "user": params["user"],
            "password": params.get("password", ""),
            "host": params["host"],
            "database": params["dbname"],
        },
    }
    if "port" in params:  # the seed has no port key; the contract allows one
        seed_config["db"]["port"] = int(params["port"])
    config = tmp_path / "config.json"
    config.write_text(json.dumps(seed_config))
    assert run_command(["adduser", "alice", "--config", str(config)], "wonderland\n").returncode == 0
    server = start_server(["--config", str(config)])
    server.wait_until_serving()
    await login_cycle(f"http://127.0.0.1:{port}", "alice", "wonderland")
    assert server.stop() == 0


async def test_embedded_postgres_is_started_beside_the_config_and_stopped_at_exit(
    tmp_path: Path, start_server: Start
) -> None:
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST}))
    env = {"DATABASE_URL": ""}  # make sure nothing points the server elsewhere
    added = run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    pgdata = tmp_path / ".pgdata"
    assert (pgdata / "PG_VERSION").exists()
    assert not (pgdata / "postmaster.pid").exists(), "adduser left PostgreSQL running"

    server = start_server(["--config", str(config)], env)
    server.wait_until_serving()
    assert (pgdata / "postmaster.pid").exists()
    await login_cycle(f"http://127.0.0.1:{port}", "alice", "wonderland")
    # A user added while the server runs shares its PostgreSQL, and leaves it running.
    added = run_command(["adduser", "bob", "--config", str(config)], "can-we-fix-it\n", env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    await login_cycle(f"http://127.0.0.1:{port}", "bob", "can-we-fix-it")
    assert server.stop() == 0
    assert not (pgdata / "postmaster.pid").exists(), "the embedded PostgreSQL is still running"


def test_startup_gives_up_when_the_database_never_answers(tmp_path: Path, start_server: Start) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": free_port()}}))
    # Nothing listens on this port; the server retries, logs each wait, and gives up with exit 1.
    env = {"DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/none"}
    server = start_server(["--config", str(config)], env)
    assert server.process.wait(60) == 1
    log = server.log
    assert "retrying" in log
    assert log.strip().splitlines()[-1].startswith("error: PostgreSQL unreachable after 30 s")
