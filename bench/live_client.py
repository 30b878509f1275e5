"""The load client for live events: thousands of sockets in one process, read as fast as they arrive.

    python bench/live_client.py --target ours --url http://127.0.0.1:8000 --streams 10000 \\
        --sessions FILE --dsn postgresql://... --scenario fanout

One asyncio process on uvloop, one `asyncio.Protocol` per socket and no task per socket: the bytes
of each read are parsed in place (WebSocket frames, Server-Sent Events lines, or Engine.IO/Socket.IO
packets) and each event only bumps a counter and, while latency is measured, records its receipt
time. bench/run.py runs it pinned to the load core and reads the one line it prints, `LIVE {json}`.

Targets:
    ours      server.py's GET /events, WebSocket (session in Authorization) or Server-Sent Events;
              events are published the real way, an INSERT into the events table, one per transaction
    ceiling   bench/ws_ceiling.py: POST /publish writes one pre-encoded frame to every socket
    peer      bench/socketio_peer.py: POST /publish is python-socketio's emit() to everyone

Why not python-socketio's own AsyncClient for the peer: it runs several tasks, queues and an aiohttp
session per client, so 10,000 of them would measure this process, not the server. Instead this file
speaks just enough of the protocol over a WebSocket, as the AsyncClient would with
`transports=["websocket"]`: Engine.IO 4's open packet (`0{...}`), the namespace connect (`40`),
pings answered with pongs (`2` -> `3`), and events (`42["message", {...}]`). The server does all
that it does for its own client.

Scenarios (each prints its figures):
    fanout    open the streams (resident memory of --server-pid before and after, per stream), then
              latency from publishing to receipt over --latency-events events published one at a
              time, then deliveries per second with events published back to back for --seconds,
              at most --window events in flight (so no socket buffer grows without bound)
    held      open the streams and measure memory only
    logout    (ours) --victims sessions hold one stream each beside the others; each is logged out
              with DELETE /user, timed until its stream gets the close frame
    storm     (ours) events keep coming; every stream is dropped at once and reconnects with
              ?last_event_id=<its last id>; time until all are live again, and a check that every
              stream holds every event exactly once
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import gc
import json
import os
import random
import re
import resource
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

# Handshakes in flight at once: more overflows the server's accept queue and costs SYN retries.
CONNECT_CONCURRENCY = 1000
CONNECT_ATTEMPTS = 10  # per stream, with backoff (a storm of reconnections overflows the queue)
READY_TIMEOUT = 60.0  # seconds for one stream to be open and authenticated
EVENT_TIMEOUT = 60.0  # seconds for one event to reach every stream
SSE_ID = re.compile(rb"\nid: (\d+)\n|^id: (\d+)\n")

# ~200 bytes on the wire for every server: the event as server.py sends it.
EVENT_DATA = {"symbol": "ACME", "price": 3.14, "volume": 1200, "note": "x" * 72}
SAMPLE_EVENT = json.dumps(
    {"id": 1000000, "type": "message", "data": EVENT_DATA, "created_at": "2026-11-29T08:00:00.000000Z"}
)

TOPIC = "bench"  # with --topics: the topic (the peer's room) events are published to

now = time.monotonic


def raise_fd_limit(needed: int) -> int:
    """Lift the soft open-files limit to the hard one (each stream is a file descriptor)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        sys.exit(f"live_client: {needed} file descriptors needed, the hard limit is {hard}")
    return hard


# ---------------------------------------------------------------------------
# What every stream reports to
# ---------------------------------------------------------------------------


class Hub:
    """Counts deliveries per event index and wakes whoever waits for an event to reach everyone."""

    def __init__(self, capacity: int = 200_000) -> None:
        self.counts = [0] * capacity
        self.sent_at: list[float] = []
        self.latencies: list[float] | None = None  # seconds from publishing to receipt, while measured
        self.expected = 0  # streams open and authenticated
        self.waiters: dict[int, asyncio.Future[None]] = {}
        self.delivered = 0

    def event(self, index: int, received: float) -> None:
        count = self.counts[index] + 1
        self.counts[index] = count
        self.delivered += 1
        if self.latencies is not None:
            self.latencies.append(received - self.sent_at[index])
        if count >= self.expected and index in self.waiters:
            waiter = self.waiters.pop(index)
            if not waiter.done():
                waiter.set_result(None)

    def stream_lost(self) -> None:
        self.expected -= 1
        for index in [i for i in self.waiters if self.counts[i] >= self.expected]:
            waiter = self.waiters.pop(index)
            if not waiter.done():
                waiter.set_result(None)

    def expect(self, index: int) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        if self.counts[index] >= self.expected:
            waiter.set_result(None)
        else:
            self.waiters[index] = waiter
        return waiter


