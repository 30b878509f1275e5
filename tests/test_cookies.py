"""Browsers: the session in an HttpOnly cookie, and the origin rules that keep other sites from
using it (cross-site request forgery, login CSRF, WebSocket hijacking, DNS rebinding), over real
HTTP on a real port: CORS for the origins of webserver.origins, no-store on session data, no
software versions in `Server`, and the demo page's CSP naming its script by hash.

Requests that need a Host or Origin no client library would send (a rebinding name, `null`) go as
raw bytes (conftest.raw_request); the rest through aiohttp's client, with the cookie sent by hand
(`Cookie:`), never from the client's jar, so each test says exactly what the browser would send.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import email.utils
import hashlib
import http.cookies
import json
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import server
from conftest import (
    ROOT,
    Client,
    ClientFactory,
    Clock,
    RawResponse,
    ServerProcess,
    add_user,
    count_sessions,
    free_port,
    make_config,
    raw_request,
    run_command,
)

PASSWORD = "wonderland"
FAST_HASHING = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}
Start = Callable[..., Awaitable[Client]]


@pytest.fixture
def start(aiohttp_client: ClientFactory, database_url: str, db: object, clock: Clock) -> Start:
    """A server on a real port with the user alice; keyword arguments replace config sections."""

    async def start(**sections: Any) -> Client:
        config = make_config(database_url, **sections)
        client = await aiohttp_client(await server.WebServer(config, clock=clock).initializer())
        await add_user(client.app, "alice", PASSWORD)
        return client

    return start


@pytest.fixture
async def client(start: Start) -> Client:
    return await start()


def own_origin(client: Client) -> str:
    return f"http://127.0.0.1:{client.port}"


async def cookie_login(client: Client, origin: str | None = None, **headers: str) -> tuple[str, Any]:
    """Log in in cookie mode from the page's own origin; the Set-Cookie morsel and the response."""
    headers.setdefault("Origin", origin or own_origin(client))
    credentials = {"username": "alice", "password": PASSWORD}
    response = await client.post("/user?cookie=true", json=credentials, headers=headers)
    assert response.status == 200, await response.text()
    client.session.cookie_jar.clear()  # every test sends the cookie by hand
    return session_cookie(response), response


def session_cookie(response: aiohttp.ClientResponse, name: str = "session") -> http.cookies.Morsel[str]:
    cookies: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
    for value in response.headers.getall("Set-Cookie", []):
        cookies.load(value)
    assert name in cookies, response.headers.getall("Set-Cookie", [])
    return cookies[name]


def set_cookie_lines(response: aiohttp.ClientResponse | RawResponse) -> str:
    if isinstance(response, RawResponse):
        return response.headers.get("set-cookie", "")
    return "\n".join(response.headers.getall("Set-Cookie", []))


def with_cookie(session_id: str, origin: str | None = None, **headers: str) -> dict[str, str]:
    return {"Cookie": f"session={session_id}", **({"Origin": origin} if origin else {}), **headers}


async def header_login(client: Client) -> str:
    response = await client.post("/user", json={"username": "alice", "password": PASSWORD})
    return str((await response.json())["session_id"])


async def is_valid(client: Client, session_id: str) -> bool:
    response = await client.get("/user", headers={"Authorization": session_id})
    return response.status == 200


async def raw(
    client: Client, method: str, path: str, *header_lines: str, host: str = "", interim: bool = False
) -> RawResponse:
    """A request as bytes, so Host and Origin are whatever the test says."""
    assert client.port is not None
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{client.port}'}", *header_lines]
    if method in ("POST", "DELETE", "PUT", "PATCH"):
        lines.append("Content-Length: 0")
    head = "\r\n".join(lines).encode()
    return await asyncio.to_thread(raw_request, client.port, head, interim=interim)


# ---------------------------------------------------------------------------
# The cookie
# ---------------------------------------------------------------------------


