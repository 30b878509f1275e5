"""The session journal: every session's life in PostgreSQL, in commit order, written with the change
it records; read with `journal [--after ID] [--follow]`, SQL and LISTEN session_journal; nothing
lost to a server killed with SIGKILL."""

from __future__ import annotations

import asyncio
import json
import queue
import select
import signal
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest
import requests

import server
from conftest import (
    PYTHON,
    SERVER,
    Client,
    ClientFactory,
    Clock,
    Start,
    add_user,
    clear_redis,
    free_port,
    log_in,
    redis_or_skip,
    run_command,
    server_config,
)

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}
FIELDS = {"id", "at", "kind", "username", "user_id", "session", "address", "user_agent", "reason"}


def entries(db: psycopg2.extensions.connection, after: int = 0) -> list[dict[str, Any]]:
    with db.cursor() as cur:
        cur.execute(
            "SELECT id, kind, username, session, reason FROM session_journal WHERE id > %s ORDER BY id",
            [after],
        )
        return [dict(zip(("id", "kind", "username", "session", "reason"), row, strict=True)) for row in cur]


def kinds(found: list[dict[str, Any]]) -> list[tuple[str, str | None]]:
    return [(entry["kind"], entry["reason"]) for entry in found]


@pytest.fixture
async def postgres_client(
    aiohttp_client: ClientFactory, database_url: str, db: object, clock: Clock
) -> Client:
    sessions = server.SessionConfig(store="postgres", max_per_user=2, cache_size=0)
    config = server_config(database_url, "postgres")
    app = await server.WebServer(
        server.dataclasses.replace(config, sessions=sessions), clock=clock
    ).initializer()
    client = await aiohttp_client(app)
    await add_user(app, "alice", "wonderland")
    return client


async def public_ids(client: Client, session_id: str) -> list[str]:
    response = await client.get("/user/sessions", headers={"Authorization": session_id})
    return [entry["id"] for entry in (await response.json())["sessions"]]


async def test_each_kind_is_journaled_in_order_with_the_session_it_ended(
    postgres_client: Client, db: psycopg2.extensions.connection, clock: Clock
) -> None:
    client = postgres_client
    first = await log_in(client, "alice", "wonderland")
    [first_public] = await public_ids(client, first)
    second = await log_in(client, "alice", "wonderland")
    third = await log_in(client, "alice", "wonderland")  # max_per_user 2: the first is evicted
    assert (await client.delete("/user", headers={"Authorization": second})).status == 200
    fourth = await log_in(client, "alice", "wonderland")
    listed = await public_ids(client, third)
    assert (
        await client.delete(f"/user/sessions/{listed[1]}", headers={"Authorization": third})
    ).status == 200
    clock.advance(server.SessionConfig().idle_timeout + 1)
    app = client.app
    assert app is not None
    assert await app[server.sessions].sweep() == 1  # the third expired
    found = entries(db)
    assert kinds(found) == [
        ("login", None),
        ("login", None),
        ("evicted", "max_per_user"),  # room made by the login that follows, in its transaction
        ("login", None),
        ("logout", "logout"),
        ("login", None),
        ("logout", "sessions"),
        ("expired", None),
    ]
    assert [entry["id"] for entry in found] == list(range(1, 9))
    assert found[2]["session"] == first_public
    assert {entry["username"] for entry in found} == {"alice"}
    assert fourth  # ended by the user's DELETE /user/sessions/{id}


def test_passwd_deluser_and_the_operators_logout_are_journaled_as_revoked(
    tmp_path: Path, database_url: str, db: psycopg2.extensions.connection, start_server: Start
) -> None:
    config, base = serve(tmp_path, database_url, start_server)
    env = {"DATABASE_URL": database_url}
    for command, stdin in (("logout", ""), ("passwd", "new password\n"), ("deluser", "")):
        password = "wonderland" if command != "deluser" else "new password"
        login = requests.post(f"{base}/user", json={"username": "alice", "password": password}, timeout=5)
        assert login.status_code == 200
        done = run_command([command, "alice", "--config", str(config)], stdin, env)
        assert done.returncode == 0, done.stderr
    assert kinds(entries(db)) == [
        ("login", None),
        ("revoked", "operator"),
        ("login", None),
        ("revoked", "passwd"),
        ("login", None),
        ("revoked", "deluser"),
    ]


