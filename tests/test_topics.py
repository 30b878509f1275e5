"""Topics over real HTTP, SSE and WebSocket: who may subscribe and publish (the first matching rule
of events.topics, and `topic_members`), topic events in the one id sequence (one last_event_id
resumes every subscription), POST /events, the WebSocket's subscribe and unsubscribe messages,
memberships that end, presence; across real server processes where the contract says so."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from test_events import OPEN, Client, EventClient, Start, event_ids, open_stream
from test_live_processes import Client as LiveClient
from test_live_processes import Site, SseStream, WsStream

import server
from conftest import ClientFactory, Clock, add_user, log_in, make_config, run_command

RULES = [
    {"pattern": "lobby", "subscribe": "anyone", "publish": "anyone", "presence": True},
    {"pattern": "room:secret", "subscribe": "members", "publish": "nobody"},  # before room:*: it wins
    {"pattern": "room:*", "subscribe": "members", "publish": "publishers", "presence": True},
    {"pattern": "news", "subscribe": "anyone", "publish": "nobody"},
    {"pattern": "club", "subscribe": "anyone", "publish": "members"},
    {"pattern": "open:*", "subscribe": "anyone", "publish": "anyone"},
]
BAD_TOPICS = ["", " lobby", "-lobby", "lob by", "a/b", "caf\u00e9", "x" * 201, "lobby\n"]
FORBIDDEN = {"error": "forbidden_topic"}


@pytest.fixture
def start(aiohttp_client: ClientFactory, database_url: str, db: object, clock: Clock) -> Start:
    """A server in this process, on a real port, with users alice and bob (as test_events')."""

    async def start(**events: Any) -> Client:
        config = make_config(database_url, events=server.EventsConfig(**events))
        client = await aiohttp_client(await server.WebServer(config, clock=clock).initializer())
        await add_user(client.app, "alice", "wonderland")
        await add_user(client.app, "bob", "builder123")
        return client

    return start


@pytest.fixture(autouse=True)
async def close_streams() -> AsyncIterator[None]:
    yield
    while OPEN:
        await OPEN.pop().close()


@pytest.fixture
def site(tmp_path: Path, database_url: str, db: Any, start_server: Start) -> Site:
    return Site(tmp_path, database_url, db, start_server)


@pytest.fixture(params=["sse", "websocket"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def client(start: Start) -> Client:
    quiet = [{**rule, "presence": False} for rule in RULES]  # presence has tests of its own, below
    return await start(topics=server.topic_rules(quiet), max_topics_per_stream=5, publish_rate=3)


def add_member(client: Client, db: Any, name: str, topic: str, publisher: bool = False) -> None:
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO topic_members (topic, user_id, publisher)"
            " SELECT %s, id, %s FROM users WHERE username = %s",
            (topic, publisher, name),
        )


async def topic_event(client: Client, topic: str, data: Any) -> int:
    return await server.publish(client.app[server.db_engine], data, topic=topic)


async def subscribed(
    client: Client, transport: str, session_id: str, *topics: str, **params: str
) -> EventClient:
    query = [("topic", topic) for topic in topics] + list(params.items())
    return await open_stream(client, transport, session_id, params=query)  # type: ignore[arg-type]


async def error_of(response: Any) -> dict[str, Any]:
    body = await response.json()
    return {"error": body["error"]}


async def post(client: Client, session_id: str, body: Any, raw: bytes | None = None) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    return await client.post("/events", data=data, headers={"Authorization": session_id})


# ---------------------------------------------------------------------------
# Subscribing: SSE and the WebSocket's query
# ---------------------------------------------------------------------------


async def test_a_stream_gets_everyones_its_users_and_its_topics_events_and_nothing_else(
    client: Client, transport: str
) -> None:
    alice = await log_in(client, "alice", "wonderland")
    stream = await subscribed(client, transport, alice, "lobby", "news")
    ids = [
        await topic_event(client, "lobby", 1),
        await topic_event(client, "club", "not subscribed"),
        await server.publish(client.app[server.db_engine], 2),
        await server.publish(client.app[server.db_engine], "bob's", "bob"),
        await topic_event(client, "news", 3),
        await server.publish(client.app[server.db_engine], 4, "alice"),
    ]
    received = [await stream.next() for _ in range(4)]
    assert event_ids(received) == [ids[0], ids[2], ids[4], ids[5]]
    assert [event.get("topic") for event in received] == ["lobby", None, "news", None]
    await stream.nothing_within(0.2)


async def test_a_stream_without_topics_gets_no_topic_events(client: Client, transport: str) -> None:
    stream = await open_stream(client, transport, await log_in(client, "alice", "wonderland"))
    await topic_event(client, "lobby", "only for subscribers")
    everyone = await server.publish(client.app[server.db_engine], "everyone")
    assert (await stream.next())["id"] == everyone


async def test_a_topic_event_has_the_contracts_shape(client: Client, transport: str) -> None:
    stream = await subscribed(client, transport, await log_in(client, "alice", "wonderland"), "lobby")
    event_id = await topic_event(client, "lobby", {"text": "hi"})
    event = await stream.next()
    assert set(event) == {"id", "type", "topic", "data", "created_at"}
    assert (event["id"], event["type"], event["topic"], event["data"]) == (
        event_id,
        "message",
        "lobby",
        {"text": "hi"},
    )
    if transport == "sse":
        assert stream.blocks[-1][:2] == [f"id: {event_id}", "event: message"]


@pytest.mark.parametrize("transport", ["sse", "websocket"])
@pytest.mark.parametrize(
    "topic", ["nowhere", "room:7", "room:secret"], ids=["no-rule", "members", "first-rule"]
)
async def test_a_topic_the_user_may_not_subscribe_to_is_403_and_no_stream_opens(
    client: Client, db: Any, transport: str, topic: str
) -> None:
    add_member(client, db, "alice", "room:other")
    alice = await log_in(client, "alice", "wonderland")
    url = client.make_url("/events").with_query([("topic", "lobby"), ("topic", topic)])
    if transport == "sse":
        response = await client.session.get(url, headers={"Authorization": alice})
    else:  # the same answer before the upgrade
        response = await client.session.get(
            url,
            headers={
                "Authorization": alice,
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
    assert response.status == 403
    assert await error_of(response) == FORBIDDEN
    assert len(client.app[server.streams]) == 0


async def test_a_member_may_subscribe_to_a_members_topic_and_the_first_matching_rule_decides(
    client: Client, db: Any
) -> None:
    add_member(client, db, "alice", "room:7")
    add_member(client, db, "alice", "room:secret")
    alice = await log_in(client, "alice", "wonderland")
    bob = await log_in(client, "bob", "builder123")
    stream = await subscribed(client, "sse", alice, "room:7", "room:secret")
    event_id = await topic_event(client, "room:secret", "members only")
    assert (await stream.next())["id"] == event_id
    response = await client.get("/events", params={"topic": "room:7"}, headers={"Authorization": bob})
    assert (response.status, await error_of(response)) == (403, FORBIDDEN)


@pytest.mark.parametrize("topic", BAD_TOPICS)
async def test_a_malformed_topic_is_400_bad_topic(client: Client, topic: str) -> None:
    alice = await log_in(client, "alice", "wonderland")
    response = await client.get("/events", params={"topic": topic}, headers={"Authorization": alice})
    assert (response.status, await error_of(response)) == (400, {"error": "bad_topic"})


async def test_more_topics_than_max_topics_per_stream_is_400_too_many_topics(client: Client) -> None:
    alice = await log_in(client, "alice", "wonderland")
    params = [("topic", f"t{n}") for n in range(6)]
    response = await client.get("/events", params=params, headers={"Authorization": alice})
    assert (response.status, await error_of(response)) == (400, {"error": "too_many_topics"})


async def test_a_topic_of_200_characters_is_well_formed(client: Client) -> None:
    async with server.connection(client.app[server.db_engine]) as conn:
        await conn.execute("INSERT INTO events (topic, data) VALUES (%s, '1')", ("a" * 200,))


# ---------------------------------------------------------------------------
# The WebSocket's messages
# ---------------------------------------------------------------------------


async def websocket(client: Client, session_id: str, first: dict[str, Any] | None = None) -> EventClient:
    """A WebSocket authenticated by its first message (with `first`'s other keys)."""
    ws = await client.session.ws_connect(client.make_url("/events"))
    await ws.send_str(json.dumps({"session_id": session_id, **(first or {})}))
    return EventClient("websocket", websocket=ws)


async def send(stream: EventClient, message: Any) -> None:
    assert stream.websocket is not None
    await stream.websocket.send_str(message if isinstance(message, str) else json.dumps(message))


async def test_the_first_message_subscribes_and_each_topic_is_answered(client: Client, db: Any) -> None:
    add_member(client, db, "alice", "room:1")
    alice = await log_in(client, "alice", "wonderland")
    topics = ["lobby", "room:1", "room:2", "nowhere", "bad topic", "news", "club", "open:1", "open:2"]
    stream = await websocket(client, alice, {"topics": topics})
    answers = [await stream.next() for _ in topics]
    assert answers == [
        {"type": "subscribed", "topic": "lobby"},
        {"type": "subscribed", "topic": "room:1"},
        {"type": "subscribe_refused", "topic": "room:2", "reason": "forbidden"},
        {"type": "subscribe_refused", "topic": "nowhere", "reason": "forbidden"},
        {"type": "subscribe_refused", "topic": "bad topic", "reason": "bad_topic"},
        {"type": "subscribed", "topic": "news"},
        {"type": "subscribed", "topic": "club"},
        {"type": "subscribed", "topic": "open:1"},
        {"type": "subscribe_refused", "topic": "open:2", "reason": "too_many_topics"},  # 5 at most
    ]
    lobby, room = await topic_event(client, "lobby", 1), await topic_event(client, "room:1", 2)
    await topic_event(client, "room:2", "not for alice")
    assert event_ids([await stream.next(), await stream.next()]) == [lobby, room]
    await stream.nothing_within(0.2)


async def test_subscribe_and_unsubscribe_messages_are_answered_and_take_effect(client: Client) -> None:
    stream = await open_stream(client, "websocket", await log_in(client, "alice", "wonderland"))
    await send(stream, {"type": "subscribe", "topic": "lobby"})
    assert await stream.next() == {"type": "subscribed", "topic": "lobby"}
    first = await topic_event(client, "lobby", "in")
    assert (await stream.next())["id"] == first
    await send(stream, {"type": "unsubscribe", "topic": "lobby"})
    assert await stream.next() == {"type": "unsubscribed", "topic": "lobby", "reason": "requested"}
    await topic_event(client, "lobby", "out")
    everyone = await server.publish(client.app[server.db_engine], "still open")
    assert (await stream.next())["id"] == everyone


async def test_a_subscribe_that_is_not_allowed_is_refused_with_its_reason(client: Client) -> None:
    stream = await open_stream(client, "websocket", await log_in(client, "alice", "wonderland"))
    for topic in ("room:9", "nowhere"):
        await send(stream, {"type": "subscribe", "topic": topic})
        assert await stream.next() == {"type": "subscribe_refused", "topic": topic, "reason": "forbidden"}
    await send(stream, {"type": "subscribe", "topic": "no/such"})
    assert await stream.next() == {"type": "subscribe_refused", "topic": "no/such", "reason": "bad_topic"}
    for n in range(5):
        await send(stream, {"type": "subscribe", "topic": f"t{n}"})
    for n in range(5):
        assert await stream.next() == {"type": "subscribe_refused", "topic": f"t{n}", "reason": "forbidden"}
    for topic in ("lobby", "news", "club"):
        await send(stream, {"type": "subscribe", "topic": topic})
        assert (await stream.next())["type"] == "subscribed"


async def test_a_subscribe_beyond_max_topics_per_stream_is_refused_too_many_topics(start: Start) -> None:
    client = await start(
        topics=server.topic_rules([{"pattern": "*", "subscribe": "anyone"}]), max_topics_per_stream=2
    )
    stream = await subscribed(client, "websocket", await log_in(client, "alice", "wonderland"), "a", "b")
    await send(stream, {"type": "subscribe", "topic": "c"})
    assert await stream.next() == {"type": "subscribe_refused", "topic": "c", "reason": "too_many_topics"}
    await send(stream, {"type": "unsubscribe", "topic": "a"})
    assert (await stream.next())["type"] == "unsubscribed"
    await send(stream, {"type": "subscribe", "topic": "c"})
    assert await stream.next() == {"type": "subscribed", "topic": "c"}


@pytest.mark.parametrize(
    "message",
    [
        "not json",
        "[1, 2]",
        {"type": "publish", "topic": "lobby"},
        {"type": "subscribe"},
        {"type": "subscribe", "topic": 7},
        {"type": "subscribe", "topic": "lobby", "last_event_id": -1},
        {"type": "subscribe", "topic": "lobby", "last_event_id": "3"},
        {"type": "subscribe", "topic": "lobby", "last_event_id": 1.5},
        {"type": "subscribe", "topic": "lobby", "last_event_id": 2.0},
        '{"type": "subscribe", "topic": "lobby", "last_event_id": 1e30}',
        {"type": "subscribe", "topic": "lobby", "last_event_id": True},
        {"type": "subscribe", "topic": "lobby", "last_event_id": 10**18},
        {"type": "subscribe", "topic": "lobby", "last_event_id": 10**30},
        {"type": "unsubscribe", "topic": None},
        {"topic": "lobby"},
    ],
    ids=lambda m: json.dumps(m) if not isinstance(m, str) else m,
)
async def test_any_other_message_is_answered_bad_message_and_the_stream_stays_open(
    client: Client, message: Any
) -> None:
    stream = await open_stream(client, "websocket", await log_in(client, "alice", "wonderland"))
    await send(stream, message)
    assert await stream.next() == {"type": "error", "error": "bad_message"}
    await topic_event(client, "lobby", "not subscribed")
    everyone = await server.publish(client.app[server.db_engine], "still open")
    assert (await stream.next())["id"] == everyone


@pytest.mark.parametrize("beyond", [1000, "max"])
async def test_a_subscribe_with_a_last_event_id_above_every_id_says_replay_truncated_then_goes_live(
    client: Client, beyond: int | str
) -> None:
    alice = await log_in(client, "alice", "wonderland")
    stream = await open_stream(client, "websocket", alice)
    await topic_event(client, "lobby", "before")
    newest = await server.publish(client.app[server.db_engine], "newest")
    assert event_ids([await stream.next()]) == [newest]  # the bus has it: the subscribe is beyond it
    since = 999_999_999_999_999_999 if beyond == "max" else newest + int(beyond)
    await send(stream, {"type": "subscribe", "topic": "lobby", "last_event_id": since})
    assert await stream.next() == {"type": "subscribed", "topic": "lobby"}
    assert await stream.next() == {"type": "replay_truncated"}
    live = [
        await topic_event(client, "lobby", "live"),
        await server.publish(client.app[server.db_engine], "x"),
    ]
    assert event_ids([await stream.next(), await stream.next()]) == live
    await stream.nothing_within(0.2)


@pytest.mark.parametrize(
    "topics",
    ["lobby", {"lobby": True}, 7, [1, None, "lobby"], ["lobby", ["news"]], [{"topic": "news"}, "lobby"]],
    ids=json.dumps,
)
async def test_first_message_topics_not_a_list_of_strings_is_bad_message_and_the_strings_still_subscribe(
    client: Client, topics: Any
) -> None:
    stream = await websocket(client, await log_in(client, "alice", "wonderland"), {"topics": topics})
    assert await stream.next() == {"type": "error", "error": "bad_message"}
    if isinstance(topics, list):
        assert await stream.next() == {"type": "subscribed", "topic": "lobby"}
    lobby = await topic_event(client, "lobby", "hi")
    everyone = await server.publish(client.app[server.db_engine], "still open")
    assert event_ids([await stream.next()]) == ([lobby] if isinstance(topics, list) else [everyone])
    if isinstance(topics, list):
        assert event_ids([await stream.next()]) == [everyone]
    await stream.nothing_within(0.2)


async def test_a_subscribe_with_a_last_event_id_replays_that_topics_events_then_live_in_order(
    client: Client,
) -> None:
    alice = await log_in(client, "alice", "wonderland")
    start_id = await server.publish(client.app[server.db_engine], "before")
    old = [await topic_event(client, "lobby", n) for n in range(3)]
    newest = await topic_event(client, "news", "another topic")
    # Resuming from the newest id: "before" is not delivered live should the bus bring it late.
    stream = await open_stream(client, "websocket", alice, params={"last_event_id": str(newest)})
    await send(stream, {"type": "subscribe", "topic": "lobby", "last_event_id": start_id})
    assert await stream.next() == {"type": "subscribed", "topic": "lobby"}
    live = await topic_event(client, "lobby", "live")
    assert event_ids([await stream.next() for _ in range(4)]) == [*old, live]
    await stream.nothing_within(0.2)


async def test_a_subscribe_on_a_stream_resumed_beyond_the_bus_replays_the_events_the_bus_had_not_brought(
    client: Client, db: Any
) -> None:
    """The stream resumes from ids a publisher's open transaction drew: the bus has not brought them. A
    topic subscribed from before them gets them by replay once they commit, not a gap (live copies of
    ids at or below the stream's last id are dropped)."""
    alice = await log_in(client, "alice", "wonderland")
    start_id = await topic_event(client, "lobby", "before")
    db.autocommit = False
    with db.cursor() as cur:
        for n in range(3):
            cur.execute(
                "INSERT INTO events (topic, data) VALUES ('lobby', %s) RETURNING id", (json.dumps(n),)
            )
        uncommitted = [start_id + 1, start_id + 2, start_id + 3]
        assert cur.fetchone()[0] == uncommitted[-1]
    stream = await open_stream(client, "websocket", alice, params={"last_event_id": str(uncommitted[-1])})
    await send(stream, {"type": "subscribe", "topic": "lobby", "last_event_id": start_id})
    assert await stream.next() == {"type": "subscribed", "topic": "lobby"}
    await stream.nothing_within(0.3)  # the subscribe waits for the bus
    db.commit()
    assert event_ids([await stream.next() for _ in range(3)]) == uncommitted
    live = await topic_event(client, "lobby", "live")
    assert event_ids([await stream.next()]) == [live]
    await stream.nothing_within(0.2)


# ---------------------------------------------------------------------------
# One id sequence: one last_event_id resumes every subscription
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["sse", "websocket"])
async def test_one_last_event_id_resumes_every_subscription_once_in_order_from_memory(
    client: Client, db: Any, transport: str
) -> None:
    add_member(client, db, "alice", "room:1")
    alice = await log_in(client, "alice", "wonderland")
    engine = client.app[server.db_engine]
    stream = await subscribed(client, transport, alice, "lobby", "room:1")
    seen = await topic_event(client, "lobby", "seen")
    assert (await stream.next())["id"] == seen
    await stream.close()
    missed = [
        await topic_event(client, "room:1", 1),
        await topic_event(client, "news", "not subscribed"),
        await server.publish(engine, 2),
        await topic_event(client, "lobby", 3),
        await topic_event(client, "room:2", "not subscribed"),
        await server.publish(engine, "bob's", "bob"),
        await topic_event(client, "room:1", 4),
    ]
    stream = await subscribed(client, transport, alice, "lobby", "room:1", last_event_id=str(seen))
    live = await topic_event(client, "lobby", "live")
    received = event_ids([await stream.next() for _ in range(5)])
    assert received == [missed[0], missed[2], missed[3], missed[6], live]
    await stream.nothing_within(0.2)


async def test_one_last_event_id_resumes_every_subscription_from_the_table(start: Start, db: Any) -> None:
    with db.cursor() as cur:  # published before the server started: not in its memory
        cur.execute("INSERT INTO events (data) VALUES ('0') RETURNING id")
        first = cur.fetchone()[0]
        ids = []
        for topic in ("lobby", "news", "room:1", "lobby"):
            cur.execute("INSERT INTO events (topic, data) VALUES (%s, '1') RETURNING id", (topic,))
            ids.append(cur.fetchone()[0])
    client = await start(topics=server.topic_rules([{**rule, "presence": False} for rule in RULES]))
    assert not client.app[server.event_bus].recent.holds(first)
    stream = await subscribed(
        client, "sse", await log_in(client, "alice", "wonderland"), "lobby", "news", last_event_id=str(first)
    )
    assert event_ids([await stream.next() for _ in range(3)]) == [ids[0], ids[1], ids[3]]
    await stream.nothing_within(0.2)


# ---------------------------------------------------------------------------
# Publishing
# ---------------------------------------------------------------------------


async def test_post_events_publishes_to_a_topic_with_from_set_by_the_server(client: Client) -> None:
    alice = await log_in(client, "alice", "wonderland")
    bob = await log_in(client, "bob", "builder123")
    stream = await subscribed(client, "sse", alice, "lobby")
    response = await post(client, bob, {"topic": "lobby", "data": {"text": "hi"}, "from": "mallory"})
    assert response.status == 200
    event_id = (await response.json())["id"]
    assert await response.json() == {"id": event_id}
    event = await stream.next()
    assert (event["id"], event["topic"], event["data"], event["from"]) == (
        event_id,
        "lobby",
        {"text": "hi"},
        "bob",
    )


@pytest.mark.parametrize(
    ("topic", "member", "publisher", "status"),
    [
        ("lobby", False, False, 200),  # publish: anyone
        ("nowhere", False, False, 403),  # no rule
        ("news", False, False, 403),  # nobody
        ("room:secret", True, True, 403),  # the first matching rule: nobody
        ("club", False, False, 403),  # members
        ("club", True, False, 200),
        ("room:1", False, False, 403),  # publishers
        ("room:1", True, False, 403),
        ("room:1", True, True, 200),
    ],
)
async def test_post_events_follows_the_topics_publish_rule(
    client: Client, db: Any, topic: str, member: bool, publisher: bool, status: int
) -> None:
    if member:
        add_member(client, db, "bob", topic, publisher)
    bob = await log_in(client, "bob", "builder123")
    response = await post(client, bob, {"topic": topic, "data": 1})
    assert response.status == status, await response.text()
    if status == 403:
        assert await error_of(response) == FORBIDDEN


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "bad_json"),
        (b"\xff\xfe", 400, "bad_json"),
        (b'{"data": 1}', 400, "bad_topic"),
        (b'{"topic": "bad topic", "data": 1}', 400, "bad_topic"),
        (b'{"topic": 7, "data": 1}', 400, "bad_topic"),
        (b"[1]", 400, "bad_topic"),
        (b'{"topic": "lobby"}', 422, "invalid_event"),
        (b'{"topic": "lobby", "data": "' + b"x" * 65536 + b'"}', 422, "invalid_event"),
        (b'{"topic": "lobby", "data": "\\u0000"}', 422, "invalid_event"),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "no-topic",
        "bad-topic",
        "topic-not-string",
        "not-object",
        "no-data",
        "data-over-64KiB",
        "nul",
    ],
)
async def test_post_events_bad_bodies_get_clear_4xx(
    client: Client, body: bytes, status: int, error: str
) -> None:
    bob = await log_in(client, "bob", "builder123")
    response = await post(client, bob, None, raw=body)
    assert (response.status, await error_of(response)) == (status, {"error": error})


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ('"\\u0000"', "U+0000, which PostgreSQL cannot store"),
        ('"' + "x" * 65536 + '"', "over 64 KiB as JSON"),
        ('"\\ud800"', "a lone surrogate (U+D800 to U+DFFF)"),
        ("NaN", "NaN and Infinity are not JSON"),
    ],
    ids=["nul", "over-64KiB", "lone-surrogate", "nan"],
)
async def test_post_events_says_what_is_wrong_with_the_data_in_one_sentence(
    client: Client, data: str, says: str
) -> None:
    bob = await log_in(client, "bob", "builder123")
    response = await post(client, bob, None, raw=f'{{"topic": "lobby", "data": {data}}}'.encode())
    body = await response.json()
    assert (response.status, body["error"]) == (422, "invalid_event"), body
    assert body["message"].startswith("The event's data ") and says in body["message"], body
    assert "codec" not in body["message"] and body["message"].endswith("."), body


