"""Property tests: under any sequence of operations the session store and the login throttle
keep their promises (Hypothesis state machines, with a clock the machine moves)."""

from __future__ import annotations

import asyncio

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

import server
from conftest import Clock

USERS = st.sampled_from(["alice", "bob"])
LIMITS = server.SessionConfig(idle_timeout=10, absolute_timeout=25, max_per_user=2)


class SessionStoreMachine(RuleBasedStateMachine):
    """Runs random create / touch / revoke / revoke_all / sweep / clock steps against a model."""

    session_ids = Bundle("session_ids")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.clock = Clock()
        self.store = server.MemorySessionStore(LIMITS, self.clock)
        # The model: session id -> (username, created_at, last_seen), for sessions believed live.
        self.model: dict[str, tuple[str, float, float]] = {}

    def run(self, coroutine: object) -> object:
        return self.loop.run_until_complete(coroutine)  # type: ignore[arg-type]

    def expires_at(self, session_id: str) -> float:
        _, created_at, last_seen = self.model[session_id]
        return min(last_seen + LIMITS.idle_timeout, created_at + LIMITS.absolute_timeout)

    def forget_expired(self) -> None:
        for session_id in [sid for sid in self.model if self.expires_at(sid) <= self.clock.now]:
            del self.model[session_id]

    @rule(target=session_ids, username=USERS)
    def create(self, username: str) -> str:
        session_id, session = self.run(self.store.create(username))  # type: ignore[misc]
        assert session.username == username
        self.model[session_id] = (username, self.clock.now, self.clock.now)
        mine = [sid for sid, (name, *_) in self.model.items() if name == username]
        self.forget_expired()
        live_mine = [sid for sid in mine if sid in self.model]
        if len(live_mine) > LIMITS.max_per_user:
            # The store drops the oldest; expired ones may already have gone.
            oldest = min(live_mine, key=lambda sid: self.model[sid][1])
            del self.model[oldest]
        return str(session_id)

    @rule(session_id=session_ids)
    def touch(self, session_id: str) -> None:
        self.forget_expired()
        session = self.run(self.store.touch(session_id))
        if session_id in self.model:
            assert session is not None and session.username == self.model[session_id][0]  # type: ignore[attr-defined]
            username, created_at, _ = self.model[session_id]
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
        ended = self.run(self.store.revoke_all(username))
        mine = [sid for sid, (name, *_) in self.model.items() if name == username]
        assert ended == len(mine)
        for session_id in mine:
            del self.model[session_id]

    @rule()
    def sweep(self) -> None:
        self.run(self.store.sweep())
        self.forget_expired()
        assert len(self.store) == len(self.model)

    @rule(seconds=st.integers(min_value=0, max_value=12) | st.floats(min_value=0, max_value=30))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def dictionaries_are_consistent(self) -> None:
        self.store.check_consistency()

    @invariant()
    def every_model_session_is_live_in_the_store(self) -> None:
        self.forget_expired()
        assert set(self.model) <= set(self.store._sessions)

    def teardown(self) -> None:
        self.loop.close()


TestSessionStore = SessionStoreMachine.TestCase
TestSessionStore.settings = settings(
    max_examples=200, stateful_step_count=40, derandomize=True, deadline=None
)


class LoginThrottleMachine(RuleBasedStateMachine):
    """Random attempts from a few users and addresses, with clock steps, against an exact model."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.config = server.LoginConfig(max_failures=3, failure_window=60)
        self.throttle = server.LoginThrottle(self.config, self.clock)
        self.failures: dict[tuple[str, str], list[float]] = {}

    def blocked(self, key: tuple[str, str]) -> bool:
        limit = self.config.max_failures * (1 if key[0] == "user" else server.ADDRESS_FAILURE_FACTOR)
        last = self.failures.get(key, [])[-limit:]
        return len(last) == limit and last[0] + self.config.failure_window > self.clock.now

    @rule(
        username=st.sampled_from(["alice", "bob", "carol"]),
        address=st.sampled_from(["192.0.2.1", "2001:db8::1"]),
        outcome=st.sampled_from(["wrong", "right", "database down"]),
    )
    def attempt(self, username: str, address: str, outcome: str) -> None:
        user, addr = ("user", username), ("address", address)
        expect_blocked = self.blocked(user) or self.blocked(addr)
        wait = self.throttle.check(username, address)
        assert (wait is not None) == expect_blocked
        if wait is not None:
            assert 0 < wait <= self.config.failure_window
            return
        if outcome == "wrong":
            self.throttle.failed(username, address)
            self.failures.setdefault(user, []).append(self.clock.now)
            self.failures.setdefault(addr, []).append(self.clock.now)
        elif outcome == "right":
            self.throttle.succeeded(username)
            self.failures.pop(user, None)
        # "database down": no verdict, nothing is recorded

    @rule(seconds=st.floats(min_value=0, max_value=90))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule()
    def sweep(self) -> None:
        self.throttle.sweep()
        for key in list(self.failures):
            if self.failures[key][-1] <= self.clock.now - self.config.failure_window:
                del self.failures[key]
        assert len(self.throttle) == len(self.failures)


TestLoginThrottle = LoginThrottleMachine.TestCase
TestLoginThrottle.settings = settings(
    max_examples=150, stateful_step_count=60, derandomize=True, deadline=None
)


def test_a_flood_of_random_usernames_keeps_the_throttle_bounded() -> None:
    clock = Clock()
    throttle = server.LoginThrottle(server.LoginConfig(), clock, max_keys=1000)
    for number in range(20_000):
        address = f"10.0.{number // 250 % 256}.{number % 250}"
        if throttle.check(f"user-{number}", address) is None:
            throttle.failed(f"user-{number}", address)
        assert len(throttle) <= 1000
    # The table is full of recent entries; a real user's failures are still counted.
    for _ in range(server.LoginConfig().max_failures):
        assert throttle.check("alice", "192.0.2.1") is None
        throttle.failed("alice", "192.0.2.1")
    assert throttle.check("alice", "192.0.2.1") is not None