def serve(
    tmp_path: Path, database_url: str, start_server: Start, store: str = "postgres"
) -> tuple[Path, str]:
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "webserver": {"host": "127.0.0.1", "port": port},
                "sessions": {"store": store},
                "passwords": FAST,
            }
        )
    )
    env = {"DATABASE_URL": database_url}
    assert run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env).returncode == 0
    start_server(["--config", str(config)], env).wait_until_serving()
    return config, f"http://127.0.0.1:{port}"


def journal(database_url: str, config: Path, *args: str) -> list[dict[str, Any]]:
    done = run_command(["journal", *args, "--config", str(config)], "", {"DATABASE_URL": database_url})
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_the_journal_command_prints_json_lines_after_an_id(
    tmp_path: Path, database_url: str, db: psycopg2.extensions.connection, start_server: Start
) -> None:
    config, base = serve(tmp_path, database_url, start_server)
    agent = {"User-Agent": "Phone/2.0"}
    session_id = requests.post(
        f"{base}/user", json={"username": "alice", "password": "wonderland"}, headers=agent
    ).json()["session_id"]
    assert (
        requests.delete(f"{base}/user", headers={"Authorization": session_id}, timeout=5).status_code == 200
    )
    printed = journal(database_url, config)
    assert [entry["kind"] for entry in printed] == ["login", "logout"]
    login = printed[0]
    assert set(login) == FIELDS
    assert (
        login["username"] == "alice"
        and login["address"] == "127.0.0.1"
        and login["user_agent"] == "Phone/2.0"
    )
    assert login["at"].endswith("Z") and isinstance(login["user_id"], int)
    assert login["session"] == printed[1]["session"] and session_id not in json.dumps(printed)
    assert journal(database_url, config, "--after", str(login["id"])) == printed[1:]
    assert journal(database_url, config, "--after", str(printed[1]["id"])) == []