async def test_post_events_takes_data_of_64_kib(client: Client) -> None:
    bob = await log_in(client, "bob", "builder123")
    response = await post(client, bob, {"topic": "lobby", "data": "x" * (65536 - 2)})
    assert response.status == 200


async def test_post_events_needs_a_session(client: Client) -> None:
    response = await client.post("/events", json={"topic": "lobby", "data": 1})
    assert (response.status, await error_of(response)) == (401, {"error": "invalid_session"})


async def test_post_events_beyond_the_publish_rate_is_429_with_retry_after(client: Client) -> None:
    bob = await log_in(client, "bob", "builder123")
    alice = await log_in(client, "alice", "wonderland")
    statuses = [(await post(client, bob, {"topic": "lobby", "data": n})).status for n in range(3)]
    assert statuses == [200, 200, 200]  # publish_rate 3
    response = await post(client, bob, {"topic": "lobby", "data": "one too many"})
    assert (response.status, await error_of(response)) == (429, {"error": "too_many_publishes"})
    assert int(response.headers["Retry-After"]) >= 1
    assert (await post(client, alice, {"topic": "lobby", "data": "another user"})).status == 200
    await asyncio.sleep(0.4)  # a third of a second gives one more
    assert (await post(client, bob, {"topic": "lobby", "data": "later"})).status == 200