async def test_a_cookie_login_sets_an_httponly_strict_cookie_and_returns_no_session_id(
    client: Client, clock: Clock
) -> None:
    cookie, response = await cookie_login(client)
    body = await response.json()
    assert set(body) == {"username", "expires_at"}
    assert body["username"] == "alice"
    assert cookie.value not in await response.text()
    assert response.headers["Cache-Control"] == "no-store"
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/"
    assert not cookie["secure"]  # plain http, no proxy: a Secure cookie would never come back
    assert not cookie["domain"]  # this host only
    # It expires with the session's absolute timeout (24 hours by default), whatever its use.
    assert cookie["max-age"] == "86400"
    expires = email.utils.parsedate_to_datetime(cookie["expires"]).timestamp()
    assert expires == clock.now + 86400
    who = await client.get("/user", headers=with_cookie(cookie.value))
    assert (await who.json())["expires_at"] == body["expires_at"]


async def test_the_cookie_authenticates_every_endpoint_that_takes_the_header(client: Client) -> None:
    cookie, _ = await cookie_login(client)
    headers = with_cookie(cookie.value, own_origin(client))
    assert (await (await client.get("/user", headers=headers)).json())["username"] == "alice"
    listed = (await (await client.get("/user/sessions", headers=headers)).json())["sessions"]
    assert [entry["current"] for entry in listed] == [True]
    stream = await client.get("/events", headers=headers)  # what a browser's EventSource sends
    assert stream.headers["Content-Type"] == "text/event-stream"
    event_id = await server.publish(client.app[server.db_engine], {"hello": "cookie"})
    event = json.loads(await read_sse_data(stream))
    assert (event["id"], event["data"]) == (event_id, {"hello": "cookie"})
    stream.close()
    websocket = await client.ws_connect("/events", headers=headers)  # no first message needed
    event_id = await server.publish(client.app[server.db_engine], 2)
    assert json.loads((await websocket.receive(timeout=3)).data)["id"] == event_id
    await websocket.close()
    other = await header_login(client)
    other_id = next(
        entry["id"]
        for entry in (await (await client.get("/user/sessions", headers=headers)).json())["sessions"]
        if not entry["current"]
    )
    ended = await client.delete(f"/user/sessions/{other_id}", headers=headers)
    assert (ended.status, await ended.json()) == (200, {"logged_out": 1})
    assert not await is_valid(client, other)
    assert (await (await client.delete("/user", headers=headers)).json()) == {"logged_out": 1}
    assert (await client.get("/user", headers=headers)).status == 401


async def read_sse_data(response: aiohttp.ClientResponse) -> str:
    """The data line of the next SSE event on response."""
    while True:
        line = (await asyncio.wait_for(response.content.readline(), 3)).decode()
        if line.startswith("data: "):
            return line.removeprefix("data: ").strip()


async def test_the_authorization_header_wins_over_the_cookie(client: Client) -> None:
    cookie, _ = await cookie_login(client)
    header = await header_login(client)
    both = {**with_cookie(cookie.value), "Authorization": header}
    listed = (await (await client.get("/user/sessions", headers=both)).json())["sessions"]
    assert [entry["current"] for entry in listed] == [False, True]  # the header's, the newer one
    malformed = {**with_cookie(cookie.value), "Authorization": "Bearer not a session id"}
    assert (await client.get("/user", headers=malformed)).status == 401
    # Header-authenticated: no origin rule, and the cookie is neither used nor cleared.
    foreign = {**both, "Origin": "http://evil.example"}
    response = await client.delete("/user", headers=foreign)
    assert (response.status, await response.json()) == (200, {"logged_out": 1})
    assert "Set-Cookie" not in response.headers
    assert not await is_valid(client, header)
    assert await is_valid(client, cookie.value)