# ---------------------------------------------------------------------------
# Streams: one protocol object per socket
# ---------------------------------------------------------------------------


class Stream(asyncio.Protocol):
    """An HTTP request whose response stays open; subclasses parse what follows the headers."""

    ok_status = b"101"

    def __init__(self, hub: Hub, request: bytes) -> None:
        self.hub, self.request = hub, request
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.open = False
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.seen = 0  # events received
        self.base: int | None = None  # the first event id this stream saw (for ours)
        self.ids: list[int] | None = None  # every event id, kept for the storm's check
        self.times: list[float] | None = None
        self.ready_at: float | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed_at: float | None = None
        self.close_code: int | None = None
        self.ended_reason: bytes | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's is no asyncio.Transport subclass)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.open:
            self.feed(data)
            return
        buffer = self.buffer + data
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            self.buffer = buffer
            return
        self.buffer = b""
        if buffer[9:12] != self.ok_status:
            self.fail(
                buffer[: end + 4].decode(errors="replace") + buffer[end + 4 :][:200].decode(errors="replace")
            )
            return
        self.open = True
        self.handshaken()
        if len(buffer) > end + 4:
            self.feed(buffer[end + 4 :])

    def handshaken(self) -> None:
        self.become_ready()

    def become_ready(self) -> None:
        if not self.ready.done():
            self.ready_at = now()
            self.hub.expected += 1
            self.ready.set_result(None)

    def fail(self, why: str) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(why.strip()))
        if self.transport is not None:
            self.transport.abort()

    def mark_closed(self, when: float) -> None:
        if self.closed_at is None:
            self.closed_at = when
        if not self.closed.done():
            self.closed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.mark_closed(now())
        if self.ready.done() and self.ready.exception() is None:
            self.hub.stream_lost()
        else:
            self.fail(f"connection lost before the stream opened: {exc}")

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def on_event_id(self, event_id: int, received: float) -> None:
        """An event of server.py: its index is its id's distance from the first this stream saw."""
        if self.base is None:
            self.base = event_id
        if self.ids is not None:
            self.ids.append(event_id)
            if self.times is not None:
                self.times.append(received)
        self.seen += 1
        self.hub.event(event_id - self.base, received)


class WebSocketStream(Stream):
    """RFC 6455 from the client's side: frames from the server are unmasked, ours are masked."""

    def __init__(self, hub: Hub, request: bytes, by_id: bool) -> None:
        super().__init__(hub, request)
        self.by_id = by_id  # server.py's events carry an id; the ceiling's frame is always the same

    def feed(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        size_all, i = len(buffer), 0
        received = now()
        while size_all - i >= 2:
            size, head = buffer[i + 1], 2
            if size >= 126:
                head = 4 if size == 126 else 10
                if size_all - i < head:
                    break
                size = int.from_bytes(buffer[i + 2 : i + head], "big")
            end = i + head + size
            if end > size_all:
                break
            opcode = buffer[i] & 0x0F
            if opcode == 1:
                self.text(buffer, i + head, end, received)
            elif opcode == 9:
                self.send(0xA, buffer[i + head : end])
            elif opcode == 8:
                self.close_frame(buffer[i + head : end], received)
            i = end
        self.buffer = buffer[i:] if i < size_all else b""

    def text(self, buffer: bytes, start: int, end: int, received: float) -> None:
        if not self.by_id:
            index = self.seen
            self.seen += 1
            self.hub.event(index, received)
        elif buffer[start + 2] == 0x69:  # {"id":N,...}: an event (int() allows a space after the colon)
            colon = buffer.index(b":", start)
            self.on_event_id(int(buffer[colon + 1 : buffer.index(b",", colon)]), received)
        elif b"session_ended" in buffer[start:end]:
            self.ended_reason = json.loads(buffer[start:end])["reason"].encode()

    def close_frame(self, payload: bytes, received: float) -> None:
        self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        self.mark_closed(received)
        self.send(0x8, payload[:2])
        if self.transport is not None:
            self.transport.close()

    def send(self, opcode: int, payload: bytes) -> None:
        """One masked frame (a client must mask, RFC 6455 section 5.3); payloads here are short."""
        if self.transport is None or self.transport.is_closing():
            return
        mask = os.urandom(4)
        masked = bytes(byte ^ mask[j & 3] for j, byte in enumerate(payload))
        self.transport.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)


