"""Your sessions, over real HTTP on every store: GET /user/sessions lists the caller's devices,
DELETE /user/sessions/{id} ends one of them. Public ids reveal nothing of the secret session ids
and are worth nothing to another user."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import re
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest
from yarl import URL

import server
from conftest import REDIS_PREFIX, REDIS_URL, Client, ClientFactory, Clock, add_user, make_config

PHONE = "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 Chrome/131.0 Mobile Safari/537.36"
LAPTOP = "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0"


@pytest.fixture
def clean_redis(store_kind: str) -> Iterator[None]:
    """The Redis store keeps its keys under the server's prefix: none before the test, none after."""
    if store_kind != "redis":
        yield
        return
    import redis

    client = redis.Redis.from_url(REDIS_URL)

    def flush() -> None:
        for key in client.scan_iter(match=f"{REDIS_PREFIX}*"):
            client.delete(key)

    flush()
    yield
    flush()
    client.close()


async def start(
    aiohttp_client: ClientFactory, database_url: str, clock: Clock, store_kind: str, **webserver: object
) -> Client:
    config = make_config(
        database_url,
        sessions=server.SessionConfig(store=store_kind, redis_url=REDIS_URL, redis_prefix=REDIS_PREFIX),
        webserver=server.WebServerConfig(host="127.0.0.1", port=0, **webserver),  # type: ignore[arg-type]
    )
    client = await aiohttp_client(await server.WebServer(config, clock=clock).initializer())
    await add_user(client.app, "alice", "wonderland")
    await add_user(client.app, "bob", "builder123")
    return client


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, database_url: str, clock: Clock, store_kind: str, clean_redis: None
) -> AsyncIterator[Client]:
    yield await start(aiohttp_client, database_url, clock, store_kind)


async def log_in(client: Client, username: str, user_agent: str = LAPTOP, forwarded_for: str = "") -> str:
    password = {"alice": "wonderland", "bob": "builder123"}[username]
    headers = {"User-Agent": user_agent}
    if forwarded_for:
        headers["X-Forwarded-For"] = forwarded_for
    response = await client.post("/user", json={"username": username, "password": password}, headers=headers)
    assert response.status == 200, await response.text()
    return str((await response.json())["session_id"])


async def listed(client: Client, session_id: str) -> list[dict[str, object]]:
    response = await client.get("/user/sessions", headers={"Authorization": session_id})
    assert response.status == 200, await response.text()
    body = await response.json()
    assert list(body) == ["sessions"]
    return list(body["sessions"])


async def end(client: Client, session_id: str, public_id: str) -> tuple[int, dict[str, object]]:
    response = await client.delete(f"/user/sessions/{public_id}", headers={"Authorization": session_id})
    return response.status, await response.json()


def timestamp(text: object) -> float:
    moment = datetime.datetime.fromisoformat(str(text))
    assert moment.utcoffset() == datetime.timedelta(0)
    return moment.timestamp()


async def test_the_list_shows_each_live_session_of_the_caller_with_its_device(
    client: Client, clock: Clock
) -> None:
    laptop = await log_in(client, "alice", LAPTOP)
    clock.advance(60)
    phone = await log_in(client, "alice", PHONE)
    clock.advance(5)
    sessions = await listed(client, laptop)
    assert [s["user_agent"] for s in sessions] == [LAPTOP, PHONE]  # oldest first
    assert [s["current"] for s in sessions] == [True, False]
    assert [s["address"] for s in sessions] == ["127.0.0.1", "127.0.0.1"]
    assert all(set(s) == {"id", "created_at", "last_seen", "expires_at", "address", "user_agent",
                          "current", "streams"} for s in sessions)  # fmt: skip
    mine, other = sessions
    assert timestamp(mine["created_at"]) == clock.now - 65
    assert timestamp(mine["last_seen"]) == clock.now  # listing is a use of the session
    assert timestamp(other["created_at"]) == timestamp(other["last_seen"]) == clock.now - 5
    whoami = await (await client.get("/user", headers={"Authorization": phone})).json()
    assert timestamp(other["expires_at"]) < timestamp(whoami["expires_at"])  # that GET renewed it
    assert [s["current"] for s in await listed(client, phone)] == [False, True]