@pytest.mark.parametrize("everywhere", [False, True], ids=["this-session", "all"])
async def test_logging_out_with_the_cookie_ends_the_session_and_clears_the_cookie(
    client: Client, everywhere: bool
) -> None:
    cookie, _ = await cookie_login(client)
    other = await header_login(client)
    path = "/user?all=true" if everywhere else "/user"
    response = await client.delete(path, headers=with_cookie(cookie.value, own_origin(client)))
    assert (await response.json()) == {"logged_out": 2 if everywhere else 1}
    cleared = session_cookie(response)
    assert cleared.value == "" and cleared["max-age"] == "0" and cleared["path"] == "/"
    assert not await is_valid(client, cookie.value)
    assert await is_valid(client, other) is not everywhere


async def test_a_stale_cookie_is_cleared_by_logout_with_401(client: Client) -> None:
    stale = server.new_session_id()
    response = await client.delete("/user", headers=with_cookie(stale, own_origin(client)))
    assert (response.status, (await response.json())["error"]) == (401, "invalid_session")
    assert session_cookie(response).value == ""


async def test_ending_the_cookies_own_session_from_the_list_clears_the_cookie(client: Client) -> None:
    cookie, _ = await cookie_login(client)
    headers = with_cookie(cookie.value, own_origin(client))
    [mine] = (await (await client.get("/user/sessions", headers=headers)).json())["sessions"]
    response = await client.delete(f"/user/sessions/{mine['id']}", headers=headers)
    assert response.status == 200
    assert session_cookie(response).value == ""


async def test_the_cookie_name_comes_from_the_config(start: Start) -> None:
    sessions = server.SessionConfig(cookie=server.CookieConfig(name="__Host-sid", secure=True))
    client = await start(sessions=sessions)
    response = await client.post(
        "/user?cookie=true",
        json={"username": "alice", "password": PASSWORD},
        headers={"Origin": own_origin(client)},
    )
    cookie = session_cookie(response, "__Host-sid")
    assert cookie["secure"] is True  # configured true: also over plain http
    assert "session=" not in set_cookie_lines(response)
    assert (await client.get("/user", headers={"Cookie": f"__Host-sid={cookie.value}"})).status == 200
    assert (await client.get("/user", headers={"Cookie": f"session={cookie.value}"})).status == 401


@pytest.mark.parametrize(
    ("secure", "trusted", "forwarded", "expected"),
    [
        pytest.param("auto", True, "https", True, id="auto-trusted-proxy-says-https"),
        pytest.param("auto", True, "http", False, id="auto-trusted-proxy-says-http"),
        pytest.param("auto", False, "https", False, id="auto-untrusted-peer-says-https"),
        pytest.param("auto", True, None, False, id="auto-plain-http"),
        pytest.param(False, True, "https", False, id="false"),
        pytest.param(True, False, None, True, id="true"),
    ],
)
async def test_secure_follows_the_config_and_a_trusted_proxys_forwarded_proto(
    start: Start, secure: str | bool, trusted: bool, forwarded: str | None, expected: bool
) -> None:
    proxies = (server.ipaddress.ip_network("127.0.0.1/32"),) if trusted else ()
    client = await start(
        sessions=server.SessionConfig(cookie=server.CookieConfig(secure=secure)),
        webserver=server.WebServerConfig(host="127.0.0.1", port=0, trusted_proxies=proxies),
    )
    headers = {"X-Forwarded-Proto": forwarded} if forwarded else {}
    # Behind a proxy the page's origin is the public one; here the forwarded scheme on this host.
    origin = f"{forwarded if trusted and forwarded else 'http'}://127.0.0.1:{client.port}"
    cookie, _ = await cookie_login(client, origin=origin, **headers)
    assert bool(cookie["secure"]) is expected


@pytest.mark.parametrize(
    "value",
    [
        pytest.param({"name": "a b"}, id="space-in-name"),
        pytest.param({"name": ""}, id="empty-name"),
        pytest.param({"secure": "yes"}, id="secure-not-auto-true-false"),
        pytest.param({"__Host-s": 1}, id="unknown-key"),
        pytest.param({"name": "__Host-s", "secure": False}, id="host-prefix-without-secure"),
        pytest.param("session", id="not-an-object"),
    ],
)
def test_a_bad_cookie_setting_is_a_config_error_naming_the_key(value: object) -> None:
    with pytest.raises(server.ConfigError, match=r"'sessions\.cookie' must be") as error:
        server.parse_config({"sessions": {"cookie": value}})
    assert "'cookie." not in str(error.value)  # a key inside it is named in full, sessions.cookie.name


