"""GET /metrics: Prometheus' text format, every worker's values summed, read only from the networks
in metrics.allow (a 404 like any other for everyone else), request durations by route pattern."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import server
from conftest import (
    Client,
    ClientFactory,
    Clock,
    ServerProcess,
    Start,
    add_user,
    free_port,
    log_in,
    make_config,
)
from conftest import run_command as run

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape, by name and labels."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(http: aiohttp.ClientSession, base: str) -> Samples:
    async with http.get(f"{base}/metrics") as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/plain")
        return samples(await response.text())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # A new connection per request, so that requests reach both workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


def two_workers(tmp_path: Path, database_url: str, start_server: Start) -> tuple[ServerProcess, str, Path]:
    port = free_port()
    path = tmp_path / "config.json"
    config = {
        "webserver": {"host": "127.0.0.1", "port": port, "workers": 2},
        "sessions": {"store": "postgres"},
        "passwords": FAST,
    }
    path.write_text(json.dumps(config))
    env = {"DATABASE_URL": database_url}
    assert run(["adduser", "alice", "--config", str(path)], "wonderland\n", env).returncode == 0
    process = start_server(["--config", str(path)], env)
    process.wait_until_serving(processes=2)
    return process, f"http://127.0.0.1:{port}", path


def workers_of(process: ServerProcess) -> list[int]:
    workers = [worker.pid for worker in psutil.Process(process.process.pid).children()]
    assert len(workers) == 2
    return workers


@contextlib.contextmanager
def only(process: ServerProcess, worker: int) -> Iterator[None]:
    """Every other worker paused (SIGSTOP): connections made meanwhile reach `worker` alone (how
    the kernel spreads them is chance, and may give one worker all of them)."""
    others = [other for other in workers_of(process) if other != worker]
    for other in others:
        os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            os.kill(other, signal.SIGCONT)


def holding(process: ServerProcess, port: int) -> dict[int, int]:
    """Established connections to the port, by worker pid."""
    held = {}
    for worker in psutil.Process(process.process.pid).children():
        connections = worker.net_connections(kind="tcp")
        held[worker.pid] = sum(1 for c in connections if c.status == "ESTABLISHED" and c.laddr.port == port)
    return held


async def test_metrics_move_by_exactly_what_was_done_summed_over_two_workers(
    tmp_path: Path, database_url: str, db: object, start_server: Start, http: aiohttp.ClientSession
) -> None:
    process, base, config = two_workers(tmp_path, database_url, start_server)
    port = int(base.rsplit(":", 1)[1])
    first, second = workers_of(process)
    before = await scrape(http, base)
    alice = {"username": "alice", "password": "wonderland"}
    sessions = []
    streams: list[aiohttp.ClientResponse] = []
    sockets: list[aiohttp.ClientWebSocketResponse] = []
    # Each worker: 3 logins, 1 or 2 wrong passwords, 2 SSE streams and 1 or 2 WebSockets.
    for worker, failures, websockets in ((first, 1, 1), (second, 2, 2)):
        with only(process, worker):
            for _ in range(3):
                async with http.post(f"{base}/user", json=alice) as response:
                    assert response.status == 200
                    sessions.append((await response.json())["session_id"])
            for _ in range(failures):
                async with http.post(
                    f"{base}/user", json={"username": "alice", "password": "guess"}
                ) as response:
                    assert response.status == 401
            for _ in range(2):
                response = await http.get(f"{base}/events", headers={"Authorization": sessions[-1]})
                assert response.status == 200
                streams.append(response)
            for _ in range(websockets):
                sockets.append(
                    await http.ws_connect(f"{base}/events", headers={"Authorization": sessions[-1]})
                )
        assert holding(process, port)[worker] == 2 + websockets
    opened = {"sse": 4, "websocket": 3}

    await asyncio.sleep(0.5)  # the bus of each worker is listening for these streams
    for number in range(3):
        published = run(
            ["publish", json.dumps({"n": number}), "--config", str(config)], "", env(database_url)
        )
        assert published.returncode == 0, published.stderr
    for stream in streams:
        for _ in range(3):
            while not (await stream.content.readline()).startswith(b"data:"):
                pass
    for socket in sockets:
        for _ in range(3):
            await socket.receive_str()
    closed = {"sse": 2, "websocket": 1}
    for stream in streams[:2]:
        stream.close()
    await sockets[0].close()

    logins = {"success": 6.0, "failure": 3.0, "throttled": 0.0}
    expected = {
        "logins": logins,
        "opened": {"sse": 4.0, "websocket": 3.0},
        "open": {transport: float(opened[transport] - closed[transport]) for transport in opened},
        "delivered": 3.0 * (len(streams) + len(sockets)),
        "published": 3.0,
        "live": 6.0,
    }
    # Each worker answers a scrape of its own, and each must give the sums of both.
    for worker in (first, second):
        deadline = time.monotonic() + 5
        while True:
            with only(process, worker):
                after = await scrape(http, base)
            moved = {
                "logins": {
                    outcome: value(after, "loginservice_logins_total", outcome=outcome)
                    - value(before, "loginservice_logins_total", outcome=outcome)
                    for outcome in logins
                },
                "opened": {
                    transport: value(after, "loginservice_streams_opened_total", transport=transport)
                    - value(before, "loginservice_streams_opened_total", transport=transport)
                    for transport in opened
                },
                "open": {
                    transport: value(after, "loginservice_streams_open", transport=transport)
                    for transport in opened
                },
                "delivered": value(after, "loginservice_events_delivered_total")
                - value(before, "loginservice_events_delivered_total"),
                "published": value(after, "loginservice_events_published_total")
                - value(before, "loginservice_events_published_total"),
                "live": value(after, "loginservice_sessions_live"),
            }
            if moved == expected:
                break
            assert time.monotonic() < deadline, f"worker {worker}: {moved} != {expected}"
            await asyncio.sleep(0.2)
    for stream in streams[2:]:
        stream.close()
    for socket in sockets[1:]:
        await socket.close()


def env(database_url: str) -> dict[str, str]:
    return {"DATABASE_URL": database_url}


async def test_a_dead_workers_open_streams_leave_the_sum(
    tmp_path: Path, database_url: str, db: object, start_server: Start, http: aiohttp.ClientSession
) -> None:
    process, base, _ = two_workers(tmp_path, database_url, start_server)
    first, second = workers_of(process)
    async with http.post(f"{base}/user", json={"username": "alice", "password": "wonderland"}) as response:
        session_id = (await response.json())["session_id"]
    streams = []
    for worker, count in ((first, 2), (second, 3)):
        with only(process, worker):
            for _ in range(count):
                streams.append(await http.get(f"{base}/events", headers={"Authorization": session_id}))
    assert value(await scrape(http, base), "loginservice_streams_open", transport="sse") == 5
    psutil.Process(first).kill()
    deadline = time.monotonic() + 10
    while True:
        workers = [worker.pid for worker in psutil.Process(process.process.pid).children()]
        if first not in workers and len(workers) == 2:
            found = await scrape(http, base)
            if value(found, "loginservice_streams_open", transport="sse") == 3:
                break
        assert time.monotonic() < deadline, f"the killed worker's streams still count:\n{process.log}"
        await asyncio.sleep(0.2)
    for stream in streams:
        stream.close()


@pytest.fixture
async def metrics_client(
    aiohttp_client: ClientFactory, database_url: str, db: object, clock: Clock, request: pytest.FixtureRequest
) -> Client:
    allow, trusted = getattr(request, "param", (None, ()))
    sections: dict[str, object] = {
        "webserver": server.WebServerConfig(host="127.0.0.1", port=0, trusted_proxies=trusted)
    }
    if allow is not None:
        sections["metrics"] = server.MetricsConfig(allow=allow)
    app = await server.WebServer(make_config(database_url, **sections), clock=clock).initializer()
    return await aiohttp_client(app)


def nets(*texts: str) -> tuple[server.IPNetwork, ...]:
    return tuple(server.ipaddress.ip_network(text) for text in texts)


async def test_metrics_are_served_to_the_loopback_by_default(metrics_client: Client) -> None:
    response = await metrics_client.get("/metrics")
    assert response.status == 200
    assert "loginservice_logins_total" in await response.text()


@pytest.mark.parametrize("metrics_client", [(nets("192.0.2.0/24"), ())], indirect=True)
async def test_metrics_outside_the_allowed_networks_are_the_usual_json_404(metrics_client: Client) -> None:
    response = await metrics_client.get("/metrics")
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"
    nowhere = await metrics_client.get("/no/such/path")
    assert (await response.json()) == (await nowhere.json())
    # Without a trusted proxy, X-Forwarded-For is the client's say-so and changes nothing.
    forged = await metrics_client.get("/metrics", headers={"X-Forwarded-For": "192.0.2.7"})
    assert forged.status == 404


@pytest.mark.parametrize("metrics_client", [(nets("192.0.2.0/24"), nets("127.0.0.1/32"))], indirect=True)
async def test_metrics_behind_a_trusted_proxy_go_by_the_forwarded_client(metrics_client: Client) -> None:
    allowed = await metrics_client.get("/metrics", headers={"X-Forwarded-For": "192.0.2.7"})
    assert allowed.status == 200
    refused = await metrics_client.get("/metrics", headers={"X-Forwarded-For": "198.51.100.1"})
    assert refused.status == 404


async def test_logins_count_by_outcome_and_requests_by_route_pattern(metrics_client: Client) -> None:
    app = metrics_client.app
    assert app is not None
    await add_user(app, "alice", "wonderland")
    session_id = await log_in(metrics_client, "alice", "wonderland")
    for _ in range(server.LoginConfig().max_failures + 2):
        await metrics_client.post("/user", json={"username": "bob", "password": "guess"})
    for public_id in ("abc", "def"):
        response = await metrics_client.delete(
            f"/user/sessions/{public_id}", headers={"Authorization": session_id}
        )
        assert response.status == 404
    await metrics_client.get("/no/such/path/1")
    await metrics_client.get("/no/such/path/2")
    found = samples(await (await metrics_client.get("/metrics")).text())
    logins = {
        o: value(found, "loginservice_logins_total", outcome=o) for o in ("success", "failure", "throttled")
    }
    assert logins == {"success": 1, "failure": server.LoginConfig().max_failures, "throttled": 2}
    durations = "loginservice_http_request_duration_seconds_count"
    assert value(found, durations, route="/user/sessions/{id}", method="DELETE", status="404") == 2
    assert value(found, durations, route="unmatched", method="GET", status="404") == 2
    assert value(found, durations, route="/user", method="POST", status="200") == 1
    routes = {labels for name, labels in found if name == durations}
    assert not any(dict(labels)["route"].startswith("/no/") for labels in routes)
    assert value(found, "loginservice_sessions_live") == 1
