"""The near cache in front of the shared stores: hits renew in memory and write the store behind,
within the renewal slack; memory stays bounded; and no revoked session is ever honoured, even by a
process whose bus missed the revocation (its listening connection killed at the worst moment)."""

from __future__ import annotations

import asyncio
import calendar
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg2.extensions
import pytest
from test_scale_out import call, two_servers

import server
from conftest import (
    REDIS_PREFIX,
    REDIS_URL,
    ClientFactory,
    Clock,
    Start,
    account,
    add_user,
    log_in,
    make_config,
    open_store,
    redis_or_skip,
    run_command,
)

IDLE = 1000.0  # seconds: a renewal slack of 10 s
LIMITS = server.SessionConfig(idle_timeout=IDLE, absolute_timeout=10 * IDLE, max_per_user=50)


def kill_buses(db: psycopg2.extensions.connection) -> int:
    """pg_terminate_backend every server process's listening connection to the test database, and
    wait until those backends are gone (what the servers have not noticed yet is theirs to see)."""
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(pg_terminate_backend(pid, 5000)) FROM pg_stat_activity"
            " WHERE application_name = %s AND datname = current_database()",
            (server.BUS_APPLICATION_NAME,),
        )
        return int(cur.fetchone()[0])


def buses(db: psycopg2.extensions.connection) -> int:
    """How many server processes listen on the test database now."""
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s"
            " AND datname = current_database()",
            (server.BUS_APPLICATION_NAME,),
        )
        return int(cur.fetchone()[0])


def stored_deadline(db: psycopg2.extensions.connection) -> float:
    with db.cursor() as cur:
        cur.execute("SELECT expires_at FROM sessions")
        return float(cur.fetchone()[0])


