"""GET /events, the user's live stream, against a real server on real sockets and a real
PostgreSQL: each behaviour over both transports, Server-Sent Events and WebSocket, where it
applies. A small client (EventClient) reads either transport and yields the events as parsed JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import pytest

import server
from conftest import Client, ClientFactory, Clock, add_user, log_in, make_config, raw_request, run_command

TRANSPORTS = ["sse", "websocket"]
WITHIN = 1.0  # seconds: the contract's bound for a session's end to reach its streams
FAST_COMMAND_CONFIG = {"passwords": {"time_cost": 1, "memory_cost": 256, "parallelism": 1}}


class StreamEnded(Exception):
    """The stream ended while an event was awaited."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"the stream ended (close code {code})")
        self.code = code


_END = object()
OPEN: list[EventClient] = []  # closed after each test (see close_streams)


class EventClient:
    """One open event stream, SSE or WebSocket, read by a task of its own into a queue.

    `next()` gives the next event as parsed JSON; `ending()` reads to the end of the stream and
    returns what came before it and the WebSocket close code (None for SSE). For SSE, `blocks`
    keeps each event's lines as they came and `comments` the comment lines (heartbeats)."""

    def __init__(
        self,
        transport: str,
        response: aiohttp.ClientResponse | None = None,
        websocket: aiohttp.ClientWebSocketResponse | None = None,
    ) -> None:
        self.transport = transport
        self.response, self.websocket = response, websocket
        self.blocks: list[list[str]] = []
        self.comments: list[float] = []  # when each comment line arrived (monotonic)
        self.pings: list[float] = []
        self.code: int | None = None
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read_sse() if response is not None else self._read_ws())
        OPEN.append(self)

    async def _read_sse(self) -> None:
        assert self.response is not None
        lines: list[str] = []
        try:
            async for raw in self.response.content:
                line = raw.decode().removesuffix("\n")
                if line.startswith(":"):
                    self.comments.append(time.monotonic())
                elif line:
                    lines.append(line)
                elif lines:
                    self.blocks.append(lines)
                    data = [value for name, _, value in (x.partition(": ") for x in lines) if name == "data"]
                    self._queue.put_nowait(json.loads("\n".join(data)))
                    lines = []
        except (aiohttp.ClientError, ConnectionError):
            pass
        finally:
            self._queue.put_nowait(_END)

    async def _read_ws(self) -> None:
        assert self.websocket is not None
        try:
            while True:
                message = await self.websocket.receive()
                if message.type is aiohttp.WSMsgType.TEXT:
                    self._queue.put_nowait(json.loads(message.data))
                elif message.type is aiohttp.WSMsgType.PING:
                    self.pings.append(time.monotonic())
                    await self.websocket.pong(message.data)
                elif message.type in (
                    aiohttp.WSMsgType.CLOSE,
                    aiohttp.WSMsgType.CLOSED,
                    aiohttp.WSMsgType.ERROR,
                ):
                    break
        finally:
            self.code = self.websocket.close_code
            self._queue.put_nowait(_END)

    async def next(self, within: float = 3.0) -> Any:
        item = await asyncio.wait_for(self._queue.get(), within)
        if item is _END:
            self._queue.put_nowait(_END)
            raise StreamEnded(self.code)
        return item

    async def nothing_within(self, seconds: float) -> None:
        """Fail if an event (or the end) arrives within `seconds`."""
        with contextlib.suppress(asyncio.TimeoutError):
            item = await asyncio.wait_for(self._queue.get(), seconds)
            raise AssertionError(f"expected nothing, got {'the end' if item is _END else item}")

    async def ending(self, within: float = WITHIN) -> tuple[list[Any], int | None]:
        """Everything until the stream ends (within `within` seconds), and the WebSocket close code."""
        received: list[Any] = []
        deadline = asyncio.get_running_loop().time() + within
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                item = await asyncio.wait_for(self._queue.get(), max(left, 0.001))
            except TimeoutError:
                raise AssertionError(f"the stream did not end within {within} s; got {received}") from None
            if item is _END:
                self._queue.put_nowait(_END)
                return received, self.code
            received.append(item)

    async def close(self) -> None:
        if self.websocket is not None:
            await self.websocket.close()
        if self.response is not None:
            self.response.close()
        with contextlib.suppress(asyncio.CancelledError):
            self._reader.cancel()
            await self._reader


@pytest.fixture(autouse=True)
async def close_streams() -> AsyncIterator[None]:
    yield
    while OPEN:
        await OPEN.pop().close()


def auth_header(session_id: str, style: str = "plain") -> dict[str, str]:
    return {"Authorization": session_id if style == "plain" else f"Bearer {session_id}"}


async def wait_until(condition: Callable[[], bool], within: float = 3.0, what: str = "") -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(0.01)


async def open_stream(
    client: Client,
    transport: str,
    session_id: str,
    auth: str = "plain",
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    http: aiohttp.ClientSession | None = None,
    registered: bool = True,
) -> EventClient:
    """Open GET /events; auth is "plain" (`Authorization: <id>`), "bearer", or, for a WebSocket,
    "message" (the first message). Returns once the server holds the stream (registered=True),
    so that an event published next is one the stream is there for."""
    http = http or client.session
    url = client.make_url("/events")
    headers = dict(headers or {})
    if auth != "message":
        headers.update(auth_header(session_id, auth))
    registry = client.app[server.streams]
    before = set(registry)
    if transport == "sse":
        response = await http.get(url, headers=headers, params=params)
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"] == "text/event-stream"
        stream = EventClient("sse", response=response)
    else:
        websocket = await http.ws_connect(url, headers=headers, params=params, autoping=False)
        if auth == "message":
            await websocket.send_str(json.dumps({"session_id": session_id}))
        stream = EventClient("websocket", websocket=websocket)
    if registered:
        await wait_until(lambda: bool(set(registry) - before), what="the server holds the stream")
    return stream


Start = Callable[..., Awaitable[Client]]