class SocketIOStream(WebSocketStream):
    """Engine.IO 4 over a WebSocket with the default Socket.IO namespace, as the peer's clients speak."""

    def handshaken(self) -> None:
        pass  # ready once the namespace connect is acknowledged

    def text(self, buffer: bytes, start: int, end: int, received: float) -> None:
        kind = buffer[start]
        if kind == 0x34:  # "4": a Socket.IO packet inside an Engine.IO message
            if buffer[start + 1] == 0x32:  # "42": an event
                index = self.seen
                self.seen += 1
                self.hub.event(index, received)
            elif buffer[start + 1] == 0x30:  # "40": the namespace connect is acknowledged
                self.become_ready()
        elif kind == 0x32:  # "2": ping
            self.send(0x1, b"3")
        elif kind == 0x30:  # "0{...}": Engine.IO open
            self.send(0x1, b"40")


class EventSourceStream(Stream):
    """Server-Sent Events over chunked HTTP/1.1: each complete event carries `id: N`."""

    ok_status = b"200"

    def feed(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        last = buffer.rfind(b"\n\n")
        if last < 0:
            self.buffer = buffer
            return
        complete, self.buffer = buffer[: last + 2], buffer[last + 2 :]
        received = now()
        for match in SSE_ID.finditer(complete):
            self.on_event_id(int(match.group(1) or match.group(2)), received)
        if b"session_ended" in complete:
            self.ended_reason = b"session_ended"
            self.mark_closed(received)


def websocket_request(host: str, path: str, headers: dict[str, str]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def sse_request(host: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Target:
    """How to open a stream on one kind of server."""

    def __init__(self, kind: str, transport: str, url: str, topics: int = 0) -> None:
        self.kind, self.transport = kind, transport
        # With topics: each stream subscribes to TOPIC and topics - 1 others (a room each, for the
        # peer), and events go to TOPIC only.
        self.query = "&".join(f"topic={TOPIC if n == 0 else f'other{n}'}" for n in range(topics))
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.netloc = f"{self.host}:{self.port}"

    def stream(self, hub: Hub, session: str | None, last_event_id: int | None = None) -> Stream:
        if self.kind == "peer":
            path = "/socket.io/?EIO=4&transport=websocket" + (f"&{self.query}" if self.query else "")
            return SocketIOStream(hub, websocket_request(self.netloc, path, {}), by_id=False)
        query = "&".join(
            part
            for part in (self.query, "" if last_event_id is None else f"last_event_id={last_event_id}")
            if part
        )
        path = "/events" + (f"?{query}" if query else "")
        headers = {"Authorization": session} if session else {}
        if self.transport == "sse":
            return EventSourceStream(hub, sse_request(self.netloc, path, headers))
        return WebSocketStream(hub, websocket_request(self.netloc, path, headers), by_id=self.kind == "ours")


async def open_streams(
    target: Target,
    hub: Hub,
    sessions: list[str | None],
    last_ids: list[int | None] | None = None,
    prepare: Callable[[int, Stream], None] | None = None,
) -> list[Stream]:
    """One stream per entry of `sessions`, CONNECT_CONCURRENCY handshakes at a time."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(number: int) -> Stream:
        last_id = last_ids[number] if last_ids else None
        async with gate:
            for attempt in range(CONNECT_ATTEMPTS):
                stream = target.stream(hub, sessions[number], last_id)
                if prepare is not None:
                    prepare(number, stream)
                try:
                    await loop.create_connection(
                        functools.partial(lambda s: s, stream), target.host, target.port
                    )
                    await asyncio.wait_for(asyncio.shield(stream.ready), READY_TIMEOUT)
                    return stream
                except OSError:  # refused, reset or timed out: the server's accept queue was full
                    if attempt == CONNECT_ATTEMPTS - 1:
                        raise
                    # As a real client would: back off exponentially, with jitter.
                    await asyncio.sleep(random.uniform(0.5, 1.0) * min(4.0, 0.1 * 2**attempt))
            raise AssertionError("unreachable")

    return list(await asyncio.gather(*(one(number) for number in range(len(sessions)))))


def close_all(streams: list[Stream]) -> None:
    for stream in streams:
        if stream.transport is not None:
            stream.transport.abort()


def resident(pid: int | None) -> int:
    """Resident set size of a process, in bytes (0 when not given)."""
    if pid is None:
        return 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------


class Publisher:
    """Publishes event after event to one server; `publish()` returns once the server has it."""

    async def start(self) -> None:
        pass

    async def publish(self) -> int:
        raise NotImplementedError

    async def stop(self) -> None:
        pass


class SqlPublisher(Publisher):
    """server.py's real path: INSERT INTO events, one transaction each (autocommit)."""

    def __init__(self, dsn: str, pool: int, topic: str | None = None) -> None:
        self.dsn, self.size, self.topic = dsn, pool, topic
        self.pool: Any = None
        self.data = json.dumps(EVENT_DATA)

    async def start(self) -> None:
        import aiopg

        # The publisher's commits skip the wait for the disk flush, as server.py's own writes do:
        # the NOTIFY still goes out at commit, and the figures are the fan-out's, not this VM's fsync.
        self.pool = await aiopg.create_pool(
            self.dsn, minsize=self.size, maxsize=self.size, options="-c synchronous_commit=off"
        )

    async def publish(self) -> int:
        async with self.pool.acquire() as conn, conn.cursor() as cursor:
            await cursor.execute(
                "INSERT INTO events (topic, data) VALUES (%s, %s) RETURNING id", (self.topic, self.data)
            )
            return int((await cursor.fetchone())[0])

    async def stop(self) -> None:
        self.pool.close()
        await self.pool.wait_closed()


class HttpPublisher(Publisher):
    """The ceiling's and the peer's trigger: POST /publish."""

    def __init__(self, url: str) -> None:
        self.url = url + "/publish"
        self.http: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))

    async def publish(self) -> int:
        assert self.http is not None
        async with self.http.post(self.url) as response:
            response.raise_for_status()
            await response.read()
        return 0

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.close()


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


async def publish_and_wait(hub: Hub, publisher: Publisher, index: int) -> None:
    waiter = hub.expect(index)
    hub.sent_at.append(now())
    await publisher.publish()
    await asyncio.wait_for(waiter, EVENT_TIMEOUT)


async def warm_up(hub: Hub, publisher: Publisher) -> None:
    """Event 0 reaches every stream before anything is measured (each stream's numbering starts there)."""
    await asyncio.sleep(0.5)  # the last streams' registration follows their handshake
    await publish_and_wait(hub, publisher, 0)


async def latency(hub: Hub, publisher: Publisher, events: int) -> dict[str, float]:
    """Events one at a time: seconds from publishing to each receipt, and to the last receipt."""
    hub.latencies = []
    spreads = []
    timed_out = 0
    for _ in range(events):
        index = len(hub.sent_at)
        started = now()
        try:
            await publish_and_wait(hub, publisher, index)
        except TimeoutError:  # some stream never got it: report, do not hang
            timed_out += 1
            break
        spreads.append(now() - started)
        await asyncio.sleep(0.05)
    found, hub.latencies = hub.latencies, None
    return {
        "latency_timeouts": timed_out,
        "latency_p50_ms": 1000 * percentile(found, 0.50),
        "latency_p99_ms": 1000 * percentile(found, 0.99),
        "latency_max_ms": 1000 * max(found, default=float("nan")),
        "fanout_complete_p50_ms": 1000 * percentile(spreads, 0.5),
        "latency_samples": len(found),
    }


async def sustained(hub: Hub, publisher: Publisher, seconds: float, window: int) -> dict[str, float]:
    """Events back to back for `seconds`, at most `window` not yet at every stream; deliveries per second."""
    first = len(hub.sent_at)
    delivered_before = hub.delivered
    in_flight: deque[asyncio.Future[None]] = deque()
    publishing: set[asyncio.Task[int]] = set()
    started = now()
    timed_out = 0
    try:
        while now() - started < seconds:
            while len(in_flight) >= window:
                await asyncio.wait_for(in_flight.popleft(), EVENT_TIMEOUT)
            index = len(hub.sent_at)
            in_flight.append(hub.expect(index))
            hub.sent_at.append(now())
            task = asyncio.create_task(publisher.publish())
            publishing.add(task)
            task.add_done_callback(publishing.discard)
        for waiter in in_flight:
            await asyncio.wait_for(waiter, EVENT_TIMEOUT)
    except TimeoutError:  # some stream never got an event: report what was delivered
        timed_out = 1
    elapsed = now() - started
    events = len(hub.sent_at) - first
    delivered = hub.delivered - delivered_before
    return {
        "events": events,
        "deliveries": delivered,
        "seconds": elapsed,
        "deliveries_per_s": delivered / elapsed,
        "sustained_timeout": timed_out,
    }


async def open_measured(
    target: Target, hub: Hub, sessions: list[str | None], server_pid: int | None
) -> tuple[list[Stream], dict[str, float]]:
    gc.collect()
    before = resident(server_pid)
    started = now()
    streams = await open_streams(target, hub, sessions)
    opened = now() - started
    await asyncio.sleep(1.0)  # let the server finish what each handshake started
    after = resident(server_pid)
    return streams, {
        "streams": len(streams),
        "open_seconds": opened,
        "rss_before": before,
        "rss_after": after,
        "bytes_per_stream": (after - before) / max(1, len(streams)),
    }


async def fanout(args: argparse.Namespace, target: Target, publisher: Publisher) -> dict[str, Any]:
    hub = Hub()
    sessions = spread(load_sessions(args.sessions), args.streams)
    streams, figures = await open_measured(target, hub, sessions, args.server_pid)
    try:
        if args.scenario == "held":
            return figures
        await warm_up(hub, publisher)
        figures |= await latency(hub, publisher, args.latency_events)
        figures |= await sustained(hub, publisher, args.seconds, args.window)
        figures["streams_at_end"] = hub.expected
        return figures
    finally:
        close_all(streams)


async def logout(args: argparse.Namespace, target: Target, publisher: Publisher) -> dict[str, Any]:
    """Each victim session holds one stream among the others; DELETE /user until its close frame."""
    hub = Hub()
    victims = load_sessions(args.victims)
    others = spread(load_sessions(args.sessions), args.streams - len(victims))
    streams = await open_streams(target, hub, [*victims, *others])
    victim_streams = streams[: len(victims)]
    times, codes = [], []
    try:
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as http:
            for session, stream in zip(victims, victim_streams, strict=True):
                started = now()
                async with http.delete(f"{args.url}/user", headers={"Authorization": session}) as response:
                    assert response.status == 200, response.status
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(stream.closed), 10)
                times.append((stream.closed_at or now()) - started)
                codes.append(stream.close_code)
                await asyncio.sleep(0.01)
        return {
            "streams": len(streams),
            "logouts": len(times),
            "logout_p50_ms": 1000 * percentile(times, 0.5),
            "logout_p99_ms": 1000 * percentile(times, 0.99),
            "closed_4001": sum(code == 4001 for code in codes),
            "session_ended_seen": sum(s.ended_reason is not None for s in victim_streams),
        }
    finally:
        close_all(streams)


