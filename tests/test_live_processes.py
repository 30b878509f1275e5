"""Live events across real `python server.py` processes and real signals: one published event
reaches the streams of every process; passwd, deluser and logouts end a user's streams in
whichever process holds them; a bus connection that is killed or refused loses no event and no
revocation; SIGTERM and SIGINT close open streams cleanly, in one process and in gunicorn's workers."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import os
import signal
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import argon2
import psutil
import psycopg2
import psycopg2.extensions
import pytest

import server
from conftest import REDIS_PREFIX, REDIS_URL, ServerProcess, Start, free_port, run_command

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}
HASHER = argon2.PasswordHasher(**FAST)  # the servers' own parameters: no re-hash at login
ENDS_WITHIN = 1.0  # the contract: a session's end reaches its streams, in any process, within 1 s
ARRIVES_WITHIN = 5.0  # a bound for an event to arrive, loose for a loaded machine
# This database's only: other databases of the cluster may have servers of their own.
BUS_BACKENDS = "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND datname = current_database()"
KILL_BUS = f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid IN ({BUS_BACKENDS})"


# ---------------------------------------------------------------------------
# Servers, users and commands
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Served:
    process: ServerProcess
    port: int

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Site:
    """`python server.py` processes on the test database, each with a config file of its own,
    and the commands (adduser, passwd, deluser, publish) run against the same database."""

    def __init__(self, tmp_path: Path, database_url: str, db: Any, start_server: Start) -> None:
        self.tmp_path = tmp_path
        self.database_url = database_url
        self.db = db  # the test's own connection, autocommit
        self.start_server = start_server
        self.command_config = self.config("memory", free_port())

    def config(self, store: str, port: int, events: dict[str, object] | None = None) -> Path:
        sessions: dict[str, object] = {"store": store}
        if store == "redis":
            sessions["redis_url"], sessions["redis_prefix"] = REDIS_URL, REDIS_PREFIX
        path = self.tmp_path / f"config-{port}.json"
        body = {
            "webserver": {"host": "127.0.0.1", "port": port},
            "sessions": sessions,
            "passwords": FAST,
            "events": events or {},
        }
        path.write_text(json.dumps(body))
        return path

    def serve(
        self,
        count: int = 1,
        store: str = "memory",
        workers: int = 1,
        url: str | None = None,
        events: dict[str, object] | None = None,
    ) -> list[Served]:
        """Start `count` servers at once (each with `workers` workers) and wait until all serve."""
        env = {"DATABASE_URL": url or self.database_url}
        started = []
        for _ in range(count):
            port = free_port()
            args = ["--config", str(self.config(store, port, events))]
            if workers > 1:
                args += ["--workers", str(workers)]
            started.append(Served(self.start_server(args, env), port))
        for served in started:
            served.process.wait_until_serving(processes=workers)
        return started

    def command(self, *args: str, stdin: str = "") -> str:
        """Run `python server.py ARGS`; it must succeed; its output."""
        env = {"DATABASE_URL": self.database_url}
        done = run_command([*args, "--config", str(self.command_config)], stdin, env)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    async def run(self, *args: str, stdin: str = "") -> str:
        """command() off the event loop, so that streams keep being read meanwhile."""
        return await asyncio.to_thread(self.command, *args, stdin=stdin)

    def add_user(self, name: str, password: str) -> None:
        """A user, straight into `users` (hashed as the servers hash): quicker than adduser."""
        with self.db.cursor() as cur:
            cur.execute(
                "INSERT INTO users (username, password_hash) VALUES (%s, %s)", (name, HASHER.hash(password))
            )

    def insert_event(self, data: object, username: str | None = None) -> int:
        """Publish by SQL, as any client may."""
        with self.db.cursor() as cur:
            cur.execute(
                "INSERT INTO events (username, data) VALUES (%s, %s) RETURNING id",
                (username, json.dumps(data)),
            )
            return int(cur.fetchone()[0])


@pytest.fixture
def site(tmp_path: Path, database_url: str, db: Any, start_server: Start) -> Site:
    return Site(tmp_path, database_url, db, start_server)


# ---------------------------------------------------------------------------
# Clients: sessions, and streams of both transports read the same way
# ---------------------------------------------------------------------------


class SseStream:
    """GET /events as Server-Sent Events."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def _next(self) -> dict[str, Any]:
        fields: dict[str, str] = {}
        while True:
            line = await self.response.content.readline()
            if not line:
                raise AssertionError(f"the stream ended; fields so far: {fields}")
            text = line.decode().rstrip("\r\n")
            if text == "":
                if fields:
                    break
            elif not text.startswith(":"):  # a comment is a heartbeat
                name, _, value = text.partition(":")
                fields[name] = value.removeprefix(" ")
        message = json.loads(fields["data"])
        assert fields["event"] == message["type"], fields
        if "id" in fields:
            assert int(fields["id"]) == message["id"], fields
        return dict(message)

    async def message(self, within: float = ARRIVES_WITHIN) -> dict[str, Any]:
        return await asyncio.wait_for(self._next(), within)

    async def end(self, within: float = ENDS_WITHIN) -> str:
        """The reason of the stream's session_ended, after which the response ends cleanly."""

        async def ended() -> str:
            message = await self._next()
            assert message["type"] == "session_ended", message
            # aiohttp raises ClientPayloadError for a chunked body cut off before its last chunk.
            assert await self.response.content.read() == b""
            return str(message["reason"])

        return await asyncio.wait_for(ended(), within)

    async def close(self) -> None:
        self.response.close()