async def test_sql_publishes_to_a_topic_and_refuses_a_malformed_one(client: Client, db: Any) -> None:
    stream = await subscribed(client, "websocket", await log_in(client, "alice", "wonderland"), "lobby")
    with db.cursor() as cur:
        cur.execute("""INSERT INTO events (topic, data) VALUES ('lobby', '{"text": "hi"}') RETURNING id""")
        event_id = cur.fetchone()[0]
    event = await stream.next()
    assert (event["id"], event["topic"], event["data"]) == (event_id, "lobby", {"text": "hi"})
    assert "from" not in event
    for bad in (
        "INSERT INTO events (topic, data) VALUES ('bad topic', '1')",
        "INSERT INTO events (topic, username, data) VALUES ('lobby', 'alice', '1')",
    ):
        with pytest.raises(server.psycopg2.errors.CheckViolation), db.cursor() as cur:
            cur.execute(bad)


async def test_the_python_coroutine_publishes_to_a_topic_and_refuses_a_malformed_one(client: Client) -> None:
    engine = client.app[server.db_engine]
    stream = await subscribed(client, "sse", await log_in(client, "alice", "wonderland"), "lobby")
    event_id = await server.publish(engine, {"n": 1}, topic="lobby")
    assert (await stream.next())["id"] == event_id
    for topic in BAD_TOPICS:
        with pytest.raises(ValueError):
            await server.publish(engine, 1, topic=topic)


