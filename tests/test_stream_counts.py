"""GET /user/sessions counts a session's open event streams in every server process: two real
servers on one database and a shared store, a stream held by one, the list answered by the other;
a process killed with SIGKILL stops counting at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from conftest import Start, start_servers


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def log_in(http: aiohttp.ClientSession, base: str) -> str:
    async with http.post(f"{base}/user", json={"username": "alice", "password": "wonderland"}) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["session_id"])


async def stream_counts(http: aiohttp.ClientSession, base: str, session_id: str) -> list[object]:
    """`streams` of each of the caller's sessions, oldest first."""
    async with http.get(f"{base}/user/sessions", headers={"Authorization": session_id}) as response:
        assert response.status == 200, await response.text()
        return [session["streams"] for session in (await response.json())["sessions"]]


async def soon(check: Callable[[], Awaitable[object]], expected: object, within: float = 3.0) -> float:
    """Wait until check() answers `expected`; fail after `within` seconds. Returns the wait."""
    start = time.monotonic()
    while (found := await check()) != expected:
        assert time.monotonic() - start < within, f"still {found!r}, not {expected!r}, after {within} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def open_sse(http: aiohttp.ClientSession, base: str, session_id: str) -> aiohttp.ClientResponse:
    response = await http.get(f"{base}/events", headers={"Authorization": session_id})
    assert response.status == 200, await response.text()
    return response


async def test_a_stream_held_by_one_process_counts_in_the_list_another_answers(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    (_, first), (_, second) = start_servers(tmp_path, database_url, shared_store, start_server)
    laptop = await log_in(http, first)
    phone = await log_in(http, second)
    assert await stream_counts(http, first, laptop) == [0, 0]
    sse = await open_sse(http, second, phone)
    websocket = await http.ws_connect(f"{second}/events", headers={"Authorization": phone})
    await soon(lambda: stream_counts(http, first, laptop), [0, 2])
    assert await stream_counts(http, second, laptop) == [0, 2]  # the holder's own answer, at once
    await websocket.close()
    await soon(lambda: stream_counts(http, first, laptop), [0, 1])
    sse.close()
    await soon(lambda: stream_counts(http, first, laptop), [0, 0])
    # The first process's own streams count there, and in the second process too.
    own = await open_sse(http, first, laptop)
    assert await stream_counts(http, first, phone) == [1, 0]
    await soon(lambda: stream_counts(http, second, phone), [1, 0])
    own.close()


async def test_the_streams_of_a_killed_process_stop_counting_at_once(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    (_, first), (holder, second) = start_servers(tmp_path, database_url, shared_store, start_server)
    session_id = await log_in(http, first)
    sse = await open_sse(http, second, session_id)
    await soon(lambda: stream_counts(http, first, session_id), [1])
    holder.process.kill()  # SIGKILL: nothing of it runs to clean up
    holder.process.wait()
    # Its listening connection closes with it, and PostgreSQL sees that at once.
    assert await soon(lambda: stream_counts(http, first, session_id), [0], within=2.0) < 2.0
    sse.close()
