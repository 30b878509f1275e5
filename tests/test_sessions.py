"""The in-memory session store: both dictionaries change together, expired sessions never return."""

from __future__ import annotations

import server
from conftest import Clock

LIMITS = server.SessionConfig(idle_timeout=100, absolute_timeout=1000, max_per_user=3)


def store(clock: Clock) -> server.MemorySessionStore:
    return server.MemorySessionStore(LIMITS, clock)


async def test_a_user_can_hold_several_sessions(clock: Clock) -> None:
    sessions = store(clock)
    first, _ = await sessions.create("alice")
    second, _ = await sessions.create("alice")
    assert first != second
    assert (await sessions.touch(first)) is not None
    assert (await sessions.touch(second)) is not None
    sessions.check_consistency()


async def test_revoking_one_session_leaves_the_others(clock: Clock) -> None:
    sessions = store(clock)
    first, _ = await sessions.create("alice")
    second, _ = await sessions.create("alice")
    assert (await sessions.revoke(first)) is not None
    assert (await sessions.touch(first)) is None
    assert (await sessions.touch(second)) is not None
    sessions.check_consistency()


async def test_revoking_an_unknown_session_changes_nothing(clock: Clock) -> None:
    sessions = store(clock)
    await sessions.create("alice")
    assert (await sessions.revoke("nope")) is None
    assert len(sessions) == 1


async def test_revoke_all_counts_only_live_sessions(clock: Clock) -> None:
    sessions = store(clock)
    await sessions.create("alice")
    clock.advance(LIMITS.idle_timeout)
    await sessions.create("alice")
    await sessions.create("bob")
    assert await sessions.revoke_all("alice") == 1
    assert len(sessions) == 1
    assert await sessions.revoke_all("nobody") == 0
    sessions.check_consistency()


async def test_the_oldest_session_goes_beyond_max_per_user(clock: Clock) -> None:
    sessions = store(clock)
    ids = [(await sessions.create("alice"))[0] for _ in range(LIMITS.max_per_user + 1)]
    assert (await sessions.touch(ids[0])) is None
    assert all([await sessions.touch(sid) is not None for sid in ids[1:]])
    assert len(sessions) == LIMITS.max_per_user
    sessions.check_consistency()


async def test_making_room_drops_expired_sessions_before_a_live_one(clock: Clock) -> None:
    sessions = store(clock)
    ids = [(await sessions.create("alice"))[0] for _ in range(LIMITS.max_per_user)]
    clock.advance(LIMITS.idle_timeout - 1)
    await sessions.touch(ids[0])  # the oldest is in use; the others will expire
    clock.advance(2)
    await sessions.create("alice")
    assert (await sessions.touch(ids[0])) is not None
    sessions.check_consistency()


async def test_a_session_expires_exactly_at_its_idle_deadline(clock: Clock) -> None:
    sessions = store(clock)
    session_id, session = await sessions.create("alice")
    assert session.expires_at == clock.now + LIMITS.idle_timeout
    clock.advance(LIMITS.idle_timeout - 0.001)
    assert (await sessions.touch(session_id)) is not None
    clock.advance(LIMITS.idle_timeout)
    assert (await sessions.touch(session_id)) is None
    assert len(sessions) == 0  # an expired session found on lookup is removed at once


async def test_touch_never_extends_past_the_absolute_deadline(clock: Clock) -> None:
    sessions = store(clock)
    session_id, session = await sessions.create("alice")
    absolute = session.created_at + LIMITS.absolute_timeout
    while clock.now + LIMITS.idle_timeout / 2 < absolute:
        clock.advance(LIMITS.idle_timeout / 2)
        touched = await sessions.touch(session_id)
        assert touched is not None and touched.expires_at <= absolute
    clock.now = absolute
    assert (await sessions.touch(session_id)) is None


async def test_sweep_removes_expired_sessions_and_keeps_live_ones(clock: Clock) -> None:
    sessions = store(clock)
    for name in ("alice", "bob", "carol"):
        await sessions.create(name)
    clock.advance(LIMITS.idle_timeout / 2)
    live, _ = await sessions.create("alice")
    clock.advance(LIMITS.idle_timeout / 2)
    assert await sessions.sweep() == 3
    assert len(sessions) == 1
    assert (await sessions.touch(live)) is not None
    sessions.check_consistency()


async def test_an_expired_session_cannot_be_revoked(clock: Clock) -> None:
    sessions = store(clock)
    session_id, _ = await sessions.create("alice")
    clock.advance(LIMITS.idle_timeout)
    assert (await sessions.revoke(session_id)) is None
    sessions.check_consistency()


async def test_session_ids_carry_at_least_128_bits() -> None:
    session_id = server.new_session_id()
    assert len(session_id) * 6 >= 128  # URL-safe base64: six bits a character