# ---------------------------------------------------------------------------
# Commands, and memberships that end (two server processes)
# ---------------------------------------------------------------------------

ROOM_RULES = {"topics": RULES}


def failing(site: Site, *args: str) -> str:
    done = run_command([*args, "--config", str(site.command_config)], "", {"DATABASE_URL": site.database_url})
    assert done.returncode == 1, done
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr


async def test_topic_commands_add_list_and_remove_members(site: Site) -> None:
    site.add_user("alice", "wonderland")
    site.add_user("bob", "builder123")
    assert site.command("topic", "add", "alice", "room:1").strip() == "'alice' is a member of 'room:1'"
    assert "may publish" in site.command("topic", "add", "bob", "room:1", "--publisher")
    assert site.command("topic", "members", "room:1").splitlines() == ["alice", "bob (publisher)"]
    assert (
        site.command("topic", "remove", "bob", "room:1").strip() == "'bob' is no longer a member of 'room:1'"
    )
    assert site.command("topic", "members", "room:1").splitlines() == ["alice"]
    assert "not a member" in failing(site, "topic", "remove", "bob", "room:1")
    assert "no such user" in failing(site, "topic", "add", "carol", "room:1")
    assert "not a topic name" in failing(site, "topic", "add", "alice", "bad topic")
    assert "not a topic name" in failing(site, "publish", "1", "--topic", "bad topic")
    with site.db.cursor() as cur:
        cur.execute("SELECT u.username FROM topic_members m JOIN users u ON u.id = m.user_id")
        assert cur.fetchall() == [("alice",)]