def test_a_bad_cookie_name_names_the_whole_key_and_what_a_name_may_hold() -> None:
    with pytest.raises(server.ConfigError) as error:
        server.parse_config({"sessions": {"cookie": {"name": "a b"}}})
    assert "'sessions.cookie.name' must be a cookie name (letters, digits" in str(error.value)


def test_webserver_origins_and_the_older_events_allowed_origins_are_both_read() -> None:
    config = server.parse_config(
        {
            "webserver": {"origins": ["HTTPS://App.Example.com:443"]},
            "events": {"allowed_origins": ["http://old.example:80"]},
        }
    )
    assert config.origins == {"https://app.example.com", "http://old.example"}
    for bad in (["https://example.com/path"], ["null"], "https://example.com", ["https://user@example.com"]):
        with pytest.raises(server.ConfigError, match=r"'webserver\.origins' must be"):
            server.parse_config({"webserver": {"origins": bad}})


# ---------------------------------------------------------------------------
# Cross-site request forgery
# ---------------------------------------------------------------------------

# Requests a page of another origin could make the browser send with the cookie, each refused
# 403 forbidden_origin. {port} is the server's port; Host is the server's own address unless the
# case gives one (a DNS-rebinding page: its Host and Origin agree on the attacker's name).
FORBIDDEN = [
    pytest.param(["Origin: http://evil.example"], "", id="another-site"),
    pytest.param(["Origin: http://127.0.0.1:{other_port}"], "", id="another-port-of-this-host"),
    pytest.param(["Origin: https://127.0.0.1:{port}"], "", id="another-scheme"),
    pytest.param(["Origin: null"], "", id="null"),
    pytest.param([], "", id="no-origin"),
    pytest.param(["Sec-Fetch-Site: cross-site"], "", id="no-origin-sec-fetch-site-cross-site"),
    pytest.param(["Sec-Fetch-Site: same-site"], "", id="no-origin-sec-fetch-site-same-site"),
    pytest.param(["Origin: http://rebind.example:{port}"], "rebind.example:{port}", id="rebinding-host"),
    pytest.param(
        ["Origin: http://rebind.example:{port}", "Sec-Fetch-Site: same-origin"],
        "rebind.example:{port}",
        id="rebinding-host-sec-fetch-site-same-origin",
    ),
    pytest.param(
        ["Origin: http://evil.example", "Sec-Fetch-Site: same-origin"],
        "",
        id="origin-wins-over-sec-fetch-site",
    ),
]

# Requests from the service's own pages, each accepted.
ALLOWED = [
    pytest.param(["Origin: http://127.0.0.1:{port}"], "", id="own-origin"),
    pytest.param(["Origin: http://LOCALHOST:{port}"], "localhost:{port}", id="localhost"),
    pytest.param(["Origin: http://[::1]:{port}"], "[::1]:{port}", id="ipv6-loopback"),
    pytest.param(["Origin: http://10.1.2.3:{port}"], "10.1.2.3:{port}", id="an-ip-address-host"),
    pytest.param(["Sec-Fetch-Site: same-origin"], "", id="no-origin-sec-fetch-site-same-origin"),
]


def fill(lines: list[str], host: str, client: Client) -> tuple[list[str], str]:
    assert client.port is not None
    values = {"port": client.port, "other_port": client.port + 1}
    return [line.format(**values) for line in lines], host.format(**values)


