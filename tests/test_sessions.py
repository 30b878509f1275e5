"""The session store contract, run against every store: memory, PostgreSQL and Redis, and the
two shared ones behind the near cache.

Several sessions per user, idle and absolute timeouts, max_per_user, revoke_all; the shared
stores keep only a SHA-256 of each session id."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import psycopg2.extensions
import pytest

import server
from conftest import Clock, account, check_consistency, count_sessions, open_store

LIMITS = server.SessionConfig(idle_timeout=100, absolute_timeout=1000, max_per_user=3)


@pytest.fixture
async def sessions(
    any_store_kind: str, clock: Clock, database_url: str
) -> AsyncIterator[server.SessionStore]:
    async with open_store(any_store_kind, LIMITS, clock, database_url) as store:
        yield store
        await check_consistency(store)


async def test_a_user_can_hold_several_sessions(sessions: server.SessionStore) -> None:
    first, _, _ = await sessions.create(account("alice"))
    second, _, _ = await sessions.create(account("alice"))
    assert first != second
    assert (await sessions.touch(first)) is not None
    assert (await sessions.touch(second)) is not None


async def test_touch_returns_the_session(sessions: server.SessionStore, clock: Clock) -> None:
    session_id, created, _ = await sessions.create(account("alice"))
    clock.advance(10)
    touched = await sessions.touch(session_id)
    assert touched is not None
    assert touched.username == "alice"
    assert touched.created_at == created.created_at
    assert touched.last_seen == clock.now
    assert touched.expires_at == clock.now + LIMITS.idle_timeout


async def test_revoking_one_session_leaves_the_others(sessions: server.SessionStore) -> None:
    first, _, _ = await sessions.create(account("alice"))
    second, _, _ = await sessions.create(account("alice"))
    revoked = await sessions.revoke(first)
    assert revoked is not None and revoked.username == "alice"
    assert (await sessions.touch(first)) is None
    assert (await sessions.touch(second)) is not None


async def test_revoking_an_unknown_session_changes_nothing(sessions: server.SessionStore) -> None:
    await sessions.create(account("alice"))
    assert (await sessions.revoke("nope")) is None
    assert await count_sessions(sessions) == 1


async def test_revoke_all_counts_only_live_sessions(sessions: server.SessionStore, clock: Clock) -> None:
    await sessions.create(account("alice"))
    clock.advance(LIMITS.idle_timeout)
    await sessions.create(account("alice"))
    bob, _, _ = await sessions.create(account("bob"))
    assert await sessions.revoke_all(account("alice").user_id) == 1
    assert await sessions.revoke_all(account("nobody").user_id) == 0
    assert (await sessions.touch(bob)) is not None


async def test_the_oldest_session_goes_beyond_max_per_user(sessions: server.SessionStore) -> None:
    ids = [(await sessions.create(account("alice")))[0] for _ in range(LIMITS.max_per_user + 1)]
    assert (await sessions.touch(ids[0])) is None
    for session_id in ids[1:]:
        assert (await sessions.touch(session_id)) is not None
    assert await count_sessions(sessions) == LIMITS.max_per_user


async def test_making_room_drops_expired_sessions_before_a_live_one(
    sessions: server.SessionStore, clock: Clock
) -> None:
    ids = [(await sessions.create(account("alice")))[0] for _ in range(LIMITS.max_per_user)]
    clock.advance(LIMITS.idle_timeout - 1)
    await sessions.touch(ids[0])  # the oldest is in use; the others will expire
    clock.advance(2)
    await sessions.create(account("alice"))
    assert (await sessions.touch(ids[0])) is not None


async def test_a_session_expires_exactly_at_its_idle_deadline(
    sessions: server.SessionStore, clock: Clock
) -> None:
    session_id, session, _ = await sessions.create(account("alice"))
    assert session.expires_at == clock.now + LIMITS.idle_timeout
    clock.advance(LIMITS.idle_timeout - 0.001)
    assert (await sessions.touch(session_id)) is not None
    clock.advance(LIMITS.idle_timeout)
    assert (await sessions.touch(session_id)) is None


async def test_touch_never_extends_past_the_absolute_deadline(
    sessions: server.SessionStore, clock: Clock
) -> None:
    session_id, session, _ = await sessions.create(account("alice"))
    absolute = session.created_at + LIMITS.absolute_timeout
    while clock.now + LIMITS.idle_timeout / 2 < absolute:
        clock.advance(LIMITS.idle_timeout / 2)
        touched = await sessions.touch(session_id)
        assert touched is not None and touched.expires_at <= absolute
    clock.now = absolute
    assert (await sessions.touch(session_id)) is None


async def test_sweep_removes_expired_sessions_and_keeps_live_ones(
    sessions: server.SessionStore, clock: Clock
) -> None:
    for name in ("alice", "bob", "carol"):
        await sessions.create(account(name))
    clock.advance(LIMITS.idle_timeout / 2)
    live, _, _ = await sessions.create(account("alice"))
    clock.advance(LIMITS.idle_timeout / 2)
    assert await sessions.sweep() == 3
    assert await count_sessions(sessions) == 1
    assert (await sessions.touch(live)) is not None


async def test_an_expired_session_cannot_be_revoked(sessions: server.SessionStore, clock: Clock) -> None:
    session_id, _, _ = await sessions.create(account("alice"))
    clock.advance(LIMITS.idle_timeout)
    assert (await sessions.revoke(session_id)) is None


async def test_sessions_of_lists_the_users_live_sessions_oldest_first(
    sessions: server.SessionStore, clock: Clock
) -> None:
    await sessions.create(account("alice"), server.Device("192.0.2.1", "expired"))
    clock.advance(LIMITS.idle_timeout)
    await sessions.create(account("alice"), server.Device("192.0.2.2", "first"))
    clock.advance(1)
    _, second, _ = await sessions.create(account("alice"), server.Device("2001:db8::1", "second"))
    await sessions.create(account("bob"))
    found = await sessions.sessions_of(account("alice").user_id)
    assert [(s.address, s.user_agent) for s in found] == [("192.0.2.2", "first"), ("2001:db8::1", "second")]
    assert found[1] == second
    assert await sessions.sessions_of(account("nobody").user_id) == []


async def test_touch_and_revoke_return_the_public_id_and_device(sessions: server.SessionStore) -> None:
    session_id, created, _ = await sessions.create(account("alice"), server.Device("192.0.2.1", "Agent/1"))
    assert re.fullmatch(r"[0-9a-f]{32}", created.public_id)  # 128 bits in hex
    touched = await sessions.touch(session_id)
    assert touched is not None
    assert (touched.public_id, touched.address, touched.user_agent) == (
        created.public_id,
        "192.0.2.1",
        "Agent/1",
    )
    assert await sessions.revoke(session_id) == touched


async def test_revoke_public_ends_that_session_and_names_its_token_hash(
    sessions: server.SessionStore,
) -> None:
    first, session, _ = await sessions.create(account("alice"))
    second, _, _ = await sessions.create(account("alice"))
    ended = await sessions.revoke_public(account("alice").user_id, session.public_id)
    assert ended is not None
    digest, revoked = ended
    assert digest == server.token_hash(first) and revoked.public_id == session.public_id
    assert (await sessions.touch(first)) is None
    assert (await sessions.touch(second)) is not None
    assert await sessions.revoke_public(account("alice").user_id, session.public_id) is None


async def test_revoke_public_ignores_other_users_sessions(sessions: server.SessionStore) -> None:
    alice, session, _ = await sessions.create(account("alice"))
    assert await sessions.revoke_public(account("bob").user_id, session.public_id) is None
    assert await sessions.revoke_public(account("alice").user_id, server.new_public_id()) is None
    assert (await sessions.touch(alice)) is not None


async def test_revoke_public_of_an_expired_session_is_none(
    sessions: server.SessionStore, clock: Clock
) -> None:
    _, session, _ = await sessions.create(account("alice"))
    clock.advance(LIMITS.idle_timeout)
    assert await sessions.revoke_public(account("alice").user_id, session.public_id) is None


async def test_session_ids_carry_at_least_128_bits() -> None:
    session_id = server.new_session_id()
    assert len(session_id) * 6 >= 128  # URL-safe base64: six bits a character


async def test_postgres_keeps_only_a_hash_of_the_session_id(
    clock: Clock, database_url: str, db: psycopg2.extensions.connection
) -> None:
    async with open_store("postgres", LIMITS, clock, database_url) as store:
        session_id, _, _ = await store.create(account("alice"))
    with db.cursor() as cur:
        cur.execute("SELECT token_hash, username FROM sessions")
        rows = cur.fetchall()
    assert [(bytes(digest), username) for digest, username in rows] == [
        (server.token_hash(session_id), "alice")
    ]
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM sessions WHERE position(%s in encode(token_hash, 'escape')) > 0",
            (session_id,),
        )
        assert cur.fetchone() == (0,)
        cur.execute("SELECT public_id FROM sessions")
        [(public_id,)] = cur.fetchall()
    # The public id is an independent draw, so showing it gives away neither the id nor its hash.
    assert public_id not in session_id and public_id not in server.token_hash(session_id).hex()


async def test_redis_keeps_only_a_hash_of_the_session_id(clock: Clock, database_url: str) -> None:
    from conftest import redis_or_skip

    redis_or_skip()
    async with open_store("redis", LIMITS, clock, database_url) as store:
        session_id, _, _ = await store.create(account("alice"))
        client = store._redis  # type: ignore[attr-defined]
        prefix = store._prefix  # type: ignore[attr-defined]
        dump = b""
        async for key in client.scan_iter(match=f"{prefix}*"):
            dump += key + repr(await client.dump(key)).encode()
        assert session_id.encode() not in dump
        assert server.token_hash(session_id).hex().encode() in dump
        # Redis itself expires the session at its deadline.
        ttl = await client.pttl(f"{prefix}session:{server.token_hash(session_id).hex()}")
        assert ttl > 0
