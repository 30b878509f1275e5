"""Password guessing: failed logins are counted per username and per client address."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from aiohttp import web

import server
from conftest import Client, ClientFactory, Clock, add_user, make_config

LOGIN = server.LoginConfig(max_failures=3, failure_window=60)


async def make_client(
    aiohttp_client: ClientFactory, database_url: str, clock: Clock, trusted: tuple[str, ...] = ()
) -> Client:
    webserver = server.WebServerConfig(
        host="127.0.0.1", port=0, trusted_proxies=tuple(ipaddress.ip_network(net) for net in trusted)
    )
    config = make_config(database_url, login=LOGIN, webserver=webserver)
    client = await aiohttp_client(await server.WebServer(config, clock=clock).initializer())
    await add_user(client.app, "alice", "wonderland")
    return client


async def attempt(client: Client, username: str, password: str, forwarded_for: str | None = None) -> int:
    headers = {} if forwarded_for is None else {"X-Forwarded-For": forwarded_for}
    response = await client.post("/user", json={"username": username, "password": password}, headers=headers)
    if response.status == 429:
        body = await response.json()
        assert body["error"] == "too_many_attempts"
        assert int(response.headers["Retry-After"]) >= 1
    return response.status


@pytest.fixture
async def client(aiohttp_client: ClientFactory, database_url: str, db: object, clock: Clock) -> Client:
    return await make_client(aiohttp_client, database_url, clock)


async def test_after_max_failures_even_the_right_password_gets_429(client: Client) -> None:
    for _ in range(LOGIN.max_failures):
        assert await attempt(client, "alice", "guess") == 401
    assert await attempt(client, "alice", "wonderland") == 429


async def test_guesses_in_both_unicode_spellings_of_a_name_count_as_one(
    aiohttp_client: ClientFactory, database_url: str, db: object, clock: Clock
) -> None:
    client = await make_client(aiohttp_client, database_url, clock)
    await add_user(client.app, "Jos\u00e9", "wonderland")
    spellings = ["Jos\u00e9", "Jose\u0301"]  # alternating would double the guesses if counted apart
    for number in range(LOGIN.max_failures):
        assert await attempt(client, spellings[number % 2], "guess") == 401
    assert await attempt(client, "Jose\u0301", "wonderland") == 429
    assert await attempt(client, "Jos\u00e9", "wonderland") == 429


async def test_the_block_lifts_when_the_window_has_passed(client: Client, clock: Clock) -> None:
    for _ in range(LOGIN.max_failures):
        await attempt(client, "alice", "guess")
    response = await client.post("/user", json={"username": "alice", "password": "wonderland"})
    assert response.status == 429
    assert int(response.headers["Retry-After"]) == LOGIN.failure_window
    clock.advance(LOGIN.failure_window)
    assert await attempt(client, "alice", "wonderland") == 200


async def test_a_successful_login_clears_the_usernames_count(client: Client) -> None:
    for _ in range(LOGIN.max_failures - 1):
        assert await attempt(client, "alice", "guess") == 401
    assert await attempt(client, "alice", "wonderland") == 200
    for _ in range(LOGIN.max_failures - 1):
        assert await attempt(client, "alice", "guess") == 401
    assert await attempt(client, "alice", "wonderland") == 200


async def test_unknown_usernames_are_counted_too(client: Client) -> None:
    for _ in range(LOGIN.max_failures):
        assert await attempt(client, "mallory", "guess") == 401
    assert await attempt(client, "mallory", "guess") == 429


async def test_a_burst_of_concurrent_guesses_gets_no_more_than_max_failures_verdicts(client: Client) -> None:
    statuses = await asyncio.gather(*[attempt(client, "alice", f"guess-{n}") for n in range(20)])
    assert statuses.count(401) == LOGIN.max_failures
    assert statuses.count(429) == 20 - LOGIN.max_failures


async def test_concurrent_good_logins_of_one_user_are_all_served(client: Client) -> None:
    statuses = await asyncio.gather(*[attempt(client, "alice", "wonderland") for _ in range(20)])
    assert statuses == [200] * 20


async def test_one_users_block_does_not_touch_another(client: Client) -> None:
    await add_user(client.app, "bob", "builder")
    for _ in range(LOGIN.max_failures):
        await attempt(client, "alice", "guess")
    assert await attempt(client, "bob", "builder") == 200


async def test_an_address_is_blocked_after_ten_times_max_failures(client: Client) -> None:
    limit = LOGIN.max_failures * server.ADDRESS_FAILURE_FACTOR
    for number in range(limit):
        assert await attempt(client, f"user-{number}", "guess") == 401
    assert await attempt(client, "alice", "wonderland") == 429


async def test_x_forwarded_for_is_ignored_by_default(client: Client) -> None:
    limit = LOGIN.max_failures * server.ADDRESS_FAILURE_FACTOR
    for number in range(limit):
        await attempt(client, f"user-{number}", "guess", forwarded_for=f"203.0.113.{number}")
    # Every attempt came from the peer, 127.0.0.1, whatever the header claimed.
    assert await attempt(client, "alice", "wonderland", forwarded_for="198.51.100.1") == 429


async def test_x_forwarded_for_is_used_behind_a_trusted_proxy(
    aiohttp_client: ClientFactory, database_url: str, db: object, clock: Clock
) -> None:
    client = await make_client(aiohttp_client, database_url, clock, trusted=("127.0.0.0/8",))
    limit = LOGIN.max_failures * server.ADDRESS_FAILURE_FACTOR
    for number in range(limit):
        await attempt(client, f"user-{number}", "guess", forwarded_for="203.0.113.7")
    assert await attempt(client, "alice", "wonderland", forwarded_for="203.0.113.7") == 429
    assert await attempt(client, "alice", "wonderland", forwarded_for="198.51.100.1") == 200


@pytest.mark.parametrize(
    ("forwarded_for", "expected"),
    [
        pytest.param("203.0.113.7", "203.0.113.7", id="one-hop"),
        pytest.param("203.0.113.7, 10.0.0.2", "203.0.113.7", id="through-another-trusted-proxy"),
        pytest.param("198.51.100.9, 203.0.113.7", "203.0.113.7", id="client-spoofs-the-left"),
        pytest.param("garbage, 203.0.113.7", "203.0.113.7", id="garbage-before-a-real-hop"),
        pytest.param("203.0.113.7, garbage", "127.0.0.1", id="garbage-nearest"),
        pytest.param("", "127.0.0.1", id="empty"),
        pytest.param("10.0.0.2", "10.0.0.2", id="only-trusted-hops"),
    ],
)
async def test_the_client_address_behind_trusted_proxies(
    aiohttp_client: ClientFactory, forwarded_for: str, expected: str
) -> None:
    trusted = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))

    async def address(request: web.Request) -> web.Response:
        return web.json_response(server.client_address(request, trusted))

    app = web.Application()
    app.router.add_get("/", address)
    client = await aiohttp_client(app)
    response = await client.get("/", headers={"X-Forwarded-For": forwarded_for})
    assert await response.json() == expected
