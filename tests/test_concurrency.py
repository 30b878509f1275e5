"""Sessions under concurrency: each promise is tried as a race, with real server processes on one
database, concurrent clients and the real command line, over many rounds, and each test counts
that the race it is about really happened (a login in flight as the command committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import unicodedata
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import argon2
import psycopg2.extensions
import pytest

import server
from conftest import (
    REDIS_PREFIX,
    REDIS_URL,
    ServerProcess,
    Start,
    free_port,
    redis_or_skip,
    run_command,
    with_clean_redis,
)

# Cheap enough for many rounds, dear enough that logins spend their time verifying.
PASSWORDS = {"time_cost": 1, "memory_cost": 2048, "parallelism": 1}
OLD, NEW = "wonderland", "looking-glass"
NO_THROTTLE = {"max_failures": 1_000_000}  # the races' own logins must not be throttled
LOST_RACE = "lost a race with a revocation"  # what a server logs for such a login


@pytest.fixture(autouse=True)
def empty_tables(db: object) -> None:
    """Every test begins with no users, sessions or events."""


@pytest.fixture(params=["memory", "postgres", "redis"])
def each_store(request: pytest.FixtureRequest, db: object) -> Iterator[str]:
    if request.param == "redis":
        redis_or_skip()
    yield from with_clean_redis(str(request.param))


def write_config(tmp_path: Path, store: str, name: str, **sections: Any) -> tuple[Path, int]:
    port = free_port()
    sessions: dict[str, Any] = {"store": store, **sections.pop("sessions", {})}
    if store == "redis":
        sessions["redis_url"], sessions["redis_prefix"] = REDIS_URL, REDIS_PREFIX
    config = {
        "webserver": {"host": "127.0.0.1", "port": port, **sections.pop("webserver", {})},
        "sessions": sessions,
        "passwords": PASSWORDS,
        **sections,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    return path, port


class Servers:
    """`processes` servers on one database and store, and the command line against them."""

    def __init__(
        self,
        tmp_path: Path,
        database_url: str,
        store: str,
        start_server: Start,
        processes: int = 2,
        **sections: Any,
    ) -> None:
        self.env = {"DATABASE_URL": database_url}
        sections.setdefault("login", NO_THROTTLE)
        made = [write_config(tmp_path, store, f"s{n}", **sections) for n in range(processes)]
        self.config = made[0][0]
        self.urls = [f"http://127.0.0.1:{port}" for _, port in made]
        self.processes: list[ServerProcess] = [
            start_server(["--config", str(path)], self.env) for path, _ in made
        ]
        for process in self.processes:
            process.wait_until_serving()

    def command(self, *args: str, stdin: str = "") -> str:
        done = run_command([*args, "--config", str(self.config)], stdin, self.env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def logged(self, text: str) -> int:
        return sum(process.log.count(text) for process in self.processes)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def log_in(
    http: aiohttp.ClientSession, url: str, password: str = OLD, name: str = "alice"
) -> str | None:
    async with http.post(f"{url}/user", json={"username": name, "password": password}) as response:
        return str((await response.json())["session_id"]) if response.status == 200 else None


async def whoami(http: aiohttp.ClientSession, url: str, session_id: str) -> int:
    async with http.get(f"{url}/user", headers={"Authorization": session_id}) as response:
        return response.status


async def sse_messages(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON of each SSE event as it arrives (heartbeats skipped)."""
    while True:
        line = await response.content.readline()
        if not line:
            return
        if line.startswith(b"data: "):
            yield json.loads(line[6:])


async def next_message(response: aiohttp.ClientResponse, within: float = 3.0) -> dict[str, Any]:
    return await asyncio.wait_for(anext(sse_messages(response)), within)


@contextlib.asynccontextmanager
async def hammering(
    http: aiohttp.ClientSession, urls: list[str], password: str, clients: int = 8
) -> AsyncIterator[list[tuple[str, str, float, float]]]:
    """Clients logging in as alice with `password` without a pause, over every server, until the
    block ends; yields the sessions they got: (id, server, request sent, answer read)."""
    got: list[tuple[str, str, float, float]] = []
    stop = asyncio.Event()

    async def client(number: int) -> None:
        url = urls[number % len(urls)]
        while not stop.is_set():
            sent = time.monotonic()
            session_id = await log_in(http, url, password)
            if session_id is not None:
                got.append((session_id, url, sent, time.monotonic()))

    tasks = [asyncio.create_task(client(number)) for number in range(clients)]
    await asyncio.sleep(0.1)
    try:
        yield got
    finally:
        stop.set()
        await asyncio.gather(*tasks)