@pytest.mark.parametrize("how", ["command", "sql"])
async def test_a_removed_member_stops_getting_the_topic_in_every_process_within_a_second(
    site: Site, how: str
) -> None:
    servers = site.serve(2, events=ROOM_RULES)
    site.add_user("alice", "wonderland")
    site.add_user("bob", "builder123")
    site.command("topic", "add", "alice", "room:1")
    site.command("topic", "add", "bob", "room:1")
    async with LiveClient() as http:
        streams = []
        for served in servers:
            session_id = await http.log_in(served, "alice", "wonderland")
            for path in ("sse", "ws"):
                response_url = f"{served.base}/events?topic=room:1&topic=lobby"
                if path == "sse":
                    response = await http.http.get(response_url, headers={"Authorization": session_id})
                    assert response.status == 200
                    streams.append(SseStream(response))
                else:
                    streams.append(
                        WsStream(
                            await http.http.ws_connect(response_url, headers={"Authorization": session_id})
                        )
                    )
        bob_session = await http.log_in(servers[1], "bob", "builder123")
        bob = await http.http.get(
            f"{servers[1].base}/events?topic=room:1", headers={"Authorization": bob_session}
        )
        bob_stream = SseStream(bob)
        http.opened += [*streams, bob_stream]
        first = int((await site.run("publish", '"before"', "--topic", "room:1")).split()[-1])
        for stream in [*streams, bob_stream]:
            assert (await not_presence(stream))["id"] == first
        if how == "command":
            await site.run("topic", "remove", "alice", "room:1")
            began = time.monotonic()  # the command has committed and returned
        else:
            began = time.monotonic()
            with site.db.cursor() as cur:
                cur.execute(
                    "DELETE FROM topic_members WHERE topic = 'room:1'"
                    " AND user_id = (SELECT id FROM users WHERE username = 'alice')"
                )
        for stream in streams:
            message = await not_presence(stream, within=1.0)
            assert message == {"type": "unsubscribed", "topic": "room:1", "reason": "membership_ended"}
        assert time.monotonic() - began < 1.5
        after = int((await site.run("publish", '"after"', "--topic", "room:1")).split()[-1])
        lobby = int((await site.run("publish", '"lobby"', "--topic", "lobby")).split()[-1])
        for stream in streams:  # the stream stays open, with its other topics
            assert (await not_presence(stream))["id"] == lobby
        assert (await not_presence(bob_stream))["id"] == after  # bob is still a member
        bob.close()