async def test_the_list_leaves_out_other_users_and_expired_sessions(client: Client, clock: Clock) -> None:
    await log_in(client, "alice")
    clock.advance(server.SessionConfig().idle_timeout)  # that one has expired
    alice = await log_in(client, "alice")
    await log_in(client, "bob")
    sessions = await listed(client, alice)
    assert len(sessions) == 1 and sessions[0]["current"] is True


async def test_public_ids_reveal_nothing_of_the_secret_session_ids(client: Client) -> None:
    session_ids = [await log_in(client, "alice") for _ in range(5)]
    public_ids = [str(s["id"]) for s in await listed(client, session_ids[0])]
    assert len(set(public_ids)) == 5
    for public_id in public_ids:
        assert re.fullmatch(r"[0-9a-f]{32}", public_id)  # 128 bits in hex: never a leading '-'
        for session_id in session_ids:
            digest = server.token_hash(session_id)
            # Not the id, nor a piece of it, nor of its hash in any common spelling.
            for secret in (session_id, digest.hex(), base64.urlsafe_b64encode(digest).decode()):
                assert not any(public_id[i : i + 8] in secret for i in range(len(public_id) - 7))


async def test_a_session_ended_from_another_device_disappears_at_once(client: Client) -> None:
    laptop = await log_in(client, "alice", LAPTOP)
    phone = await log_in(client, "alice", PHONE)
    stolen_phone = next(s for s in await listed(client, laptop) if s["user_agent"] == PHONE)
    assert await end(client, laptop, str(stolen_phone["id"])) == (200, {"logged_out": 1})
    assert [s["user_agent"] for s in await listed(client, laptop)] == [LAPTOP]
    response = await client.get("/user", headers={"Authorization": phone})
    assert response.status == 401
    assert (await response.json())["error"] == "invalid_session"
    status, body = await end(client, laptop, str(stolen_phone["id"]))
    assert (status, body["error"]) == (404, "no_such_session")


async def test_a_session_ended_from_another_device_has_its_streams_closed_at_once(client: Client) -> None:
    laptop = await log_in(client, "alice", LAPTOP)
    phone = await log_in(client, "alice", PHONE)
    sse = await client.get("/events", headers={"Authorization": phone})
    assert sse.status == 200
    websocket = await client.ws_connect("/events", headers={"Authorization": phone})
    assert [s["streams"] for s in await listed(client, laptop)] == [0, 2]  # the list counts them
    phone_id = next(s["id"] for s in await listed(client, laptop) if s["user_agent"] == PHONE)
    assert await end(client, laptop, str(phone_id)) == (200, {"logged_out": 1})
    assert [s["user_agent"] for s in await listed(client, laptop)] == [LAPTOP]
    ended = {"type": "session_ended", "reason": "logout"}
    async with asyncio.timeout(2):  # within a second, as the contract says, and a margin
        assert await sse.content.read() == b"event: session_ended\ndata: %b\n\n" % json.dumps(ended).encode()
        assert (await websocket.receive_json()) == ended
        assert (await websocket.receive()).type is aiohttp.WSMsgType.CLOSE
    assert websocket.close_code == server.WS_SESSION_ENDED
    assert [s["streams"] for s in await listed(client, laptop)] == [0]


async def test_ending_the_callers_own_session_by_its_id_logs_it_out(client: Client) -> None:
    laptop = await log_in(client, "alice")
    [mine] = await listed(client, laptop)
    assert await end(client, laptop, str(mine["id"])) == (200, {"logged_out": 1})
    assert (await client.get("/user/sessions", headers={"Authorization": laptop})).status == 401