class WsStream:
    """GET /events as a WebSocket."""

    def __init__(self, websocket: aiohttp.ClientWebSocketResponse) -> None:
        self.websocket = websocket

    @property
    def local_port(self) -> int:
        return int(self.websocket.get_extra_info("sockname")[1])

    async def message(self, within: float = ARRIVES_WITHIN) -> dict[str, Any]:
        received = await self.websocket.receive(within)
        assert received.type is aiohttp.WSMsgType.TEXT, received
        return dict(json.loads(received.data))

    async def end(self, within: float = ENDS_WITHIN) -> str:
        """The reason of the stream's session_ended, after which the server closes with 4001."""

        async def ended() -> str:
            message = await self.message()
            assert message["type"] == "session_ended", message
            closing = await self.websocket.receive()
            assert closing.type is aiohttp.WSMsgType.CLOSE, closing
            assert self.websocket.close_code == server.WS_SESSION_ENDED, self.websocket.exception()
            return str(message["reason"])

        return await asyncio.wait_for(ended(), within)

    async def close(self) -> None:
        await self.websocket.close()


Stream = SseStream | WsStream


class Client:
    """An HTTP client for the servers; the streams it opened are closed when it is."""

    def __init__(self) -> None:
        # A connection per request: a stream must reach the worker that accepts it, not ride on
        # a kept-alive connection another worker holds (see streams_on_every_worker).
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )
        self.opened: list[Stream | RawSse] = []

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for stream in self.opened:
            await stream.close()
        await self.http.close()

    async def log_in(self, served: Served, name: str, password: str) -> str:
        body = {"username": name, "password": password}
        async with self.http.post(f"{served.base}/user", json=body) as response:
            assert response.status == 200, await response.text()
            return str((await response.json())["session_id"])

    async def status(self, method: str, served: Served, path: str, session_id: str) -> int:
        async with self.http.request(
            method, f"{served.base}{path}", headers={"Authorization": session_id}
        ) as response:
            return response.status

    async def whoami(self, served: Served, session_id: str) -> int:
        return await self.status("GET", served, "/user", session_id)

    async def sse(self, served: Served, session_id: str, last_event_id: int | None = None) -> SseStream:
        query = "" if last_event_id is None else f"?last_event_id={last_event_id}"
        response = await self.http.get(f"{served.base}/events{query}", headers={"Authorization": session_id})
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        stream = SseStream(response)
        self.opened.append(stream)
        return stream

    async def ws(self, served: Served, session_id: str) -> WsStream:
        websocket = await self.http.ws_connect(f"{served.base}/events", headers={"Authorization": session_id})
        stream = WsStream(websocket)
        self.opened.append(stream)
        return stream

    async def raw_sse(self, served: Served, session_id: str) -> RawSse:
        stream = await RawSse.open(served.port, session_id)
        self.opened.append(stream)
        return stream

    async def both(self, served: Served, session_id: str) -> list[Stream]:
        """An SSE stream and a WebSocket of the session."""
        return [await self.sse(served, session_id), await self.ws(served, session_id)]

    async def each_both(self, servers: list[Served], sessions: list[str]) -> list[Stream]:
        """Both kinds of stream of each session, on its server."""
        return [stream for i, served in enumerate(servers) for stream in await self.both(served, sessions[i])]

    async def statuses(self, path: str, servers: list[Served], sessions: list[str]) -> list[int]:
        """GET path with each session, on its server."""
        return [await self.status("GET", served, path, sessions[i]) for i, served in enumerate(servers)]