@pytest.fixture
def start(aiohttp_client: ClientFactory, database_url: str, db: object, clock: Clock) -> Start:
    """A server (in this process, on a real port) with users alice and bob; keyword arguments
    are settings of the `events` section, or `sessions=` a SessionConfig."""

    async def start(sessions: server.SessionConfig | None = None, **events: Any) -> Client:
        config = make_config(
            database_url,
            events=server.EventsConfig(**events),
            sessions=sessions or server.SessionConfig(),
        )
        client = await aiohttp_client(await server.WebServer(config, clock=clock).initializer())
        await add_user(client.app, "alice", "wonderland")
        await add_user(client.app, "bob", "builder123")
        return client

    return start


@pytest.fixture
async def client(start: Start) -> Client:
    return await start()


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def publish(client: Client, data: Any, username: str | None = None) -> int:
    return await server.publish(client.app[server.db_engine], data, username)


def event_ids(events: list[Any]) -> list[int]:
    return [event["id"] for event in events]


# ---------------------------------------------------------------------------
# Authentication
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["plain", "bearer"])
async def test_the_session_in_the_authorization_header_opens_a_stream(
    client: Client, transport: str, style: str
) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    stream = await open_stream(client, transport, session_id, auth=style)
    event_id = await publish(client, {"hello": "alice"})
    event = await stream.next()
    assert (event["id"], event["data"]) == (event_id, {"hello": "alice"})


async def test_a_websocket_authenticates_with_its_first_message(client: Client) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    stream = await open_stream(client, "websocket", session_id, auth="message")
    event_id = await publish(client, [1, 2, 3], "alice")
    assert await stream.next() == {
        "id": event_id,
        "type": "message",
        "data": [1, 2, 3],
        "created_at": (await stream_created_at(client, event_id)),
    }


async def stream_created_at(client: Client, event_id: int) -> str:
    async with server.connection(client.app[server.db_engine]) as conn:
        created = await conn.scalar("SELECT created_at FROM events WHERE id = %s", (event_id,))
    return str(created.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))


def websocket_head(port: int, path: str = "/events", *extra: str) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
        "Sec-WebSocket-Version: 13",
        *extra,
    ]
    return "\r\n".join(lines).encode()


def sse_head(port: int, path: str = "/events", *extra: str) -> bytes:
    return "\r\n".join([f"GET {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", *extra]).encode()


async def request_raw(client: Client, head: bytes) -> Any:
    """raw_request in a thread: the server answers on this test's event loop."""
    assert client.port is not None
    return await asyncio.to_thread(raw_request, client.port, head)


async def test_sse_without_a_valid_session_is_401_json(client: Client) -> None:
    assert client.port is not None
    for authorization in [
        None,
        "Authorization: ",
        "Authorization: Bearer ",
        "Authorization: Basic YWxpY2U6d29uZGVybGFuZA==",
        "Authorization: Bearer a b",
    ]:
        answer = await request_raw(client, sse_head(client.port, "/events", *filter(None, [authorization])))
        assert answer.status == 401, authorization
        assert answer.headers["content-type"].startswith("application/json")
        assert answer.json()["error"] == "invalid_session"


@pytest.mark.parametrize("style", ["plain", "bearer"])
async def test_an_unknown_session_is_401_json_before_any_upgrade(
    client: Client, transport: str, style: str
) -> None:
    assert client.port is not None
    unknown = server.new_session_id()
    header = "Authorization: " + (unknown if style == "plain" else f"Bearer {unknown}")
    make_head = websocket_head if transport == "websocket" else sse_head
    answer = await request_raw(client, make_head(client.port, "/events", header))
    assert answer.status == 401
    assert answer.json()["error"] == "invalid_session"
    assert "upgrade" not in answer.headers.get("connection", "").lower()


async def test_a_logged_out_session_is_401(client: Client, transport: str) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    assert (await client.delete("/user", headers=auth_header(session_id))).status == 200
    assert client.port is not None
    make_head = websocket_head if transport == "websocket" else sse_head
    answer = await request_raw(client, make_head(client.port, "/events", f"Authorization: {session_id}"))
    assert (answer.status, answer.json()["error"]) == (401, "invalid_session")


BAD_FIRST_MESSAGES = [
    "not json",
    "[]",
    '"a string"',
    "null",
    "42",
    "{}",
    '{"session": "x"}',
    '{"session_id": 42}',
    '{"session_id": null}',
    '{"session_id": "not a session id!"}',
    json.dumps({"session_id": server.new_session_id()}),  # well-formed, unknown
    "[" * 8000 + "]" * 8000,  # JSON nested too deeply to read
]


async def test_a_websocket_is_closed_4001_on_a_bad_first_message(client: Client) -> None:
    for first_message in BAD_FIRST_MESSAGES:
        websocket = await client.ws_connect("/events")
        await websocket.send_str(first_message)
        message = await websocket.receive(timeout=2)
        assert message.type is aiohttp.WSMsgType.CLOSE, first_message
        assert websocket.close_code == server.WS_SESSION_ENDED == 4001, first_message
    assert len(client.app[server.streams]) == 0


async def test_a_websocket_is_closed_4001_on_a_binary_first_message(client: Client) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    websocket = await client.ws_connect("/events")
    await websocket.send_bytes(json.dumps({"session_id": session_id}).encode())
    await websocket.receive(timeout=2)
    assert websocket.close_code == 4001


async def test_a_websocket_that_sends_no_first_message_in_time_is_closed_4001(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "FIRST_MESSAGE_TIMEOUT", 0.5)
    websocket = await client.ws_connect("/events")
    began = time.monotonic()
    message = await websocket.receive(timeout=3)
    assert message.type is aiohttp.WSMsgType.CLOSE
    assert websocket.close_code == 4001
    assert 0.4 <= time.monotonic() - began < 2


async def test_messages_after_the_first_other_than_topic_ones_get_bad_message_and_change_nothing(
    client: Client,
) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    stream = await open_stream(client, "websocket", session_id, auth="message")
    assert stream.websocket is not None
    await stream.websocket.send_str(json.dumps({"session_id": server.new_session_id()}))
    await stream.websocket.send_str("anything at all")
    await stream.websocket.send_bytes(b"\x00\x01")
    for _ in range(3):
        assert await stream.next() == {"type": "error", "error": "bad_message"}
    event_id = await publish(client, "still here")
    assert (await stream.next())["id"] == event_id


