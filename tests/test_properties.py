"""Property tests: under any sequence of operations each session store and the login throttle
keep their promises (Hypothesis state machines, with a clock the machine moves), for every store."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

import server
from conftest import Clock, account, check_consistency, count_sessions, open_store

USERS = st.sampled_from(["alice", "bob"])
LIMITS = server.SessionConfig(idle_timeout=10, absolute_timeout=25, max_per_user=2)
CLOCK_STEPS = st.integers(min_value=0, max_value=12) | st.floats(min_value=0, max_value=30)
# Fewer examples for the shared stores: each step is a round trip to a real server.
EXAMPLES = {"memory": 200, "postgres": 40, "redis": 40, "cached-postgres": 40, "cached-redis": 40}


class StoreMachine(RuleBasedStateMachine):
    """Opens a fresh store of one kind per example, on its own event loop."""

    def __init__(self, kind: str, database_url: str) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self._store_context = open_store(kind, LIMITS, self.clock, database_url)
        self.store = self.run(self._store_context.__aenter__())

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        self.run(self._store_context.__aexit__(None, None, None))
        self.loop.close()


class SessionStoreMachine(StoreMachine):
    """Random create / touch / revoke / revoke_all / sweep / clock steps against a model."""

    session_ids = Bundle("session_ids")

    def __init__(self, kind: str, database_url: str) -> None:
        super().__init__(kind, database_url)
        # The model: session id -> (username, created_at, written), for sessions believed live;
        # `written` is the last renewal the store itself has seen.
        self.model: dict[str, tuple[str, float, float]] = {}
        # A near cache renews the store at most once per slack: a use within the slack after the
        # last write renews the session in memory only, and expiry follows the stored deadline.
        self.slack = server.renewal_slack(LIMITS) if kind.startswith("cached-") else 0.0

    def expires_at(self, session_id: str) -> float:
        _, created_at, written = self.model[session_id]
        return server.deadline(LIMITS, created_at, written)

    def forget_expired(self) -> None:
        for session_id in [sid for sid in self.model if self.expires_at(sid) <= self.clock.now]:
            del self.model[session_id]

    @rule(target=session_ids, username=USERS)
    def create(self, username: str) -> str:
        session_id, session, _ = self.run(self.store.create(account(username)))
        assert session.username == username
        self.forget_expired()
        self.model[session_id] = (username, self.clock.now, self.clock.now)
        mine = [sid for sid, (name, *_) in self.model.items() if name == username]
        if len(mine) > LIMITS.max_per_user:
            del self.model[mine[0]]  # the oldest live one makes room
        return str(session_id)

    @rule(session_id=session_ids)
    def touch(self, session_id: str) -> None:
        self.forget_expired()
        session = self.run(self.store.touch(session_id))
        if session_id in self.model:
            assert session is not None and session.username == self.model[session_id][0]
            assert session.expires_at > self.clock.now
            username, created_at, written = self.model[session_id]
            if self.clock.now - written >= self.slack:
                self.model[session_id] = (username, created_at, self.clock.now)
        else:
            assert session is None

    @rule(session_id=consumes(session_ids))
    def revoke(self, session_id: str) -> None:
        self.forget_expired()
        session = self.run(self.store.revoke(session_id))
        assert (session is not None) == (session_id in self.model)
        self.model.pop(session_id, None)

    @rule(username=USERS)
    def revoke_all(self, username: str) -> None:
        self.forget_expired()
        ended = self.run(self.store.revoke_all(account(username).user_id))
        mine = [sid for sid, (name, *_) in self.model.items() if name == username]
        assert ended == len(mine)
        for session_id in mine:
            del self.model[session_id]

    @rule()
    def sweep(self) -> None:
        self.run(self.store.sweep())
        self.forget_expired()
        assert self.run(count_sessions(self.store)) == len(self.model)

    @rule(seconds=CLOCK_STEPS)
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def store_is_consistent(self) -> None:
        self.run(check_consistency(self.store))


class LoginThrottleMachine(StoreMachine):
    """Random attempts from a few users and addresses, with clock steps, against an exact model."""

    def __init__(self, kind: str, database_url: str) -> None:
        super().__init__(kind, database_url)
        self.config = server.LoginConfig(max_failures=3, failure_window=60)
        self.throttle = server.LoginThrottle(self.config, self.clock, self.store)
        self.failures: dict[tuple[str, str], list[float]] = {}

    def blocked(self, key: tuple[str, str]) -> bool:
        limit = self.config.max_failures * (1 if key[0] == "user" else server.ADDRESS_FAILURE_FACTOR)
        last = self.failures.get(key, [])[-limit:]
        return len(last) == limit and last[0] + self.config.failure_window > self.clock.now

    @rule(
        username=st.sampled_from(["alice", "bob", "carol"]),
        address=st.sampled_from(["192.0.2.1", "2001:db8::1", "2001:db8::2"]),
        outcome=st.sampled_from(["wrong", "right", "database down"]),
    )
    def attempt(self, username: str, address: str, outcome: str) -> None:
        user, addr = ("user", username), ("address", server.address_key(address))  # IPv6: the /64
        expect_blocked = self.blocked(user) or self.blocked(addr)
        try:
            attempt = self.run(self.throttle.attempt(username, address))
        except server.TooManyAttempts as refused:
            assert expect_blocked
            assert 0 < refused.wait <= self.config.failure_window
            return
        assert not expect_blocked
        if outcome == "wrong":
            self.run(self.throttle.settle(attempt, failed=True))
            self.failures.setdefault(user, []).append(self.clock.now)
            self.failures.setdefault(addr, []).append(self.clock.now)
        elif outcome == "right":
            self.run(self.throttle.settle(attempt, succeeded=True))
            self.failures.pop(user, None)
        else:  # "database down", or a right password that lost a race: nothing is recorded
            self.run(self.throttle.settle(attempt))

    @rule(seconds=st.floats(min_value=0, max_value=90))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def sweep(self) -> None:
        self.run(self.throttle.sweep())


@pytest.mark.parametrize("machine", [SessionStoreMachine, LoginThrottleMachine])
def test_store_keeps_its_promises_under_any_sequence(
    machine: type[StoreMachine], any_store_kind: str, database_url: str
) -> None:
    run_state_machine_as_test(
        lambda: machine(any_store_kind, database_url),
        settings=settings(
            max_examples=EXAMPLES[any_store_kind], stateful_step_count=40, derandomize=True, deadline=None
        ),
    )


async def test_a_flood_of_random_usernames_keeps_the_memory_throttle_bounded() -> None:
    clock = Clock()
    failures = server.MemoryFailureLog(max_keys=1000)
    throttle = server.LoginThrottle(server.LoginConfig(), clock, failures)
    for number in range(20_000):
        address = f"10.0.{number // 250 % 256}.{number % 250}"
        with contextlib.suppress(server.TooManyAttempts):
            await throttle.settle(await throttle.attempt(f"user-{number}", address), failed=True)
        assert len(failures) <= 1000
    # The table is full of recent entries; a real user's failures are still counted.
    for _ in range(server.LoginConfig().max_failures):
        await throttle.settle(await throttle.attempt("alice", "192.0.2.1"), failed=True)
    with pytest.raises(server.TooManyAttempts):
        await throttle.attempt("alice", "192.0.2.1")