# ---------------------------------------------------------------------------
# A login racing passwd or deluser
# ---------------------------------------------------------------------------


async def test_a_login_racing_passwd_never_yields_a_session_honored_after_it(
    tmp_path: Path, database_url: str, each_store: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    servers = Servers(tmp_path, database_url, each_store, start_server)
    servers.command("adduser", "alice", stdin=f"{OLD}\n")
    rounds, in_flight = 12, 0
    passwords = [OLD, NEW]
    for number in range(rounds):
        old, new = passwords[number % 2], passwords[(number + 1) % 2]
        async with hammering(http, servers.urls, old) as got:
            began = time.monotonic()
            await asyncio.to_thread(servers.command, "passwd", "alice", stdin=f"{new}\n")
            returned = time.monotonic()
        # Logins with the old password answered after the command began were in flight across it.
        in_flight += sum(1 for _, _, _, answered in got if answered > began)
        for session_id, _, _, _ in got:
            for url in servers.urls:
                assert await whoami(http, url, session_id) == 401, (
                    f"round {number}: a session outlived passwd"
                )
        assert returned > began
    lost = servers.logged(LOST_RACE)
    assert in_flight >= rounds and lost >= 1, (in_flight, lost)  # the race was run, and met


async def test_a_login_racing_deluser_never_yields_a_session_for_a_new_account_of_the_name(
    tmp_path: Path, database_url: str, each_store: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    servers = Servers(tmp_path, database_url, each_store, start_server)
    servers.command("adduser", "alice", stdin=f"{OLD}\n")
    rounds, in_flight = 8, 0
    for number in range(rounds):
        async with hammering(http, servers.urls, OLD) as got:
            began = time.monotonic()
            await asyncio.to_thread(servers.command, "deluser", "alice")
        servers.command("adduser", "alice", stdin=f"{OLD}\n")  # a new account of the name
        in_flight += sum(1 for _, _, _, answered in got if answered > began)
        for url in servers.urls:
            for session_id, _, _, _ in got:
                assert await whoami(http, url, session_id) == 401, (
                    f"round {number}: a session outlived deluser"
                )
    assert in_flight >= rounds, in_flight


async def test_a_hash_upgrade_racing_passwd_never_brings_the_old_password_back(
    tmp_path: Path,
    database_url: str,
    db: psycopg2.extensions.connection,
    start_server: Start,
    http: aiohttp.ClientSession,
) -> None:
    """alice's hash has older parameters, so her next login re-hashes it; meanwhile passwd."""
    servers = Servers(tmp_path, database_url, "postgres", start_server)
    servers.command("adduser", "alice", stdin=f"{OLD}\n")
    older = argon2.PasswordHasher(time_cost=2, memory_cost=1024, parallelism=1)
    upgraded = 0
    for number in range(10):
        old, new = (OLD, NEW) if number % 2 == 0 else (NEW, OLD)
        with db.cursor() as cur:
            cur.execute("SELECT session_epoch FROM users WHERE username = 'alice'")
            (epoch,) = cur.fetchone()
        command = asyncio.ensure_future(
            asyncio.to_thread(servers.command, "passwd", "alice", stdin=f"{new}\n")
        )
        while not command.done():
            # Older parameters again, as long as passwd has not committed (it raises the epoch).
            with db.cursor() as cur:
                cur.execute(
                    "UPDATE users SET password_hash = %s WHERE username = 'alice' AND session_epoch = %s",
                    (older.hash(old), epoch),
                )
            await asyncio.gather(*(log_in(http, url, old) for url in servers.urls * 2))
        await command
        with db.cursor() as cur:
            cur.execute("SELECT password_hash FROM users WHERE username = 'alice'")
            (stored,) = cur.fetchone()
        upgraded += stored.startswith("$argon2id$v=19$m=2048,")
        assert await log_in(http, servers.urls[0], new) is not None, f"round {number}: the new password fails"
        assert await log_in(http, servers.urls[1], old) is None, f"round {number}: the old password works"
    assert servers.logged("upgraded the password hash") >= 10  # upgrades ran beside every passwd


# ---------------------------------------------------------------------------
# Eviction
# ---------------------------------------------------------------------------


async def test_an_evicted_sessions_streams_end_as_evicted_in_every_process(
    tmp_path: Path, database_url: str, each_store: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    servers = Servers(tmp_path, database_url, each_store, start_server, sessions={"max_per_user": 2})
    servers.command("adduser", "alice", stdin=f"{OLD}\n")
    # With the memory store a session lives in the process that made it: its logins go there.
    holder, other = servers.urls if each_store != "memory" else servers.urls[:1] * 2
    oldest = await log_in(http, holder)
    assert oldest is not None
    async with http.get(f"{holder}/events", headers={"Authorization": oldest}) as stream:
        assert stream.status == 200
        assert await log_in(http, other) is not None
        started = time.monotonic()
        assert await log_in(http, other) is not None  # the third: the oldest goes
        assert await next_message(stream, within=1.0) == {"type": "session_ended", "reason": "evicted"}
        assert time.monotonic() - started < 1.5
        assert (await stream.content.read()).strip() == b""  # the blank line ending the event, then closed
    assert await whoami(http, holder, oldest) == 401


# ---------------------------------------------------------------------------
# Events follow the account
# ---------------------------------------------------------------------------


async def test_an_event_inserted_for_a_name_before_deluser_never_reaches_a_new_account_of_it(
    tmp_path: Path,
    database_url: str,
    db: psycopg2.extensions.connection,
    start_server: Start,
    http: aiohttp.ClientSession,
) -> None:
    servers = Servers(tmp_path, database_url, "memory", start_server, processes=1)
    (url,) = servers.urls
    servers.command("adduser", "alice", stdin=f"{OLD}\n")
    publisher = psycopg2.connect(database_url)
    try:
        with publisher.cursor() as cur:  # a transaction still open while alice is deleted
            cur.execute(
                """INSERT INTO events (username, data) VALUES ('alice', '{"for": "the first alice"}')"""
            )
        # deluser and adduser in SQL: a command would wait for the open transaction (its schema check).
        with db.cursor() as cur:
            cur.execute("DELETE FROM users WHERE username = 'alice'")
            cur.execute(
                "INSERT INTO users (username, password_hash) VALUES ('alice', %s)",
                (argon2.PasswordHasher(**PASSWORDS).hash(OLD),),
            )
        session_id = await log_in(http, url)
        assert session_id is not None
        async with http.get(f"{url}/events", headers={"Authorization": session_id}) as live:
            publisher.commit()
            servers.command("publish", '{"for": "the second alice"}', "--to", "alice")
            assert (await next_message(live))["data"] == {"for": "the second alice"}
        async with http.get(f"{url}/events?last_event_id=0", headers={"Authorization": session_id}) as replay:
            assert (await next_message(replay))["data"] == {"for": "the second alice"}
    finally:
        publisher.close()


# ---------------------------------------------------------------------------
# The throttle
# ---------------------------------------------------------------------------


async def test_concurrent_wrong_passwords_from_one_address_get_no_more_verdicts_than_its_limit(
    tmp_path: Path, database_url: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    servers = Servers(tmp_path, database_url, "memory", start_server, processes=1, login={"max_failures": 5})
    (url,) = servers.urls

    async def guess(number: int) -> int:
        body = {"username": f"user{number}", "password": "not-it-at-all"}
        async with http.post(f"{url}/user", json=body) as response:
            return response.status

    statuses = await asyncio.gather(*(guess(number) for number in range(300)))
    assert statuses.count(401) == 50 and statuses.count(429) == 250, (
        statuses.count(401),
        statuses.count(429),
    )


async def test_concurrent_guesses_at_one_name_over_two_processes_get_no_more_verdicts_than_its_limit(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    servers = Servers(tmp_path, database_url, shared_store, start_server, login={"max_failures": 5})
    servers.command("adduser", "alice", stdin=f"{OLD}\n")

    async def guess(number: int) -> int:
        body = {"username": "alice", "password": f"guess-{number}"}
        async with http.post(f"{servers.urls[number % 2]}/user", json=body) as response:
            return response.status

    statuses = await asyncio.gather(*(guess(number) for number in range(30)))
    assert statuses.count(401) == 5 and statuses.count(429) == 25, statuses


async def test_ipv6_clients_are_counted_per_64(
    tmp_path: Path, database_url: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    servers = Servers(
        tmp_path,
        database_url,
        "memory",
        start_server,
        processes=1,
        login={"max_failures": 1},
        webserver={"trusted_proxies": ["127.0.0.1/32"]},
    )
    (url,) = servers.urls
    statuses = []
    for number in range(12):  # one /64, a new address each time, a new name each time
        headers = {"X-Forwarded-For": f"2001:db8:1:2::{number + 1:x}"}
        body = {"username": f"user{number}", "password": "not-it-at-all"}
        async with http.post(f"{url}/user", json=body, headers=headers) as response:
            statuses.append(response.status)
    assert statuses == [401] * 10 + [429] * 2
    headers = {"X-Forwarded-For": "2001:db8:1:3::1"}  # the next /64 is someone else
    async with http.post(f"{url}/user", json={"username": "x", "password": "y"}, headers=headers) as response:
        assert response.status == 401


# ---------------------------------------------------------------------------
# What a login costs
# ---------------------------------------------------------------------------


def count_verifications(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The cost (passes times KiB) of every argon2 verification in this process from now on."""
    seen: list[int] = []
    verify = argon2.PasswordHasher.verify

    def counting(self: argon2.PasswordHasher, stored: str | bytes, password: str | bytes) -> bool:
        found = argon2.extract_parameters(stored if isinstance(stored, str) else stored.decode())
        seen.append(found.time_cost * found.memory_cost)
        return verify(self, stored, password)

    monkeypatch.setattr(argon2.PasswordHasher, "verify", counting)
    return seen


TODAY = server.PasswordConfig(time_cost=3, memory_cost=1024, parallelism=1, threads=2)


@pytest.mark.parametrize("form", ["NFC", "NFD"])
@pytest.mark.parametrize("stored", ["no user", "current hash", "weaker hash", "no hash"])
async def test_a_wrong_password_costs_one_verification_at_todays_parameters(
    aiohttp_client: Any,
    config: server.Config,
    db: psycopg2.extensions.connection,
    monkeypatch: pytest.MonkeyPatch,
    stored: str,
    form: str,
) -> None:
    app = await server.WebServer(server.dataclasses.replace(config, passwords=TODAY)).initializer()
    client = await aiohttp_client(app)
    weaker = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    kept = {
        "current hash": await app[server.passwords].hash("Jos\u00e9 is right"),
        "weaker hash": weaker.hash("Jos\u00e9 is right"),
        "no hash": "not a hash at all",
    }.get(stored)
    if kept is not None:
        with db.cursor() as cur:
            cur.execute("INSERT INTO users (username, password_hash) VALUES ('alice', %s)", (kept,))
    seen = count_verifications(monkeypatch)
    typed = unicodedata.normalize(form, "Jos\u00e9 is wrong")
    response = await client.post("/user", json={"username": "alice", "password": typed})
    assert response.status == 401
    assert sum(seen) == TODAY.time_cost * TODAY.memory_cost, seen  # one verification's worth


async def test_a_right_password_typed_in_nfd_costs_one_verification_and_logs_in(
    aiohttp_client: Any, config: server.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = await server.WebServer(server.dataclasses.replace(config, passwords=TODAY)).initializer()
    client = await aiohttp_client(app)
    password_hash = await app[server.passwords].hash("Jos\u00e9 is right")
    await server.insert_user(app[server.db_engine], "alice", password_hash)
    seen = count_verifications(monkeypatch)
    typed = unicodedata.normalize("NFD", "Jos\u00e9 is right")
    response = await client.post("/user", json={"username": "alice", "password": typed})
    assert response.status == 200
    assert seen == [TODAY.time_cost * TODAY.memory_cost]


# ---------------------------------------------------------------------------
# Replays and the first message
# ---------------------------------------------------------------------------


def insert_events(database_url: str, count: int, size: int) -> None:
    """`count` events for everyone, each about `size` bytes of JSON, before the server starts."""
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO events (username, data)"
            " SELECT NULL, jsonb_build_object('n', n, 'pad', repeat('x', %s)) FROM generate_series(1, %s) n",
            (size, count),
        )
    conn.close()


async def test_replays_waiting_for_their_clients_leave_the_pool_to_logins_and_health(
    tmp_path: Path, database_url: str, db: object, start_server: Start, http: aiohttp.ClientSession
) -> None:
    insert_events(database_url, 400, 60_000)  # 24 MB: from the table, far beyond what a client buffers
    servers = Servers(tmp_path, database_url, "memory", start_server, processes=1)
    (url,) = servers.urls
    servers.command("adduser", "alice", stdin=f"{OLD}\n")
    session_id = await log_in(http, url)
    assert session_id is not None
    # Twice the pool's size of clients resume from the start and read nothing.
    stalled = [
        await http.get(f"{url}/events?last_event_id=0", headers={"Authorization": session_id})
        for _ in range(2 * server.DB_POOL_SIZE)
    ]
    for stream in stalled:
        assert stream.status == 200
        assert (await next_message(stream))["id"] == 1
    await asyncio.sleep(1)  # they all wait for their clients now
    for _ in range(5):
        async with http.get(f"{url}/health") as health:
            assert health.status == 200, await health.text()
        assert await log_in(http, url) is not None
    for stream in stalled:
        stream.close()


async def test_a_client_that_keeps_reading_is_never_cut_during_a_long_replay(
    tmp_path: Path, database_url: str, db: object, start_server: Start, http: aiohttp.ClientSession
) -> None:
    insert_events(database_url, 60, 60_000)
    servers = Servers(
        tmp_path, database_url, "memory", start_server, processes=1, events={"max_buffer": 65536}
    )
    (url,) = servers.urls
    servers.command("adduser", "alice", stdin=f"{OLD}\n")
    session_id = await log_in(http, url)
    assert session_id is not None
    started, ids = time.monotonic(), []
    # Small reads with pauses: about 3.6 MB at about 250 KB/s, well past REPLAY_STALL in all.
    async with http.get(
        f"{url}/events?last_event_id=0", headers={"Authorization": session_id}, read_bufsize=2**16
    ) as stream:
        while len(ids) < 60:
            line = await stream.content.readline()
            assert line, f"cut after {len(ids)} events"
            if line.startswith(b"id: "):
                ids.append(int(line[4:]))
                await asyncio.sleep(0.24)
    assert ids == list(range(1, 61))
    assert time.monotonic() - started > server.REPLAY_STALL


async def test_a_last_event_id_beyond_the_newest_gets_replay_truncated_then_the_live_events(
    tmp_path: Path, database_url: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    servers = Servers(tmp_path, database_url, "memory", start_server, processes=1)
    (url,) = servers.urls
    servers.command("adduser", "alice", stdin=f"{OLD}\n")
    session_id = await log_in(http, url)
    assert session_id is not None
    servers.command("publish", '"before"')
    async with http.get(f"{url}/events?last_event_id=5000", headers={"Authorization": session_id}) as stream:
        assert await next_message(stream) == {"type": "replay_truncated"}
        servers.command("publish", '"after"')
        assert (await next_message(stream))["data"] == "after"


async def test_the_first_message_limit_holds_with_a_heartbeat_below_it(
    tmp_path: Path, database_url: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    servers = Servers(tmp_path, database_url, "memory", start_server, processes=1, events={"heartbeat": 1})
    (url,) = servers.urls
    started = time.monotonic()
    async with http.ws_connect(f"{url}/events", autoping=True) as websocket:  # answers every ping
        message = await asyncio.wait_for(websocket.receive(), server.FIRST_MESSAGE_TIMEOUT + 5)
    assert message.type is aiohttp.WSMsgType.CLOSE and message.data == server.WS_SESSION_ENDED
    assert server.FIRST_MESSAGE_TIMEOUT - 0.5 < time.monotonic() - started < server.FIRST_MESSAGE_TIMEOUT + 2