# ---------------------------------------------------------------------------
# Origin (cross-site WebSocket hijacking)
# ---------------------------------------------------------------------------


async def test_a_websocket_from_a_foreign_origin_is_refused_403(client: Client) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    assert client.port is not None
    for origin in ["http://evil.example", f"http://127.0.0.1:{client.port + 1}", "null"]:
        for authorization in [f"Authorization: {session_id}", None]:
            head = websocket_head(client.port, "/events", f"Origin: {origin}", *filter(None, [authorization]))
            answer = await request_raw(client, head)
            assert (answer.status, answer.json()["error"]) == (403, "forbidden_origin"), origin
    assert len(client.app[server.streams]) == 0


@pytest.mark.parametrize("auth", ["plain", "message"])
async def test_a_websocket_from_the_servers_own_origin_is_accepted(client: Client, auth: str) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    origin = f"http://127.0.0.1:{client.port}"
    stream = await open_stream(client, "websocket", session_id, auth=auth, headers={"Origin": origin})
    event_id = await publish(client, 1)
    assert (await stream.next())["id"] == event_id


async def test_a_websocket_from_a_configured_origin_is_accepted(start: Start) -> None:
    client = await start(allowed_origins=("https://app.example.com",))
    session_id = await log_in(client, "alice", "wonderland")
    headers = {"Origin": "https://app.example.com"}
    stream = await open_stream(client, "websocket", session_id, auth="message", headers=headers)
    event_id = await publish(client, 1)
    assert (await stream.next())["id"] == event_id
    assert client.port is not None
    head = websocket_head(client.port, "/events", "Origin: https://other.example.com")
    assert (await request_raw(client, head)).status == 403


async def test_a_websocket_without_origin_is_accepted(client: Client) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    # aiohttp's client sends no Origin unless told to.
    stream = await open_stream(client, "websocket", session_id, auth="message")
    event_id = await publish(client, 1)
    assert (await stream.next())["id"] == event_id


# ---------------------------------------------------------------------------
# Delivery and the event's shape
# ---------------------------------------------------------------------------


async def test_an_event_for_one_user_reaches_only_that_users_streams(client: Client, transport: str) -> None:
    alice = await log_in(client, "alice", "wonderland")
    bob = await log_in(client, "bob", "builder123")
    alice_phone = await open_stream(client, transport, alice)
    alice_laptop = await open_stream(client, transport, await log_in(client, "alice", "wonderland"))
    bob_stream = await open_stream(client, transport, bob)
    for_alice = await publish(client, {"to": "alice"}, "alice")
    for_bob = await publish(client, {"to": "bob"}, "bob")
    assert (await alice_phone.next())["id"] == for_alice
    assert (await alice_laptop.next())["id"] == for_alice
    assert (await bob_stream.next())["id"] == for_bob
    await alice_phone.nothing_within(0.2)
    await alice_laptop.nothing_within(0.0)


async def test_a_broadcast_reaches_every_users_streams(client: Client, transport: str) -> None:
    streams = [
        await open_stream(client, transport, await log_in(client, name, password))
        for name, password in [("alice", "wonderland"), ("bob", "builder123"), ("alice", "wonderland")]
    ]
    event_id = await publish(client, {"price": 3})
    for stream in streams:
        assert await stream.next() == {
            "id": event_id,
            "type": "message",
            "data": {"price": 3},
            "created_at": await stream_created_at(client, event_id),
        }


DATA_VALUES = [
    {"nested": {"list": [1, 2.5, None, True, "x"]}},
    "a line\nand another\r\n\nand a blank one",
    "José 🎉 \u2028 \\u0000 \t",
    0,
    -12.75,
    None,
    False,
    [],
    {},
    "data: id: event: fake",
]


async def test_an_event_has_the_contracts_shape(client: Client, transport: str) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    stream = await open_stream(client, transport, session_id)
    ids = [await publish(client, value) for value in DATA_VALUES]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    now = datetime.datetime.now(datetime.UTC)
    for event_id, value in zip(ids, DATA_VALUES, strict=True):
        event = await stream.next()
        assert set(event) == {"id", "type", "data", "created_at"}
        assert (event["id"], event["type"], event["data"]) == (event_id, "message", value)
        assert isinstance(event["id"], int)
        created = datetime.datetime.strptime(event["created_at"], "%Y-%m-%dT%H:%M:%SZ")
        assert abs(created.replace(tzinfo=datetime.UTC) - now) < datetime.timedelta(seconds=5)


async def test_sse_frames_each_event_with_id_event_and_data_lines(client: Client) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    stream = await open_stream(client, "sse", session_id)
    assert stream.response is not None
    assert stream.response.headers["Cache-Control"] == "no-store"
    ids = [await publish(client, value) for value in DATA_VALUES]
    for _ in ids:
        await stream.next()
    for event_id, value, block in zip(ids, DATA_VALUES, stream.blocks, strict=True):
        assert len(block) == 3, block  # one data line, however many line breaks the data holds
        assert block[0] == f"id: {event_id}"
        assert block[1] == "event: message"
        assert block[2].startswith("data: ")
        assert json.loads(block[2].removeprefix("data: "))["data"] == value


async def test_sse_over_http_1_0_is_the_same_stream_without_chunked_coding(client: Client) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    loop = asyncio.get_running_loop()
    registry = client.app[server.streams]
    assert client.port is not None
    with socket.create_connection(("127.0.0.1", client.port)) as sock:
        sock.setblocking(False)
        await loop.sock_sendall(sock, f"GET /events HTTP/1.0\r\nAuthorization: {session_id}\r\n\r\n".encode())
        await wait_until(lambda: len(registry) == 1, what="the server holds the stream")
        event_id = await publish(client, {"price": 3})
        received = await read_all(sock, lambda data: data.endswith(b"}\n\n"))
        assert (await client.delete("/user", headers=auth_header(session_id))).status == 200
        received += await read_all(sock)  # to the end: the server closes the connection
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"Transfer-Encoding" not in head
    event, ended, rest = body.split(b"\n\n")
    lines = event.decode().split("\n")
    assert lines[:2] == [f"id: {event_id}", "event: message"]
    assert json.loads(lines[2].removeprefix("data: "))["data"] == {"price": 3}
    assert ended.decode().split("\n")[0] == "event: session_ended"
    assert rest == b""