async def storm(args: argparse.Namespace, target: Target, publisher: Publisher) -> dict[str, Any]:
    """Drop every stream at once while events keep coming; reconnect each with its last event id."""
    hub = Hub(capacity=1_000_000)
    sessions = spread(load_sessions(args.sessions), args.streams)
    streams = await open_streams(target, hub, sessions)
    for stream in streams:
        stream.ids = []
    await warm_up(hub, publisher)
    published: dict[int, float] = {}  # event id -> when its INSERT was sent
    stop = asyncio.Event()

    async def keep_publishing() -> None:
        while not stop.is_set():
            sent = now()
            published[await publisher.publish()] = sent
            await asyncio.sleep(1 / args.storm_rate)

    background = asyncio.create_task(keep_publishing())
    await asyncio.sleep(1.0)
    dropped_at = now()
    close_all(streams)
    await asyncio.sleep(0)
    last_ids = [stream.ids[-1] if stream.ids else None for stream in streams]
    hub.expected = 0

    def keep_history(number: int, new: Stream) -> None:
        new.ids, new.times = list(streams[number].ids or []), []

    renewed = await open_streams(target, hub, sessions, last_ids, keep_history)
    reopened = now() - dropped_at
    await asyncio.sleep(args.storm_tail)
    stop.set()
    await background
    final = max(published)
    for _ in range(1200):  # a minute at most for the last event to reach every stream
        if all(s.ids and s.ids[-1] >= final for s in renewed):
            break
        await asyncio.sleep(0.05)
    close_all(renewed)
    # Caught up: the first receipt of an event published after that stream's reconnection was open.
    caught_up = []
    complete, duplicates = 0, 0
    all_ids = sorted(published)
    for old_last, new in zip(last_ids, renewed, strict=True):
        ids = new.ids or []
        duplicates += len(ids) - len(set(ids))
        expected = set(ids[:1]) | {i for i in all_ids if ids and i > ids[0]}
        complete += set(ids) == expected and ids == sorted(ids)
        opened_at = new.ready_at or dropped_at
        live = [t for i, t in zip(ids[len(ids) - len(new.times or []) :], new.times or [], strict=True)
                if published.get(i, 0.0) > opened_at]  # fmt: skip
        caught_up.append((live[0] if live else now()) - dropped_at)
        del old_last
    return {
        "streams": len(renewed),
        "events_published": len(published),
        "reconnect_seconds": reopened,
        "catch_up_seconds": max(caught_up),
        "catch_up_p50_seconds": percentile(caught_up, 0.5),
        "complete_streams": complete,
        "duplicates": duplicates,
    }


