"""Several processes, one shared store: sessions and login failures cross processes and restarts;
workers share one port; an unreachable store answers 503 and recovers by itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import argon2
import psutil
import psycopg2.extensions
import pytest
import requests

import server
from conftest import (
    REDIS_PREFIX,
    REDIS_URL,
    ROOT,
    ClientFactory,
    Clock,
    PrivateCluster,
    ServerProcess,
    Start,
    add_user,
    free_port,
    log_in,
    make_config,
    redis_or_skip,
    run_command,
)

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}


def shared_config(tmp_path: Path, store: str, port: int, name: str, **webserver: object) -> Path:
    sessions: dict[str, object] = {"store": store}
    if store == "redis":
        sessions["redis_url"], sessions["redis_prefix"] = REDIS_URL, REDIS_PREFIX
    path = tmp_path / f"{name}.json"
    config = {
        "webserver": {"host": "127.0.0.1", "port": port, **webserver},
        "sessions": sessions,
        "passwords": FAST,
    }
    path.write_text(json.dumps(config))
    return path


async def call(method: str, url: str, session_id: str | None = None, **kwargs: object) -> tuple[int, object]:
    headers = {} if session_id is None else {"Authorization": session_id}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, url, headers=headers, **kwargs) as response,
    ):
        return response.status, await response.json()


def start_with_alice(
    tmp_path: Path,
    env: dict[str, str],
    store: str,
    start_server: Start,
    args: tuple[str, ...] = (),
    processes: int = 1,
    **webserver: object,
) -> tuple[ServerProcess, str, Path]:
    """Add user alice, then serve on `store` and wait for `processes` workers; the /user URL."""
    port = free_port()
    config = shared_config(tmp_path, store, port, "config", **webserver)
    added = run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    process = start_server(["--config", str(config), *args], env)
    process.wait_until_serving(processes=processes)
    return process, f"http://127.0.0.1:{port}/user", config


def two_servers(
    tmp_path: Path, database_url: str, store: str, start_server: Start
) -> tuple[Callable[[], list[ServerProcess]], list[str]]:
    """Two servers' configs on one store, and user alice: a way to start both, and their URLs."""
    env = {"DATABASE_URL": database_url}
    ports = [free_port(), free_port()]
    configs = [shared_config(tmp_path, store, port, f"c{port}") for port in ports]
    assert run_command(["adduser", "alice", "--config", str(configs[0])], "wonderland\n", env).returncode == 0

    def start_both() -> list[ServerProcess]:
        processes = [start_server(["--config", str(config)], env) for config in configs]
        for process in processes:
            process.wait_until_serving()
        return processes

    return start_both, [f"http://127.0.0.1:{port}" for port in ports]


async def test_a_session_ended_through_one_process_leaves_every_processs_list(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start
) -> None:
    start_both, (one, other) = two_servers(tmp_path, database_url, shared_store, start_server)
    start_both()
    credentials = {"username": "alice", "password": "wonderland"}
    laptop = (await call("POST", f"{one}/user", json=credentials))[1]["session_id"]  # type: ignore[index]
    phone = (await call("POST", f"{other}/user", json=credentials))[1]["session_id"]  # type: ignore[index]
    status, listing = await call("GET", f"{other}/user/sessions", laptop)
    assert status == 200
    ids = [entry["id"] for entry in listing["sessions"]]  # type: ignore[index]
    assert len(ids) == 2
    assert await call("DELETE", f"{one}/user/sessions/{ids[1]}", laptop) == (200, {"logged_out": 1})
    _, listing = await call("GET", f"{other}/user/sessions", laptop)
    assert [entry["id"] for entry in listing["sessions"]] == ids[:1]  # type: ignore[index]
    # The other process had the phone's session cached: the bus tells it, within a second.
    deadline = time.monotonic() + 1.0
    while (await call("GET", f"{other}/user", phone))[0] != 401:
        assert time.monotonic() < deadline, "the other process still honours an ended session"


async def test_a_session_made_by_one_process_works_in_another_and_survives_restarts(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start
) -> None:
    start_both, (one, other) = two_servers(tmp_path, database_url, shared_store, start_server)
    first, second = start_both()

    status, body = await call("POST", f"{one}/user", json={"username": "alice", "password": "wonderland"})
    assert status == 200
    session_id = body["session_id"]  # type: ignore[index]
    _, keeper = await call("POST", f"{one}/user", json={"username": "alice", "password": "wonderland"})
    assert (await call("GET", f"{other}/user", session_id))[0] == 200
    assert (await call("DELETE", f"{other}/user", session_id))[0] == 200
    assert (await call("GET", f"{one}/user", session_id))[0] == 401

    # Restart both: the other session, made before the restart, is still valid.
    assert first.stop() == 0 and second.stop() == 0
    start_both()
    status, body = await call("GET", f"{other}/user", keeper["session_id"])  # type: ignore[index]
    assert (status, body["username"]) == (200, "alice")  # type: ignore[index]