async def test_an_sql_insert_is_delivered_when_its_transaction_commits(
    client: Client, transport: str, database_url: str
) -> None:
    stream = await open_stream(client, transport, await log_in(client, "alice", "wonderland"))
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("""INSERT INTO events (username, data) VALUES (NULL, '{"price": 3}') RETURNING id""")
            (first,) = cur.fetchone()
            cur.execute("""INSERT INTO events (username, data) VALUES ('alice', '"two"') RETURNING id""")
            (second,) = cur.fetchone()
        await stream.nothing_within(0.5)
        conn.commit()
    finally:
        conn.close()
    assert [(event["id"], event["data"]) for event in [await stream.next(), await stream.next()]] == [
        (first, {"price": 3}),
        (second, "two"),
    ]


async def test_an_sql_insert_rolled_back_is_never_delivered(
    client: Client, transport: str, database_url: str
) -> None:
    stream = await open_stream(client, transport, await log_in(client, "alice", "wonderland"))
    conn = psycopg2.connect(database_url)
    try:
        with conn.cursor() as cur:
            cur.execute("""INSERT INTO events (username, data) VALUES (NULL, '"rolled back"')""")
        conn.rollback()
        with conn.cursor() as cur:
            cur.execute("""INSERT INTO events (username, data) VALUES (NULL, '"committed"') RETURNING id""")
            (committed,) = cur.fetchone()
        conn.commit()
    finally:
        conn.close()
    event = await stream.next()
    assert (event["id"], event["data"]) == (committed, "committed")
    await stream.nothing_within(0.3)


# ---------------------------------------------------------------------------
# Replay after a reconnect
# ---------------------------------------------------------------------------


def resume(transport: str, last_id: int, how: str = "query") -> dict[str, Any]:
    """open_stream's arguments that resume after last_id: the query, or SSE's Last-Event-ID."""
    if how == "header":
        return {"headers": {"Last-Event-ID": str(last_id)}}
    return {"params": {"last_event_id": str(last_id)}}


@pytest.mark.parametrize(("transport", "how"), [("sse", "query"), ("sse", "header"), ("websocket", "query")])
async def test_a_reconnect_with_the_last_event_id_replays_what_was_missed(
    client: Client, transport: str, how: str
) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    stream = await open_stream(client, transport, session_id)
    seen = [await publish(client, n) for n in range(3)]
    assert event_ids([await stream.next() for _ in seen]) == seen
    await stream.close()
    missed = [
        await publish(client, "for alice", "alice"),
        await publish(client, "for bob", "bob"),
        await publish(client, "for everyone"),
    ]
    stream = await open_stream(client, transport, session_id, **resume(transport, seen[-1], how))
    live = await publish(client, "live")
    received = [await stream.next() for _ in range(3)]
    assert event_ids(received) == [missed[0], missed[2], live]
    assert [event["data"] for event in received] == ["for alice", "for everyone", "live"]
    await stream.nothing_within(0.2)


async def test_with_both_the_query_and_last_event_id_the_larger_counts(client: Client) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    ids = [await publish(client, n) for n in range(4)]
    stream = await open_stream(
        client,
        "sse",
        session_id,
        params={"last_event_id": str(ids[1])},
        headers={"Last-Event-ID": str(ids[0])},
    )
    assert event_ids([await stream.next(), await stream.next()]) == ids[2:]
    await stream.nothing_within(0.2)
    # An EventSource reconnecting to its URL (?last_event_id= of when it was made) with the header
    # saying how far it got since: no event again.
    reconnected = await open_stream(
        client,
        "sse",
        session_id,
        params={"last_event_id": str(ids[0])},
        headers={"Last-Event-ID": str(ids[2])},
    )
    assert event_ids([await reconnected.next()]) == ids[3:]
    await reconnected.nothing_within(0.2)


async def test_a_reconnect_while_events_are_published_has_no_gap_and_no_duplicate(
    client: Client, transport: str
) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    published: list[int] = []
    stream = await open_stream(client, transport, session_id)

    async def publish_many() -> None:
        for n in range(120):
            published.append(await publish(client, n, "bob" if n % 5 == 0 else (None if n % 2 else "alice")))

    publisher = asyncio.create_task(publish_many())
    received: list[int] = []
    for _round in range(3):  # drop the connection twice while events keep coming
        while len(received) < 10 * (_round + 1) or not published:
            received.append((await stream.next())["id"])
        await stream.close()
        stream = await open_stream(client, transport, session_id, **resume(transport, received[-1]))
    await publisher
    mine = [event_id for n, event_id in enumerate(published) if n % 5 != 0]
    while len(received) < len(mine):
        received.append((await stream.next())["id"])
    assert received == mine
    await stream.nothing_within(0.2)


async def sweep_everything(client: Client) -> None:
    """The server's retention sweep, as it runs it, with every event older than now dropped."""
    await asyncio.sleep(0.01)  # now() of the sweep is after the last event's created_at
    async with server.connection(client.app[server.db_engine]) as conn:
        await conn.execute(server.SWEEP_EVENTS, {"retention": 0.001})


async def test_replay_truncated_comes_first_when_retention_dropped_events_after_the_last_id(
    client: Client, transport: str
) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    ids = [await publish(client, n) for n in range(3)]
    await sweep_everything(client)
    kept = await publish(client, "kept")
    stream = await open_stream(client, transport, session_id, **resume(transport, ids[0]))
    assert await stream.next() == {"type": "replay_truncated"}
    assert (await stream.next())["id"] == kept
    if transport == "sse":
        assert stream.blocks[0] == ["event: replay_truncated", 'data: {"type": "replay_truncated"}']
    await stream.nothing_within(0.2)
    # Nothing after the last id was dropped: no notice.
    await stream.close()
    stream = await open_stream(client, transport, session_id, **resume(transport, ids[-1]))
    assert (await stream.next())["id"] == kept
    await stream.nothing_within(0.2)


