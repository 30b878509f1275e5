"""The HTTP API, end to end over real HTTP and a real PostgreSQL: log in, who am I, log out."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import os
import statistics

import argon2
import psycopg2.extensions
import pytest

import server
from conftest import (
    FAST_PASSWORDS,
    Client,
    ClientFactory,
    Clock,
    add_user,
    check_consistency,
    count_sessions,
    log_in,
    make_config,
)


def auth(session_id: str) -> dict[str, str]:
    return {"Authorization": session_id}


async def test_login_returns_a_session_id_that_is_not_cached(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    response = await client.post("/user", json={"username": "alice", "password": "wonderland"})
    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    session_id = (await response.json())["session_id"]
    assert isinstance(session_id, str) and len(session_id) >= 22  # at least 128 bits in base64


async def test_login_accepts_any_content_type_like_curl_d(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    body = '{"username": "alice", "password": "wonderland"}'
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = await client.post("/user", data=body, headers=headers)
    assert response.status == 200


async def test_session_ids_are_unique(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    ids = {await log_in(client, "alice", "wonderland") for _ in range(10)}
    assert len(ids) == 10


async def test_whoami_names_the_user_and_when_the_session_expires(client: Client, clock: Clock) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    response = await client.get("/user", headers=auth(session_id))
    assert response.status == 200
    body = await response.json()
    assert body["username"] == "alice"
    expires_at = datetime.datetime.fromisoformat(body["expires_at"])
    assert expires_at.utcoffset() == datetime.timedelta(0)
    assert expires_at.timestamp() == clock.now + server.SessionConfig().idle_timeout


async def test_bearer_form_of_the_header_is_accepted(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    response = await client.get("/user", headers={"Authorization": f"Bearer {session_id}"})
    assert response.status == 200
    response = await client.delete("/user", headers={"Authorization": f"bearer  {session_id}"})
    assert response.status == 200


async def test_logout_ends_the_session_and_a_second_logout_is_401(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    response = await client.delete("/user", headers=auth(session_id))
    assert response.status == 200
    assert await response.json() == {"logged_out": 1}
    again = await client.delete("/user", headers=auth(session_id))
    assert again.status == 401
    assert (await again.json())["error"] == "invalid_session"
    whoami = await client.get("/user", headers=auth(session_id))
    assert whoami.status == 401


async def test_second_login_keeps_first_session_valid(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    first = await log_in(client, "alice", "wonderland")
    second = await log_in(client, "alice", "wonderland")
    for session_id in (first, second):
        response = await client.get("/user", headers=auth(session_id))
        assert response.status == 200


async def test_logging_out_the_old_session_keeps_the_new_one(client: Client) -> None:
    # The seed's bug: the second login overwrote userToSession, and this logout then broke it.
    await add_user(client.app, "alice", "wonderland")
    old = await log_in(client, "alice", "wonderland")
    new = await log_in(client, "alice", "wonderland")
    assert (await client.delete("/user", headers=auth(old))).status == 200
    assert (await client.get("/user", headers=auth(new))).status == 200
    assert (await client.delete("/user", headers=auth(new))).status == 200
    await check_consistency(client.app[server.sessions])
    assert await count_sessions(client.app[server.sessions]) == 0


async def test_logout_all_ends_every_session_of_that_user_only(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    await add_user(client.app, "bob", "builder")
    alice_sessions = [await log_in(client, "alice", "wonderland") for _ in range(3)]
    bob = await log_in(client, "bob", "builder")
    response = await client.delete("/user?all=true", headers=auth(alice_sessions[0]))
    assert await response.json() == {"logged_out": 3}
    for session_id in alice_sessions:
        assert (await client.get("/user", headers=auth(session_id))).status == 401
    assert (await client.get("/user", headers=auth(bob))).status == 200


async def test_logout_all_false_ends_only_this_session(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    first = await log_in(client, "alice", "wonderland")
    second = await log_in(client, "alice", "wonderland")
    response = await client.delete("/user?all=false", headers=auth(first))
    assert await response.json() == {"logged_out": 1}
    assert (await client.get("/user", headers=auth(second))).status == 200


async def test_oldest_session_ends_beyond_max_per_user(
    aiohttp_client: ClientFactory, database_url: str, db: object
) -> None:
    config = make_config(database_url, sessions=server.SessionConfig(max_per_user=2))
    client = await aiohttp_client(await server.WebServer(config).initializer())
    await add_user(client.app, "alice", "wonderland")
    first, second, third = [await log_in(client, "alice", "wonderland") for _ in range(3)]
    assert (await client.get("/user", headers=auth(first))).status == 401
    assert (await client.get("/user", headers=auth(second))).status == 200
    assert (await client.get("/user", headers=auth(third))).status == 200


async def test_idle_session_expires(client: Client, clock: Clock) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    clock.advance(server.SessionConfig().idle_timeout + 1)
    assert (await client.get("/user", headers=auth(session_id))).status == 401
    assert (await client.delete("/user", headers=auth(session_id))).status == 401


async def test_each_use_renews_the_idle_timeout(client: Client, clock: Clock) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    idle = server.SessionConfig().idle_timeout
    for _ in range(3):
        clock.advance(idle - 1)
        assert (await client.get("/user", headers=auth(session_id))).status == 200


async def test_absolute_timeout_ends_even_a_busy_session(client: Client, clock: Clock) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    limits = server.SessionConfig()
    used_for = 0.0
    while used_for + limits.idle_timeout / 2 < limits.absolute_timeout:
        clock.advance(limits.idle_timeout / 2)
        used_for += limits.idle_timeout / 2
        assert (await client.get("/user", headers=auth(session_id))).status == 200
    clock.advance(limits.idle_timeout / 2)
    assert (await client.get("/user", headers=auth(session_id))).status == 401


async def test_wrong_password_and_unknown_user_get_the_same_answer(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    wrong = await client.post("/user", json={"username": "alice", "password": "nope"})
    unknown = await client.post("/user", json={"username": "mallory", "password": "nope"})
    assert wrong.status == unknown.status == 401
    assert await wrong.json() == await unknown.json()
    assert (await wrong.json())["error"] == "invalid_credentials"


async def test_usernames_are_case_sensitive(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    response = await client.post("/user", json={"username": "Alice", "password": "wonderland"})
    assert response.status == 401


async def test_unicode_credentials_work(client: Client) -> None:
    await add_user(client.app, "zoë", "pässwörd🔑")
    session_id = await log_in(client, "zoë", "pässwörd🔑")
    response = await client.get("/user", headers=auth(session_id))
    assert (await response.json())["username"] == "zoë"


async def test_passwords_are_stored_as_argon2id_hashes(
    client: Client, db: psycopg2.extensions.connection
) -> None:
    await add_user(client.app, "alice", "wonderland")
    with db.cursor() as cur:
        cur.execute("SELECT password_hash FROM users WHERE username = 'alice'")
        (stored,) = cur.fetchone()
    assert stored.startswith("$argon2id$")
    assert "wonderland" not in stored


async def test_an_old_hash_is_upgraded_at_the_next_login(
    client: Client, db: psycopg2.extensions.connection
) -> None:
    old_hash = argon2.PasswordHasher(time_cost=3, memory_cost=128, parallelism=1).hash("wonderland")
    with db.cursor() as cur:
        cur.execute("INSERT INTO users (username, password_hash) VALUES ('alice', %s)", (old_hash,))
    await log_in(client, "alice", "wonderland")
    with db.cursor() as cur:
        cur.execute("SELECT password_hash FROM users WHERE username = 'alice'")
        (new_hash,) = cur.fetchone()
    assert new_hash != old_hash
    params = argon2.extract_parameters(new_hash)
    assert (params.time_cost, params.memory_cost) == (FAST_PASSWORDS.time_cost, FAST_PASSWORDS.memory_cost)
    assert argon2.PasswordHasher().verify(new_hash, "wonderland")


async def test_a_current_hash_is_left_alone_at_login(
    client: Client, db: psycopg2.extensions.connection
) -> None:
    await add_user(client.app, "alice", "wonderland")
    with db.cursor() as cur:
        cur.execute("SELECT password_hash FROM users")
        (before,) = cur.fetchone()
    await log_in(client, "alice", "wonderland")
    with db.cursor() as cur:
        cur.execute("SELECT password_hash FROM users")
        (after,) = cur.fetchone()
    assert after == before


async def test_health_reports_the_database(client: Client) -> None:
    response = await client.get("/health")
    assert response.status == 200
    assert await response.json() == {"status": "ok", "database": "ok"}


async def test_every_json_body_ends_with_a_newline(client: Client) -> None:
    """So that after a curl in a terminal the prompt starts on a line of its own."""
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    requests = [
        ("POST", "/user", {"json": {"username": "alice", "password": "wonderland"}}),  # 200
        ("POST", "/user", {"data": "{not json"}),  # 400
        ("POST", "/user", {"json": {"username": "alice"}}),  # 422
        ("POST", "/user", {"json": {"username": "alice", "password": "wrong"}}),  # 401
        ("POST", "/user", {"data": "x" * (server.MAX_BODY_BYTES + 1)}),  # 413
        ("GET", "/user", {"headers": auth(session_id)}),  # 200
        ("GET", "/user", {}),  # 401
        ("PUT", "/user", {}),  # 405
        ("GET", "/nowhere", {}),  # 404
        ("GET", "/health", {}),  # 200
        ("DELETE", "/user", {"headers": auth(session_id)}),  # 200
    ]
    for method, path, options in requests:
        response = await client.request(method, path, **options)
        body = await response.text()
        assert response.content_type == "application/json", (method, path)
        assert body.endswith("}\n") and body.count("\n") == 1, (method, path, response.status, body)


async def test_hashing_does_not_block_other_requests(
    aiohttp_client: ClientFactory, database_url: str, db: object
) -> None:
    # Costly hashing: each verify takes far longer than answering GET /user.
    costly = server.PasswordConfig(time_cost=4, memory_cost=65536, parallelism=1, threads=1)
    app = await server.WebServer(make_config(database_url, passwords=costly)).initializer()
    client = await aiohttp_client(app)
    await add_user(app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    logins = [
        asyncio.create_task(client.post("/user", json={"username": "alice", "password": "wonderland"}))
        for _ in range(4)
    ]
    await asyncio.sleep(0.01)  # the logins are now hashing on the one hashing thread
    response = await client.get("/user", headers=auth(session_id))
    assert response.status == 200
    assert not all(task.done() for task in logins), "GET /user waited for the hashing"
    for response in await asyncio.gather(*logins):
        assert response.status == 200


async def test_hashing_threads_yield_the_cpu_to_the_event_loop(config: server.Config) -> None:
    hasher = server.Passwords(config.passwords)
    try:
        policy = hasher._executor.submit(lambda: os.sched_getscheduler(0)).result()
        # sched_getscheduler(0) names the calling thread's policy on Linux.
        assert policy == os.SCHED_IDLE
        assert os.sched_getscheduler(0) != os.SCHED_IDLE  # the event loop's thread is untouched
    finally:
        hasher.close()


async def test_without_affinity_or_sched_idle_hashing_uses_every_cpu_at_normal_priority(
    config: server.Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    # macOS and Windows have neither call; the default `threads: 0` must still start.
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.delattr(os, "sched_setscheduler")
    hasher = server.Passwords(dataclasses.replace(config.passwords, threads=0))
    try:
        assert hasher._executor._max_workers == os.cpu_count()
        assert await hasher.verify(await hasher.hash("wonderland"), "wonderland") is server.Verdict.RIGHT
        policy = hasher._executor.submit(lambda: os.sched_getscheduler(0)).result()
        assert policy == os.SCHED_OTHER
    finally:
        hasher.close()


# Stored values other than a hash with today's parameters (besides none at all).
WEAK_HASH = argon2.PasswordHasher(time_cost=1, memory_cost=8, parallelism=1).hash("wonderland")
NOT_A_HASH = "wonderland"  # a plain-text password left over from another system


async def test_a_failed_login_costs_the_same_whatever_is_stored(
    aiohttp_client: ClientFactory, database_url: str, db: psycopg2.extensions.connection
) -> None:
    # Hashing costly enough to dominate a request, and no throttling in the way.
    costly = server.PasswordConfig(time_cost=2, memory_cost=16384, parallelism=1, threads=1)
    config = make_config(database_url, passwords=costly, login=server.LoginConfig(max_failures=10_000))
    app = await server.WebServer(config).initializer()
    client = await aiohttp_client(app)
    await add_user(app, "current", "wonderland")
    with db.cursor() as cur:
        for username, stored in (("weak", WEAK_HASH), ("plain", NOT_A_HASH)):
            cur.execute("INSERT INTO users (username, password_hash) VALUES (%s, %s)", (username, stored))
    loop = asyncio.get_running_loop()
    times: dict[str, list[float]] = {"current": [], "unknown": [], "weak": [], "plain": []}
    names = list(times)
    # Interleaved rounds, each in another order, so bursts of load on this shared machine (the
    # hashing threads run under SCHED_IDLE and feel every other process) hit every kind alike.
    for round_number in range(12):
        for username in names[round_number % 4 :] + names[: round_number % 4]:
            started = loop.time()
            response = await client.post("/user", json={"username": username, "password": "wrong-password"})
            times[username].append(loop.time() - started)
            assert response.status == 401
    baseline = statistics.median(times["current"])
    ratios = {name: round(statistics.median(durations) / baseline, 2) for name, durations in times.items()}
    # Before, a weak hash or a value that is no hash answered in about a twentieth of the time.
    assert all(0.25 < ratio < 4 for ratio in ratios.values()), ratios


@pytest.mark.parametrize(
    "stored", [pytest.param(WEAK_HASH, id="weak-hash"), pytest.param(NOT_A_HASH, id="not-a-hash")]
)
async def test_a_stored_value_that_is_no_current_hash_still_decides_correctly(
    client: Client, db: psycopg2.extensions.connection, stored: str
) -> None:
    with db.cursor() as cur:
        cur.execute("INSERT INTO users (username, password_hash) VALUES ('alice', %s)", (stored,))
    response = await client.post("/user", json={"username": "alice", "password": "wrong-password"})
    assert response.status == 401
    response = await client.post("/user", json={"username": "alice", "password": "wonderland"})
    # A weak hash still verifies (and is upgraded); a plain-text value never matches.
    assert response.status == (200 if stored == WEAK_HASH else 401)


COMPOSED, DECOMPOSED = "Jos\u00e9", "Jose\u0301"  # what most keyboards type, and macOS's
# The same password in each spelling.
PASSWORDS = {COMPOSED: "caf\u00e9-au-lait", DECOMPOSED: "cafe\u0301-au-lait"}


@pytest.mark.parametrize(
    ("created", "typed"),
    [
        pytest.param(COMPOSED, DECOMPOSED, id="created-composed-typed-decomposed"),
        pytest.param(DECOMPOSED, COMPOSED, id="created-decomposed-typed-composed"),
    ],
)
async def test_username_and_password_are_one_however_they_are_typed(
    client: Client, db: psycopg2.extensions.connection, created: str, typed: str
) -> None:
    # The login's own normalization (as adduser's): both spellings name one user with one password.
    await add_user(client.app, server.parse_username(created), PASSWORDS[created])
    session_id = await log_in(client, typed, PASSWORDS[typed])
    response = await client.get("/user", headers=auth(session_id))
    assert (await response.json())["username"] == COMPOSED
    with db.cursor() as cur:
        cur.execute("SELECT username FROM users")
        assert cur.fetchall() == [(COMPOSED,)]


async def test_a_hash_made_before_passwords_were_normalized_still_verifies_and_is_upgraded(
    client: Client, db: psycopg2.extensions.connection
) -> None:
    password = PASSWORDS[DECOMPOSED]  # typed on macOS, hashed as typed by an older version
    old_hash = argon2.PasswordHasher(time_cost=1, memory_cost=256, parallelism=1).hash(password)
    with db.cursor() as cur:
        cur.execute("INSERT INTO users (username, password_hash) VALUES ('alice', %s)", (old_hash,))
    await log_in(client, "alice", password)
    with db.cursor() as cur:
        cur.execute("SELECT password_hash FROM users")
        (new_hash,) = cur.fetchone()
    assert new_hash != old_hash
    assert argon2.PasswordHasher().verify(new_hash, PASSWORDS[COMPOSED])  # now in NFC
    await log_in(client, "alice", PASSWORDS[COMPOSED])  # so either spelling works from now on