async def all_receive(streams: Sequence[Stream | RawSse], event_id: int, data: object) -> None:
    """Every stream's next message is this event."""
    for stream in streams:
        message = await stream.message()
        assert (message["type"], message["id"], message["data"]) == ("message", event_id, data)


def published_id(output: str) -> int:
    assert output.startswith("published event "), output
    return int(output.split()[-1])


# ---------------------------------------------------------------------------
# Several processes on one database, each with its sessions in memory (unless said otherwise)
# ---------------------------------------------------------------------------


async def test_an_event_published_once_reaches_the_streams_of_every_process(site: Site) -> None:
    site.add_user("alice", "wonderland")
    site.add_user("bob", "builder-bob")
    one, other = site.serve(2)
    async with Client() as client:
        alices = await client.both(one, await client.log_in(one, "alice", "wonderland"))
        alices += await client.both(other, await client.log_in(other, "alice", "wonderland"))
        bobs = await client.both(other, await client.log_in(other, "bob", "builder-bob"))
        everyone = published_id(await site.run("publish", '{"price": 3}'))
        await all_receive([*alices, *bobs], everyone, {"price": 3})
        to_bob = site.insert_event("for bob", "bob")
        to_alice = site.insert_event("for alice", "alice")
        await all_receive(bobs, to_bob, "for bob")
        await all_receive(alices, to_alice, "for alice")  # bob's event never reached them


async def test_passwd_and_deluser_end_the_users_streams_and_sessions_in_every_process(site: Site) -> None:
    site.add_user("alice", "wonderland")
    site.add_user("bob", "builder-bob")
    servers = site.serve(2)
    async with Client() as client:
        bob = await client.log_in(servers[1], "bob", "builder-bob")
        bobs = await client.both(servers[1], bob)
        for command, password, stdin in (
            ("passwd", "wonderland", "looking-glass\n"),
            ("deluser", "looking-glass", ""),
        ):
            alice = [await client.log_in(served, "alice", password) for served in servers]
            streams = await client.each_both(servers, alice)
            await site.run(command, "alice", stdin=stdin)
            for stream in streams:
                assert await stream.end() == "revoked", command
            assert await client.statuses("/user", servers, alice) == [401, 401]
        # Bob's streams and session live on.
        event_id = site.insert_event("still here")
        await all_receive(bobs, event_id, "still here")
        assert await client.whoami(servers[1], bob) == 200


@pytest.mark.parametrize("store", ["memory", "postgres"])  # postgres: a shared store, and its near cache
async def test_a_session_of_a_deleted_user_never_passes_as_the_new_user_of_that_name(
    site: Site, store: str
) -> None:
    site.add_user("erin", "same-password")
    servers = site.serve(2, store=store)
    async with Client() as client:
        old = [await client.log_in(served, "erin", "same-password") for served in servers]
        streams = await client.each_both(servers, old)
        await site.run("deluser", "erin")
        await site.run("adduser", "erin", stdin="same-password\n")
        for stream in streams:
            assert await stream.end() == "revoked"
        new = [await client.log_in(served, "erin", "same-password") for served in servers]
        assert await client.statuses("/user", servers, new) == [200, 200]
        assert await client.statuses("/user", servers, old) == [401, 401]
        assert await client.statuses("/events", servers, old) == [401, 401]


