"""Replays from memory: each process keeps the events it delivered last (server.RecentEvents), so
a stream resuming with a recent last_event_id is served without a query, and from the `events`
table when it asks for more than memory holds. Either way: every event after N for this user,
once, in order, then live; `replay_truncated` past the retention.

The end-to-end tests prove which path served a replay by making the two disagree: rows deleted
from the table after the process delivered them are still replayed from memory, and a stream that
resumes from below what memory holds gets only what the table still has.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import psycopg2.extensions
from aiohttp import WSMsgType

import server
from conftest import Client, ClientFactory, Clock, add_user, log_in, make_config

PASSWORD = "wonderland"
WAIT = 5.0


USER_IDS = {"alice": 1, "bob": 2}


def encoded(event_id: int, username: str | None = None) -> server.Encoded:
    to = None if username is None else USER_IDS[username]
    return server.Encoded.row(event_id, to, json.dumps({"n": event_id}), time.time())


def held_ids(recent: server.RecentEvents, after: int, username: str = "alice") -> list[int] | None:
    found = recent.since(after, USER_IDS[username], time.time())
    return None if found is None else [event.id for event in found if event.id is not None]


# ---------------------------------------------------------------------------
# RecentEvents on its own
# ---------------------------------------------------------------------------


def test_nothing_is_served_from_memory_before_the_bus_has_connected() -> None:
    recent = server.RecentEvents(retention=3600)
    assert held_ids(recent, 0) is None


def test_events_after_the_given_id_come_in_order_and_only_those() -> None:
    recent = server.RecentEvents(retention=3600)
    recent.start(10)
    for event_id in (11, 12, 15, 16):  # 13 and 14 were rolled back: ids may skip
        recent.add(encoded(event_id), time.time())
    assert held_ids(recent, 10) == [11, 12, 15, 16]
    assert held_ids(recent, 12) == [15, 16]
    assert held_ids(recent, 13) == [15, 16]
    assert held_ids(recent, 16) == []


def test_a_resume_from_before_what_memory_holds_goes_to_the_table() -> None:
    recent = server.RecentEvents(retention=3600)
    recent.start(10)
    recent.add(encoded(11), time.time())
    assert held_ids(recent, 9) is None
    assert held_ids(recent, 10) == [11]


def test_another_users_events_are_not_replayed_but_everyones_are() -> None:
    recent = server.RecentEvents(retention=3600)
    recent.start(0)
    for event_id, username in ((1, None), (2, "bob"), (3, "alice"), (4, None)):
        recent.add(encoded(event_id, username), time.time())
    assert held_ids(recent, 0, "alice") == [1, 3, 4]
    assert held_ids(recent, 0, "bob") == [1, 2, 4]


def test_memory_is_bounded_by_count_and_what_was_dropped_goes_to_the_table() -> None:
    recent = server.RecentEvents(retention=3600, most=3)
    recent.start(0)
    for event_id in range(1, 8):
        recent.add(encoded(event_id), time.time())
    assert len(recent) == 3
    assert recent.floor == 4
    assert held_ids(recent, 4) == [5, 6, 7]
    assert held_ids(recent, 3) is None


def test_memory_is_bounded_by_bytes() -> None:
    size = len(encoded(1).sse) + len(encoded(1).sse_chunk) + len(encoded(1).websocket)
    recent = server.RecentEvents(retention=3600, most_bytes=2 * size + size // 2)
    recent.start(0)
    for event_id in range(1, 6):
        recent.add(encoded(event_id), time.time())
    assert len(recent) == 2
    assert held_ids(recent, 3) == [4, 5]
    assert held_ids(recent, 2) is None


def test_events_past_the_retention_are_never_served_from_memory() -> None:
    recent = server.RecentEvents(retention=60)
    recent.start(0)
    recent.add(encoded(1), time.time() - 120)
    recent.add(encoded(2), time.time())
    assert held_ids(recent, 0) is None  # the table answers: replay_truncated, then what it kept
    assert held_ids(recent, 1) == [2]


# ---------------------------------------------------------------------------
# Through GET /events, on a real server and database
# ---------------------------------------------------------------------------


async def start(
    aiohttp_client: ClientFactory, database_url: str, retention: float = 3600
) -> tuple[Client, server.Bus]:
    config = make_config(database_url, events=server.EventsConfig(retention=retention))
    app = await server.WebServer(config, clock=Clock(time.time())).initializer()
    client = await aiohttp_client(app)
    for name in ("alice", "bob"):
        await add_user(app, name, PASSWORD)
    bus = app[server.event_bus]
    await asyncio.wait_for(bus.connected.wait(), WAIT)
    return client, bus


async def publish(client: Client, bus: server.Bus, count: int, username: str | None = None) -> list[int]:
    """Publish `count` events; return their ids once this process has delivered them."""
    engine = client.app[server.db_engine]
    ids = [await server.publish(engine, {"n": number}, username) for number in range(count)]
    deadline = time.monotonic() + WAIT
    while (bus.last_id or 0) < ids[-1]:
        assert time.monotonic() < deadline, "the bus did not deliver the events"
        await asyncio.sleep(0.01)
    return ids


async def received(client: Client, session_id: str, after: int, count: int) -> list[dict[str, Any]]:
    """Open a WebSocket resuming after `after`; the first `count` messages it gets."""
    messages = []
    async with client.ws_connect(
        f"/events?last_event_id={after}", headers={"Authorization": session_id}
    ) as ws:
        while len(messages) < count:
            message = await ws.receive(timeout=WAIT)
            assert message.type is WSMsgType.TEXT, message
            messages.append(json.loads(message.data))
    return messages


def delete_rows(database_url: str) -> None:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute("DELETE FROM events")
    conn.close()


async def test_a_recent_resume_is_served_from_memory_in_order_once_then_live(
    aiohttp_client: ClientFactory, database_url: str, db: psycopg2.extensions.connection
) -> None:
    client, bus = await start(aiohttp_client, database_url)
    alice = await log_in(client, "alice", PASSWORD)
    ids = await publish(client, bus, 5)
    delete_rows(database_url)  # the table no longer has them: only memory can replay them
    async with client.ws_connect(f"/events?last_event_id={ids[1]}", headers={"Authorization": alice}) as ws:
        replayed = [json.loads((await ws.receive(timeout=WAIT)).data) for _ in range(3)]
        assert [event["id"] for event in replayed] == ids[2:]
        assert [event["data"] for event in replayed] == [{"n": 2}, {"n": 3}, {"n": 4}]
        live = await publish(client, bus, 3)
        after = [json.loads((await ws.receive(timeout=WAIT)).data)["id"] for _ in range(3)]
        assert after == live  # no gap between the replay and live events, and no repeat


async def test_a_resume_from_memory_leaves_out_another_users_events(
    aiohttp_client: ClientFactory, database_url: str, db: psycopg2.extensions.connection
) -> None:
    client, bus = await start(aiohttp_client, database_url)
    alice = await log_in(client, "alice", PASSWORD)
    first = await publish(client, bus, 1)
    for_bob = await publish(client, bus, 2, "bob")
    for_alice = await publish(client, bus, 1, "alice")
    everyone = await publish(client, bus, 1)
    delete_rows(database_url)
    events = await received(client, alice, first[0] - 1, 3)
    assert [event["id"] for event in events] == [first[0], for_alice[0], everyone[0]]
    assert not set(for_bob) & {event["id"] for event in events}


async def test_a_resume_older_than_memory_holds_is_read_from_the_table(
    aiohttp_client: ClientFactory, database_url: str, db: psycopg2.extensions.connection
) -> None:
    client, bus = await start(aiohttp_client, database_url)
    bus.recent = server.RecentEvents(retention=3600, most=2)
    bus.recent.start(bus.last_id or 0)
    alice = await log_in(client, "alice", PASSWORD)
    ids = await publish(client, bus, 5)
    with db.cursor() as cur:  # the table now disagrees with memory about one of the held events
        cur.execute("UPDATE events SET data = '\"from the table\"' WHERE id = %s", (ids[4],))
    events = await received(client, alice, ids[0], 4)
    assert [event["id"] for event in events] == ids[1:]
    assert events[-1]["data"] == "from the table"


async def test_events_past_the_retention_replay_as_truncated_from_the_table(
    aiohttp_client: ClientFactory, database_url: str, db: psycopg2.extensions.connection
) -> None:
    client, bus = await start(aiohttp_client, database_url, retention=1)
    alice = await log_in(client, "alice", PASSWORD)
    old = await publish(client, bus, 2)
    await asyncio.sleep(1.1)
    with db.cursor() as cur:  # what the retention sweep does, without waiting for its interval
        cur.execute(server.SWEEP_EVENTS, {"retention": 1})
    new = await publish(client, bus, 1)
    events = await received(client, alice, old[0], 2)
    assert events[0] == {"type": "replay_truncated"}
    assert events[1]["id"] == new[0]


async def test_events_published_back_to_back_are_delivered_without_waiting_for_another(
    aiohttp_client: ClientFactory, database_url: str, db: psycopg2.extensions.connection
) -> None:
    # A notification that arrives with the answer to the bus's own query sits in libpq's buffer,
    # not on the socket: unless the bus looks there, it is seen only when the next one comes.
    client, bus = await start(aiohttp_client, database_url)
    engine = client.app[server.db_engine]
    for _ in range(20):
        ids = [await server.publish(engine, {"n": number}) for number in range(2)]
        deadline = time.monotonic() + 2.0
        while (bus.last_id or 0) < ids[-1]:
            assert time.monotonic() < deadline, f"event {ids[-1]} waits for another to be delivered"
            await asyncio.sleep(0.005)