async def test_ids_of_one_users_sessions_are_useless_to_another(client: Client) -> None:
    alice = await log_in(client, "alice")
    await log_in(client, "alice", PHONE)
    bob = await log_in(client, "bob")
    alice_ids = [str(s["id"]) for s in await listed(client, alice)]
    unknown = server.new_public_id()
    status, not_found = await end(client, bob, unknown)
    assert status == 404 and not_found["error"] == "no_such_session"
    for public_id in alice_ids:
        # The same answer as for an id that never existed: nothing to learn, nothing ended.
        assert await end(client, bob, public_id) == (404, not_found)
    assert [s["id"] for s in await listed(client, alice)] == alice_ids
    assert [s["current"] for s in await listed(client, bob)] == [True]


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/user/sessions/", id="empty"),
        pytest.param("/user/sessions/%C3%A9t%C3%A9", id="non-ascii"),
        pytest.param("/user/sessions/%FF%FE", id="not-utf-8"),
        pytest.param("/user/sessions/" + "A" * 4000, id="huge"),
        pytest.param("/user/sessions/%00", id="nul"),
        pytest.param("/user/sessions/..%2F..%2Fuser", id="encoded-dot-dot-slash"),
        # Dot segments are resolved as RFC 3986 says (`/user/sessions/../../user` is `/user`).
        pytest.param("/user/sessions/..", id="dot-dot"),
        pytest.param("/user/sessions/%2E%2E", id="encoded-dot-dot"),
        pytest.param("/user/sessions/x%20y", id="space"),
        pytest.param("/user/sessions/'%20OR%201=1%20--", id="sql"),
        pytest.param("/user/sessions/*", id="glob"),
        pytest.param("/user/sessions/a/b", id="two-segments"),
    ],
)
async def test_bad_ids_are_a_json_4xx_and_end_nothing(client: Client, path: str) -> None:
    alice = await log_in(client, "alice")
    response = await client.delete(URL(path, encoded=True), headers={"Authorization": alice})
    assert 400 <= response.status < 500
    assert response.content_type == "application/json"
    assert "error" in await response.json()
    assert len(await listed(client, alice)) == 1


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param("", id="empty"),
        pytest.param("not-a-session", id="unknown"),
        pytest.param("x" * 5000, id="huge"),
    ],
)
async def test_both_endpoints_need_a_valid_session(
    client: Client, method: str, authorization: str | None
) -> None:
    alice = await log_in(client, "alice")
    [mine] = await listed(client, alice)
    path = "/user/sessions" if method == "GET" else f"/user/sessions/{mine['id']}"
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.request(method, path, headers=headers)
    assert response.status == 401
    assert (await response.json())["error"] == "invalid_session"
    assert len(await listed(client, alice)) == 1


async def test_a_logged_out_session_can_no_longer_list_or_end(client: Client) -> None:
    alice = await log_in(client, "alice")
    other = await log_in(client, "alice")
    [_, second] = await listed(client, alice)
    await client.delete("/user", headers={"Authorization": alice})
    assert (await client.get("/user/sessions", headers={"Authorization": alice})).status == 401
    status, _ = await end(client, alice, str(second["id"]))
    assert status == 401
    assert len(await listed(client, other)) == 1


async def test_the_user_agent_is_cut_to_256_printable_ascii_characters(client: Client) -> None:
    user_agent = "Agent/1.0 (é\u263a) " + "x" * 1000
    session_id = await log_in(client, "alice", user_agent)
    [mine] = await listed(client, session_id)
    shown = str(mine["user_agent"])
    assert len(shown) == server.MAX_USER_AGENT_CHARS
    assert shown.startswith("Agent/1.0 (") and shown.isascii() and shown.isprintable()
    assert "?" in shown


async def test_no_user_agent_is_shown_as_empty(client: Client) -> None:
    response = await client.post(
        "/user", json={"username": "alice", "password": "wonderland"}, skip_auto_headers=["User-Agent"]
    )
    session_id = (await response.json())["session_id"]
    assert [s["user_agent"] for s in await listed(client, session_id)] == [""]


async def test_the_address_is_the_client_the_throttle_sees_behind_a_trusted_proxy(
    aiohttp_client: ClientFactory, database_url: str, clock: Clock, store_kind: str, clean_redis: None
) -> None:
    trusted = (ipaddress.ip_network("127.0.0.0/8"),)
    client = await start(aiohttp_client, database_url, clock, store_kind, trusted_proxies=trusted)
    # The client, then a proxy of ours; the connection comes from another (127.0.0.1).
    session_id = await log_in(client, "alice", forwarded_for="203.0.113.9, 127.0.0.2")
    assert [s["address"] for s in await listed(client, session_id)] == ["203.0.113.9"]


async def test_without_trusted_proxies_x_forwarded_for_is_ignored(client: Client) -> None:
    session_id = await log_in(client, "alice", forwarded_for="203.0.113.9")
    assert [s["address"] for s in await listed(client, session_id)] == ["127.0.0.1"]