# ---------------------------------------------------------------------------
# Several processes sharing one session store
# ---------------------------------------------------------------------------


async def test_a_logout_through_one_process_closes_the_streams_another_process_holds(
    site: Site, shared_store: str
) -> None:
    site.add_user("alice", "wonderland")
    one, other = site.serve(2, store=shared_store)
    async with Client() as client:
        # DELETE /user
        laptop = await client.log_in(one, "alice", "wonderland")
        streams = await client.both(other, laptop)
        assert await client.status("DELETE", one, "/user", laptop) == 200
        for stream in streams:
            assert await stream.end() == "logout"
        assert await client.whoami(other, laptop) == 401

        # DELETE /user/sessions/{id}, of another session of the caller's
        phone, tablet = [await client.log_in(one, "alice", "wonderland") for _ in range(2)]
        streams = await client.both(other, phone)
        async with client.http.get(
            f"{one.base}/user/sessions", headers={"Authorization": tablet}
        ) as response:
            listed = (await response.json())["sessions"]
        (phones,) = [entry["id"] for entry in listed if not entry["current"]]
        assert await client.status("DELETE", one, f"/user/sessions/{phones}", tablet) == 200
        for stream in streams:
            assert await stream.end() == "logout"
        assert await client.whoami(other, phone) == 401

        # DELETE /user?all=true
        streams = await client.both(other, tablet)
        assert await client.status("DELETE", one, "/user?all=true", tablet) == 200
        for stream in streams:
            assert await stream.end() == "logout"


# ---------------------------------------------------------------------------
# The bus: each process's listening connection to PostgreSQL
# ---------------------------------------------------------------------------


def publish_while_killing_the_bus(database_url: str, count: int) -> int:
    """Insert `count` events ({"n": 0}, {"n": 1}, ...), each its own transaction, while another
    connection terminates every bus backend every 0.12 s; returns how many it terminated."""
    stop, kills = threading.Event(), []

    def kill() -> None:
        conn = psycopg2.connect(database_url)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                while not stop.wait(0.12):
                    cur.execute(KILL_BUS, (server.BUS_APPLICATION_NAME,))
                    kills.extend(pid for (pid,) in cur.fetchall() if pid)
        finally:
            conn.close()

    killer = threading.Thread(target=kill)
    killer.start()
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for n in range(count):
                cur.execute("INSERT INTO events (username, data) VALUES (NULL, %s)", (json.dumps({"n": n}),))
                time.sleep(0.005)
    finally:
        conn.close()
        stop.set()
        killer.join()
    return len(kills)


async def read_until(stream: Stream, last: object) -> list[dict[str, Any]]:
    """The messages up to the one whose data is `last` (not included)."""
    messages = []
    while (message := await stream.message())["data"] != last:
        messages.append(message)
    return messages


async def test_a_bus_connection_killed_while_events_are_published_loses_and_repeats_nothing(
    site: Site,
) -> None:
    site.add_user("alice", "wonderland")
    (served,) = site.serve()
    count = 300
    async with Client() as client:
        streams = await client.both(served, await client.log_in(served, "alice", "wonderland"))
        await all_receive(streams, site.insert_event("ready"), "ready")
        readers = [asyncio.ensure_future(read_until(stream, "done")) for stream in streams]
        kills = await asyncio.to_thread(publish_while_killing_the_bus, site.database_url, count)
        site.insert_event("done")
        for messages in await asyncio.gather(*readers):
            assert [message["data"] for message in messages] == [{"n": n} for n in range(count)]
            ids = [message["id"] for message in messages]
            assert ids == sorted(set(ids))
    assert kills >= 3, "the bus was not terminated often enough for this test to mean anything"
    assert served.process.log.count("PostgreSQL bus back; catching up") >= 3