async def test_the_servers_own_sweep_drops_events_past_the_retention(start: Start) -> None:
    client = await start(retention=0.5)
    session_id = await log_in(client, "alice", "wonderland")
    first = await publish(client, "old")
    second = await publish(client, "old too")
    await asyncio.sleep(1.2)  # the sweep runs every min(60, retention) seconds
    stream = await open_stream(client, "websocket", session_id, **resume("websocket", first - 1))
    assert await stream.next() == {"type": "replay_truncated"}
    live = await publish(client, "new")
    assert (await stream.next())["id"] == live > second


# ---------------------------------------------------------------------------
# Publishing from Python
# ---------------------------------------------------------------------------


async def test_the_publish_coroutine_returns_increasing_ids(client: Client) -> None:
    stream = await open_stream(client, "websocket", await log_in(client, "alice", "wonderland"))
    ids = [await publish(client, {"n": n}, name) for n, name in enumerate([None, "alice", "bob", None])]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert event_ids([await stream.next() for _ in range(3)]) == [ids[0], ids[1], ids[3]]


async def test_the_publish_coroutine_refuses_what_is_not_a_storable_json_value(client: Client) -> None:
    nested: list[Any] = []
    for _ in range(100_000):
        nested = [nested]
    for data in [
        object(),
        float("nan"),
        float("inf"),
        {1j: 2},
        "x" * (64 * 1024),
        "\x00",
        {"key\x00": 1},
        nested,
    ]:
        with pytest.raises(ValueError):
            await publish(client, data)
    async with server.connection(client.app[server.db_engine]) as conn:
        assert await conn.scalar("SELECT count(*) FROM events") == 0


async def test_an_sql_insert_of_more_than_64_kib_of_json_is_refused(
    client: Client, db: psycopg2.extensions.connection
) -> None:
    """Every process reads each event within its statement timeout: SQL publishers keep the limit too."""
    with pytest.raises(psycopg2.errors.CheckViolation), db.cursor() as cur:
        cur.execute("INSERT INTO events (username, data) VALUES (NULL, to_jsonb(repeat('x', 70000)))")
    with db.cursor() as cur:
        cur.execute("INSERT INTO events (username, data) VALUES (NULL, to_jsonb(repeat('x', 60000)))")
        cur.execute("SELECT count(*) FROM events")
        assert cur.fetchone() == (1,)


async def test_the_publish_coroutine_takes_64_kib_of_json(client: Client) -> None:
    stream = await open_stream(client, "sse", await log_in(client, "alice", "wonderland"))
    data = "x" * (64 * 1024 - 2)  # with its quotes: 64 KiB of JSON text
    event_id = await publish(client, data)
    assert await stream.next() == {
        "id": event_id,
        "type": "message",
        "data": data,
        "created_at": await stream_created_at(client, event_id),
    }


async def test_the_publish_coroutine_raises_user_not_found_for_an_unknown_user(client: Client) -> None:
    with pytest.raises(server.UserNotFound):
        await publish(client, 1, "nobody")


# ---------------------------------------------------------------------------
# A stream lives as long as its session
# ---------------------------------------------------------------------------


async def assert_session_ended(stream: EventClient, reason: str) -> None:
    """The stream gets session_ended with `reason` and is closed (4001) within one second."""
    received, code = await stream.ending(WITHIN)
    assert received == [{"type": "session_ended", "reason": reason}]
    if stream.transport == "websocket":
        assert code == server.WS_SESSION_ENDED == 4001
    else:
        assert stream.blocks[-1][0] == "event: session_ended"  # and no id line
        assert len(stream.blocks[-1]) == 2


async def assert_alive(client: Client, *streams: EventClient) -> None:
    event_id = await publish(client, "still open")
    for stream in streams:
        assert (await stream.next())["id"] == event_id


async def test_a_logout_ends_that_sessions_streams(client: Client, transport: str) -> None:
    phone = await log_in(client, "alice", "wonderland")
    laptop = await log_in(client, "alice", "wonderland")
    phone_streams = [await open_stream(client, transport, phone) for _ in range(2)]
    laptop_stream = await open_stream(client, transport, laptop)
    response = await client.delete("/user", headers=auth_header(phone, "bearer"))
    assert await response.json() == {"logged_out": 1}
    for stream in phone_streams:
        await assert_session_ended(stream, "logout")
    await assert_alive(client, laptop_stream)


async def test_a_logout_of_all_sessions_ends_every_stream_of_the_user(client: Client, transport: str) -> None:
    phone = await log_in(client, "alice", "wonderland")
    laptop = await log_in(client, "alice", "wonderland")
    alice_streams = [await open_stream(client, transport, session) for session in (phone, laptop)]
    bob_stream = await open_stream(client, transport, await log_in(client, "bob", "builder123"))
    response = await client.delete("/user?all=true", headers=auth_header(phone))
    assert await response.json() == {"logged_out": 2}
    for stream in alice_streams:
        await assert_session_ended(stream, "logout")
    await assert_alive(client, bob_stream)


async def test_ending_a_session_by_its_id_ends_its_streams(client: Client, transport: str) -> None:
    phone = await log_in(client, "alice", "wonderland")
    laptop = await log_in(client, "alice", "wonderland")
    phone_stream = await open_stream(client, transport, phone)
    laptop_stream = await open_stream(client, transport, laptop)
    listed = (await (await client.get("/user/sessions", headers=auth_header(laptop))).json())["sessions"]
    (phone_id,) = [session["id"] for session in listed if not session["current"]]
    response = await client.delete(f"/user/sessions/{phone_id}", headers=auth_header(laptop))
    assert await response.json() == {"logged_out": 1}
    await assert_session_ended(phone_stream, "logout")
    await assert_alive(client, laptop_stream)


@pytest.fixture
def command(database_url: str, tmp_path: Path) -> Callable[..., Awaitable[Any]]:
    """Run `python server.py ARGS` on the test database (in a thread: the server under test
    answers on this test's event loop meanwhile)."""
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(FAST_COMMAND_CONFIG))

    async def run(*args: str, stdin: str = "") -> Any:
        return await asyncio.to_thread(
            run_command, [*args, "--config", str(config_file)], stdin, {"DATABASE_URL": database_url}
        )

    return run