class Follower:
    """`journal --follow` in a subprocess, its lines read as they come (a thread and a queue)."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen([PYTHON, SERVER, *args], stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)

    def entry(self, timeout: float = 5) -> dict[str, Any]:
        return dict(json.loads(self.lines.get(timeout=timeout)))


@pytest.fixture
def follower() -> Iterator[list[Follower]]:
    started: list[Follower] = []
    yield started
    for follower in started:
        follower.process.kill()
        follower.process.wait()
        follower.reader.join(5)
        assert follower.process.stdout is not None
        follower.process.stdout.close()


def test_follow_prints_each_new_entry_as_it_commits_and_listen_hears_it(
    tmp_path: Path,
    database_url: str,
    db: psycopg2.extensions.connection,
    start_server: Start,
    follower: list[Follower],
) -> None:
    config, base = serve(tmp_path, database_url, start_server)
    requests.post(f"{base}/user", json={"username": "alice", "password": "wonderland"}, timeout=5)
    listener = psycopg2.connect(database_url)
    listener.autocommit = True
    listener.cursor().execute("LISTEN session_journal")
    env = {**server.os.environ, "DATABASE_URL": database_url}
    following = Follower(["journal", "--follow", "--after", "0", "--config", str(config)], env)
    follower.append(following)
    assert following.entry()["kind"] == "login"  # what was there before
    for _ in range(3):
        session_id = requests.post(
            f"{base}/user", json={"username": "alice", "password": "wonderland"}, timeout=5
        ).json()["session_id"]
        requests.delete(f"{base}/user", headers={"Authorization": session_id}, timeout=5)
        assert [following.entry()["kind"] for _ in range(2)] == ["login", "logout"]
    heard: list[str] = []
    deadline = time.monotonic() + 5
    while len(heard) < 6 and time.monotonic() < deadline:
        if select.select([listener], [], [], 0.5)[0]:
            listener.poll()
            heard += [notice.payload for notice in listener.notifies]
            listener.notifies.clear()
    listener.close()
    assert [int(payload) for payload in heard] == list(range(2, 8))  # each new id, in order
    following.process.send_signal(signal.SIGINT)
    assert following.process.wait(5) == 0


def test_entries_survive_a_server_killed_with_sigkill(
    tmp_path: Path, database_url: str, db: psycopg2.extensions.connection, start_server: Start
) -> None:
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "webserver": {"host": "127.0.0.1", "port": port},
                "sessions": {"store": "postgres"},
                "passwords": FAST,
            }
        )
    )
    env = {"DATABASE_URL": database_url}
    assert run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env).returncode == 0
    process = start_server(["--config", str(config)], env)
    process.wait_until_serving()
    base = f"http://127.0.0.1:{port}"
    answered = []
    for _ in range(5):
        response = requests.post(
            f"{base}/user", json={"username": "alice", "password": "wonderland"}, timeout=5
        )
        answered.append(response.json()["session_id"])
    requests.delete(f"{base}/user", headers={"Authorization": answered[0]}, timeout=5)
    process.process.send_signal(signal.SIGKILL)
    process.process.wait(5)
    # Every change the server answered for is in the journal: it was written in the same transaction.
    assert kinds(entries(db)) == [("login", None)] * 5 + [("logout", "logout")]


@pytest.fixture(params=["memory", "redis"])
async def memory_client(
    aiohttp_client: ClientFactory, database_url: str, db: object, clock: Clock, request: pytest.FixtureRequest
) -> AsyncIterator[Client]:
    """A server whose store is not in PostgreSQL (memory, Redis): it journals by itself."""
    kind = str(request.param)
    if kind == "redis":
        redis_or_skip()
        clear_redis()
    config = server_config(database_url, kind)
    journal = server.JournalConfig(streams=True)
    sessions = server.dataclasses.replace(config.sessions, max_per_user=2)
    config = server.dataclasses.replace(config, sessions=sessions, journal=journal)
    client = await aiohttp_client(await server.WebServer(config, clock=clock).initializer())
    assert client.app is not None
    await add_user(client.app, "alice", "wonderland")
    yield client
    if kind == "redis":
        clear_redis()


async def soon_entries(db: psycopg2.extensions.connection, count: int) -> list[dict[str, Any]]:
    """The entries, once there are `count` (or 5 s have passed)."""
    deadline = time.monotonic() + 5
    found = entries(db)
    while len(found) < count and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        found = entries(db)
    return found


async def test_a_store_outside_postgres_journals_each_change_and_streams_when_asked(
    memory_client: Client, db: psycopg2.extensions.connection, clock: Clock
) -> None:
    client = memory_client
    first = await log_in(client, "alice", "wonderland")
    assert kinds(await soon_entries(db, 1)) == [("login", None)]  # written within moments
    stream = await client.get("/events", headers={"Authorization": first})
    assert stream.status == 200
    assert (await client.delete("/user", headers={"Authorization": first})).status == 200
    assert b'"reason": "logout"' in await stream.read()
    assert len(await soon_entries(db, 4)) == 4
    for _ in range(3):  # max_per_user 2: the third pushes the first of them out
        await log_in(client, "alice", "wonderland")
    clock.advance(server.SessionConfig().idle_timeout + 1)
    assert client.app is not None
    assert await client.app[server.sessions].sweep() == 2
    found = await soon_entries(db, 10)
    assert kinds(found) == [
        ("login", None),
        ("stream_opened", "sse"),
        ("logout", "logout"),
        ("stream_closed", "logout"),
        ("login", None),
        ("login", None),
        ("evicted", "max_per_user"),
        ("login", None),
        ("expired", None),
        ("expired", None),
    ]
    assert found[0]["session"] == found[1]["session"] == found[3]["session"]
    assert found[4]["session"] == found[6]["session"]
