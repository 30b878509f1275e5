"""Every malformed request gets the contract's 4xx with a JSON error body, never a 500,
and changes nothing: the server goes on serving and existing sessions stay valid."""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import logging
import socket
import time
import zlib
from collections.abc import AsyncIterator
from ipaddress import ip_network

import pytest
from aiohttp import web

import server
from conftest import Client, ClientFactory, add_user, log_in, raw_request, server_config

LONG = "x" * 1025


def credentials(username: object = "alice", password: object = "wonderland") -> bytes:
    return json.dumps({"username": username, "password": password}).encode()


LOGIN_BODIES = [
    pytest.param(b"not json", 400, "bad_json", id="not-json"),
    pytest.param(b"", 400, "bad_json", id="empty-body"),
    pytest.param(b'{"username": "alice", "password": "wonderland"', 400, "bad_json", id="truncated-json"),
    pytest.param(b'{"username": "\xff\xfe", "password": "x"}', 400, "bad_json", id="not-utf8"),
    pytest.param(b"[" * 10000 + b"]" * 10000, 413, "body_too_large", id="deep-nesting-too-large"),
    pytest.param(b"[" * 5000 + b"]" * 5000, 400, "bad_json", id="deep-nesting"),
    pytest.param(b"1" * 5000, 400, "bad_json", id="integer-too-long-to-parse"),
    pytest.param(b"null", 422, "invalid_credentials_format", id="json-null"),
    pytest.param(b"5", 422, "invalid_credentials_format", id="json-number"),
    pytest.param(b'"str"', 422, "invalid_credentials_format", id="json-string"),
    pytest.param(b"[]", 422, "invalid_credentials_format", id="json-array"),
    pytest.param(b"true", 422, "invalid_credentials_format", id="json-true"),
    pytest.param(b"{}", 422, "invalid_credentials_format", id="empty-object"),
    pytest.param(b'{"password": "wonderland"}', 422, "invalid_credentials_format", id="no-username"),
    pytest.param(b'{"username": "alice"}', 422, "invalid_credentials_format", id="no-password"),
    pytest.param(credentials(username=5), 422, "invalid_credentials_format", id="username-number"),
    pytest.param(credentials(password=None), 422, "invalid_credentials_format", id="password-null"),
    pytest.param(credentials(username=["alice"]), 422, "invalid_credentials_format", id="username-list"),
    pytest.param(credentials(password={"a": 1}), 422, "invalid_credentials_format", id="password-object"),
    pytest.param(credentials(password=True), 422, "invalid_credentials_format", id="password-bool"),
    pytest.param(credentials(username=""), 422, "invalid_credentials_format", id="empty-username"),
    pytest.param(credentials(password=""), 422, "invalid_credentials_format", id="empty-password"),
    pytest.param(credentials(username=LONG), 422, "invalid_credentials_format", id="username-too-long"),
    pytest.param(credentials(password=LONG), 422, "invalid_credentials_format", id="password-too-long"),
    pytest.param(credentials(username="al\x00ice"), 422, "invalid_credentials_format", id="nul-in-username"),
    pytest.param(credentials(password="wonder\x00"), 422, "invalid_credentials_format", id="nul-in-password"),
    pytest.param(
        b'{"username": "\\ud800", "password": "x"}', 422, "invalid_credentials_format", id="lone-surrogate"
    ),
    pytest.param(b"{" + b" " * 17000 + b"}", 413, "body_too_large", id="body-over-16-KiB"),
]


@pytest.mark.parametrize(("body", "status", "error"), LOGIN_BODIES)
async def test_bad_login_body_gets_a_clear_4xx(client: Client, body: bytes, status: int, error: str) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    response = await client.post("/user", data=body)
    assert response.status == status
    assert response.content_type == "application/json"
    answer = await response.json()
    assert answer["error"] == error and answer["message"]
    # Nothing was lost: the old session still works and a good login still succeeds.
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200
    await log_in(client, "alice", "wonderland")


async def test_credentials_of_exactly_1024_characters_are_accepted(client: Client) -> None:
    name, password = "n" * 1024, "p" * 1024
    await add_user(client.app, name, password)
    await log_in(client, name, password)