async def not_presence(stream: SseStream | WsStream, within: float = 5.0) -> dict[str, Any]:
    """The stream's next message that is not a presence event."""
    deadline = time.monotonic() + within
    while (message := await stream.message(within=max(deadline - time.monotonic(), 0.01)))[
        "type"
    ] == "presence":
        pass
    return message


async def test_deleting_a_user_ends_its_memberships(site: Site) -> None:
    site.add_user("alice", "wonderland")
    site.command("topic", "add", "alice", "room:1")
    site.command("deluser", "alice")
    with site.db.cursor() as cur:
        cur.execute("SELECT count(*) FROM topic_members")
        assert cur.fetchone()[0] == 0
    site.add_user("alice", "wonderland")  # a new account of the name is no member
    assert site.command("topic", "members", "room:1").strip() == ""


# ---------------------------------------------------------------------------
# Presence (two server processes; kill -9)
# ---------------------------------------------------------------------------


async def presence_of(http: LiveClient, served: Any, session_id: str, topic: str) -> tuple[int, Any]:
    async with http.http.get(
        f"{served.base}/topics/{topic}/presence", headers={"Authorization": session_id}
    ) as response:
        return response.status, await response.json()


async def until_presence(
    http: LiveClient, served: Any, session_id: str, topic: str, users: list[dict[str, Any]], within: float
) -> None:
    deadline = time.monotonic() + within
    while True:
        status, body = await presence_of(http, served, session_id, topic)
        if status == 200 and body["users"] == users:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"presence not {users} within {within} s: {body}")
        await asyncio.sleep(0.05)