def load_sessions(path: str | None) -> list[str | None]:
    if not path:
        return [None]
    return [line.strip() for line in open(path) if line.strip()]


def spread(sessions: list[str | None], count: int) -> list[str | None]:
    """`count` streams over the sessions, round robin."""
    return [sessions[number % len(sessions)] for number in range(count)]


SCENARIOS: dict[str, Callable[[argparse.Namespace, Target, Publisher], Awaitable[dict[str, Any]]]] = {
    "fanout": fanout,
    "held": fanout,
    "logout": logout,
    "storm": storm,
}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(args.target, args.transport, args.url, args.topics)
    topic = TOPIC if args.topics else None
    publisher: Publisher = (
        SqlPublisher(args.dsn, args.window, topic)
        if args.target == "ours" and args.dsn
        else HttpPublisher(args.url)
    )
    await publisher.start()
    try:
        return await SCENARIOS[args.scenario](args, target, publisher)
    finally:
        await publisher.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", choices=["ours", "ceiling", "peer"], required=True)
    parser.add_argument("--transport", choices=["ws", "sse"], default="ws")
    parser.add_argument("--url", required=True)
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="fanout")
    parser.add_argument("--sessions", help="file of session ids, one a line (ours)")
    parser.add_argument("--victims", help="file of session ids to log out (logout)")
    parser.add_argument("--dsn", help="PostgreSQL to publish into (ours)")
    parser.add_argument("--server-pid", type=int, help="measure this process's resident memory")
    parser.add_argument("--latency-events", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--window", type=int, default=8, help="events in flight at most (sustained)")
    parser.add_argument("--topics", type=int, default=0, help="topics (rooms) per stream; events to one")
    parser.add_argument("--storm-rate", type=float, default=20.0, help="events a second during the storm")
    parser.add_argument("--storm-tail", type=float, default=3.0, help="seconds of events after reconnecting")
    args = parser.parse_args()
    raise_fd_limit(args.streams + 100)
    import uvloop

    figures = uvloop.run(run(args))
    print("LIVE " + json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