async def test_failed_logins_through_one_process_count_in_another(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start
) -> None:
    start_both, bases = two_servers(tmp_path, database_url, shared_store, start_server)
    start_both()
    urls = [f"{base}/user" for base in bases]
    for attempt in range(server.LoginConfig().max_failures):
        status, _ = await call("POST", urls[attempt % 2], json={"username": "alice", "password": "guess"})
        assert status == 401
    for url in urls:
        status, body = await call("POST", url, json={"username": "alice", "password": "wonderland"})
        assert (status, body["error"]) == (429, "too_many_attempts")  # type: ignore[index]


async def test_deluser_ends_the_users_sessions_in_a_shared_store(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start
) -> None:
    env = {"DATABASE_URL": database_url}
    _, url, config = start_with_alice(tmp_path, env, shared_store, start_server)
    sessions = [
        (await call("POST", url, json={"username": "alice", "password": "wonderland"}))[1]["session_id"]  # type: ignore[index]
        for _ in range(2)
    ]
    deleted = run_command(["deluser", "alice", "--config", str(config)], "", env)
    assert deleted.returncode == 0, deleted.stderr
    assert "ended 2 session(s)" in deleted.stdout
    for session_id in sessions:
        assert (await call("GET", url, session_id))[0] == 401


async def test_workers_serve_one_port_and_stop_together_on_sigterm(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start
) -> None:
    env = {"DATABASE_URL": database_url}
    process, url, _ = start_with_alice(
        tmp_path, env, shared_store, start_server, args=("--workers", "2"), processes=2
    )
    for _ in range(30):
        status, body = await call("POST", url, json={"username": "alice", "password": "wonderland"})
        assert status == 200
        assert (await call("GET", url, body["session_id"]))[0] == 200  # type: ignore[index]
    workers = psutil.Process(process.process.pid).children()
    assert len(workers) >= 2  # the two workers
    assert process.stop(timeout=15) == 0
    assert "all workers stopped" in process.log
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert alive == []


def test_workers_on_a_port_in_use_fail_in_one_line(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        config = shared_config(tmp_path, "postgres", port, "config")
        result = run_command(["--config", str(config), "--workers", "2"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_several_workers_with_the_memory_store_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"webserver": {"port": free_port()}}))
    result = run_command(["--config", str(config), "--workers", "2"])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: --workers: 'webserver.workers' above 1 needs a shared session store"
        " ('sessions.store': 'postgres' or 'redis')"
    ]