@pytest.mark.parametrize(("lines", "host"), FORBIDDEN)
async def test_a_cookie_logout_from_another_origin_is_refused_and_the_session_lives(
    client: Client, lines: list[str], host: str
) -> None:
    cookie, _ = await cookie_login(client)
    lines, host = fill(lines, host, client)
    for path in ("/user", "/user?all=true"):
        answer = await raw(client, "DELETE", path, f"Cookie: session={cookie.value}", *lines, host=host)
        assert (answer.status, answer.json()["error"]) == (403, "forbidden_origin")
        assert "session=" not in set_cookie_lines(answer)
    assert await is_valid(client, cookie.value)


@pytest.mark.parametrize(("lines", "host"), FORBIDDEN)
async def test_ending_a_session_by_cookie_from_another_origin_is_refused(
    client: Client, lines: list[str], host: str
) -> None:
    cookie, _ = await cookie_login(client)
    other = await header_login(client)
    listed = await client.get("/user/sessions", headers={"Authorization": other})
    other_id = next(entry["id"] for entry in (await listed.json())["sessions"] if entry["current"])
    lines, host = fill(lines, host, client)
    path = f"/user/sessions/{other_id}"
    answer = await raw(client, "DELETE", path, f"Cookie: session={cookie.value}", *lines, host=host)
    assert (answer.status, answer.json()["error"]) == (403, "forbidden_origin")
    assert await is_valid(client, other)


@pytest.mark.parametrize(("lines", "host"), FORBIDDEN)
async def test_a_cookie_login_from_another_origin_is_refused_login_csrf(
    client: Client, lines: list[str], host: str
) -> None:
    lines, host = fill(lines, host, client)
    body = json.dumps({"username": "alice", "password": PASSWORD}).encode()
    assert client.port is not None
    head = ["POST /user?cookie=true HTTP/1.1", f"Host: {host or f'127.0.0.1:{client.port}'}", *lines]
    head.append(f"Content-Length: {len(body)}")
    answer = await asyncio.to_thread(raw_request, client.port, "\r\n".join(head).encode(), body)
    assert (answer.status, answer.json()["error"]) == (403, "forbidden_origin")
    assert "set-cookie" not in answer.headers
    assert await count_sessions(client.app[server.sessions]) == 0


@pytest.mark.parametrize(("lines", "host"), ALLOWED)
async def test_cookie_requests_from_the_services_own_origin_are_accepted(
    client: Client, lines: list[str], host: str
) -> None:
    lines, host = fill(lines, host, client)
    body = json.dumps({"username": "alice", "password": PASSWORD}).encode()
    assert client.port is not None
    head = ["POST /user?cookie=true HTTP/1.1", f"Host: {host or f'127.0.0.1:{client.port}'}", *lines]
    head.append(f"Content-Length: {len(body)}")
    answer = await asyncio.to_thread(raw_request, client.port, "\r\n".join(head).encode(), body)
    assert answer.status == 200, answer.body
    session_id = http.cookies.SimpleCookie(answer.headers["set-cookie"])["session"].value
    deleted = await raw(client, "DELETE", "/user", f"Cookie: session={session_id}", *lines, host=host)
    assert (deleted.status, deleted.json()) == (200, {"logged_out": 1})


async def test_a_cookie_request_with_a_safe_method_needs_no_origin(client: Client) -> None:
    cookie, _ = await cookie_login(client)
    # GET is never an action, and SameSite=Strict keeps the cookie off other sites' requests.
    answer = await raw(
        client, "GET", "/user", f"Cookie: session={cookie.value}", "Origin: http://evil.example"
    )
    assert answer.status == 200
    assert "access-control-allow-origin" not in answer.headers  # and the page cannot read it


async def test_the_configured_host_name_is_an_own_origin(start: Start) -> None:
    client = await start(webserver=server.WebServerConfig(host="login.internal", port=0))
    host = f"login.internal:{client.port}"
    cookie, _ = await cookie_login(client, origin=f"http://{host}", Host=host)
    origin = f"Origin: http://login.internal:{client.port}"
    host = f"login.internal:{client.port}"
    answer = await raw(client, "DELETE", "/user", f"Cookie: session={cookie.value}", origin, host=host)
    assert answer.status == 200