async def test_passwd_ends_the_users_streams_and_sessions_with_reason_revoked(
    client: Client, command: Callable[..., Awaitable[Any]]
) -> None:
    alice = await log_in(client, "alice", "wonderland")
    alice_streams = [await open_stream(client, transport, alice) for transport in TRANSPORTS]
    bob_streams = [
        await open_stream(client, transport, await log_in(client, "bob", "builder123"))
        for transport in TRANSPORTS
    ]
    result = await command("passwd", "alice", stdin="looking-glass\n")
    assert result.returncode == 0, result.stderr
    for stream in alice_streams:
        await assert_session_ended(stream, "revoked")
    await assert_alive(client, *bob_streams)
    assert (await client.get("/user", headers=auth_header(alice))).status == 401
    old = await client.post("/user", json={"username": "alice", "password": "wonderland"})
    assert old.status == 401
    new_session = await log_in(client, "alice", "looking-glass")
    assert (await client.get("/user", headers=auth_header(new_session))).status == 200
    await assert_alive(client, await open_stream(client, "websocket", new_session, auth="message"))


async def test_deluser_ends_the_users_streams_and_a_new_user_of_that_name_gets_nothing_of_them(
    client: Client, command: Callable[..., Awaitable[Any]]
) -> None:
    old = await log_in(client, "alice", "wonderland")
    old_streams = [await open_stream(client, transport, old) for transport in TRANSPORTS]
    bob_stream = await open_stream(client, "sse", await log_in(client, "bob", "builder123"))
    private = await publish(client, "for the old alice", "alice")
    for stream in old_streams:
        assert (await stream.next())["id"] == private
    result = await command("deluser", "alice")
    assert result.returncode == 0, result.stderr
    for stream in old_streams:
        await assert_session_ended(stream, "revoked")
    await assert_alive(client, bob_stream)
    result = await command("adduser", "alice", stdin="a-new-alice\n")
    assert result.returncode == 0, result.stderr
    # The old session does not pass as the new alice: not for GET /user, a stream or a logout.
    assert (await client.get("/user", headers=auth_header(old))).status == 401
    assert client.port is not None
    for head in (sse_head, websocket_head):
        assert (
            await request_raw(client, head(client.port, "/events", f"Authorization: {old}"))
        ).status == 401
    websocket = await client.ws_connect("/events")
    await websocket.send_str(json.dumps({"session_id": old}))
    await websocket.receive(timeout=2)
    assert websocket.close_code == 4001
    assert (await client.delete("/user?all=true", headers=auth_header(old))).status == 401
    # The new alice's sessions are hers alone: logging out everywhere ends her two, and nothing else.
    new_sessions = [await log_in(client, "alice", "a-new-alice") for _ in range(2)]
    # Nor does she replay the old alice's events: only what was published for everyone.
    broadcast = await publish(client, "for everyone")
    replay = await open_stream(client, "sse", new_sessions[0], params={"last_event_id": "0"})
    replayed = [await replay.next()]
    while replayed[-1]["id"] != broadcast:
        replayed.append(await replay.next())
    assert private not in event_ids(replayed) and all(
        event["data"] != "for the old alice" for event in replayed
    )
    await replay.close()
    assert (await bob_stream.next())["id"] == broadcast
    new_stream = await open_stream(client, "websocket", new_sessions[1])
    response = await client.delete("/user?all=true", headers=auth_header(new_sessions[0]))
    assert await response.json() == {"logged_out": 2}
    await assert_session_ended(new_stream, "logout")
    await assert_alive(client, bob_stream)


def expiring(idle: float, absolute: float) -> server.SessionConfig:
    return server.SessionConfig(idle_timeout=idle, absolute_timeout=absolute)


async def test_a_stream_ends_at_the_idle_timeout_with_reason_expired(
    start: Start, clock: Clock, transport: str
) -> None:
    client = await start(sessions=expiring(60, 3600))
    stream = await open_stream(client, transport, await log_in(client, "alice", "wonderland"))
    clock.advance(59)
    await stream.nothing_within(0.6)
    clock.advance(2)
    await assert_session_ended(stream, "expired")


async def test_a_stream_ends_at_the_absolute_timeout_with_reason_expired(
    start: Start, clock: Clock, transport: str
) -> None:
    client = await start(sessions=expiring(60, 100))
    session_id = await log_in(client, "alice", "wonderland")
    stream = await open_stream(client, transport, session_id)
    clock.advance(50)
    assert (await client.get("/user", headers=auth_header(session_id))).status == 200  # renewed
    clock.advance(49)
    await stream.nothing_within(0.6)
    clock.advance(2)  # 101 s after the login; 51 s after its last use
    await assert_session_ended(stream, "expired")


async def test_an_open_stream_renews_its_sessions_idle_timeout(
    start: Start, clock: Clock, transport: str
) -> None:
    client = await start(sessions=expiring(1.5, 3600))  # an open stream renews every 0.5 s
    session_id = await log_in(client, "alice", "wonderland")
    stream = await open_stream(client, transport, session_id)
    (held,) = client.app[server.streams]
    opened = held.renewed
    clock.advance(1)
    await wait_until(lambda: held.renewed > opened, what="the stream renewed its session")
    clock.advance(0.9)
    # 1.9 s after the login: 0.4 s past its idle timeout had nothing used the session.
    await stream.nothing_within(0.6)
    assert (await client.get("/user", headers=auth_header(session_id))).status == 200


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------