def parse_utc(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


@pytest.fixture(params=["cached-postgres", "cached-redis"])
async def cached(
    request: pytest.FixtureRequest, clock: Clock, database_url: str, db: object
) -> AsyncIterator[server.CachedSessionStore]:
    if "redis" in request.param:
        redis_or_skip()
    async with open_store(request.param, LIMITS, clock, database_url) as store:
        assert isinstance(store, server.CachedSessionStore)
        yield store


@pytest.mark.parametrize(("store", "size", "cached"), [("postgres", None, True), ("redis", 5, True),
    ("postgres", 0, False), ("memory", None, False)])  # fmt: skip
def test_the_shared_stores_are_cached_unless_cache_size_is_zero(
    store: str, size: int | None, cached: bool
) -> None:
    raw: dict[str, object] = {"store": store} | ({} if size is None else {"cache_size": size})
    config = server.parse_config({"sessions": raw}, environ={}).sessions
    assert config.cache_size == (100_000 if size is None else size)
    found = server.open_session_store(config, None, time.time)  # type: ignore[arg-type]
    assert isinstance(found, server.CachedSessionStore) == cached


def test_a_negative_cache_size_is_a_config_error() -> None:
    with pytest.raises(server.ConfigError, match="cache_size"):
        server.parse_config({"sessions": {"cache_size": -1}}, environ={})


async def test_the_cache_holds_at_most_its_size_and_a_session_it_dropped_still_works(
    cached: server.CachedSessionStore,
) -> None:
    small = server.CachedSessionStore(cached.store, LIMITS, cached._clock, size=3)
    made = [(await small.create(account(f"user{n}")))[0] for n in range(5)]
    assert len(small) == 0  # a session is cached at its first use, not at login
    for session_id in made + made:  # beyond 3 the least recently used goes; a miss reads the store
        assert await small.touch(session_id) is not None
        assert len(small) <= 3
    assert len(small) == 3


async def test_a_hit_renews_in_memory_and_writes_the_store_once_per_slack(
    cached: server.CachedSessionStore, clock: Clock
) -> None:
    session_id, _, _ = await cached.create(account("alice"))
    assert cached.slack == 10.0
    assert await cached.touch(session_id) is not None  # read from the store, and cached
    clock.advance(9)
    told = await cached.touch(session_id)
    assert told is not None and told.expires_at == clock.now + IDLE
    stored = await cached.store.sessions_of(account("alice").user_id)
    assert stored[0].expires_at == clock.now - 9 + IDLE  # not written yet: 9 s behind, within 10
    clock.advance(2)  # 11 s since the last write: this use writes
    told = await cached.touch(session_id)
    stored = await cached.store.sessions_of(account("alice").user_id)
    assert told is not None and stored[0].expires_at == told.expires_at == clock.now + IDLE


async def test_a_session_revoked_in_the_store_behind_the_caches_back_ends_within_the_slack(
    cached: server.CachedSessionStore, clock: Clock
) -> None:
    """What the bus does not say (a row deleted by hand) the cache learns at the next write."""
    session_id, _, _ = await cached.create(account("alice"))
    other = server.CachedSessionStore(cached.store, LIMITS, clock, size=10)
    assert await other.touch(session_id) is not None
    assert await cached.revoke(session_id) is not None
    assert await cached.touch(session_id) is None  # its own revocation: forgotten at once
    assert await other.touch(session_id) is not None  # no bus told it: the documented slack
    clock.advance(cached.slack)
    assert await other.touch(session_id) is None


async def test_a_revocation_during_a_miss_leaves_nothing_cached(cached: server.CachedSessionStore) -> None:
    session_id, _, _ = await cached.create(account("alice"))
    cached.clear()
    reading = asyncio.ensure_future(cached.touch(session_id))
    await asyncio.sleep(0)  # the read is on its way to the store
    cached.forget(server.token_hash(session_id))  # as the bus does for another process's logout
    assert await reading is not None
    assert len(cached) == 0


@pytest.fixture
def clean_redis() -> Iterator[None]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{REDIS_PREFIX}*"):
        client.delete(key)
    yield
    client.close()


@pytest.mark.parametrize("store", ["postgres", "redis"])
async def test_a_process_whose_bus_is_down_reads_the_store_instead_of_its_cache(
    aiohttp_client: ClientFactory,
    database_url: str,
    db: psycopg2.extensions.connection,
    clock: Clock,
    store: str,
) -> None:
    if store == "redis":
        redis_or_skip()
    sessions = server.SessionConfig(
        store=store, redis_url=REDIS_URL, redis_prefix=REDIS_PREFIX, idle_timeout=IDLE
    )
    app = await server.WebServer(make_config(database_url, sessions=sessions), clock=clock).initializer()
    client = await aiohttp_client(app)
    await add_user(app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200
    # Gone from the record without a word on the bus: the cache still answers, as it may
    # (within the slack) while the bus is listening...
    assert await app[server.sessions].store.store.revoke(session_id) is not None  # type: ignore[attr-defined]
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200
    # ...and stops the moment the bus is down: the store answers.
    assert kill_buses(db) >= 1
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 401


async def test_get_user_tells_a_deadline_the_store_keeps_within_the_slack(
    aiohttp_client: ClientFactory, database_url: str, db: psycopg2.extensions.connection, clock: Clock
) -> None:
    sessions = server.SessionConfig(store="postgres", idle_timeout=IDLE)
    app = await server.WebServer(make_config(database_url, sessions=sessions), clock=clock).initializer()
    client = await aiohttp_client(app)
    await add_user(app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    for step in (4, 4, 4, 4, 9, 1):
        clock.advance(step)
        response = await client.get("/user", headers={"Authorization": session_id})
        told = parse_utc((await response.json())["expires_at"])
        assert told - 1 <= clock.now + IDLE <= told + 1  # ISO text is in whole seconds
        assert 0 <= clock.now + IDLE - stored_deadline(db) < server.renewal_slack(sessions)


@pytest.mark.parametrize("moment", ["bus-killed-then-logout", "logout-then-bus-killed"])
async def test_logout_and_passwd_are_honoured_by_a_process_whose_bus_was_killed(
    tmp_path: Path,
    database_url: str,
    db: psycopg2.extensions.connection,
    shared_store: str,
    start_server: Start,
    moment: str,
) -> None:
    start_both, (one, other) = two_servers(tmp_path, database_url, shared_store, start_server)
    start_both()
    credentials = {"username": "alice", "password": "wonderland"}
    session_id = (await call("POST", f"{one}/user", json=credentials))[1]["session_id"]  # type: ignore[index]
    keeper = (await call("POST", f"{one}/user", json=credentials))[1]["session_id"]  # type: ignore[index]
    for _ in range(3):  # in the other process's cache now
        assert (await call("GET", f"{other}/user", session_id))[0] == 200
        assert (await call("GET", f"{other}/user", keeper))[0] == 200

    if moment == "bus-killed-then-logout":
        assert kill_buses(db) == 2  # the notification of the logout goes nowhere
        assert (await call("DELETE", f"{one}/user", session_id))[0] == 200
    else:
        assert (await call("DELETE", f"{one}/user", session_id))[0] == 200
        assert kill_buses(db) == 2
    # At once, while the bus reconnects, and after: never the revoked session, always the other.
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        assert (await call("GET", f"{other}/user", session_id))[0] == 401
        assert (await call("GET", f"{other}/user", keeper))[0] == 200
    assert buses(db) == 2  # both are back

    # passwd through the trigger: the other process forgets the session it has cached again.
    config = tmp_path / f"c{other.rsplit(':', 1)[1]}.json"
    env = {"DATABASE_URL": database_url}
    changed = run_command(["passwd", "alice", "--config", str(config)], "looking-glass\n", env)
    assert changed.returncode == 0, changed.stderr
    deadline = time.monotonic() + 1.0  # the contract's second
    while (await call("GET", f"{other}/user", keeper))[0] != 401:
        assert time.monotonic() < deadline, "a cached session outlived passwd by a second"
    assert (await call("GET", f"{one}/user", keeper))[0] == 401
