"""The stream registry under any sequence of steps (a Hypothesis state machine): streams open and
close, sessions end (a logout, or an account's passwd and deluser), events go to everyone or to one
user, replays finish, clients go away, handlers finish, in any order. Against a model:

- no stream outlives its session: a stream whose session ended has ended, with the right reason;
- every live stream an event is for gets it exactly once, in publishing order (a resumed stream
  gets the replayed events first, then those that arrived meanwhile: no gap, no duplicate);
- an ended stream gets nothing more (only its handler's `session_ended`);
- the registry's counts (per user, per session) are those of the streams still registered.

Each stream writes to a real asyncio transport over a socketpair; the other end is read and its
bytes parsed as the client would (WebSocket frames, Server-Sent Events, plain or chunked).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import socket
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import server

USERNAMES = st.sampled_from(["alice", "bob"])
TEXTS = st.text(st.characters(exclude_characters="\x00"), max_size=5)  # PostgreSQL's jsonb holds no U+0000
KINDS = st.sampled_from(["websocket", "sse", "sse-chunked"])
FAR_FUTURE = 4_000_000_000.0
NEVER_EXPIRES = server.SessionConfig(idle_timeout=FAR_FUTURE, absolute_timeout=FAR_FUTURE)


class ServerEnd(asyncio.Protocol):
    """The server's side of a connection: what aiohttp's protocol would be, minus HTTP."""

    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


class ClientEnd(asyncio.Protocol):
    """The client's side: keeps every byte that arrives."""

    def __init__(self) -> None:
        self.received = bytearray()

    def data_received(self, data: bytes) -> None:
        self.received += data


def websocket_messages(data: bytes) -> list[Any]:
    """The JSON of each complete server frame (final text frames, unmasked, as RFC 6455 says)."""
    messages, at = [], 0
    while at + 2 <= len(data):
        assert data[at] == 0x81, f"not a final text frame: {data[at : at + 2]!r}"
        size, at = data[at + 1], at + 2
        assert size & 0x80 == 0, "a server's frame is never masked"
        width = {126: 2, 127: 8}.get(size, 0)
        if at + width > len(data):
            break
        if width:
            size, at = int.from_bytes(data[at : at + width], "big"), at + width
        if at + size > len(data):
            break
        messages.append(json.loads(data[at : at + size]))
        at += size
    return messages


def dechunk(data: bytes) -> bytes:
    """The body carried by complete HTTP/1.1 chunks."""
    body, at = b"", 0
    while (end := data.find(b"\r\n", at)) != -1:
        size = int(data[at:end], 16)
        if end + 2 + size + 2 > len(data):
            break
        assert data[end + 2 + size : end + 4 + size] == b"\r\n"
        body += data[end + 2 : end + 2 + size]
        at = end + 4 + size
    return body


def sse_messages(data: bytes) -> list[Any]:
    """The JSON of each complete Server-Sent Event; its `event:` and `id:` lines must agree with it."""
    messages = []
    *blocks, _ = data.split(b"\n\n")
    for block in blocks:
        fields = dict(line.split(b": ", 1) for line in block.split(b"\n"))
        message = json.loads(fields[b"data"])
        assert fields[b"event"].decode() == message["type"]
        assert fields.get(b"id") == (str(message["id"]).encode() if message["type"] == "message" else None)
        messages.append(message)
    return messages


def item(message: Any) -> tuple[Any, ...]:
    """What the model compares: (message, id, data) or (session_ended, reason)."""
    if message["type"] == "message":
        return ("message", message["id"], message["data"])
    return (message["type"], message.get("reason"))


@dataclasses.dataclass(eq=False)
class ModelSession:
    session_id: str
    session: server.Session
    ended: server.Ended | None = None


@dataclasses.dataclass(eq=False)
class ModelStream:
    stream: server.Stream
    session: ModelSession
    kind: str
    client: ClientEnd
    client_transport: asyncio.Transport
    server_end: ServerEnd
    expected: list[tuple[Any, ...]]
    replay_from: int | None  # resumed with last_event_id: replaying until finish_replay
    newest_at_open: int  # the newest event published when the stream opened (the bus's last id)
    backlog: list[tuple[Any, ...]] = dataclasses.field(default_factory=list)
    ended: server.Ended | None = None
    registered: bool = True
    client_gone: bool = False

    def received(self) -> list[tuple[Any, ...]]:
        data = bytes(self.client.received)
        if self.kind == "websocket":
            return [item(message) for message in websocket_messages(data)]
        return [
            item(message) for message in sse_messages(dechunk(data) if self.kind == "sse-chunked" else data)
        ]


class StreamRegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.registry = server.StreamRegistry()
        self.user_ids = itertools.count(1)
        self.accounts: dict[str, server.Account] = {}  # the users that exist now
        self.all_sessions: list[ModelSession] = []
        self.all_streams: list[ModelStream] = []
        self.events: list[tuple[int, int | None, Any]] = []  # published: id, for whom, data

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def teardown(self) -> None:
        async def close_all() -> None:
            for model in self.all_streams:
                model.client_transport.close()
                model.stream.transport.close()
            await asyncio.gather(*(model.server_end.lost for model in self.all_streams))
            await asyncio.sleep(0)

        self.run(close_all())
        self.loop.close()

    # -- the model's rules ------------------------------------------------------------------

    def end_stream(self, model: ModelStream, why: server.Ended) -> None:
        if model.ended is None:
            model.ended = why

    def deliver(self, model: ModelStream, event: tuple[Any, ...]) -> None:
        """An event reaches a registered stream: written, or held while the stream replays."""
        if model.ended is not None:
            return
        if model.replay_from is not None:
            model.backlog.append(event)
        elif model.client_gone:
            self.end_stream(model, server.Ended.GONE)  # the write finds the transport closing
        else:
            model.expected.append(event)

    # -- steps ---------------------------------------------------------------------------------

    @initialize(kinds=st.lists(KINDS, min_size=1, max_size=3))
    def open_a_few_streams(self, kinds: list[str]) -> None:
        """Start with streams of both users, one of them resuming."""
        for name in ("alice", "bob"):
            for kind in kinds:
                self.start_stream(self.new_session(name), kind, None)
        self.start_stream(self.new_session("alice"), kinds[0], 0)

    def pick(self, data: st.DataObject, which: Any) -> ModelStream:
        return data.draw(st.sampled_from([model for model in self.all_streams if which(model)]))

    @rule(username=USERNAMES)
    def log_in(self, username: str) -> None:
        self.new_session(username)

    def new_session(self, username: str) -> ModelSession:
        if username not in self.accounts:
            self.accounts[username] = server.Account(next(self.user_ids), username)
        account = self.accounts[username]
        session = server.Device("192.0.2.1", "test").begin(account, NEVER_EXPIRES, 0.0)
        model = ModelSession(server.new_session_id(), session)
        self.all_sessions.append(model)
        return model

    @rule(data=st.data(), kind=KINDS, resume=st.none() | st.integers(0, 30))
    def open_stream(self, data: st.DataObject, kind: str, resume: int | None) -> None:
        """A stream of a live session (the handler checked it), fresh or resuming after an id."""
        live = [session for session in self.all_sessions if session.ended is None]
        session = data.draw(st.sampled_from(live)) if live else self.new_session("alice")
        self.start_stream(session, kind, None if resume is None else min(resume, len(self.events)))

    def start_stream(self, session: ModelSession, kind: str, resume: int | None) -> ModelStream:
        """resume: the client's last event id (one it was sent), None for a fresh stream."""

        async def connect() -> ModelStream:
            loop = asyncio.get_running_loop()
            ours, theirs = socket.socketpair()
            transport, server_end = await loop.connect_accepted_socket(ServerEnd, ours)
            client_transport, client = await loop.connect_accepted_socket(ClientEnd, theirs)
            stream = server.Stream(
                session.session_id,
                session.session,
                transport,
                websocket=kind == "websocket",
                chunked=kind == "sse-chunked",
                max_buffer=1024 * 1024,
                last_id=resume or 0,
            )
            self.registry.add(stream)
            if resume is None:
                stream.go_live()
            return ModelStream(
                stream, session, kind, client, client_transport, server_end, [], resume, len(self.events)
            )

        model = self.run(connect())
        self.all_streams.append(model)
        return model

    @precondition(lambda self: any(model.replay_from is not None for model in self.all_streams))
    @rule(data=st.data(), newer=st.sampled_from([0, 1, 3]))
    def finish_replay(self, data: st.DataObject, newer: int) -> None:
        """The replay of a resumed stream ends: it read the table after the client's id up to the
        newest event the process had when the stream opened, or, racing with the bus, a few newer
        ones that are also held back (they must not go out twice)."""
        stream = self.pick(data, lambda model: model.replay_from is not None)
        assert stream.replay_from is not None
        after, through = stream.replay_from, min(stream.newest_at_open + newer, len(self.events))
        user_id = stream.stream.account.user_id
        replayed = [
            (event_id, to, data)
            for event_id, to, data in self.events[after:through]
            if to is None or to == user_id
        ]

        async def replay() -> None:
            for event_id, to, data in replayed:
                stream.stream.write(server.Encoded.row(event_id, to, server.event_data_text(data), 1.0))
            stream.stream.go_live()

        self.run(replay())
        backlog, stream.backlog, stream.replay_from = stream.backlog, [], None
        for event_id, _, data in replayed:
            self.deliver(stream, ("message", event_id, data))
        for event in backlog:
            if event[1] > through:
                self.deliver(stream, event)

    @rule(to=st.none() | USERNAMES, data=st.integers() | TEXTS | st.lists(st.booleans()))
    def publish(self, to: str | None, data: Any) -> None:
        """To everyone, or to the account that has the name now (none: user id 0, nobody)."""
        event_id = len(self.events) + 1
        target = None if to is None else self.accounts[to].user_id if to in self.accounts else 0
        self.events.append((event_id, target, data))

        async def fan_out() -> None:
            self.registry.fan_out(server.Encoded.row(event_id, target, server.event_data_text(data), 1.0))

        self.run(fan_out())
        for model in self.all_streams:
            if model.registered and (target is None or target == model.stream.account.user_id):
                self.deliver(model, ("message", event_id, data))

    @rule(data=st.data())
    def log_out(self, data: st.DataObject) -> None:
        """DELETE /user, or DELETE /user/sessions/{id} from another device, in any process (of a
        session that may have ended already)."""
        session = data.draw(st.sampled_from(self.all_sessions))
        self.registry.end_session(server.token_hash(session.session_id), server.Ended.LOGOUT)
        self.end_session(session, server.Ended.LOGOUT)

    @rule(username=USERNAMES, how=st.sampled_from(["passwd", "deluser", "late"]), epoch=st.integers(0, 2))
    def revoke_account(self, username: str, how: str, epoch: int) -> None:
        """passwd: the account's epoch goes up, its sessions begun below it end; deluser: all of
        them end. Late: a passwd's notification arriving after later ones (a bus catching up) ends
        the sessions begun below its epoch, gone already, and none begun since."""
        if username not in self.accounts:
            return
        account = self.accounts[username]
        below = {"passwd": account.epoch + 1, "deluser": None, "late": min(epoch, account.epoch)}[how]
        self.registry.end_user(account.user_id, below, server.Ended.REVOKED)
        if how == "deluser":
            del self.accounts[username]  # a new user of that name will be another account
        elif how == "passwd":
            self.accounts[username] = dataclasses.replace(account, epoch=account.epoch + 1)
        for session in self.all_sessions:
            mine = session.session.user_id == account.user_id
            if mine and (below is None or session.session.epoch < below):
                assert how != "late" or session.ended is not None
                self.end_session(session, server.Ended.REVOKED)

    def end_session(self, session: ModelSession, why: server.Ended) -> None:
        if session.ended is None:
            session.ended = why
        for model in self.all_streams:
            if model.session is session:
                self.end_stream(model, why)

    @precondition(lambda self: any(not model.client_gone for model in self.all_streams))
    @rule(data=st.data())
    def client_goes_away(self, data: st.DataObject) -> None:
        """The client closes its connection (after reading all it was sent)."""
        stream = self.pick(data, lambda model: not model.client_gone)
        self.check_received(stream)
        stream.client_gone = True
        stream.client_transport.close()
        self.run(asyncio.wait_for(stream.server_end.lost, 5))
        assert stream.stream.transport.is_closing()

    @precondition(lambda self: any(model.client_gone and model.registered for model in self.all_streams))
    @rule(data=st.data())
    def handler_notices_the_client_left(self, data: st.DataObject) -> None:
        """The WebSocket's receive loop ends, or the SSE watcher sees the transport closing."""
        stream = self.pick(data, lambda model: model.client_gone and model.registered)
        stream.stream.end(server.Ended.GONE)
        self.end_stream(stream, server.Ended.GONE)

    @precondition(lambda self: any(model.registered and model.ended for model in self.all_streams))
    @rule(data=st.data())
    def handler_finishes(self, data: st.DataObject) -> None:
        """An ended stream's handler: says `session_ended` with the reason, then leaves the registry."""
        stream = self.pick(data, lambda model: model.registered and model.ended is not None)
        why = stream.stream.ended.result()
        if why.tells_client and not stream.stream.transport.is_closing():
            notice = server.SESSION_ENDED[why]
            transport = stream.stream.transport
            transport.write(notice.websocket if stream.kind == "websocket" else notice.sse_chunk if
                            stream.kind == "sse-chunked" else notice.sse)  # fmt: skip
            stream.expected.append(("session_ended", why.value))
        self.registry.discard(stream.stream)
        stream.registered = False

    # -- invariants ----------------------------------------------------------------------------

    def check_received(self, *models: ModelStream) -> None:
        """What each client read is exactly what the model expects, once the bytes in flight land."""
        reading = [model for model in models if not model.client_gone]

        async def settle() -> None:
            for _ in range(200):
                if all(len(model.received()) >= len(model.expected) for model in reading):
                    break
                await asyncio.sleep(0.001)
            await asyncio.sleep(0)  # anything more that was sent arrives too

        self.run(settle())
        for model in reading:
            assert model.received() == model.expected

    @invariant()
    def no_stream_outlives_its_session(self) -> None:
        for model in self.all_streams:
            if model.session.ended is not None:
                assert model.stream.ended.done()
            assert model.stream.ended.done() == (model.ended is not None)
            if model.ended is not None:
                assert model.stream.ended.result() is model.ended

    @invariant()
    def every_client_got_exactly_its_events_in_order(self) -> None:
        self.check_received(*self.all_streams)

    @invariant()
    def the_registry_counts_the_streams_still_registered(self) -> None:
        registered = [model for model in self.all_streams if model.registered]
        assert len(self.registry) == len(registered)
        assert set(self.registry) == {model.stream for model in registered}
        # Its indexes hold the registered streams and nothing more (no stale key, no empty group).
        for index in (self.registry._by_session, self.registry._by_user):
            assert all(index.values())
            assert {stream for group in index.values() for stream in group} == set(self.registry)
        for session in self.all_sessions:
            user_id, public_id = session.session.user_id, session.session.public_id
            assert self.registry.count(user_id) == sum(
                m.stream.account.user_id == user_id for m in registered
            )
            assert self.registry.streams_of(public_id, user_id) == sum(
                m.session is session for m in registered
            )


def test_streams_follow_their_sessions_and_get_each_event_once_in_order() -> None:
    run_state_machine_as_test(
        StreamRegistryMachine,
        settings=settings(max_examples=100, stateful_step_count=40, derandomize=True, deadline=None),
    )


def test_the_parsers_read_what_the_server_encodes() -> None:
    """The machine's parsers, checked on encodings of known bytes (a parser that saw nothing
    would make the machine pass vacuously)."""
    event = server.Encoded.row(7, None, json.dumps("x" * 200), 1.0)
    ended = server.SESSION_ENDED[server.Ended.LOGOUT]
    assert [item(m) for m in websocket_messages(event.websocket + ended.websocket)] == [
        ("message", 7, "x" * 200),
        ("session_ended", "logout"),
    ]
    assert [item(m) for m in sse_messages(dechunk(event.sse_chunk + ended.sse_chunk))] == [
        ("message", 7, "x" * 200),
        ("session_ended", "logout"),
    ]
    assert [item(m) for m in sse_messages(event.sse + ended.sse[:-1])] == [("message", 7, "x" * 200)]
    assert dechunk(event.sse_chunk) == event.sse