async def test_behind_a_proxy_only_a_listed_public_origin_or_forwarded_address_is_own(start: Start) -> None:
    proxies = (server.ipaddress.ip_network("127.0.0.1/32"),)
    client = await start(
        webserver=server.WebServerConfig(
            host="127.0.0.1", port=0, trusted_proxies=proxies, origins=("https://login.example.com",)
        )
    )
    forwarded = ["X-Forwarded-Proto: https", "X-Forwarded-Host: login.example.com"]
    cookie, _ = await cookie_login(
        client, origin="https://login.example.com", **dict(line.split(": ") for line in forwarded)
    )
    # An unlisted name the proxy forwards is still only what the client's Host said: refused.
    rebinding = ["X-Forwarded-Proto: https", "X-Forwarded-Host: rebind.example"]
    answer = await raw(
        client,
        "DELETE",
        "/user",
        f"Cookie: session={cookie.value}",
        "Origin: https://rebind.example",
        *rebinding,
    )
    assert answer.status == 403
    # The proxy's forwarded address (no name to rebind) is the service's own origin.
    by_address = ["X-Forwarded-Proto: https", "X-Forwarded-Host: 10.0.0.5"]
    answer = await raw(
        client, "DELETE", "/user", f"Cookie: session={cookie.value}", "Origin: https://10.0.0.5", *by_address
    )
    assert answer.status == 200


async def test_forwarded_headers_from_an_untrusted_peer_are_ignored(client: Client) -> None:
    cookie, _ = await cookie_login(client)
    lines = ["X-Forwarded-Proto: https", "X-Forwarded-Host: 10.0.0.5", "Origin: https://10.0.0.5"]
    answer = await raw(client, "DELETE", "/user", f"Cookie: session={cookie.value}", *lines)
    assert answer.status == 403
    assert await is_valid(client, cookie.value)


async def test_a_page_of_a_listed_origin_may_use_the_cookie(start: Start) -> None:
    listed = "https://app.example.com"
    client = await start(webserver=server.WebServerConfig(host="127.0.0.1", port=0, origins=(listed,)))
    cookie, login = await cookie_login(client, origin=listed)
    assert login.headers["Access-Control-Allow-Origin"] == listed
    answer = await raw(client, "DELETE", "/user", f"Cookie: session={cookie.value}", f"Origin: {listed}")
    assert answer.status == 200


async def test_a_page_of_a_listed_origin_under_the_older_name_may_use_the_cookie(start: Start) -> None:
    listed = "https://app.example.com"
    client = await start(events=server.EventsConfig(allowed_origins=(listed,)))
    cookie, _ = await cookie_login(client, origin=listed)
    answer = await raw(client, "DELETE", "/user", f"Cookie: session={cookie.value}", f"Origin: {listed}")
    assert answer.status == 200


# ---------------------------------------------------------------------------
# WebSocket handshakes
# ---------------------------------------------------------------------------


def handshake(*lines: str) -> list[str]:
    key = base64.b64encode(os.urandom(16)).decode()
    return [
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *lines,
    ]


@pytest.mark.parametrize(("lines", "host"), FORBIDDEN)
async def test_a_cookie_websocket_from_another_origin_is_refused(
    client: Client, lines: list[str], host: str
) -> None:
    cookie, _ = await cookie_login(client)
    lines, host = fill(lines, host, client)
    answer = await raw(
        client, "GET", "/events", *handshake(f"Cookie: session={cookie.value}", *lines), host=host
    )
    assert (answer.status, answer.json()["error"]) == (403, "forbidden_origin")
    assert len(client.app[server.streams]) == 0


async def test_a_rebinding_page_cannot_open_a_websocket_whatever_its_credentials(client: Client) -> None:
    session_id = await header_login(client)
    assert client.port is not None
    host = f"rebind.example:{client.port}"
    origin = f"Origin: http://{host}"
    for credentials in ([f"Authorization: {session_id}"], []):
        answer = await raw(client, "GET", "/events", *handshake(origin, *credentials), host=host)
        assert (answer.status, answer.json()["error"]) == (403, "forbidden_origin")