async def test_postgres_store_down_answers_503_and_recovers(
    aiohttp_client: ClientFactory, private_cluster: PrivateCluster, clock: Clock
) -> None:
    config = make_config(private_cluster.url, sessions=server.SessionConfig(store="postgres"))
    client = await aiohttp_client(await server.WebServer(config, clock=clock).initializer())
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    private_cluster.stop()
    started = time.monotonic()
    response = await client.get("/user", headers={"Authorization": session_id})
    assert time.monotonic() - started < 5
    assert response.status == 503
    assert (await response.json())["error"] == "session_store_unavailable"
    assert int(response.headers["Retry-After"]) >= 1
    private_cluster.start()
    # A pooled connection may have died with the server: at most one more 503, then service.
    statuses = [(await client.get("/user", headers={"Authorization": session_id})).status for _ in range(3)]
    assert statuses[-1] == 200 and 500 not in statuses


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[Callable[[str], str]]:
    """A Redis server of the test's own on a free port; control('stop'|'start') returns its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        redis_or_skip()  # fails under REQUIRE_REDIS, skips elsewhere
        pytest.skip("redis-server is not installed")
    port = free_port()
    process: list[subprocess.Popen[bytes]] = []

    def control(action: str) -> str:
        if action == "start":
            process.append(
                subprocess.Popen(
                    [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                    stdout=subprocess.DEVNULL,
                    cwd=tmp_path,
                )
            )
            deadline = time.monotonic() + 10
            while (
                subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout
                != b"PONG\n"
            ):
                assert time.monotonic() < deadline, "private redis did not start"
                time.sleep(0.05)
        else:
            process[-1].terminate()
            process[-1].wait(10)
        return f"redis://127.0.0.1:{port}/0"

    yield control
    for running in process:
        if running.poll() is None:
            running.kill()
            running.wait()


async def test_redis_store_down_answers_503_and_recovers(
    aiohttp_client: ClientFactory, database_url: str, db: object, private_redis: Callable[[str], str]
) -> None:
    url = private_redis("start")
    config = make_config(database_url, sessions=server.SessionConfig(store="redis", redis_url=url))
    client = await aiohttp_client(await server.WebServer(config).initializer())
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    private_redis("stop")
    for method, path in (("GET", "/user"), ("DELETE", "/user"), ("POST", "/user")):
        started = time.monotonic()
        body = {"username": "alice", "password": "wonderland"} if method == "POST" else None
        response = await client.request(method, path, headers={"Authorization": session_id}, json=body)
        assert time.monotonic() - started < 5
        assert response.status == 503, await response.text()
        assert (await response.json())["error"] == "session_store_unavailable"
    private_redis("start")  # empty: Redis here keeps nothing on disk, so log in again
    await log_in(client, "alice", "wonderland")


async def test_workers_on_the_embedded_postgres_share_it_and_stop_it(
    tmp_path: Path, start_server: Start
) -> None:
    env = {"DATABASE_URL": ""}  # the embedded PostgreSQL, beside the config file
    process, url, _ = start_with_alice(tmp_path, env, "postgres", start_server, processes=2, workers=2)
    status, body = await call("POST", url, json={"username": "alice", "password": "wonderland"})
    assert status == 200
    for _ in range(10):  # new connections land on either worker; all of them know the session
        assert (await call("GET", url, body["session_id"]))[0] == 200  # type: ignore[index]
    children = worker_pids(process)
    assert process.stop(timeout=15) == 0
    assert gone(children)  # nothing left behind
    assert "embedded PostgreSQL stopped" in process.log
    assert not (tmp_path / ".pgdata" / "postmaster.pid").exists()


# Workers under gunicorn's arbiter: real processes, real signals.

ALICE = {"username": "alice", "password": "wonderland"}


def worker_pids(process: ServerProcess) -> set[int]:
    return {child.pid for child in psutil.Process(process.process.pid).children()}


def gone(pids: set[int]) -> bool:
    """Every process has exited (a zombie waiting for a parent that is gone counts as exited)."""
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
    return True


def two_workers(
    tmp_path: Path, database_url: str, start_server: Start, store: str
) -> tuple[ServerProcess, str, Path]:
    """User alice, then `python server.py` with two workers on `store`; the /user URL, the config."""
    env = {"DATABASE_URL": database_url}
    return start_with_alice(tmp_path, env, store, start_server, processes=2, workers=2)


async def eventually(condition: Callable[[], bool], seconds: float, what: str, server: ServerProcess) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}\n{server.log}"
        await asyncio.sleep(0.1)


async def test_a_killed_worker_is_replaced_and_requests_keep_succeeding(
    tmp_path: Path, database_url: str, db: object, start_server: Start
) -> None:
    process, url, _ = two_workers(tmp_path, database_url, start_server, "postgres")
    _, body = await call("POST", url, json=ALICE)
    session_id = body["session_id"]  # type: ignore[index]
    before = worker_pids(process)
    os.kill(min(before), signal.SIGKILL)
    statuses = []

    def replaced() -> bool:
        now = worker_pids(process)
        return min(before) not in now and len(now) == 2 and process.log.count("serving on http://") == 3

    deadline = time.monotonic() + 5
    while not replaced():
        assert time.monotonic() < deadline, f"no new worker serving within 5 s:\n{process.log}"
        statuses.append((await call("GET", url, session_id))[0])
        await asyncio.sleep(0.05)
    statuses += [(await call("GET", url, session_id))[0] for _ in range(20)]
    assert set(statuses) == {200}
    assert process.stop(timeout=20) == 0


async def test_sighup_replaces_every_worker_with_the_config_read_again(
    tmp_path: Path,
    database_url: str,
    db: psycopg2.extensions.connection,
    shared_store: str,
    start_server: Start,
) -> None:
    process, url, config = two_workers(tmp_path, database_url, start_server, shared_store)
    _, body = await call("POST", url, json=ALICE)
    session_id = body["session_id"]  # type: ignore[index]
    assert (await call("GET", url, session_id))[0] == 200
    assert "GET /user 200" not in process.log  # no access log yet
    old_workers = worker_pids(process)
    # A login in flight across the reload: verifying alice's stored hash takes half a second or so.
    slow_hash = argon2.PasswordHasher(time_cost=6, memory_cost=65536, parallelism=1).hash("wonderland")
    with db.cursor() as cur:
        cur.execute("UPDATE users SET password_hash = %s WHERE username = 'alice'", (slow_hash,))
    in_flight = asyncio.create_task(call("POST", url, json=ALICE))
    await asyncio.sleep(0.1)  # the request has reached an old worker
    settings = json.loads(config.read_text())
    settings["webserver"]["access_log"] = True
    config.write_text(json.dumps(settings))
    process.process.send_signal(signal.SIGHUP)

    assert (await in_flight)[0] == 200
    await eventually(lambda: not worker_pids(process) & old_workers, 20, "old workers gone", process)
    await eventually(lambda: len(worker_pids(process)) == 2, 20, "two new workers", process)
    assert (await call("GET", url, session_id))[0] == 200  # the session outlived the workers
    await eventually(lambda: "GET /user 200" in process.log, 5, "the new config's access log", process)
    assert process.stop(timeout=20) == 0


async def test_sighup_with_a_broken_config_keeps_serving_with_the_old_one(
    tmp_path: Path, database_url: str, db: object, start_server: Start
) -> None:
    process, url, config = two_workers(tmp_path, database_url, start_server, "postgres")
    config.write_text("{not json")
    process.process.send_signal(signal.SIGHUP)
    await eventually(lambda: process.log.count("serving on http://") == 4, 20, "two new workers", process)
    assert "config not reloaded, the new workers keep the old one" in process.log
    assert (await call("POST", url, json=ALICE))[0] == 200
    assert process.stop(timeout=20) == 0


def _change_host(settings: dict[str, Any]) -> None:
    settings["webserver"]["host"] = "localhost"


def _drop_webserver(settings: dict[str, Any]) -> None:
    del settings["webserver"]


@pytest.mark.parametrize(
    "change",
    [_change_host, _drop_webserver],
    ids=["host-changed", "webserver-section-removed"],
)
async def test_sighup_keeps_the_listening_address_and_workers_given_at_start(
    tmp_path: Path,
    database_url: str,
    db: object,
    start_server: Start,
    change: Callable[[dict[str, Any]], None],
) -> None:
    process, url, config = two_workers(tmp_path, database_url, start_server, "postgres")
    old_workers = worker_pids(process)
    settings = json.loads(config.read_text())
    change(settings)
    config.write_text(json.dumps(settings))
    process.process.send_signal(signal.SIGHUP)
    await eventually(lambda: process.log.count("serving on http://") == 4, 20, "two new workers", process)
    await eventually(lambda: not worker_pids(process) & old_workers, 20, "old workers gone", process)
    assert "the address and workers stay 127.0.0.1:" in process.log
    assert "Connection in use" not in process.log
    assert process.process.poll() is None
    assert len(worker_pids(process)) == 2
    assert (await call("POST", url, json=ALICE))[0] == 200
    assert process.stop(timeout=20) == 0


async def test_killing_the_arbiter_stops_every_worker_and_closes_the_port(
    tmp_path: Path, database_url: str, db: object, start_server: Start
) -> None:
    process, url, _ = two_workers(tmp_path, database_url, start_server, "postgres")
    workers = worker_pids(process)
    assert len(workers) == 2
    process.process.kill()
    process.process.wait()
    await eventually(lambda: gone(workers), 10, "every worker gone", process)
    port = int(url.split(":")[2].split("/")[0])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_an_existing_gunicorn_serves_the_app_factory(tmp_path: Path, database_url: str, db: object) -> None:
    env = {"DATABASE_URL": database_url}
    port = free_port()
    config = shared_config(tmp_path, "postgres", port, "config")
    assert run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env).returncode == 0
    # The README's line, with a config path, a bind address and no control socket (tests run side by side).
    command = [sys.executable, "-m", "gunicorn", f"server:app_factory('{config}')", "--pythonpath", str(ROOT)]
    command += [
        "--worker-class",
        "aiohttp.GunicornWebWorker",
        "--bind",
        f"127.0.0.1:{port}",
        "--no-control-socket",
    ]
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        gunicorn = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "serving on http://" not in log_path.read_text():
            assert time.monotonic() < deadline and gunicorn.poll() is None, log_path.read_text()
            time.sleep(0.1)
        login = requests.post(f"http://127.0.0.1:{port}/user", json=ALICE, timeout=10)
        assert login.status_code == 200
        headers = {"Authorization": login.json()["session_id"]}
        assert requests.get(f"http://127.0.0.1:{port}/user", headers=headers, timeout=10).status_code == 200
    finally:
        gunicorn.terminate()
        assert gunicorn.wait(20) == 0