class RefusableRole:
    """A login role of the test's own for a server to connect as (a superuser, like the test's):
    refuse() has PostgreSQL refuse its new connections (NOLOGIN), as if the server were cut off
    from the database, while the ones it has open stay; admit() lets them in again."""

    def __init__(self, database_url: str, db: Any) -> None:
        self.db = db
        self.name = f"{psycopg2.extensions.parse_dsn(database_url)['dbname']}_live_server"
        password = "live-server-password"
        with db.cursor() as cur:
            cur.execute(f'DROP ROLE IF EXISTS "{self.name}"')
            cur.execute(f'CREATE ROLE "{self.name}" LOGIN SUPERUSER PASSWORD %s', (password,))
        parts = urllib.parse.urlsplit(database_url)
        host = parts.netloc.rpartition("@")[2]
        self.url = urllib.parse.urlunsplit(parts._replace(netloc=f"{self.name}:{password}@{host}"))

    def refuse(self) -> None:
        with self.db.cursor() as cur:
            cur.execute(f'ALTER ROLE "{self.name}" NOLOGIN')

    def admit(self) -> None:
        with self.db.cursor() as cur:
            cur.execute(f'ALTER ROLE "{self.name}" LOGIN')

    def cut_off(self) -> None:
        """Refuse new connections, then end the bus connection of the server that uses the role."""
        self.refuse()
        with self.db.cursor() as cur:
            cur.execute(f"{KILL_BUS} AND usename = %s", (server.BUS_APPLICATION_NAME, self.name))
            assert cur.fetchall() == [(True,)]

    def drop(self) -> None:
        with self.db.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE usename = %s",
                (self.name,),
            )
            cur.execute(f'DROP ROLE IF EXISTS "{self.name}"')


@pytest.fixture
def refusable_role(database_url: str, db: Any) -> Iterator[RefusableRole]:
    role = RefusableRole(database_url, db)
    yield role
    role.drop()


async def test_a_passwd_made_while_the_bus_is_cut_off_takes_effect_when_it_reconnects(
    site: Site, refusable_role: RefusableRole
) -> None:
    site.add_user("alice", "wonderland")
    (served,) = site.serve(url=refusable_role.url)
    async with Client() as client:
        alice = await client.log_in(served, "alice", "wonderland")
        streams = await client.both(served, alice)
        refusable_role.cut_off()
        await site.run("passwd", "alice", stdin="looking-glass\n")
        # The server has not heard of it: its bus cannot get back (else this test means nothing).
        with pytest.raises(asyncio.TimeoutError):
            await streams[0].message(within=0.3)
        refusable_role.admit()
        for stream in streams:
            assert await stream.end(within=server.BUS_RETRY[1] + 2) == "revoked"
        assert await client.whoami(served, alice) == 401
    assert "PostgreSQL bus back" in served.process.log


async def test_a_logout_made_while_a_process_is_cut_off_closes_its_streams_when_it_reconnects(
    site: Site, refusable_role: RefusableRole
) -> None:
    site.add_user("alice", "wonderland")
    (one,) = site.serve(store="postgres")
    (cut_off,) = site.serve(store="postgres", url=refusable_role.url)
    async with Client() as client:
        alice = await client.log_in(one, "alice", "wonderland")
        streams = await client.both(cut_off, alice)
        refusable_role.cut_off()
        assert await client.status("DELETE", one, "/user", alice) == 200
        with pytest.raises(asyncio.TimeoutError):  # it has not heard (else this test means nothing)
            await streams[0].message(within=0.3)
        refusable_role.admit()
        for stream in streams:
            assert await stream.end(within=server.BUS_RETRY[1] + 2) == "logout"
        assert await client.whoami(cut_off, alice) == 401


# ---------------------------------------------------------------------------
# Signals: open streams are closed cleanly, the process exits 0
# ---------------------------------------------------------------------------


