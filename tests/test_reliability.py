"""Real failures: PostgreSQL stopped and started under a running server, floods of clients,
slow and silent connections, a signal in the middle of a burst, and what reaches the logs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Iterator
from pathlib import Path

import aiohttp
import psycopg2
import psycopg2.extensions
import pytest
from aiohttp.test_utils import TestServer

import server
from conftest import (
    Client,
    ClientFactory,
    PrivateCluster,
    Start,
    add_user,
    check_consistency,
    count_sessions,
    free_port,
    log_in,
    make_config,
    run_command,
)


async def cluster_client(aiohttp_client: ClientFactory, cluster: PrivateCluster) -> Client:
    config = make_config(cluster.url)
    return await aiohttp_client(await server.WebServer(config).initializer())


async def test_while_postgres_is_down_logins_get_503_and_sessions_keep_working(
    aiohttp_client: ClientFactory, private_cluster: PrivateCluster
) -> None:
    client = await cluster_client(aiohttp_client, private_cluster)
    await add_user(client.app, "alice", "wonderland")
    # Several concurrent logins leave several connections in the pool, all to die with the server.
    first, second, *_ = await asyncio.gather(*[log_in(client, "alice", "wonderland") for _ in range(6)])
    private_cluster.stop()

    started = time.monotonic()
    response = await client.post("/user", json={"username": "alice", "password": "wonderland"})
    assert time.monotonic() - started < 5
    assert response.status == 503
    assert (await response.json())["error"] == "database_unavailable"
    assert int(response.headers["Retry-After"]) >= 1

    assert (await client.get("/user", headers={"Authorization": first})).status == 200
    assert (await client.delete("/user", headers={"Authorization": second})).status == 200
    health = await client.get("/health")
    assert health.status == 503
    assert await health.json() == {"status": "degraded", "database": "unavailable"}


async def test_logins_work_again_when_postgres_returns_without_a_restart(
    aiohttp_client: ClientFactory, private_cluster: PrivateCluster
) -> None:
    client = await cluster_client(aiohttp_client, private_cluster)
    await add_user(client.app, "alice", "wonderland")
    await asyncio.gather(*[log_in(client, "alice", "wonderland") for _ in range(6)])
    private_cluster.stop()
    assert (await client.post("/user", json={"username": "alice", "password": "x"})).status == 503
    private_cluster.start()
    # The very first login after the return succeeds: dead pooled connections are not handed out.
    await log_in(client, "alice", "wonderland")
    assert (await client.get("/health")).status == 200


async def test_failed_attempts_during_an_outage_do_not_count_as_guesses(
    aiohttp_client: ClientFactory, private_cluster: PrivateCluster
) -> None:
    client = await cluster_client(aiohttp_client, private_cluster)
    await add_user(client.app, "alice", "wonderland")
    private_cluster.stop()
    for _ in range(server.LoginConfig().max_failures + 2):
        response = await client.post("/user", json={"username": "alice", "password": "wonderland"})
        assert response.status == 503
    private_cluster.start()
    await log_in(client, "alice", "wonderland")


async def test_a_server_started_before_postgres_waits_for_it(
    tmp_path: Path, private_cluster: PrivateCluster, start_server: Start
) -> None:
    private_cluster.stop()
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}}))
    process = start_server(["--config", str(config)], {"DATABASE_URL": private_cluster.url})
    deadline = time.monotonic() + 20
    while "retrying" not in process.log:
        assert time.monotonic() < deadline and process.process.poll() is None, process.log
        await asyncio.sleep(0.1)
    private_cluster.start()
    process.wait_until_serving(timeout=30)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/health") as response:
        assert response.status == 200
    assert process.stop() == 0


async def test_200_concurrent_clients_lose_and_leak_no_session(client: Client) -> None:
    users = [f"user{number}" for number in range(5)]
    for username in users:
        await add_user(client.app, username, "pw-" + username)

    async def cycle(number: int) -> None:
        username = users[number % len(users)]
        session_id = await log_in(client, username, "pw-" + username)
        whoami = await client.get("/user", headers={"Authorization": session_id})
        assert (await whoami.json())["username"] == username
        logout = await client.delete("/user", headers={"Authorization": session_id})
        assert await logout.json() == {"logged_out": 1}

    store = client.app[server.sessions]
    await asyncio.gather(*[cycle(number) for number in range(200)])
    await check_consistency(store)
    assert await count_sessions(store) == 0


async def test_a_body_that_never_finishes_gets_408_and_others_are_served(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "BODY_READ_TIMEOUT", 0.5)
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b'POST /user HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"user')
    await writer.drain()
    # While that client dawdles, another is served at once.
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200
    answer = await asyncio.wait_for(reader.read(4096), timeout=5)
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"error": "request_timeout"' in answer
    writer.close()
    await writer.wait_closed()


async def test_headers_over_the_limit_are_refused_and_others_are_served(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"GET /user HTTP/1.1\r\nHost: x\r\nAuthorization: " + b"a" * 20000 + b"\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), timeout=5)
    # aiohttp's parser answers this itself (plain text, not our JSON) and closes the connection.
    status = int(answer.split(b" ", 2)[1])
    assert 400 <= status < 500, answer[:100]
    writer.close()
    await writer.wait_closed()
    await log_in(client, "alice", "wonderland")


async def test_silent_connections_do_not_affect_others_and_are_dropped(
    aiohttp_client: ClientFactory, config: server.Config
) -> None:
    app = await server.WebServer(config).initializer()
    # The real server closes idle connections after KEEPALIVE_TIMEOUT; here a shorter one.
    test_server = TestServer(app)
    await test_server.start_server(keepalive_timeout=1.0)
    client = await aiohttp_client(test_server)
    await add_user(app, "alice", "wonderland")
    silent = [await asyncio.open_connection(client.host, client.port) for _ in range(300)]
    session_id = await log_in(client, "alice", "wonderland")
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200
    for reader, _ in silent[:5]:
        assert await asyncio.wait_for(reader.read(), timeout=5) == b""  # closed by the server
    for _, writer in silent:
        writer.close()
    await asyncio.gather(*[writer.wait_closed() for _, writer in silent], return_exceptions=True)


async def test_sigterm_during_a_burst_of_logins_finishes_them_and_exits_0(
    tmp_path: Path, start_server: Start
) -> None:
    port = free_port()
    config = tmp_path / "config.json"
    # Default (costly) hashing on the embedded PostgreSQL: logins are still hashing at the signal.
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}}))
    added = run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    process = start_server(["--config", str(config)], {"DATABASE_URL": ""})
    process.wait_until_serving()
    base = f"http://127.0.0.1:{port}"

    async def login(http: aiohttp.ClientSession) -> int | str:
        try:
            async with http.post(f"{base}/user", json={"username": "alice", "password": "wonderland"}) as r:
                await r.read()
                return r.status
        except aiohttp.ClientConnectionError as exc:
            return type(exc).__name__

    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        tasks = [asyncio.create_task(login(http)) for _ in range(40)]
        await asyncio.sleep(0.3)
        process.process.send_signal(15)
        outcomes = await asyncio.gather(*tasks)
    assert process.process.wait(15) == 0
    completed = [outcome for outcome in outcomes if isinstance(outcome, int)]
    assert completed and all(status == 200 for status in completed), outcomes
    assert "database engine closed" in process.log
    assert "embedded PostgreSQL stopped" in process.log
    assert not (tmp_path / ".pgdata" / "postmaster.pid").exists()
    assert "Traceback" not in process.log


async def test_no_password_or_session_id_reaches_the_logs(
    tmp_path: Path, database_url: str, db: object, start_server: Start
) -> None:
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "webserver": {"host": "127.0.0.1", "port": port, "access_log": True},
                "passwords": {"time_cost": 1, "memory_cost": 256, "parallelism": 1},
            }
        )
    )
    env = {"DATABASE_URL": database_url}
    secret = "correct-horse-battery"
    added = run_command(["adduser", "alice", "--config", str(config)], secret + "\n", env)
    assert added.returncode == 0
    process = start_server(["--config", str(config)], env)
    process.wait_until_serving()
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{base}/user", json={"username": "alice", "password": secret}) as response:
            session_id = (await response.json())["session_id"]
        headers = {"Authorization": f"Bearer {session_id}"}
        async with http.get(f"{base}/user", headers=headers) as response:
            assert response.status == 200
        async with http.delete(f"{base}/user?all=true", headers=headers) as response:
            assert response.status == 200
        async with http.post(f"{base}/user", json={"username": "alice", "password": "wrong-" + secret}) as r:
            assert r.status == 401
        malformed = {"username": "alice", "password": 5, "note": secret}
        async with http.post(f"{base}/user", json=malformed) as r:
            assert r.status == 422
    assert process.stop() == 0
    logs = process.log + added.stdout + added.stderr
    assert "POST /user" in logs and "failed login" in logs  # the logs were captured
    assert secret not in logs
    assert session_id not in logs


def count_backends(database_url: str, application_name: str, waiting: bool = False) -> int:
    """Server processes of one application name (in this database), or only those waiting for a lock."""
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = %s AND (NOT %s OR wait_event_type = 'Lock')",
            (application_name, waiting),
        )
        (count,) = cur.fetchone()
    conn.close()
    return int(count)


@contextlib.contextmanager
def table_locked(database_url: str, table: str) -> Iterator[None]:
    """`LOCK TABLE` held by another client (as an operator's psql would) until the block ends."""
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        conn.rollback()
        conn.close()


@pytest.mark.parametrize(
    ("table", "store"),
    [
        pytest.param("users", "memory", id="users-memory-store"),
        pytest.param("users", "postgres", id="users-postgres-store"),
        pytest.param("sessions", "postgres", id="sessions-postgres-store"),
    ],
)
async def test_a_locked_table_gets_503_in_time_and_never_more_connections_than_the_pool(
    aiohttp_client: ClientFactory, database_url: str, db: object, table: str, store: str
) -> None:
    name = f"lock-test-{uuid.uuid4().hex[:12]}"
    dsn = psycopg2.extensions.make_dsn(database_url, application_name=name)
    # Without the near cache, which would answer the GETs below from memory, table or no table.
    sessions = server.SessionConfig(store=store, cache_size=0)
    config = make_config(dsn, sessions=sessions, login=server.LoginConfig(max_failures=1000))
    client = await aiohttp_client(await server.WebServer(config).initializer())
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    loop = asyncio.get_running_loop()
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, await loop.run_in_executor(None, count_backends, database_url, name))
            await asyncio.sleep(0.05)

    async def timed(request: Awaitable[aiohttp.ClientResponse]) -> tuple[int, str, float]:
        started = time.monotonic()
        response = await request
        return response.status, (await response.json()).get("error", ""), time.monotonic() - started

    credentials = {"username": "alice", "password": "wonderland"}
    requests = [timed(client.post("/user", json=credentials)) for _ in range(20)]
    if table == "sessions":
        requests += [timed(client.get("/user", headers={"Authorization": session_id})) for _ in range(10)]
    watcher = asyncio.create_task(watch())
    with table_locked(database_url, table):
        answers = await asyncio.gather(*requests)
        # Nothing the service gave up on is still waiting in PostgreSQL.
        waiting = await loop.run_in_executor(None, count_backends, database_url, name, True)
    watcher.cancel()
    # Which 503 depends on which query met the lock (or the full pool) first.
    assert {status for status, *_ in answers} == {503}
    assert {code for _, code, _ in answers} <= {"database_unavailable", "session_store_unavailable"}
    assert max(seconds for *_, seconds in answers) < server.DB_REQUEST_BUDGET + 1
    assert waiting == 0
    assert 0 < peak <= server.DB_POOL_SIZE
    # Released: the service is back at once.
    await log_in(client, "alice", "wonderland")
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200


async def test_a_statement_past_its_time_is_ended_by_postgres_and_the_connection_serves_on(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = f"slow-test-{uuid.uuid4().hex[:12]}"
    dsn = psycopg2.extensions.make_dsn(database_url, application_name=name)
    async with server.open_database(server.DatabaseConfig(dsn=dsn)) as engine:
        started = time.monotonic()
        with pytest.raises(server.DatabaseBusy, match="statement timeout"):
            await server.read_scalar(engine, server.CompiledQuery("SELECT pg_sleep(10)"))
        assert time.monotonic() - started < server.DB_OPERATION_TIMEOUT
        assert count_backends(database_url, name) == 1  # the same connection, idle again
        await server.ping(engine)
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