async def test_a_cookie_websocket_from_the_own_origin_streams_events(client: Client) -> None:
    cookie, _ = await cookie_login(client)
    headers = with_cookie(cookie.value, own_origin(client))
    websocket = await client.ws_connect("/events", headers=headers)
    event_id = await server.publish(client.app[server.db_engine], "hi")
    assert json.loads((await websocket.receive(timeout=3)).data)["id"] == event_id
    await websocket.close()


# ---------------------------------------------------------------------------
# CORS for webserver.origins
# ---------------------------------------------------------------------------


async def test_a_preflight_from_a_listed_origin_allows_the_paths_methods_with_credentials(
    start: Start,
) -> None:
    listed = "https://app.example.com"
    client = await start(webserver=server.WebServerConfig(host="127.0.0.1", port=0, origins=(listed,)))
    headers = {
        "Origin": listed,
        "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "content-type",
    }
    response = await client.options("/user", headers=headers)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == listed
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert {"DELETE", "GET", "POST"} <= set(response.headers["Access-Control-Allow-Methods"].split(", "))
    assert "Content-Type" in response.headers["Access-Control-Allow-Headers"]
    refused = await client.options("/user", headers={**headers, "Origin": "https://evil.example"})
    assert (refused.status, (await refused.json())["error"]) == (403, "forbidden_origin")
    assert "Access-Control-Allow-Origin" not in refused.headers
    # Not a preflight, or a path that does not exist: the usual answers.
    assert (await client.options("/user")).status == 405
    assert (await client.options("/nowhere", headers=headers)).status == 404


async def test_answers_to_a_listed_origin_carry_cors_headers_streams_and_errors_too(start: Start) -> None:
    listed = "https://app.example.com"
    client = await start(webserver=server.WebServerConfig(host="127.0.0.1", port=0, origins=(listed,)))
    cookie, _ = await cookie_login(client, origin=listed)
    headers = with_cookie(cookie.value, listed)
    for response in [
        await client.get("/user", headers=headers),
        await client.get("/events", headers=headers),
        await client.get("/user", headers={"Origin": listed}),  # 401
    ]:
        assert response.headers["Access-Control-Allow-Origin"] == listed
        assert response.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in response.headers["Vary"]
        response.close()
    other = await client.get("/user", headers=with_cookie(cookie.value, "https://evil.example"))
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_without_listed_origins_no_cors_headers_are_sent(client: Client) -> None:
    response = await client.get("/health", headers={"Origin": "https://app.example.com"})
    assert not any(name.startswith("Access-Control-") for name in response.headers)


# ---------------------------------------------------------------------------
# Caching, Server, the page's CSP
# ---------------------------------------------------------------------------


async def test_answers_with_session_data_are_not_stored_by_caches(client: Client) -> None:
    _, login = await cookie_login(client)
    session_id = await header_login(client)
    assert login.headers["Cache-Control"] == "no-store"
    for path in ("/user", "/user/sessions"):
        response = await client.get(path, headers={"Authorization": session_id})
        assert response.headers["Cache-Control"] == "no-store", path