class RawSse:
    """GET /events over a plain socket, to see the bytes that end the response."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, session_id: str) -> RawSse:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {session_id}\r\n\r\n"
        writer.write(request.encode())
        head = (await reader.readuntil(b"\r\n\r\n")).lower()
        assert head.startswith(b"http/1.1 200 ") and b"transfer-encoding: chunked" in head, head
        return cls(reader, writer)

    @property
    def local_port(self) -> int:
        return int(self.writer.get_extra_info("sockname")[1])

    async def message(self, within: float = ARRIVES_WITHIN) -> dict[str, Any]:
        """The next event: one chunk of the chunked coding holding one SSE event."""

        async def next_event() -> dict[str, Any]:
            while True:
                chunk = (await self.reader.readuntil(b"\n\n\r\n")).decode()
                size, _, text = chunk.partition("\r\n")
                assert int(size, 16) == len(text.encode()) - 2, chunk  # the chunk's data and its CRLF
                fields = dict(line.split(": ", 1) for line in text.splitlines() if line and line[0] != ":")
                if fields:  # else a heartbeat
                    message = dict(json.loads(fields["data"]))
                    assert fields["event"] == message["type"], chunk
                    assert fields.get("id") == (str(message["id"]) if "id" in message else None), chunk
                    return message

        return await asyncio.wait_for(next_event(), within)

    async def end(self, within: float = ENDS_WITHIN) -> str:
        """The reason of the stream's session_ended, right after which comes the last chunk."""

        async def ended() -> str:
            message = await self.message()
            assert message["type"] == "session_ended", message
            assert await self.reader.readexactly(5) == b"0\r\n\r\n"
            return str(message["reason"])

        return await asyncio.wait_for(ended(), within)

    async def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        return await self.reader.read()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def closed_for_shutdown(stream: RawSse | WsStream) -> None:
    """The stream ends as a server shutdown ends it: SSE with the last chunk; WebSocket with 1001."""
    if isinstance(stream, RawSse):
        rest = await stream.rest()
        assert rest.endswith(b"0\r\n\r\n"), rest  # the chunked coding's last chunk: a clean end
        assert b"session_ended" not in rest
    else:
        closing = await stream.websocket.receive()
        assert closing.type is aiohttp.WSMsgType.CLOSE, closing
        assert stream.websocket.close_code == server.WS_GOING_AWAY, stream.websocket.exception()


async def stop_while_streaming(served: Served, streams: list[RawSse | WsStream], sig: int) -> None:
    """Send sig; every stream is closed for shutdown and the process exits 0 in time."""
    stopping = asyncio.ensure_future(asyncio.to_thread(served.process.stop, sig, server.SHUTDOWN_TIMEOUT))
    await asyncio.wait_for(asyncio.gather(*(closed_for_shutdown(stream) for stream in streams)), 5)
    assert await stopping == 0
    assert "Traceback" not in served.process.log


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_a_signal_closes_open_streams_cleanly_and_the_server_exits_0(site: Site, sig: int) -> None:
    site.add_user("alice", "wonderland")
    (served,) = site.serve()
    async with Client() as client:
        alice = await client.log_in(served, "alice", "wonderland")
        streams = [
            await client.raw_sse(served, alice),
            await client.ws(served, alice),
            await client.raw_sse(served, alice),
        ]
        await stop_while_streaming(served, streams, sig)


def frozen_websocket(port: int, session_id: str) -> socket.socket:
    """A WebSocket client that completes its handshake, then never reads again (a small
    receive buffer, so that the server's unsent bytes pile up on its side)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET /events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: {session_id}\r\n\r\n"
    )
    sock.sendall(head.encode())
    assert sock.recv(12) == b"HTTP/1.1 101"
    return sock


async def test_a_websocket_client_that_stops_reading_is_disconnected(site: Site) -> None:
    site.add_user("alice", "wonderland")
    (served,) = site.serve(events={"max_buffer": 64 * 1024})
    async with Client() as client:
        alice = await client.log_in(served, "alice", "wonderland")
        frozen = frozen_websocket(served.port, alice)
        try:
            with site.db.cursor() as cur:  # 6 MB: more than the kernel's buffers and max_buffer
                cur.executemany(
                    "INSERT INTO events (username, data) VALUES (NULL, %s)",
                    [(json.dumps("x" * 60_000),)] * 100,
                )
            # The server gives up on it within the WebSocket's close timeout (its Close frame
            # cannot reach a client that reads nothing): its stream is gone.
            deadline = time.monotonic() + server.SHUTDOWN_TIMEOUT / 2 + 3
            while True:
                async with client.http.get(
                    f"{served.base}/user/sessions", headers={"Authorization": alice}
                ) as response:
                    if [entry["streams"] for entry in (await response.json())["sessions"]] == [0]:
                        break
                assert time.monotonic() < deadline, "the stream of a client that reads nothing lives on"
                await asyncio.sleep(0.2)
        finally:
            frozen.close()
    assert served.process.stop(timeout=server.SHUTDOWN_TIMEOUT) == 0


def worker_holding(served: Served, local_port: int) -> int:
    """The pid of the worker whose connection is the client's at local_port."""
    for worker in psutil.Process(served.process.process.pid).children():
        for conn in worker.net_connections("tcp"):
            if conn.raddr and conn.raddr.port == local_port and conn.laddr.port == served.port:
                return int(worker.pid)
    raise AssertionError(f"no worker holds the connection from port {local_port}")