async def next_presence(stream: Any, within: float = 1.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        message = await stream.message(within=max(deadline - time.monotonic(), 0.01))
        if message["type"] == "presence":
            return dict(message)


async def test_presence_lists_users_and_their_streams_in_every_process_and_announces_join_and_leave(
    site: Site,
) -> None:
    servers = site.serve(2, events=ROOM_RULES)
    for name in ("alice", "bob", "carol"):
        site.add_user(name, "wonderland")
    site.command("topic", "add", "carol", "room:1")
    async with LiveClient() as http:
        alice = await http.log_in(servers[0], "alice", "wonderland")
        bob = await http.log_in(servers[1], "bob", "wonderland")
        carol = await http.log_in(servers[0], "carol", "wonderland")
        url0, url1 = f"{servers[0].base}/events?topic=lobby", f"{servers[1].base}/events?topic=lobby"
        watcher = SseStream(await http.http.get(url0, headers={"Authorization": alice}))
        assert await next_presence(watcher) == {
            "type": "presence",
            "topic": "lobby",
            "action": "join",
            "username": "alice",
        }
        began = time.monotonic()
        bob_streams = [SseStream(await http.http.get(url1, headers={"Authorization": bob})) for _ in range(2)]
        assert await next_presence(watcher) == {
            "type": "presence",
            "topic": "lobby",
            "action": "join",
            "username": "bob",
        }
        assert time.monotonic() - began < 1.0
        expected = [{"username": "alice", "streams": 1}, {"username": "bob", "streams": 2}]
        await until_presence(http, servers[0], carol, "lobby", expected, within=1.0)
        await until_presence(http, servers[1], bob, "lobby", expected, within=1.0)
        who = await site.run("who", "lobby")
        assert who.splitlines() == ["alice\t1", "bob\t2"]
        bob_streams[0].response.close()
        await until_presence(
            http, servers[0], alice, "lobby", [expected[0], {"username": "bob", "streams": 1}], 1.5
        )
        began = time.monotonic()
        bob_streams[1].response.close()
        assert await next_presence(watcher) == {
            "type": "presence",
            "topic": "lobby",
            "action": "leave",
            "username": "bob",
        }
        assert time.monotonic() - began < 1.0
        # Not for a topic without presence, nor one the user may not subscribe to; 400 for a malformed one.
        assert (await presence_of(http, servers[0], alice, "news"))[0] == 403
        assert (await presence_of(http, servers[0], alice, "room:1"))[0] == 403
        assert (await presence_of(http, servers[0], carol, "room:1")) == (
            200,
            {"topic": "room:1", "users": []},
        )
        assert (await presence_of(http, servers[0], alice, "nowhere"))[1]["error"] == "forbidden_topic"
        assert (await presence_of(http, servers[0], alice, "bad%20topic"))[1]["error"] == "bad_topic"
        async with http.http.get(f"{servers[0].base}/topics/lobby/presence") as response:
            assert response.status == 401
        watcher.response.close()


async def test_the_users_of_a_killed_process_leave_within_a_heartbeat(site: Site) -> None:
    servers = site.serve(2, events={**ROOM_RULES, "heartbeat": 2})  # SSE streams only: no pings to answer
    site.add_user("alice", "wonderland")
    site.add_user("bob", "wonderland")
    async with LiveClient() as http:
        alice = await http.log_in(servers[0], "alice", "wonderland")
        bob = await http.log_in(servers[1], "bob", "wonderland")
        watcher = SseStream(
            await http.http.get(f"{servers[0].base}/events?topic=lobby", headers={"Authorization": alice})
        )
        doomed = SseStream(
            await http.http.get(f"{servers[1].base}/events?topic=lobby", headers={"Authorization": bob})
        )
        while (await next_presence(watcher))["username"] != "bob":
            pass
        began = time.monotonic()
        servers[1].process.process.send_signal(signal.SIGKILL)
        assert await next_presence(watcher, within=2.0) == {
            "type": "presence",
            "topic": "lobby",
            "action": "leave",
            "username": "bob",
        }
        assert time.monotonic() - began < 2.0
        await until_presence(
            http, servers[0], alice, "lobby", [{"username": "alice", "streams": 1}], within=0.5
        )
        doomed.response.close()
        watcher.response.close()


async def test_who_lists_every_processs_users_with_streams(site: Site) -> None:
    servers = site.serve(2, events=ROOM_RULES)
    site.add_user("alice", "wonderland")
    site.add_user("bob", "wonderland")
    assert site.command("who").strip() == "nobody is online"
    async with LiveClient() as http:
        await http.sse(servers[0], await http.log_in(servers[0], "alice", "wonderland"))
        await http.sse(servers[1], await http.log_in(servers[1], "alice", "wonderland"))
        await http.sse(servers[1], await http.log_in(servers[1], "bob", "wonderland"))
        assert (await site.run("who")).splitlines() == ["alice\t2", "bob\t1"]
        assert (await site.run("who", "lobby")).strip() == "nobody is online on 'lobby'"


async def test_a_user_who_reconnects_at_once_neither_leaves_nor_joins_and_one_who_goes_leaves_within_a_second(
    start: Start,
) -> None:
    client = await start(topics=server.topic_rules(RULES))  # the lobby with presence
    alice = await log_in(client, "alice", "wonderland")
    bob = await log_in(client, "bob", "builder123")
    watcher = await subscribed(client, "sse", alice, "lobby")
    assert (await watcher.next())["username"] == "alice"
    first = await subscribed(client, "websocket", bob, "lobby")
    assert await watcher.next() == {"type": "presence", "topic": "lobby", "action": "join", "username": "bob"}
    await first.close()
    second = await subscribed(client, "websocket", bob, "lobby")  # a reconnect
    await watcher.nothing_within(0.5)
    response = await client.get("/topics/lobby/presence", headers={"Authorization": alice})
    assert (await response.json())["users"] == [
        {"username": "alice", "streams": 1},
        {"username": "bob", "streams": 1},
    ]
    await second.close()
    assert await watcher.next(within=1.0) == {
        "type": "presence",
        "topic": "lobby",
        "action": "leave",
        "username": "bob",
    }