async def test_a_user_over_max_streams_per_user_is_refused(start: Start, transport: str) -> None:
    client = await start(max_streams_per_user=2)
    alice = await log_in(client, "alice", "wonderland")
    held = [await open_stream(client, transport, alice) for _ in range(2)]
    assert client.port is not None
    for head in (sse_head, websocket_head):
        answer = await request_raw(client, head(client.port, "/events", f"Authorization: {alice}"))
        assert (answer.status, answer.json()["error"]) == (429, "too_many_streams")
    websocket = await client.ws_connect("/events")
    await websocket.send_str(json.dumps({"session_id": await log_in(client, "alice", "wonderland")}))
    await websocket.receive(timeout=2)
    assert websocket.close_code == server.WS_TOO_MANY_STREAMS == 4029
    # Another user is not limited by alice's streams, and alice may open one once one closes.
    bob_stream = await open_stream(client, transport, await log_in(client, "bob", "builder123"))
    await held[0].close()
    registry = client.app[server.streams]
    await wait_until(lambda: registry.count(held_user(client)) == 1, what="the server noticed the close")
    await assert_alive(client, held[1], bob_stream, await open_stream(client, transport, alice))


def held_user(client: Client) -> int:
    (user_id,) = {
        stream.account.user_id for stream in client.app[server.streams] if stream.account.username == "alice"
    }
    return user_id


async def raw_stream(client: Client, transport: str, session_id: str) -> socket.socket:
    """A connection that asks for a stream and then never reads: a receive buffer of 4 KiB."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    assert client.port is not None
    await loop.sock_connect(sock, ("127.0.0.1", client.port))
    head = (websocket_head if transport == "websocket" else sse_head)(
        client.port, "/events", f"Authorization: {session_id}"
    )
    await loop.sock_sendall(sock, head + b"\r\n\r\n")
    return sock


async def read_all(sock: socket.socket, until: Callable[[bytes], bool] = lambda _: False) -> bytes:
    """Everything until the server closes or resets the connection, or until(what was read)."""
    loop = asyncio.get_running_loop()
    data = b""
    async with asyncio.timeout(5):
        while not until(data):
            try:
                chunk = await loop.sock_recv(sock, 1 << 20)
            except ConnectionResetError:
                return data
            if not chunk:
                return data
            data += chunk
    return data


def ends_with_close_frame(data: bytes) -> bool:
    frames = websocket_frames(data) if b"\r\n\r\n" in data else []
    return bool(frames) and frames[-1][0] == 0x8


def websocket_frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of each whole frame a server sent (unmasked) after its 101 answer."""
    head, _, data = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    frames, at = [], 0
    while len(data) >= at + 2:
        opcode, size, start = data[at] & 0x0F, data[at + 1] & 0x7F, at + 2
        if size == 126:
            size, start = int.from_bytes(data[at + 2 : at + 4], "big"), at + 4
        elif size == 127:
            size, start = int.from_bytes(data[at + 2 : at + 10], "big"), at + 10
        if len(data) < start + size:
            break
        frames.append((opcode, data[start : start + size]))
        at = start + size
    return frames


async def test_a_client_that_stops_reading_is_disconnected_and_others_get_every_event_promptly(
    start: Start, transport: str
) -> None:
    client = await start(max_buffer=256 * 1024)
    alice = await log_in(client, "alice", "wonderland")
    reader = await open_stream(client, transport, alice)
    registry = client.app[server.streams]
    before = set(registry)
    sock = await raw_stream(client, transport, alice)
    try:
        await wait_until(lambda: bool(set(registry) - before), what="the server holds the slow stream")
        (slow,) = set(registry) - before
        published: list[int] = []
        slowest = 0.0
        data = "x" * (60 * 1024)
        while not slow.ended.done():
            assert len(published) < 500, "the slow reader was never disconnected"
            began = time.monotonic()
            published.append(await publish(client, data))
            assert (await reader.next())["id"] == published[-1]
            slowest = max(slowest, time.monotonic() - began)
        assert slowest < 0.5
        received = await read_all(
            sock, ends_with_close_frame if transport == "websocket" else lambda _: False
        )
    finally:
        sock.close()
    if transport == "websocket":
        frames = websocket_frames(received)
        texts = [json.loads(payload)["id"] for opcode, payload in frames if opcode == 0x1]
        assert texts == published[: len(texts)]
        assert frames[-1][0] == 0x8, "the last frame is a Close"
        assert int.from_bytes(frames[-1][1][:2], "big") == server.WS_TRY_AGAIN_LATER == 1013
    else:
        # The connection is dropped with the events it had not taken: at least max_buffer of them.
        assert received.count(b"\nevent: message\n") <= len(published) - 4
    await wait_until(lambda: slow not in set(registry), what="the slow stream is gone")
    # It reconnects with its last id and loses nothing still retained.
    resumed = await open_stream(client, transport, alice, params={"last_event_id": str(published[-3])})
    assert event_ids([await resumed.next(), await resumed.next()]) == published[-2:]
    await assert_alive(client, reader, resumed)


async def test_500_streams_on_one_process_all_receive_a_broadcast(start: Start) -> None:
    client = await start(max_streams_per_user=500)
    session_id = await log_in(client, "alice", "wonderland")
    registry = client.app[server.streams]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        streams = await asyncio.gather(
            *(
                open_stream(client, TRANSPORTS[n % 2], session_id, http=http, registered=False)
                for n in range(500)
            )
        )
        await wait_until(lambda: len(registry) == 500, what="500 streams held")
        began = time.monotonic()
        event_id = await publish(client, {"to": "everyone"})
        events = await asyncio.gather(*(stream.next(within=5) for stream in streams))
        assert {event["id"] for event in events} == {event_id}
        assert time.monotonic() - began < 2
        await asyncio.gather(*(stream.close() for stream in streams))


# ---------------------------------------------------------------------------
# Heartbeats, the sessions list
# ---------------------------------------------------------------------------


async def test_sse_sends_a_comment_line_every_heartbeat(start: Start) -> None:
    client = await start(heartbeat=0.2)
    stream = await open_stream(client, "sse", await log_in(client, "alice", "wonderland"))
    await stream.nothing_within(1.6)  # comments are no events
    assert len(stream.comments) >= 2
    await assert_alive(client, stream)


async def test_a_websocket_gets_a_ping_every_heartbeat(start: Start) -> None:
    client = await start(heartbeat=0.2)
    stream = await open_stream(client, "websocket", await log_in(client, "alice", "wonderland"))
    await stream.nothing_within(1.0)
    assert len(stream.pings) >= 3
    await assert_alive(client, stream)