async def streams_on_every_worker(client: Client, served: Served, session_id: str) -> list[RawSse | WsStream]:
    """An SSE and a WebSocket stream on each worker. How the kernel spreads connections over the
    workers is chance (it may give one worker all of them), so each stream opens while the other
    workers are paused (SIGSTOP): only the worker meant can accept its connection."""
    workers = [worker.pid for worker in psutil.Process(served.process.process.pid).children()]
    assert len(workers) == 2
    streams: list[RawSse | WsStream] = []
    for worker in workers:
        others = [other for other in workers if other != worker]
        for other in others:
            os.kill(other, signal.SIGSTOP)
        try:
            for opening in (client.raw_sse(served, session_id), client.ws(served, session_id)):
                stream = await asyncio.wait_for(opening, 10)
                assert worker_holding(served, stream.local_port) == worker
                streams.append(stream)
        finally:
            for other in others:
                os.kill(other, signal.SIGCONT)
    return streams


async def test_a_broadcast_and_a_passwd_reach_the_streams_of_every_worker(site: Site) -> None:
    site.add_user("alice", "wonderland")
    (served,) = site.serve(store="postgres", workers=2)
    async with Client() as client:
        alice = await client.log_in(served, "alice", "wonderland")
        streams = await streams_on_every_worker(client, served, alice)
        event_id = published_id(await site.run("publish", '{"price": 4}'))
        await all_receive(streams, event_id, {"price": 4})
        await site.run("passwd", "alice", stdin="looking-glass\n")
        for stream in streams:
            assert await stream.end() == "revoked"
        assert await client.whoami(served, alice) == 401
    assert served.process.stop(timeout=server.SHUTDOWN_TIMEOUT) == 0


async def test_sigterm_closes_the_streams_of_every_worker_and_exits_0(site: Site) -> None:
    site.add_user("alice", "wonderland")
    (served,) = site.serve(store="postgres", workers=2)
    async with Client() as client:
        alice = await client.log_in(served, "alice", "wonderland")
        streams = await streams_on_every_worker(client, served, alice)
        await stop_while_streaming(served, streams, signal.SIGTERM)


async def test_sighup_replaces_the_workers_closing_their_streams_for_clients_to_reconnect(site: Site) -> None:
    site.add_user("alice", "wonderland")
    (served,) = site.serve(store="postgres", workers=2)
    async with Client() as client:
        alice = await client.log_in(served, "alice", "wonderland")
        streams = await streams_on_every_worker(client, served, alice)
        seen = site.insert_event("before")
        await all_receive(streams, seen, "before")
        old = psutil.Process(served.process.process.pid).children()
        served.process.process.send_signal(signal.SIGHUP)
        await asyncio.wait_for(asyncio.gather(*(closed_for_shutdown(stream) for stream in streams)), 5)
        served.process.wait_until_serving(processes=4)  # two new workers
        _, alive = psutil.wait_procs(old, timeout=server.SHUTDOWN_TIMEOUT)
        assert alive == [], "old workers live on"
        # A client reconnects with its last event id and misses nothing published meanwhile.
        missed = site.insert_event("while reconnecting")
        again = await client.sse(served, alice, last_event_id=seen)
        await all_receive([again], missed, "while reconnecting")
    assert served.process.stop(timeout=server.SHUTDOWN_TIMEOUT) == 0