async def test_a_body_of_exactly_16_kib_is_read(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    body = credentials()
    body = body[:-1] + b" " * (16 * 1024 - len(body)) + b"}"
    assert len(body) == 16 * 1024
    response = await client.post("/user", data=body)
    assert response.status == 200


BAD_AUTHORIZATION = [
    pytest.param(None, id="missing"),
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("Bearer", id="bearer-alone"),
    pytest.param("Bearer ", id="bearer-with-nothing-after"),
    pytest.param("unknown-session-id", id="unknown"),
    pytest.param("Bearer unknown-session-id", id="bearer-unknown"),
    pytest.param("Basic YWxpY2U6d29uZGVybGFuZA==", id="basic-scheme"),
    pytest.param("x" * 8000, id="absurdly-long"),
    pytest.param("Bearer " + "x" * 8000, id="bearer-absurdly-long"),
]


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("header", BAD_AUTHORIZATION)
async def test_bad_authorization_is_401(client: Client, method: str, header: str | None) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    headers = {} if header is None else {"Authorization": header}
    response = await client.request(method, "/user", headers=headers)
    assert response.status == 401
    assert (await response.json())["error"] == "invalid_session"
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200


async def test_session_id_with_extra_characters_is_not_accepted(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    for near_miss in (session_id + "x", session_id[:-1], session_id.upper()):
        response = await client.get("/user", headers={"Authorization": near_miss})
        assert response.status == 401


@pytest.mark.parametrize("value", ["yes", "1", "TRUE", ""])
async def test_logout_all_with_a_value_other_than_true_or_false_is_400(client: Client, value: str) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    response = await client.delete(f"/user?all={value}", headers={"Authorization": session_id})
    assert response.status == 400
    assert (await response.json())["error"] == "bad_request"
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200


@pytest.mark.parametrize("path", ["/users", "/index.html", "/user/", "/user/alice", "/health/x", "/%00"])
async def test_unknown_path_is_a_json_404(client: Client, path: str) -> None:
    response = await client.get(path)
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"


@pytest.mark.parametrize(("method", "path"), [("PUT", "/user"), ("PATCH", "/user"), ("POST", "/health")])
async def test_other_method_is_a_json_405(client: Client, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert response.status == 405
    assert (await response.json())["error"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]


# What a client may declare about a body, with how the body really is.
def gzipped(data: bytes) -> bytes:
    return gzip.compress(data)


DECLARED_BODIES = [
    pytest.param(b"Content-Encoding: gzip", credentials(), 400, "bad_body", id="gzip-declared-plain-sent"),
    pytest.param(
        b"Content-Encoding: deflate", credentials(), 400, "bad_body", id="deflate-declared-plain-sent"
    ),
    pytest.param(
        b"Content-Encoding: gzip", gzipped(credentials())[:20], 400, "bad_json", id="gzip-truncated"
    ),
    pytest.param(
        b"Content-Encoding: compress", credentials(), 415, "unsupported_content_encoding", id="compress"
    ),
    pytest.param(
        b"Content-Encoding: gzip, gzip",
        gzipped(gzipped(credentials())),
        415,
        "unsupported_content_encoding",
        id="stacked-codings",
    ),
    pytest.param(
        b"Content-Encoding: caf\xe9", credentials(), 415, "unsupported_content_encoding", id="latin-1-coding"
    ),
    pytest.param(
        b"Content-Encoding: gzip",
        gzipped(b" " * 40000 + credentials()),
        413,
        "body_too_large",
        id="gzip-bomb",
    ),
    pytest.param(
        b"Content-Type: application/json; charset=utf-16",
        credentials().decode().encode("utf-16"),
        400,
        "bad_json",
        id="utf-16-body",
    ),
]


def login_head(extra: bytes, length: int | None) -> bytes:
    lines = [b"POST /user HTTP/1.1", b"Host: localhost", b"Connection: close", extra]
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    return b"\r\n".join(line for line in lines if line)


@pytest.mark.parametrize(("header", "body", "status", "error"), DECLARED_BODIES)
async def test_a_body_unlike_its_declared_coding_or_framing_gets_a_json_4xx(
    client: Client, caplog: pytest.LogCaptureFixture, header: bytes, body: bytes, status: int, error: str
) -> None:
    await add_user(client.app, "alice", "wonderland")
    chunked = header.startswith(b"Transfer-Encoding")
    head = login_head(header, None if chunked else len(body))
    answer = await asyncio.to_thread(raw_request, client.port, head, body)
    assert (answer.status, answer.headers["content-type"]) == (status, "application/json; charset=utf-8")
    assert answer.json()["error"] == error
    await log_in(client, "alice", "wonderland")
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]


@pytest.mark.parametrize(
    ("header", "body"),
    [
        pytest.param(b"Content-Encoding: gzip", gzipped(credentials()), id="gzip"),
        pytest.param(b"Content-Encoding: GZip", gzipped(credentials()), id="gzip-any-case"),
        pytest.param(b"Content-Encoding: deflate", zlib.compress(credentials()), id="deflate"),
        pytest.param(b"Content-Encoding: identity", credentials(), id="identity"),
        pytest.param(b"", b"\xef\xbb\xbf" + credentials(), id="utf-8-byte-order-mark"),
        pytest.param(
            b"Transfer-Encoding: chunked",
            b"%x\r\n%s\r\n0\r\n\r\n" % (len(credentials()), credentials()),
            id="chunked",
        ),
    ],
)
async def test_a_body_in_a_form_a_client_may_send_logs_in(client: Client, header: bytes, body: bytes) -> None:
    await add_user(client.app, "alice", "wonderland")
    chunked = header.startswith(b"Transfer-Encoding")
    answer = await asyncio.to_thread(
        raw_request, client.port, login_head(header, None if chunked else len(body)), body
    )
    assert answer.status == 200, answer.body
    assert answer.json()["session_id"]


@pytest.mark.parametrize(
    "coding", [b"gzip, chunked", b"x-custom, chunked", b"identity, chunked"], ids=bytes.decode
)
async def test_a_transfer_coding_other_than_chunked_is_a_json_501(client: Client, coding: bytes) -> None:
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(credentials()), credentials())
    answer = await asyncio.to_thread(
        raw_request, client.port, login_head(b"Transfer-Encoding: " + coding, None), body
    )
    assert answer.status == 501 and answer.json()["error"] == "unsupported_transfer_encoding"


@pytest.mark.parametrize(
    ("header", "status", "error"),
    [
        pytest.param(b"Content-Length: 1000000", 413, "body_too_large", id="over-the-limit"),
        pytest.param(b"Content-Length: 16385", 413, "body_too_large", id="one-byte-over"),
        pytest.param(
            b"Content-Length: 40\r\nContent-Encoding: zip",
            415,
            "unsupported_content_encoding",
            id="unsupported-coding",
        ),
    ],
)
async def test_expect_100_continue_for_a_body_never_read_is_refused_at_once(
    client: Client, header: bytes, status: int, error: str
) -> None:
    head = b"POST /user HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\n" + header
    started = time.monotonic()
    # The first answer, before any body is sent: the refusal itself, not "100 Continue".
    answer = await asyncio.to_thread(raw_request, client.port, head, b"", 3.0, True)
    assert time.monotonic() - started < 2
    assert answer.status == status and answer.json()["error"] == error


async def test_expect_100_continue_for_a_body_within_the_limit_continues(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    body = credentials()
    head = b"POST /user HTTP/1.1\r\nHost: localhost\r\nExpect: 100-continue\r\nContent-Length: %d" % len(body)

    def converse() -> tuple[bytes, bytes]:
        with socket.create_connection(("127.0.0.1", client.port), timeout=5) as sock:
            sock.sendall(head + b"\r\n\r\n")
            interim = sock.recv(100)
            sock.sendall(body)
            return interim, sock.recv(4096)

    interim, final = await asyncio.to_thread(converse)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    assert final.startswith(b"HTTP/1.1 200") and b'"session_id"' in final


# Bytes aiohttp's HTTP parser refuses by itself, before any middleware runs; the server's own
# runner (the one `python server.py` and gunicorn's workers use) answers them in JSON too.
PARSER_REFUSALS = [
    pytest.param(b"POST", b"Authorization: Bearer caf\x01", b"", 400, id="control-byte-in-a-header"),
    pytest.param(b"GET", b"X-Padding: " + b"a" * 9000, b"", 400, id="header-line-over-8-kib"),
    pytest.param(b"POST", b"Content-Encoding: br\r\nContent-Length: 2", b"{}", 415, id="brotli"),
    pytest.param(b"POST", b"Content-Encoding: zstd\r\nContent-Length: 2", b"{}", 415, id="zstandard"),
    pytest.param(b"POST", b"Transfer-Encoding: chunked", b'5\r\n{"use\r\nZZ\r\n', 400, id="bad-chunk-size"),
    pytest.param(
        b"POST", b"Transfer-Encoding: chunked\r\nContent-Length: 2", b"{}", 400, id="length-and-chunked"
    ),
    pytest.param(b"POST", b"Content-Length: -1", b"", 400, id="negative-length"),
    pytest.param(b"POST", b"Content-Length: abc", b"", 400, id="length-not-a-number"),
    pytest.param(b"POST", b"Content-Length: 2\r\nContent-Length: 3", b"{}", 400, id="two-lengths"),
    pytest.param(b"FOO", b"", b"", 400, id="unknown-method"),
]


@pytest.fixture
async def served_port(config: server.Config) -> AsyncIterator[int]:
    """The application behind WebServer's own runner, on a free port."""
    runner = await server.WebServer(config).runner()
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield runner.addresses[0][1]
    await runner.cleanup()


@pytest.mark.parametrize(("method", "header", "body", "status"), PARSER_REFUSALS)
async def test_bytes_the_http_parser_refuses_get_a_json_4xx_and_one_log_line(
    served_port: int,
    caplog: pytest.LogCaptureFixture,
    method: bytes,
    header: bytes,
    body: bytes,
    status: int,
) -> None:
    head = method + b" /user HTTP/1.1\r\nHost: localhost\r\n" + header
    answer = await asyncio.to_thread(raw_request, served_port, head.rstrip(b"\r\n"), body)
    assert answer.status == status
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.body.endswith(b"\n")
    assert set(answer.json()) == {"error", "message"}
    healthy = await asyncio.to_thread(raw_request, served_port, b"GET /health HTTP/1.1\r\nHost: localhost")
    assert healthy.status == 200
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]


@pytest.mark.parametrize("path", ["/user", "/health"])
async def test_an_expectation_other_than_100_continue_is_a_json_417(client: Client, path: str) -> None:
    head = b"GET %s HTTP/1.1\r\nHost: localhost\r\nExpect: something-else" % path.encode()
    answer = await asyncio.to_thread(raw_request, client.port, head)
    assert answer.status == 417 and answer.json()["error"] == "expectation_failed"


# Header bytes no session id has: undecodable (Latin-1), other scripts, and characters outside
# the ids' alphabet. Every store answers 401 without being asked.
ODD_AUTHORIZATION = [
    pytest.param(b"Bearer caf\xe9", id="latin-1-byte"),
    pytest.param(b"caf\xe9", id="latin-1-byte-seed-form"),
    pytest.param(b"Bearer \xff\xfe\xfd", id="invalid-utf-8"),
    pytest.param("Bearer café".encode(), id="utf-8-letter"),
    pytest.param("Bearer \U0001d530\U0001d522\U0001d530".encode(), id="astral-plane"),
    pytest.param(b"Bearer a b", id="space-inside"),
    pytest.param(b"Bearer a,b;c=d", id="punctuation"),
    pytest.param(b"Bearer " + b"A" * 129, id="129-characters"),
]


@pytest.mark.parametrize("method", [b"GET", b"DELETE"])
@pytest.mark.parametrize("value", ODD_AUTHORIZATION)
async def test_authorization_bytes_that_are_no_session_id_get_401_with_every_store(
    aiohttp_client: ClientFactory, database_url: str, store_kind: str, method: bytes, value: bytes
) -> None:
    app = await server.WebServer(server_config(database_url, store_kind)).initializer()
    client = await aiohttp_client(app)
    await add_user(app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    head = method + b" /user HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: " + value
    answer = await asyncio.to_thread(raw_request, client.port, head)
    assert answer.status == 401 and answer.json()["error"] == "invalid_session"
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200


@pytest.mark.parametrize(
    "forwarded",
    [
        pytest.param(b"fe80::1%caf\xe9", id="zone-with-latin-1-byte"),
        pytest.param(b"fe80::1%" + b"x" * 2000, id="zone-longer-than-a-key"),
        pytest.param(b"203.0.113.9\xe9", id="latin-1-byte"),
        pytest.param(b"203.0.113.9, \xff\xff", id="invalid-utf-8-hop"),
    ],
)
async def test_a_forwarded_address_reaches_the_failure_log_only_as_an_ip_address(
    aiohttp_client: ClientFactory, database_url: str, store_kind: str, forwarded: bytes
) -> None:
    config = server_config(database_url, store_kind)
    config = server.dataclasses.replace(
        config,
        webserver=server.dataclasses.replace(config.webserver, trusted_proxies=(ip_network("127.0.0.1"),)),
    )
    app = await server.WebServer(config).initializer()
    client = await aiohttp_client(app)
    await add_user(app, "alice", "wonderland")
    body = credentials(password="wrong-password")
    head = login_head(b"X-Forwarded-For: " + forwarded, len(body))
    answer = await asyncio.to_thread(raw_request, client.port, head, body)
    assert answer.status == 401 and answer.json()["error"] == "invalid_credentials"
    await log_in(client, "alice", "wonderland")


# ---------------------------------------------------------------------------
# A client that goes away, or sends what aiohttp refuses, behind the server's own runner
# ---------------------------------------------------------------------------

CUT_BODIES = [
    pytest.param(b"Content-Length: 100", b'{"user', id="shorter-than-its-length"),
    pytest.param(b"Transfer-Encoding: chunked", b'6\r\n{"user', id="chunk-cut-off"),
    pytest.param(b"Content-Length: 100\r\nExpect: 100-continue", b"", id="no-body-after-100-continue"),
]


@pytest.mark.parametrize(("header", "body"), CUT_BODIES)
async def test_a_client_that_hangs_up_inside_its_body_is_no_500_and_no_traceback(
    served_port: int, caplog: pytest.LogCaptureFixture, header: bytes, body: bytes
) -> None:
    head = b"POST /user HTTP/1.1\r\nHost: localhost\r\n" + header + b"\r\n\r\n"

    def hang_up() -> None:
        with socket.create_connection(("127.0.0.1", served_port)) as sock:
            sock.sendall(head + body)
            time.sleep(0.2)  # the server is reading the body when the connection closes

    await asyncio.to_thread(hang_up)
    await asyncio.sleep(0.3)
    healthy = await asyncio.to_thread(raw_request, served_port, b"GET /health HTTP/1.1\r\nHost: localhost")
    assert healthy.status == 200
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    assert not [record for record in caplog.records if "500" in record.getMessage()]


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(b"GET /health HTTP/1.1\r\nConnection: close", id="no-host"),
        pytest.param(b"GET /user HTTP/1.1\r\nHost: localhost\r\nAuthorization: caf\x01", id="control-byte"),
    ],
)
async def test_a_refused_request_behind_a_trusted_proxy_gets_one_access_line_not_a_traceback(
    config: server.Config, caplog: pytest.LogCaptureFixture, head: bytes
) -> None:
    webserver = server.WebServerConfig(access_log=True, trusted_proxies=(ip_network("127.0.0.1/32"),))
    runner = await server.WebServer(dataclasses.replace(config, webserver=webserver)).runner()
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        caplog.set_level(logging.INFO, logger="server.access")
        answer = await asyncio.to_thread(raw_request, runner.addresses[0][1], head)
        assert answer.status == 400 and answer.json()["error"] == "bad_request"
        await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    assert [
        record
        for record in caplog.records
        if record.name == "server.access" and " 400 " in record.getMessage()
    ]


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"Upgrade": "websocket", "Connection": "Upgrade"}, id="no-key"),
        pytest.param(
            {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Key": "short"}, id="bad-key"
        ),
        pytest.param(
            {
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "99",
            },
            id="unknown-version",
        ),
    ],
)
async def test_a_malformed_websocket_handshake_is_a_json_400_not_an_event_stream(
    client: Client, headers: dict[str, str]
) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    response = await client.get("/events", headers={"Authorization": session_id, **headers})
    assert response.status == 400
    assert (await response.json())["error"] == "bad_request"


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        pytest.param("/events?last_event_id=", {}, id="empty-last-event-id"),
        pytest.param("/events", {"Last-Event-ID": ""}, id="empty-last-event-id-header"),
        pytest.param("/events?last_event_id=0&last_event_id=abc", {}, id="second-last-event-id-not-digits"),
        pytest.param("/user?all=true&all=false", {}, id="all-given-twice-differently"),
    ],
)
async def test_a_parameter_that_is_empty_or_given_twice_differently_is_a_400(
    client: Client, path: str, headers: dict[str, str]
) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    method = client.delete if path.startswith("/user") else client.get
    response = await method(path, headers={"Authorization": session_id, **headers})
    assert response.status == 400
    assert (await response.json())["error"] == "bad_request"
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200
