"""The operator's commands act in every process: `sessions NAME` lists a user's live sessions with
their open streams wherever they are held, `logout NAME [SESSION_ID]` ends them (the password
unchanged) and closes their streams in every process within a second, reason `revoked`. Two real
servers on one database and one shared store; the commands run as real subprocesses."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from conftest import Start, run_command, start_servers

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}
ALICE = {"username": "alice", "password": "wonderland"}


def start_two(
    tmp_path: Path, database_url: str, store: str, start_server: Start, count: int = 2
) -> tuple[list[str], Path]:
    """`count` servers on one database and store, user alice: their URLs, and a config file."""
    started = start_servers(tmp_path, database_url, store, start_server, count)
    return [url for _, url in started], tmp_path / "server-0.json"


def command(database_url: str, config: Path, *args: str) -> tuple[int, str, str]:
    done = run_command([*args, "--config", str(config)], "", {"DATABASE_URL": database_url})
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def log_in(http: aiohttp.ClientSession, base: str, agent: str = "test") -> str:
    async with http.post(f"{base}/user", json=ALICE, headers={"User-Agent": agent}) as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["session_id"])


async def status_of(http: aiohttp.ClientSession, base: str, session_id: str) -> int:
    async with http.get(f"{base}/user", headers={"Authorization": session_id}) as response:
        return response.status


async def session_ended(stream: aiohttp.ClientResponse) -> tuple[dict[str, object], float]:
    """Read an SSE stream up to its session_ended event; that event and when it came."""
    async with asyncio.timeout(5):
        while True:
            line = await stream.content.readline()
            assert line, "the stream closed without session_ended"
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                if event.get("type") == "session_ended":
                    return event, time.monotonic()


async def test_sessions_lists_every_live_session_with_streams_held_by_any_process(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    (one, other), config = start_two(tmp_path, database_url, shared_store, start_server)
    laptop = await log_in(http, one, "Laptop/1.0")
    phone = await log_in(http, other, "Phone/2.0")
    stream = await http.get(f"{other}/events", headers={"Authorization": laptop})
    assert stream.status == 200
    deadline = time.monotonic() + 5
    while True:
        code, out, err = command(database_url, config, "sessions", "alice")
        assert code == 0, err
        listed = [json.loads(line) for line in out.splitlines()]
        if [entry["streams"] for entry in listed] == [1, 0]:
            break
        assert time.monotonic() < deadline, listed
        await asyncio.sleep(0.2)
    assert [entry["user_agent"] for entry in listed] == ["Laptop/1.0", "Phone/2.0"]
    assert set(listed[0]) == {
        "id",
        "created_at",
        "last_seen",
        "expires_at",
        "address",
        "user_agent",
        "streams",
    }
    assert listed[0]["address"] == "127.0.0.1"
    assert laptop not in out and phone not in out  # public ids only
    stream.close()


async def test_logout_ends_every_session_everywhere_within_a_second_and_keeps_the_password(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    (one, other), config = start_two(tmp_path, database_url, shared_store, start_server)
    sessions = [await log_in(http, one), await log_in(http, other)]
    streams = [
        await http.get(f"{base}/events", headers={"Authorization": sessions[0]}) for base in (one, other)
    ]
    streams.append(await http.get(f"{one}/events", headers={"Authorization": sessions[1]}))
    await asyncio.sleep(0.3)
    ending = asyncio.gather(*(session_ended(stream) for stream in streams))
    code, out, err = await asyncio.to_thread(command, database_url, config, "logout", "alice")
    returned = time.monotonic()
    assert (code, err) == (0, ""), err
    assert out.strip() == "ended every session of 'alice' (2 live)"
    for event, when in await ending:
        assert event == {"type": "session_ended", "reason": "revoked"}
        assert when - returned < 1.0
    for base in (one, other):
        for session_id in sessions:
            assert await status_of(http, base, session_id) == 401
    assert await status_of(http, other, await log_in(http, one)) == 200  # the password still works


async def test_logout_of_one_session_by_its_id_closes_its_streams_everywhere_and_only_those(
    tmp_path: Path, database_url: str, shared_store: str, start_server: Start, http: aiohttp.ClientSession
) -> None:
    (one, other), config = start_two(tmp_path, database_url, shared_store, start_server)
    laptop, phone = await log_in(http, one, "Laptop/1.0"), await log_in(http, one, "Phone/2.0")
    for base in (one, other):  # both processes know the laptop's session (the near cache too)
        assert await status_of(http, base, laptop) == 200
    stream = await http.get(f"{other}/events", headers={"Authorization": laptop})
    kept = await http.get(f"{other}/events", headers={"Authorization": phone})
    await asyncio.sleep(0.3)
    _, out, _ = command(database_url, config, "sessions", "alice")
    laptop_id = next(json.loads(line)["id"] for line in out.splitlines() if "Laptop" in line)
    ending = asyncio.ensure_future(session_ended(stream))
    code, out, err = await asyncio.to_thread(command, database_url, config, "logout", "alice", laptop_id)
    returned = time.monotonic()
    assert code == 0, err
    assert out.strip() == f"ended session '{laptop_id}' of 'alice'"
    event, when = await ending
    assert event == {"type": "session_ended", "reason": "revoked"} and when - returned < 1.0
    for base in (one, other):
        assert await status_of(http, base, laptop) == 401
        assert await status_of(http, base, phone) == 200
    assert not kept.content.at_eof()
    kept.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(("logout", "nobody"), "error: no such user 'nobody'", id="logout-unknown-user"),
        pytest.param(("sessions", "nobody"), "error: no such user 'nobody'", id="sessions-unknown-user"),
        pytest.param(
            ("logout", "alice", "NoSuchSession0000000000"),
            "error: 'alice' has no live session 'NoSuchSession0000000000'",
            id="unknown-session-id",
        ),
        pytest.param(
            ("logout", "alice", "not/an id"),
            "error: 'alice' has no live session 'not/an id'",
            id="malformed-id",
        ),
    ],
)
def test_an_unknown_user_or_session_is_one_line_and_exit_1(
    tmp_path: Path, database_url: str, db: object, args: tuple[str, ...], message: str
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"sessions": {"store": "postgres"}, "passwords": FAST}))
    env = {"DATABASE_URL": database_url}
    assert run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env).returncode == 0
    code, out, err = command(database_url, config, *args)
    assert (code, out, err) == (1, "", message + "\n")


async def test_logout_reaches_a_server_that_keeps_sessions_in_memory(
    tmp_path: Path, database_url: str, db: object, start_server: Start, http: aiohttp.ClientSession
) -> None:
    (base,), config = start_two(tmp_path, database_url, "memory", start_server, count=1)
    session_id = await log_in(http, base)
    stream = await http.get(f"{base}/events", headers={"Authorization": session_id})
    await asyncio.sleep(0.3)
    ending = asyncio.ensure_future(session_ended(stream))
    code, out, err = await asyncio.to_thread(command, database_url, config, "logout", "alice")
    assert (code, out.strip()) == (0, "ended every session of 'alice'"), err
    event, _ = await ending
    assert event == {"type": "session_ended", "reason": "revoked"}
    assert await status_of(http, base, session_id) == 401
    assert await status_of(http, base, await log_in(http, base)) == 200
    listing = command(database_url, config, "sessions", "alice")
    assert listing[0] == 1 and "needs a shared session store" in listing[2]