async def test_the_sessions_list_counts_each_sessions_open_streams(client: Client) -> None:
    phone = await log_in(client, "alice", "wonderland")
    laptop = await log_in(client, "alice", "wonderland")
    phone_streams = [await open_stream(client, transport, phone) for transport in TRANSPORTS]

    async def counts() -> dict[bool, int]:
        response = await client.get("/user/sessions", headers=auth_header(laptop))
        return {session["current"]: session["streams"] for session in (await response.json())["sessions"]}

    assert await counts() == {False: 2, True: 0}
    laptop_stream = await open_stream(client, "websocket", laptop, auth="message")
    assert await counts() == {False: 2, True: 1}
    await phone_streams[0].close()
    deadline = time.monotonic() + 2
    while await counts() != {False: 1, True: 1}:
        assert time.monotonic() < deadline, await counts()
        await asyncio.sleep(0.05)
    await laptop_stream.close()


# ---------------------------------------------------------------------------
# The publish command
# ---------------------------------------------------------------------------


async def test_the_publish_command_prints_the_events_id(
    client: Client, command: Callable[..., Awaitable[Any]]
) -> None:
    await add_user(client.app, "Jos\u00e9", "jose-password")
    jose_stream = await open_stream(client, "sse", await log_in(client, "Jos\u00e9", "jose-password"))
    bob_stream = await open_stream(client, "websocket", await log_in(client, "bob", "builder123"))
    everyone, to_jose = await asyncio.gather(
        command("publish", '{"price": 3}'),
        command("publish", '"for José"', "--to", "Jose\u0301"),  # the name typed decomposed (NFD)
    )
    ids = {}
    for result, data in [(everyone, {"price": 3}), (to_jose, "for José")]:
        assert result.returncode == 0, result.stderr
        assert re.fullmatch(r"published event [12]\n", result.stdout), result.stdout
        ids[int(result.stdout.split()[-1])] = data
    assert sorted(ids) == [1, 2]
    received = [await jose_stream.next(), await jose_stream.next()]
    assert [(event["id"], event["data"]) for event in received] == sorted(ids.items())
    assert (await bob_stream.next())["data"] == {"price": 3}
    await bob_stream.nothing_within(0.2)


async def test_the_publish_coroutine_compares_usernames_in_nfc(client: Client) -> None:
    await add_user(client.app, "Jos\u00e9", "jose-password")
    stream = await open_stream(client, "websocket", await log_in(client, "Jos\u00e9", "jose-password"))
    event_id = await publish(client, "for José", "Jose\u0301")
    assert (await stream.next())["id"] == event_id


async def test_the_publish_command_exits_1_with_one_line_for_bad_data_or_an_unknown_user(
    client: Client, command: Callable[..., Awaitable[Any]]
) -> None:
    cases = [
        ["publish", '{"price": '],
        ["publish", "1", "--to", "nobody"],
        ["publish", json.dumps("x" * (64 * 1024))],
        ["publish", "[" * 8000 + "]" * 8000],  # nested too deeply to read
        ["publish", '"\udce9"'],  # the byte 0xE9 alone: not UTF-8 (the argument as Python decodes it)
    ]
    results = await asyncio.gather(*(command(*case) for case in cases))
    for case, result in zip(cases, results, strict=True):
        assert result.returncode == 1, (case[:2], result.stdout, result.stderr)
        assert result.stdout == ""
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (
            case[:2],
            result.stderr,
        )
    async with server.connection(client.app[server.db_engine]) as conn:
        assert await conn.scalar("SELECT count(*) FROM events") == 0


# ---------------------------------------------------------------------------
# Bad requests
# ---------------------------------------------------------------------------


async def test_other_methods_on_events_are_405(client: Client) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    for method in ("PUT", "DELETE", "PATCH"):  # POST publishes (test_topics)
        response = await client.request(method, "/events", headers=auth_header(session_id))
        assert response.status == 405, method
        assert (await response.json())["error"]
    response = await client.head("/events", headers=auth_header(session_id))
    assert response.status == 405
    assert response.headers["Content-Type"].startswith("application/json")
    assert len(client.app[server.streams]) == 0


async def test_a_bad_last_event_id_is_400_before_any_stream(client: Client, transport: str) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    assert client.port is not None
    head = websocket_head if transport == "websocket" else sse_head
    for value in ["-1", "abc", "1.5", "1e3", "0x10", "9" * 19, "1 2"]:
        query = f"/events?last_event_id={value.replace(' ', '%20')}"
        answer = await request_raw(client, head(client.port, query, f"Authorization: {session_id}"))
        assert (answer.status, answer.json()["error"]) == (400, "bad_request"), value
        if transport == "sse":
            answer = await request_raw(
                client,
                head(client.port, "/events", f"Authorization: {session_id}", f"Last-Event-ID: {value}"),
            )
            assert (answer.status, answer.json()["error"]) == (400, "bad_request"), value
    assert len(client.app[server.streams]) == 0


@pytest.mark.parametrize("value", ["%201", "1%20", "+5", "%2B5", "%EF%BC%95", "%20"])
async def test_a_last_event_id_with_a_sign_a_space_or_other_digits_is_400(
    client: Client, transport: str, value: str
) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    assert client.port is not None
    head = websocket_head if transport == "websocket" else sse_head
    answer = await request_raw(
        client, head(client.port, f"/events?last_event_id={value}", f"Authorization: {session_id}")
    )
    assert (answer.status, answer.json()["error"]) == (400, "bad_request")
    assert len(client.app[server.streams]) == 0


@pytest.mark.parametrize("value", ["+5", "-0", "1 2", "5.", "0x5"])
async def test_a_last_event_id_header_with_a_sign_or_inner_space_is_400(client: Client, value: str) -> None:
    session_id = await log_in(client, "alice", "wonderland")
    assert client.port is not None
    answer = await request_raw(
        client, sse_head(client.port, "/events", f"Authorization: {session_id}", f"Last-Event-ID: {value}")
    )
    assert (answer.status, answer.json()["error"]) == (400, "bad_request")
    assert len(client.app[server.streams]) == 0