def test_no_answer_names_the_servers_software_versions(
    start_server: Callable[..., ServerProcess], tmp_path: Path, database_url: str, db: object
) -> None:
    """A real `python server.py`: its connections answer what aiohttp's HTTP parser refuses, too."""
    port = free_port()
    config = tmp_path / "config.json"
    settings = {"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST_HASHING}
    config.write_text(json.dumps(settings))
    env = {"DATABASE_URL": database_url}
    assert run_command(["adduser", "alice", "--config", str(config)], PASSWORD + "\n", env).returncode == 0
    process = start_server(["--config", str(config)], env=env)
    process.wait_until_serving()
    body = json.dumps({"username": "alice", "password": PASSWORD}).encode()
    login = raw_request(port, f"POST /user HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}".encode(), body)
    session_id = login.json()["session_id"]
    heads = [
        b"GET /health HTTP/1.1",
        b"GET / HTTP/1.1",
        b"GET /nowhere HTTP/1.1",
        b"PUT /user HTTP/1.1\r\nContent-Length: 0",
        b"GET /user HTTP/1.1",
        b"POST /user HTTP/1.1\r\nContent-Length: 1\r\n\r\n{",
        b"GET /user HTTP/1.1\r\nBad Header Line",  # refused by aiohttp's parser, before any handler
        f"GET /events HTTP/1.1\r\nAuthorization: {session_id}".encode(),
        "\r\n".join(["GET /events HTTP/1.1", f"Authorization: {session_id}", *handshake()]).encode(),
    ]
    seen = []
    for head in heads:
        line, _, rest = head.partition(b"\r\n")
        answer = raw_request(
            port, line + b"\r\nHost: 127.0.0.1" + (b"\r\n" + rest if rest else b""), interim=True
        )
        seen.append((line.decode(), answer.status, answer.headers.get("server")))
    assert [status for _, status, _ in seen] == [200, 200, 404, 405, 401, 400, 400, 200, 101]
    assert [header for _, _, header in seen] == [server.SERVER_HEADER] * len(seen), seen
    assert not re.search(r"[0-9]|aiohttp|python", server.SERVER_HEADER, re.IGNORECASE)


async def test_the_pages_csp_allows_exactly_its_own_script_by_hash(client: Client) -> None:
    response = await client.get("/")
    policy = dict(
        part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";")
    )
    page = (ROOT / "index.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", page, re.DOTALL)
    assert len(scripts) == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert policy["script-src"] == f"'sha256-{digest}'"
    assert "<script " not in page  # no other script element (an src= would need the policy too)
    assert policy["frame-ancestors"] == "'none'" and policy["connect-src"] == "'self'"


def test_config_dataclasses_have_the_new_defaults() -> None:
    assert dataclasses.asdict(server.Config().sessions.cookie) == {"name": "session", "secure": "auto"}
    assert server.Config().webserver.origins == ()


# ---------------------------------------------------------------------------
# Publishing to a topic (POST /events) with the cookie
# ---------------------------------------------------------------------------


@pytest.fixture
async def lobby(start: Start) -> Client:
    rules = server.topic_rules([{"pattern": "lobby", "subscribe": "anyone", "publish": "anyone"}])
    return await start(events=server.EventsConfig(topics=rules))


async def test_a_cookie_post_to_a_topic_from_another_origin_is_refused(lobby: Client) -> None:
    cookie, _ = await cookie_login(lobby)
    body = json.dumps({"topic": "lobby", "data": {"text": "forged"}})
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{lobby.port + 1}"):
        headers = {**with_cookie(cookie.value, origin), "Content-Type": "text/plain"}
        response = await lobby.post("/events", data=body, headers=headers)
        assert (response.status, (await response.json())["error"]) == (403, "forbidden_origin"), origin
    response = await lobby.post("/events", data=body, headers=with_cookie(cookie.value))  # no Origin
    assert response.status == 403
    engine = lobby.app[server.db_engine]
    async with server.connection(engine) as conn:
        assert await conn.scalar("SELECT count(*) FROM events") == 0


async def test_a_cookie_post_to_a_topic_from_the_own_origin_publishes(lobby: Client) -> None:
    cookie, _ = await cookie_login(lobby)
    body = {"topic": "lobby", "data": {"text": "hello"}}
    response = await lobby.post("/events", json=body, headers=with_cookie(cookie.value, own_origin(lobby)))
    assert response.status == 200, await response.text()
    assert isinstance((await response.json())["id"], int)
    # The header is never refused for its origin.
    session_id = await header_login(lobby)
    headers = {"Authorization": session_id, "Origin": "http://evil.example"}
    assert (await lobby.post("/events", json=body, headers=headers)).status == 200
