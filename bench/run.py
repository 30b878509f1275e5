"""Benchmark server.py against the framework's ceiling, the hashing limit, the article's login, the
session stores side by side (with py-spy's profile of each), and, for live events, a minimal
WebSocket fan-out and python-socketio.

    python bench/run.py               # full run (about 20 minutes), writes BENCHMARKS.md
    python bench/run.py --smoke       # a second or so per scenario, 300 streams, writes nothing (CI)
    python bench/run.py --only live   # one part (http, stores or live); rewrites only its section

Everything it needs is started here: an embedded PostgreSQL in a temporary directory, each server
under test as its own process pinned to core 0, and the load generators (wrk for HTTP requests,
bench/live_client.py for held streams) pinned to core 1. Figures compared in a ratio come from
the same run, so the ratios hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import argon2
import psycopg2

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))

import server  # noqa: E402  (the service under test, for its schema and session store)

SERVER_CORE, LOAD_CORE = "0", "1"
USERS = 100
CHEAP = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}  # the least argon2 accepts
OWASP = {"time_cost": 2, "memory_cost": 19456, "parallelism": 1}  # server.py's defaults
THROUGHPUT_CONNECTIONS = 50
LOGIN_CONNECTIONS = 4  # enough to keep the one hashing thread busy
FLOOD_CONNECTIONS = 16
LATENCY_CONNECTIONS = 4


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


def ensure_wrk() -> None:
    if shutil.which("wrk"):
        return
    if os.geteuid() != 0:
        sys.exit("bench: wrk is missing; install it with `sudo apt-get install wrk`")
    print("bench: installing wrk (Debian package)", flush=True)
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if subprocess.run(install, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], check=True, capture_output=True)
        subprocess.run(install, check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_opens(port: int, seconds: float, process: subprocess.Popen[Any]) -> bool:
    """Whether something accepts connections on port before `process` dies or time is up."""
    deadline = time.monotonic() + seconds
    while process.poll() is None and time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.05)
    return False


@contextmanager
def pinned_server(
    args: list[str], port: int, env: dict[str, str] | None = None, cores: str = SERVER_CORE
) -> Iterator[str]:
    """Run `python ARGS` on the server core until it accepts connections on port; SIGTERM after."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            ["taskset", "-c", cores, sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            if not port_opens(port, 60, process):
                log.seek(0)
                sys.exit(f"bench: {args[0]} did not start:\n{log.read().decode(errors='replace')}")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:  # python-socketio with 10,000 clients can take longer
                process.kill()
                process.wait()


def wrk_command(url: str, script: str, seconds: float, connections: int) -> list[str]:
    """wrk on the load core against url's /user, for whole seconds (all wrk can do)."""
    return [
        "taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", "-s", str(BENCH / script), f"{url}/user",
    ]  # fmt: skip


def wrk_environment(env: dict[str, str]) -> dict[str, str]:
    return {**os.environ, "BENCH_DIR": str(BENCH), **env}


def wrk(url: str, script: str, seconds: float, connections: int, **env: str) -> dict[str, float]:
    """One wrk run from the load core; returns the figures its Lua `done` prints."""
    command = wrk_command(url, script, seconds, connections)
    output = subprocess.run(
        command, capture_output=True, text=True, env=wrk_environment(env), check=True
    ).stdout
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    figures: dict[str, float] = json.loads(line.removeprefix("BENCH "))
    figures["rps"] = (figures["requests"] - figures["non_2xx"]) / figures["seconds"]
    return figures


def wrk_background(
    url: str, script: str, seconds: float, connections: int, **env: str
) -> subprocess.Popen[str]:
    command = wrk_command(url, script, seconds, connections)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, env=wrk_environment(env), text=True)


# ---------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------


def start_postgres(directory: Path) -> object:
    """The embedded PostgreSQL, moved to the load core so the server's core is the server's alone."""
    import psutil

    postgres = server.load_pgserver().get_server(directory / "pgdata")
    postmaster = psutil.Process(postgres.get_pid())
    for process in [postmaster, *postmaster.children(recursive=True)]:
        process.cpu_affinity([int(LOAD_CORE)])  # new backends inherit the postmaster's
    return postgres


def prepare_database(admin_url: str, name: str, parameters: dict[str, int], users: int = USERS) -> str:
    """A database with server.py's tables, `users` users hashed with `parameters`, and the seed's table."""
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {name}")
        cur.execute(f"CREATE DATABASE {name}")
    admin.close()
    url = psycopg2.extensions.make_dsn(admin_url, dbname=name)
    hasher = argon2.PasswordHasher(**parameters)
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(server.SCHEMA_PATH.read_text())
        cur.execute("CREATE TABLE seed_users (username text PRIMARY KEY, password text NOT NULL)")
        for number in range(users):
            username, password = f"user{number}", f"password{number}"
            cur.execute(
                "INSERT INTO users (username, password_hash) VALUES (%s, %s)",
                (username, hasher.hash(password)),
            )
            cur.execute("INSERT INTO seed_users VALUES (%s, %s)", (username, password))
    conn.close()
    return str(url)


def server_config(directory: Path, port: int, passwords: dict[str, int], uvloop: bool = False) -> Path:
    config = {
        "webserver": {"host": "127.0.0.1", "port": port, "uvloop": uvloop},
        "sessions": {"max_per_user": 1_000_000},
        "passwords": passwords,
    }
    path = directory / f"config-{port}.json"
    path.write_text(json.dumps(config))
    return path


async def new_session(url: str, user: int = 0) -> str:
    credentials = {"username": f"user{user}", "password": f"password{user}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/user", json=credentials) as response,
    ):
        return str((await response.json())["session_id"])


def log_in(url: str) -> str:
    import asyncio

    return asyncio.run(new_session(url))


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median rate (and its latencies): robust to one disturbed round."""
    ordered = sorted(runs, key=lambda run: run["rps"])
    return ordered[len(ordered) // 2]


def interleaved(
    rounds: int, round_seconds: int, measurements: dict[str, tuple[str, str, int, dict[str, str]]]
) -> dict[str, dict[str, float]]:
    """Run each measurement (url, script, connections, env) once per round, in turn, and keep
    each one's median: A B C A B C A B C, so a slow minute of the machine hits all of them."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in measurements}
    for _ in range(rounds):
        for name, (url, script, connections, env) in measurements.items():
            runs[name].append(wrk(url, script, round_seconds, connections, **env))
    return {name: median_run(found) for name, found in runs.items()}


def bank_sessions(url: str, seconds: float, sessions_file: Path) -> dict[str, float]:
    """Log in for `seconds`, saving every new session id for a DELETE run."""
    sessions_file.write_text("")
    return wrk(
        url,
        "login.lua",
        seconds,
        THROUGHPUT_CONNECTIONS,
        BENCH_USERS=str(USERS),
        BENCH_SAVE=str(sessions_file),
    )


def delete_run(url: str, sessions_file: Path, rate_hint: float) -> dict[str, float]:
    """DELETE /user on the banked sessions; wrk runs whole seconds, so size it to outlast them."""
    sessions = len(sessions_file.read_text().split())
    seconds = max(1, int(sessions / (1.25 * rate_hint)))
    delete = wrk(url, "delete.lua", seconds, THROUGHPUT_CONNECTIONS, BENCH_SESSIONS=str(sessions_file))
    delete["ran_out"] = float(delete["non_2xx"] > 0.01 * delete["requests"])
    return delete


def memory_per_session(count: int = 100_000) -> float:
    """Resident bytes per live session in server.py's MemorySessionStore."""
    import asyncio

    def resident() -> int:
        gc.collect()
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    store = server.MemorySessionStore(server.SessionConfig(max_per_user=1_000_000))
    users = [server.Account(number, f"user{number}") for number in range(1000)]
    # Each session keeps its own copy of a browser-sized User-Agent and an address, as logins
    # from a real server would (no string shared between sessions).
    agent = (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/131.0.0.0 Safari/537.36"
    )

    async def fill() -> None:
        for number in range(count):
            device = server.Device(f"203.0.{number % 256}.{number // 256 % 256}", f"{agent} #{number}")
            await store.create(users[number % len(users)], device)

    before = resident()
    asyncio.run(fill())
    after = resident()
    assert len(store._sessions) == count  # all still held
    return (after - before) / count


@contextmanager
def private_redis() -> Iterator[str | None]:
    """A Redis server of the benchmark's own on the load core (beside PostgreSQL), or None where
    redis-server is not installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = free_port()
    command = ["taskset", "-c", LOAD_CORE, binary, "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--save", "", "--appendonly", "no"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        if not port_opens(port, 10, process):
            sys.exit("bench: redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)


def server_args(config: Path) -> list[str]:
    return [str(ROOT / "server.py"), "--config", str(config)]


def run(seconds: float, parts: set[str], live: LiveSize, store_rounds: int) -> dict[str, object]:
    ensure_wrk()
    raise_fd_limit(live.streams + 1000)
    rounds, round_seconds = 3, max(1, round(seconds / 3))
    results: dict[str, dict[str, float]] = {}
    profiles: dict[str, Profile | str] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as temp, private_redis() as redis_url:
        directory = Path(temp)
        postgres = start_postgres(directory)
        admin_url = postgres.get_uri()  # type: ignore[attr-defined]
        try:
            if "http" in parts:
                results |= http_scenarios(directory, admin_url, redis_url, seconds, rounds, round_seconds)
            if "stores" in parts:
                found, profiles = side_by_side(directory, admin_url, redis_url, seconds, store_rounds)
                results |= found
            if "live" in parts:
                results |= live_scenarios(directory, admin_url, live)
        finally:
            postgres.cleanup()  # type: ignore[attr-defined]
    if "http" in parts:
        results["memory"] = {"bytes_per_session": memory_per_session()}
    return {"results": results, "ratios": ratios(results), "profiles": profiles}


def http_scenarios(
    directory: Path, admin_url: str, redis_url: str | None, seconds: float, rounds: int, round_seconds: int
) -> dict[str, dict[str, float]]:
    """Sections 1 to 7 and the session stores: HTTP requests driven by wrk."""
    results: dict[str, dict[str, float]] = {}
    cheap_url = prepare_database(admin_url, "bench_cheap", CHEAP)
    owasp_url = prepare_database(admin_url, "bench_owasp", OWASP)
    cheap_env = {"DATABASE_URL": cheap_url}
    bank = directory / "sessions.txt"
    print("bench: 1, 2, 5: ceiling, GET and DELETE /user, logins against the seed", flush=True)
    ports = [free_port() for _ in range(3)]
    seed_args = [str(BENCH / "seed_server.py"), "--port", str(ports[2]), "--dsn", cheap_url]
    with (
        pinned_server([str(BENCH / "ceiling.py"), "--port", str(ports[0])], ports[0]) as ceiling,
        pinned_server(server_args(server_config(directory, ports[1], CHEAP)), ports[1], cheap_env) as ours,
        pinned_server(seed_args, ports[2]) as seed,
    ):
        session = log_in(ours)
        users = {"BENCH_USERS": str(USERS)}
        for url in (ceiling, ours):  # warm-up
            wrk(url, "get.lua", 1, THROUGHPUT_CONNECTIONS, BENCH_SESSION=session)
        bank_sessions(ours, 2 * seconds, bank)
        results |= interleaved(
            rounds,
            round_seconds,
            {
                "ceiling": (ceiling, "get.lua", THROUGHPUT_CONNECTIONS, {}),
                "get": (ours, "get.lua", THROUGHPUT_CONNECTIONS, {"BENCH_SESSION": session}),
                "seed_login": (seed, "login.lua", THROUGHPUT_CONNECTIONS, users),
                "login": (ours, "login.lua", THROUGHPUT_CONNECTIONS, users),
            },
        )
        results["delete"] = delete_run(ours, bank, results["get"]["rps"])

    print("bench: 7: the same on uvloop", flush=True)
    ports = [free_port() for _ in range(2)]
    uvloop_config = server_config(directory, ports[1], CHEAP, uvloop=True)
    ceiling_args = [str(BENCH / "ceiling.py"), "--port", str(ports[0]), "--uvloop"]
    with (
        pinned_server(ceiling_args, ports[0]) as ceiling,
        pinned_server(server_args(uvloop_config), ports[1], cheap_env) as ours,
    ):
        session = log_in(ours)
        bank_sessions(ours, 2 * seconds, bank)
        found = interleaved(
            rounds,
            round_seconds,
            {
                "uvloop_ceiling": (ceiling, "get.lua", THROUGHPUT_CONNECTIONS, {}),
                "uvloop_get": (ours, "get.lua", THROUGHPUT_CONNECTIONS, {"BENCH_SESSION": session}),
            },
        )
        results |= found
        results["uvloop_delete"] = delete_run(ours, bank, found["uvloop_get"]["rps"])

    print("bench: 3, 4: logins against the argon2 limit; GET /user during a login flood", flush=True)
    port = free_port()
    owasp_env = {"DATABASE_URL": owasp_url}
    with pinned_server(server_args(server_config(directory, port, OWASP)), port, owasp_env) as ours:
        users = {"BENCH_USERS": str(USERS)}
        wrk(ours, "login.lua", 1, LOGIN_CONNECTIONS, **users)
        limits, logins = [], []
        for _ in range(rounds):
            limits.append({"rps": argon2_limit(round_seconds)})
            logins.append(wrk(ours, "login.lua", round_seconds, LOGIN_CONNECTIONS, **users))
        results["argon2_limit"], results["owasp_login"] = median_run(limits), median_run(logins)
        session = log_in(ours)
        idle, flooded = [], []
        for _ in range(rounds):
            idle.append(wrk(ours, "get.lua", round_seconds, LATENCY_CONNECTIONS, BENCH_SESSION=session))
            flood = wrk_background(ours, "login.lua", round_seconds + 2, FLOOD_CONNECTIONS, **users)
            time.sleep(1)  # let the flood fill the hashing pool first
            flooded.append(wrk(ours, "get.lua", round_seconds, LATENCY_CONNECTIONS, BENCH_SESSION=session))
            flood.wait(round_seconds + 30)
        results["get_idle"] = max(idle, key=lambda run: run["p99_ms"])
        results["get_under_flood"] = max(flooded, key=lambda run: run["p99_ms"])

    print("bench: session stores, one and two workers", flush=True)
    results |= store_scenarios(directory, cheap_env, redis_url, seconds)
    return results


def argon2_limit(seconds: int) -> float:
    """argon2 verifies per second on the server's core, with its pool size (one thread there)."""
    limit = subprocess.run(
        ["taskset", "-c", SERVER_CORE, sys.executable, str(BENCH / "argon2_limit.py"),
         "--threads", "1", "--seconds", str(seconds),
         "--time-cost", str(OWASP["time_cost"]), "--memory-cost", str(OWASP["memory_cost"])],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(json.loads(limit.stdout)["verifies_per_second"])


def store_scenarios(
    directory: Path, env: dict[str, str], redis_url: str | None, seconds: float
) -> dict[str, dict[str, float]]:
    """GET /user and logins for each store, with one worker (pinned) and two (on both cores)."""
    found: dict[str, dict[str, float]] = {}
    measure_seconds = max(1, round(seconds / 2))
    stores = ["memory", "postgres"] + (["redis"] if redis_url else [])
    for store in stores:
        for workers in (1, 2):
            if store == "memory" and workers == 2:
                continue  # refused by design: memory sessions cannot be shared
            port = free_port()
            path = directory / f"store-{store}-{workers}.json"
            sessions: dict[str, object] = {"store": store, "max_per_user": 1_000_000}
            if store == "redis":
                sessions["redis_url"] = redis_url
            config = {
                "webserver": {"host": "127.0.0.1", "port": port, "workers": workers},
                "sessions": sessions,
                "passwords": CHEAP,
            }
            path.write_text(json.dumps(config))
            # One worker is pinned like every other server here; two take both cores (beside wrk).
            cores = SERVER_CORE if workers == 1 else "0,1"
            with pinned_server(server_args(path), port, env, cores=cores) as url:
                session = log_in(url)
                wrk(url, "get.lua", 1, THROUGHPUT_CONNECTIONS, BENCH_SESSION=session)  # warm-up
                name = f"store_{store}_{workers}"
                found[f"{name}_get"] = wrk(
                    url, "get.lua", measure_seconds, THROUGHPUT_CONNECTIONS, BENCH_SESSION=session
                )
                found[f"{name}_login"] = wrk(
                    url, "login.lua", measure_seconds, THROUGHPUT_CONNECTIONS, BENCH_USERS=str(USERS)
                )
    return found


# ---------------------------------------------------------------------------
# Session stores side by side: the ceiling, GET and POST /user on each store, py-spy's profiles
# ---------------------------------------------------------------------------

STORE_ROUNDS = 5
PROFILE_TOP = 5
PROFILE_RATE = 200  # py-spy's samples a second
# scenario: (server, wrk script, label); "ceiling" is bench/ceiling.py, the others server.py on that store.
SIDE_BY_SIDE = {
    "ceiling_get": ("ceiling", "get.lua", "ceiling: minimal aiohttp GET"),
    "memory_get": ("memory", "get.lua", "GET /user, memory store"),
    "memory_login": ("memory", "login.lua", "POST /user, memory store"),
    "postgres_get": ("postgres", "get.lua", "GET /user, PostgreSQL store, near cache"),
    "postgres_login": ("postgres", "login.lua", "POST /user, PostgreSQL store, near cache"),
    "redis_get": ("redis", "get.lua", "GET /user, Redis store, near cache"),
    "redis_login": ("redis", "login.lua", "POST /user, Redis store, near cache"),
}
SHARED_STORES = ("postgres", "redis")


@dataclasses.dataclass(frozen=True)
class Profile:
    """py-spy's samples of one server under one load: where its event loop's thread spent them."""

    samples: int  # of the main thread, which runs the event loop
    waiting: int  # of those, in the selector: the loop had nothing to run
    top: list[tuple[int, str, str, str]]  # own samples, function, file:line, innermost server.py function
    entry: list[str]  # server.py functions on (nearly) every stack: the way in, main() to the loop
    on_stack: list[tuple[int, str]]  # the others, by samples with them on the stack
    innermost: list[tuple[int, str]]  # server.py functions, by samples where each is the innermost
    other_samples: int  # of every other thread (the hashing pool, the database's helpers)
    other_top: list[tuple[int, str]]  # their leaves


def side_by_side(
    directory: Path, admin_url: str, redis_url: str | None, seconds: float, rounds: int
) -> tuple[dict[str, dict[str, float]], dict[str, Profile | str]]:
    """In one run, rounds alternating over every scenario: the ceiling's GET, and GET /user and logins
    (cheapest hashing, USERS users in turn) on the memory store and on each shared store with the near
    cache at its default size; then one more window of each with py-spy recording the server."""
    round_seconds = max(1, round(seconds / rounds))
    print(
        f"bench: session stores side by side, {rounds} rounds of {round_seconds} s, then py-spy", flush=True
    )
    # USERS log in; one more user's session is the one GET /user reads, so no login evicts it
    # (sessions.max_per_user as shipped: a login past it ends its user's oldest session).
    database = prepare_database(admin_url, "bench_stores", CHEAP, users=USERS + 1)
    env = {"DATABASE_URL": database}
    stores = ["memory", *(store for store in SHARED_STORES if store != "redis" or redis_url)]
    scenarios = {
        name: scenario for name, scenario in SIDE_BY_SIDE.items() if scenario[0] in ("ceiling", *stores)
    }
    with ExitStack() as stack:
        ports = {server: free_port() for server in ("ceiling", *stores)}
        ceiling_args = [str(BENCH / "ceiling.py"), "--port", str(ports["ceiling"])]
        urls = {"ceiling": stack.enter_context(pinned_server(ceiling_args, ports["ceiling"]))}
        for store in stores:
            config = store_config(directory, ports[store], store, redis_url)
            urls[store] = stack.enter_context(pinned_server(server_args(config), ports[store], env))
        session = {store: asyncio.run(new_session(urls[store], USERS)) for store in stores}
        loads = {
            name: (urls[server], script, THROUGHPUT_CONNECTIONS, load_env(script, session.get(server, "")))
            for name, (server, script, _) in scenarios.items()
        }
        for url, script, connections, load in loads.values():  # warm-up: pools and near caches filled
            wrk(url, script, 1, connections, **load)
        found = interleaved(rounds, round_seconds, loads)
        for name, figures in found.items():
            if figures["non_2xx"] > 0.01 * figures["requests"]:
                sys.exit(
                    f"bench: {name}: {figures['non_2xx']:.0f} of {figures['requests']:.0f} answers not 2xx"
                )
        profiles = {
            name: profiled(server_pid(ports[server]), *loads[name], round_seconds, directory / f"{name}.txt")
            for name, (server, _, _) in scenarios.items()
        }
    measured = {f"stores_{name}": figures for name, figures in found.items()}
    return measured | {"stores_run": {"rounds": rounds, "seconds": round_seconds}}, profiles


def store_config(directory: Path, port: int, store: str, redis_url: str | None) -> Path:
    """server.py on one store, cheapest hashing, the rest as shipped (the near cache's size too)."""
    sessions: dict[str, object] = {"store": store}
    if store == "redis":
        sessions["redis_url"] = redis_url
    config = {"webserver": {"host": "127.0.0.1", "port": port}, "sessions": sessions, "passwords": CHEAP}
    path = directory / f"stores-{store}.json"
    path.write_text(json.dumps(config))
    return path


def load_env(script: str, session: str) -> dict[str, str]:
    """What the wrk script reads: GET's session, or how many users log in in turn."""
    return {"BENCH_USERS": str(USERS)} if script == "login.lua" else {"BENCH_SESSION": session}


def profiled(
    pid: int, url: str, script: str, connections: int, env: dict[str, str], seconds: int, output: Path
) -> Profile | str:
    """py-spy recording the server (from the load core, without pausing it) while wrk drives it:
    the profile, or why there is none."""
    spy = shutil.which("py-spy")
    if spy is None:
        return "py-spy is not installed (requirements-dev.txt pins it)"
    command = [
        "taskset", "-c", LOAD_CORE, spy, "record", "--format", "raw", "--nonblocking", "--threads",
        "--function", "--rate", str(PROFILE_RATE), "--duration", str(seconds), "--pid", str(pid),
        "--output", str(output),
    ]  # fmt: skip
    load = wrk_background(url, script, seconds + 1, connections, **env)
    try:
        time.sleep(0.5)  # wrk connected, the server busy
        done = subprocess.run(command, capture_output=True, text=True)
    finally:
        load.wait(seconds + 30)
    if done.returncode != 0 or not output.exists():
        # Its first line says why; a backtrace may follow.
        said = (done.stderr.strip() or done.stdout.strip() or f"exit status {done.returncode}").splitlines()
        if said[0].lower().startswith("permission denied"):
            return "py-spy could not attach to the server: ptrace is not permitted here"
        return f"py-spy could not record the server ({said[0].rstrip('.')})"
    return read_profile(output.read_text())


FRAME = re.compile(r"(?P<function>.*) \((?P<where>[^()]*)\)$")  # py-spy's raw frame: "name (file:line)"
# A server.py function on this share of the loop's stacks that hold any is the way in, not the work
# (some stacks read without pausing the server come out torn, without their outer frames).
ENTRY_SHARE = 0.8


def read_profile(raw: str) -> Profile:
    """py-spy's raw output with --threads (one stack a line: "thread (id): name", then the frames,
    outermost first, then its samples) summed up, the main thread apart from the others."""
    own: Counter[tuple[str, str]] = Counter()
    under: defaultdict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    on_stack: Counter[str] = Counter()
    innermost: Counter[str] = Counter()
    depth: dict[str, int] = {}  # how far from the outermost frame a server.py function was first seen
    ours_total = 0  # the loop's samples with any server.py function on the stack
    others: Counter[str] = Counter()
    stacks = []
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        thread, _, stack = stack.partition(";")
        frames = [frame for frame in map(FRAME.match, stack.split(";")) if frame]
        if frames and count.isdigit():
            stacks.append((thread, frames, int(count)))
    threads = Counter[str]()
    for thread, _, samples in stacks:
        threads[thread] += samples
    # The event loop runs in the main thread; should py-spy not know the threads' names, the busiest.
    main = next((thread for thread in threads if thread.endswith(": MainThread")), None)
    main = main or (threads.most_common(1) or [("", 0)])[0][0]
    for thread, frames, samples in stacks:
        leaf = (frames[-1]["function"], frames[-1]["where"])
        if thread != main:
            others[leaf[0]] += samples
            continue
        own[leaf] += samples
        ours = [frame["function"] for frame in frames if in_server(frame["where"])]
        under[leaf][ours[-1] if ours else "—"] += samples
        if ours:
            innermost[ours[-1]] += samples
            ours_total += samples
        for number, function in enumerate(ours):
            depth.setdefault(function, number)
        for function in set(ours):
            on_stack[function] += samples
    total = sum(own.values())
    entry = sorted(
        (function for function, samples in on_stack.items() if samples >= ENTRY_SHARE * ours_total),
        key=lambda function: depth[function],
    )
    return Profile(
        samples=total,
        waiting=sum(samples for (function, where), samples in own.items() if is_wait(function, where)),
        top=[
            (samples, function, where, under[function, where].most_common(1)[0][0])
            for (function, where), samples in own.most_common(PROFILE_TOP)
        ],
        entry=entry,
        on_stack=[
            (samples, function) for function, samples in on_stack.most_common() if function not in entry
        ],
        innermost=[(samples, function) for function, samples in innermost.most_common()],
        other_samples=sum(others.values()),
        other_top=[(samples, function) for function, samples in others.most_common(3)],
    )


def is_wait(function: str, where: str) -> bool:
    """The event loop waiting for I/O: asyncio's selector (EpollSelector.select)."""
    return function.endswith("select") and where.startswith("selectors.py")


def in_server(where: str) -> bool:
    """Whether a frame's file is server.py (py-spy shortens a path it finds on sys.path)."""
    path = Path(where.rpartition(":")[0])
    return path.name == "server.py" and (not path.parent.name or path == ROOT / "server.py")


# ---------------------------------------------------------------------------
# Live events: thousands of held streams (bench/live_client.py on the load core)
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LiveSize:
    streams: int = 10_000
    rounds: int = 3
    latency_events: int = 20
    seconds: float = 10.0  # of events back to back
    logouts: int = 100


SMOKE_LIVE = LiveSize(streams=300, rounds=1, latency_events=5, seconds=1.0, logouts=10)
LIVE_TARGETS = ("ours", "ceiling", "peer")
TOPICS_PER_STREAM = 10  # the topic rounds: each stream subscribes to 10 topics, events go to one
LIVE_SHOWN = {"open_seconds", "latency_p99_ms", "deliveries_per_s", "logout_p99_ms", "catch_up_seconds"}


def raise_fd_limit(needed: int) -> None:
    """Every held stream is a file descriptor, in the server and in the client: lift RLIMIT_NOFILE.

    Children (servers, client) inherit it. Root may also raise the hard limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < needed and os.geteuid() == 0:
        hard = needed
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(needed, hard)), hard))
    except (ValueError, OSError) as exc:
        sys.exit(f"bench: cannot raise the open-files limit to {needed} ({exc}); try `ulimit -n {needed}`")
    if hard < needed:
        sys.exit(f"bench: {needed} open files needed, the hard limit is {hard}; raise it (`ulimit -Hn`)")


def live_config(directory: Path, port: int, name: str, **webserver: object) -> Path:
    sessions: dict[str, object] = {"max_per_user": 1_000_000}
    if webserver.get("workers", 1) != 1:
        sessions["store"] = "postgres"
    config = {
        "webserver": {"host": "127.0.0.1", "port": port, "uvloop": True, **webserver},
        "sessions": sessions,
        "passwords": CHEAP,
    }
    # Any topic, for the topic rounds (bench/live_client.py --topics): anyone may subscribe.
    config["events"] = {
        "max_streams_per_user": 1_000_000,
        "topics": [{"pattern": "*", "subscribe": "anyone", "publish": "anyone"}],
    }
    path = directory / f"live-{name}.json"
    path.write_text(json.dumps(config))
    return path


async def new_sessions(url: str, count: int) -> list[str]:
    """`count` sessions, spread over the benchmark's users."""
    async with aiohttp.ClientSession() as http:

        async def one(number: int) -> str:
            user = number % USERS
            credentials = {"username": f"user{user}", "password": f"password{user}"}
            async with http.post(f"{url}/user", json=credentials) as response:
                return str((await response.json())["session_id"])

        return list(await asyncio.gather(*(one(number) for number in range(count))))


def sessions_file(url: str, count: int, path: Path) -> Path:
    path.write_text("\n".join(asyncio.run(new_sessions(url, count))) + "\n")
    return path


def live_client(url: str, target: str, streams: int, *options: str) -> dict[str, float]:
    """One run of bench/live_client.py pinned to the load core; its figures."""
    command = [
        "taskset", "-c", LOAD_CORE, sys.executable, str(BENCH / "live_client.py"),
        "--target", target, "--url", url, "--streams", str(streams), *options,
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    line = next((line for line in done.stdout.splitlines() if line.startswith("LIVE ")), None)
    if done.returncode != 0 or line is None:
        sys.exit(f"bench: live_client {target} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
    figures: dict[str, float] = json.loads(line.removeprefix("LIVE "))
    shown = ", ".join(f"{key} {value:,.1f}" for key, value in figures.items() if key in LIVE_SHOWN)
    print(f"bench:   {target} ({time.monotonic() - started:.0f} s): {shown}", flush=True)
    return figures


def server_pid(port: int) -> int:
    """The process listening on port (the server under test; taskset execs it, so it is the child)."""
    import psutil

    for connection in psutil.net_connections("tcp"):
        if connection.laddr and connection.laddr.port == port and connection.status == "LISTEN":
            return int(connection.pid or 0)
    raise RuntimeError(f"nothing listens on {port}")


def live_scenarios(directory: Path, admin_url: str, size: LiveSize) -> dict[str, dict[str, float]]:
    """Held streams, fan-out latency and throughput against the ceiling and the peer, logout, storm."""
    import live_client as client

    found: dict[str, dict[str, float]] = {}
    database = prepare_database(admin_url, "bench_live", CHEAP)
    env = {"DATABASE_URL": database}
    ports = {target: free_port() for target in LIVE_TARGETS}
    message = ["--message", client.SAMPLE_EVENT, "--uvloop"]
    fanout = ["--latency-events", str(size.latency_events), "--seconds", str(size.seconds)]
    print(
        f"bench: live events, {size.streams:,} WebSocket streams: server.py, ceiling, python-socketio",
        flush=True,
    )
    with (
        pinned_server(server_args(live_config(directory, ports["ours"], "ours")), ports["ours"], env) as ours,
        pinned_server(
            [str(BENCH / "ws_ceiling.py"), "--port", str(ports["ceiling"]), *message], ports["ceiling"]
        ),
        pinned_server(
            [str(BENCH / "socketio_peer.py"), "--port", str(ports["peer"]), *message], ports["peer"]
        ),
    ):
        urls = {target: f"http://127.0.0.1:{port}" for target, port in ports.items()}
        sessions = sessions_file(ours, USERS, directory / "live-sessions.txt")
        options = {
            "ours": ["--sessions", str(sessions), "--dsn", database],
            "ceiling": [],
            "peer": [],
        }
        runs: dict[str, list[dict[str, float]]] = {target: [] for target in LIVE_TARGETS}
        for round_number in range(size.rounds):
            for target in LIVE_TARGETS:
                # Memory is measured in each server's first round, while it is fresh.
                measure = ["--server-pid", str(server_pid(ports[target]))] if round_number == 0 else []
                runs[target].append(
                    live_client(urls[target], target, size.streams, *options[target], *fanout, *measure)
                )
                time.sleep(1)  # the server lets go of the closed sockets
        for target, target_runs in runs.items():
            best = median_live(target_runs)
            best["bytes_per_stream"] = target_runs[0]["bytes_per_stream"]
            found[f"live_{target}"] = best
        print(
            f"bench: live events: one topic of {TOPICS_PER_STREAM} per stream, against python-socketio rooms"
        )
        peer_port = free_port()
        peer_args = [str(BENCH / "socketio_peer.py"), "--port", str(peer_port), *message, "--rooms"]
        with pinned_server(peer_args, peer_port):
            topics = ["--topics", str(TOPICS_PER_STREAM)]
            found["live_topic_ours"] = live_client(
                ours, "ours", size.streams, *options["ours"], *fanout, *topics,
                "--server-pid", str(server_pid(ports["ours"])),
            )  # fmt: skip
            found["live_topic_peer"] = live_client(
                f"http://127.0.0.1:{peer_port}", "peer", size.streams, *fanout, *topics,
                "--server-pid", str(server_pid(peer_port)),
            )  # fmt: skip
        print("bench: live events: logout under load, one process", flush=True)
        victims = sessions_file(ours, size.logouts, directory / "live-victims.txt")
        found["live_logout_1"] = live_client(
            ours, "ours", size.streams, *options["ours"], "--scenario", "logout", "--victims", str(victims)
        )
        print("bench: live events: reconnect storm", flush=True)
        found["live_storm"] = live_client(ours, "ours", size.streams, *options["ours"], "--scenario", "storm")

    print("bench: live events: Server-Sent Events held", flush=True)
    port = free_port()
    with pinned_server(server_args(live_config(directory, port, "sse")), port, env) as ours:
        sessions = sessions_file(ours, USERS, directory / "live-sse-sessions.txt")
        found["live_sse"] = live_client(
            ours, "ours", size.streams, "--transport", "sse", "--sessions", str(sessions),
            "--scenario", "held", "--server-pid", str(server_pid(port)),
        )  # fmt: skip

    print("bench: live events: logout under load, two processes on the PostgreSQL store", flush=True)
    port = free_port()
    config = live_config(directory, port, "two", workers=2)
    with pinned_server(server_args(config), port, env, cores=f"{SERVER_CORE},{LOAD_CORE}") as ours:
        time.sleep(2)  # both workers up
        sessions = sessions_file(ours, USERS, directory / "live-two-sessions.txt")
        victims = sessions_file(ours, size.logouts, directory / "live-two-victims.txt")
        found["live_logout_2"] = live_client(
            ours,
            "ours",
            size.streams,
            "--sessions",
            str(sessions),
            "--scenario",
            "logout",
            "--victims",
            str(victims),
        )
    return found


def median_live(runs: list[dict[str, float]]) -> dict[str, float]:
    """The round with the median deliveries per second (its latencies with it)."""
    return dict(sorted(runs, key=lambda run: run["deliveries_per_s"])[len(runs) // 2])


def ratios(r: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, str]]:
    """Each reported ratio: (value, target, comparison), for the parts that ran."""
    return (
        (http_ratios(r) if "get" in r else {})
        | (store_ratios(r) if "stores_memory_get" in r else {})
        | (live_ratios(r) if "live_ours" in r else {})
    )


def http_ratios(r: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, str]]:
    return {
        "GET /user / ceiling": (r["get"]["rps"] / r["ceiling"]["rps"], 0.9, ">="),
        "DELETE /user / ceiling": (r["delete"]["rps"] / r["ceiling"]["rps"], 0.9, ">="),
        "logins / argon2 limit": (r["owasp_login"]["rps"] / r["argon2_limit"]["rps"], 0.85, ">="),
        "GET p99 under login flood / idle p99": (
            r["get_under_flood"]["p99_ms"] / max(r["get_idle"]["p99_ms"], 0.001), 5.0, "<"),
        "GET p99 under login flood (ms)": (r["get_under_flood"]["p99_ms"], 20.0, "<"),
        "login (cheapest hashing) / seed login": (r["login"]["rps"] / r["seed_login"]["rps"], 0.9, ">="),
        "memory per session (bytes)": (r["memory"]["bytes_per_session"], 1024.0, "<"),
        "uvloop: GET /user / uvloop ceiling": (
            r["uvloop_get"]["rps"] / r["uvloop_ceiling"]["rps"], 0.9, ">="),
        "uvloop: DELETE /user / uvloop ceiling": (
            r["uvloop_delete"]["rps"] / r["uvloop_ceiling"]["rps"], 0.9, ">="),
        "uvloop ceiling / asyncio ceiling": (r["uvloop_ceiling"]["rps"] / r["ceiling"]["rps"], 0.0, "info"),
    }  # fmt: skip


def store_ratios(r: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, str]]:
    """The issue's targets for the stores (its fourth, OWASP logins / argon2's rate, is http's)."""
    memory_get, memory_login = r["stores_memory_get"]["rps"], r["stores_memory_login"]["rps"]
    rows = {
        "stores: GET /user, memory store / ceiling": (memory_get / r["stores_ceiling_get"]["rps"], 0.9, ">=")
    }
    for store in SHARED_STORES:
        if f"stores_{store}_get" not in r:
            continue
        label = STORE_LABELS[store]
        get, login = r[f"stores_{store}_get"]["rps"], r[f"stores_{store}_login"]["rps"]
        rows[f"stores: GET /user, {label} store with the near cache / memory store"] = (
            get / memory_get,
            0.9,
            ">=",
        )
        rows[f"stores: logins, {label} store / memory store"] = (login / memory_login, 0.5, ">=")
        rows[f"stores: logins, {label} store / memory store (stretch)"] = (login / memory_login, 0.8, ">=")
    return rows


def live_ratios(r: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, str]]:
    ours, ceiling, peer, storm = r["live_ours"], r["live_ceiling"], r["live_peer"], r["live_storm"]
    kib = 1024
    return {
        "live: WebSocket memory per stream (KiB)": (ours["bytes_per_stream"] / kib, 32.0, "<="),
        "live: Server-Sent Events memory per stream (KiB)": (
            r["live_sse"]["bytes_per_stream"] / kib, 32.0, "<="),
        "live: fan-out latency p99 (ms)": (ours["latency_p99_ms"], 200.0, "<="),
        "live: deliveries per second": (ours["deliveries_per_s"], 50_000.0, ">="),
        "live: deliveries/s / ceiling": (ours["deliveries_per_s"] / ceiling["deliveries_per_s"], 0.8, ">="),
        "live: deliveries/s / python-socketio": (
            ours["deliveries_per_s"] / peer["deliveries_per_s"], 3.0, ">="),
        "live: python-socketio p99 / server.py p99": (
            peer["latency_p99_ms"] / ours["latency_p99_ms"], 0.0, "info"),
        "live: logout p99, one process (ms)": (r["live_logout_1"]["logout_p99_ms"], 50.0, "<="),
        "live: logout p99, two processes, PostgreSQL store (ms)": (
            r["live_logout_2"]["logout_p99_ms"], 500.0, "<="),
        "live: reconnect storm, all caught up (s)": (storm["catch_up_seconds"], 20.0, "<="),
        "live: one topic, deliveries/s / ceiling": (
            r["live_topic_ours"]["deliveries_per_s"] / ceiling["deliveries_per_s"], 0.8, ">="),
        "live: one topic / broadcast, deliveries/s": (
            r["live_topic_ours"]["deliveries_per_s"] / ours["deliveries_per_s"], 0.9, ">="),
        "live: one topic, fan-out latency p99 (ms)": (r["live_topic_ours"]["latency_p99_ms"], 200.0, "<="),
        "live: one topic / python-socketio rooms, deliveries/s": (
            r["live_topic_ours"]["deliveries_per_s"] / r["live_topic_peer"]["deliveries_per_s"], 3.0, ">="),
        "live: reconnect storm, streams with every event once / all": (
            storm["complete_streams"] / storm["streams"], 1.0, ">="),
    }  # fmt: skip


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

ROWS = [
    ("ceiling", "1. ceiling: minimal aiohttp GET"),
    ("get", "2. GET /user (valid session)"),
    ("delete", "2. DELETE /user (sessions made beforehand)"),
    ("login", "5. POST /user, cheapest hashing"),
    ("seed_login", "5. the article's login (plain-text SQL compare)"),
    ("argon2_limit", "3. argon2 verify limit (OWASP parameters)"),
    ("owasp_login", "3. POST /user, OWASP parameters"),
    ("get_idle", f"4. GET /user, idle ({LATENCY_CONNECTIONS} connections; worst of 3 rounds)"),
    ("get_under_flood", "4. GET /user during a login flood (worst of 3 rounds)"),
    ("uvloop_ceiling", "7. uvloop: ceiling"),
    ("uvloop_get", "7. uvloop: GET /user"),
    ("uvloop_delete", "7. uvloop: DELETE /user"),
]


def machine() -> str:
    import aiohttp as aiohttp_module

    return (
        f"{os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, aiohttp {aiohttp_module.__version__}, "
        f"Linux {platform.release()}"
    )


def command_line() -> str:
    return " ".join(["python", "bench/run.py", *sys.argv[1:]])


def verdict(value: float, target: float, comparison: str) -> str:
    if comparison == "info":
        return "—"
    ok = {">=": value >= target, "<=": value <= target, "<": value < target}[comparison]
    return "met" if ok else "**missed**"


STORE_LABELS = {"memory": "memory", "postgres": "PostgreSQL", "redis": "Redis"}


def store_rows(results: dict[str, dict[str, float]]) -> list[str]:
    """The shared-store table: each figure as a ratio of one worker on the memory store."""
    if "store_memory_1_get" not in results:
        return []
    base_get = results["store_memory_1_get"]["rps"]
    base_login = results["store_memory_1_login"]["rps"]
    lines = [
        "",
        "Session stores (cheapest hashing, so the store's cost shows). One worker is pinned to core 0;",
        "two workers share both cores with wrk. Ratios are against one worker on the memory store.",
        "",
        "| store | workers | GET /user req/s | ratio | p99 ms | logins/s | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for store, label in STORE_LABELS.items():
        for workers in (1, 2):
            name = f"store_{store}_{workers}"
            if f"{name}_get" not in results:
                continue
            get, login = results[f"{name}_get"], results[f"{name}_login"]
            lines.append(
                f"| {label} | {workers} | {get['rps']:,.0f} | {get['rps'] / base_get:.2f} | "
                f"{get['p99_ms']:.2f} | {login['rps']:,.0f} | {login['rps'] / base_login:.2f} |"
            )
    return lines


def ratio_table(rows: dict[str, tuple[float, float, str]]) -> list[str]:
    lines = ["", "| ratio | value | target | |", "|---|---:|---:|---|"]
    for name, (value, target, comparison) in rows.items():
        shown_target = "—" if comparison == "info" else f"{comparison} {target:g}"
        lines.append(f"| {name} | {value:.2f} | {shown_target} | {verdict(value, target, comparison)} |")
    return lines


def markdown(report: dict[str, object], seconds: float, size: LiveSize) -> str:
    results: dict[str, dict[str, float]] = report["results"]  # type: ignore[assignment]
    ratio_rows: dict[str, tuple[float, float, str]] = report["ratios"]  # type: ignore[assignment]
    profiles: dict[str, Profile | str] = report["profiles"]  # type: ignore[assignment]
    lines = [
        "# Benchmarks",
        "",
        f"Measured {datetime.date.today().isoformat()} with `python bench/run.py`"
        f" ({seconds:.0f} s a scenario), on {machine()}.",
    ]
    if "get" in results:
        http_rows = {k: v for k, v in ratio_rows.items() if not k.startswith(("live:", "stores:"))}
        lines += http_markdown(results, http_rows)
    if "live_ours" in results:
        lines += live_markdown(results, {k: v for k, v in ratio_rows.items() if k.startswith("live:")}, size)
    if "stores_memory_get" in results:
        lines += stores_markdown(results, ratio_rows, profiles)
    return "\n".join(lines)


def http_markdown(
    results: dict[str, dict[str, float]], ratio_rows: dict[str, tuple[float, float, str]]
) -> list[str]:
    lines = [
        f"Each server runs as one process pinned to core {SERVER_CORE}; wrk runs pinned to core {LOAD_CORE}",
        f"({THROUGHPUT_CONNECTIONS} connections for throughput, {LOGIN_CONNECTIONS} for the OWASP logins,",
        f"{LATENCY_CONNECTIONS} for latency), beside the embedded PostgreSQL. Figures compared in a",
        "ratio are measured in alternating rounds (A B A B A B) and the median round is kept, so a slow",
        "moment of this shared machine touches both sides; compare ratios, not absolute figures.",
        "",
        "| scenario | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for key, label in ROWS:
        row = results[key]
        p50 = f"{row['p50_ms']:.2f}" if "p50_ms" in row else "—"
        p99 = f"{row['p99_ms']:.2f}" if "p99_ms" in row else "—"
        note = " (ran out of sessions: a lower bound)" if row.get("ran_out") else ""
        lines.append(f"| {label}{note} | {row['rps']:,.0f} | {p50} | {p99} |")
    lines += ratio_table(ratio_rows)
    memory = results["memory"]["bytes_per_session"]
    lines += ["", f"6. Memory: {memory:.0f} bytes of resident memory per live session (100,000 sessions)."]
    lines += store_rows(results)
    lines += [
        "",
        "Where the time goes with a shared store: with the near cache (the default `sessions.cache_size`)",
        "a `GET /user` for a session the process has seen is a dictionary lookup and its renewal is written",
        "behind (see the Near cache section, which compares both); a login is three round trips to the",
        "stores (see the Login round trips section). Without the cache every `GET /user` is a round trip",
        "(an `UPDATE … RETURNING` in PostgreSQL, an `EVALSHA` in Redis), and on one pinned core the",
        "Python side of each round trip —",
        "the driver's request and reply handling, one more await — costs several times what the whole",
        "memory-store request costs. A second worker spreads that Python work over both cores, which",
        "here also host wrk and the databases.",
        "",
    ]
    return lines


def stores_markdown(
    results: dict[str, dict[str, float]],
    ratio_rows: dict[str, tuple[float, float, str]],
    profiles: dict[str, Profile | str],
) -> list[str]:
    found = {name: results[f"stores_{name}"] for name in SIDE_BY_SIDE if f"stores_{name}" in results}
    run = results["stores_run"]
    rounds = (
        f"{run['rounds']:.0f} alternating round{'s' if run['rounds'] != 1 else ''} of {run['seconds']:.0f} s"
    )
    lines = [
        "",
        STORES_HEADING.strip(),
        "",
        f"Measured {datetime.date.today().isoformat()} with `{command_line()}` ({rounds},",
        f"the median round of each kept), on {machine()}.",
        "The ceiling (bench/ceiling.py) and one server.py process per store run side by side, each pinned",
        f"to core {SERVER_CORE}; wrk ({THROUGHPUT_CONNECTIONS} connections) runs on core {LOAD_CORE}, beside"
        " the embedded PostgreSQL and a private",
        f"Redis. Cheapest hashing, so the store's own cost shows; {USERS} users log in in turn"
        " (`sessions.max_per_user` as",
        "shipped: each login past it ends that user's oldest session), and GET /user reads a session of",
        "another user. The shared stores run with the near cache at its default `sessions.cache_size`.",
        "",
        "Under each ratio, the profiles of its scenarios: py-spy (`py-spy record --nonblocking --threads",
        "--function`, from the load core) over one more window of the same load. For the event loop's",
        "thread: the share of its samples waiting in the selector (the loop had nothing to run), the",
        "server.py functions on the most stacks, and the five functions with the most samples of their",
        "own (the stack's leaf; file:line is where the function begins) with the innermost server.py",
        "function on those stacks. `WebServer.run` as the innermost is the event loop and aiohttp's own",
        "request handling, outside any server.py middleware or handler. Stacks read without pausing the",
        "server are sometimes torn (outer frames missing): the own samples hold, the server.py shares",
        "come out a little low.",
        "",
        "| scenario | requests/s | p50 ms | p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for name, row in found.items():
        label = SIDE_BY_SIDE[name][2]
        lines.append(f"| {label} | {row['rps']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} |")
    groups = [
        ("GET /user against the ceiling", ("GET /user, memory store /",), ("ceiling_get", "memory_get")),
        (
            "GET /user on the shared stores, with the near cache",
            ("with the near cache",),
            tuple(f"{store}_get" for store in SHARED_STORES),
        ),
        (
            "Logins on the shared stores",
            ("stores: logins",),
            ("memory_login", *(f"{store}_login" for store in SHARED_STORES)),
        ),
    ]
    for title, markers, names in groups:
        rows = {
            k.removeprefix("stores: "): v
            for k, v in ratio_rows.items()
            if k.startswith("stores:") and any(marker in k for marker in markers)
        }
        lines += ["", f"### {title}", *ratio_table(rows)]
        for name in names:
            if name in found:
                lines += profile_markdown(SIDE_BY_SIDE[name][2], profiles.get(name, "not profiled"))
    lines += [
        "",
        "The fourth target, logins at OWASP parameters ≥ 0.85 of argon2's own verify rate, is the first",
        "table's `logins / argon2 limit` (the http part).",
        "",
    ]
    return lines


def profile_markdown(label: str, profile: Profile | str) -> list[str]:
    if isinstance(profile, str):
        return ["", f"Profile, {label}: {profile}."]

    def share(samples: int) -> str:
        return f"{100 * samples / max(profile.samples, 1):.0f}%"

    def listed(functions: list[tuple[int, str]]) -> str:
        return ", ".join(f"`{function}` {share(samples)}" for samples, function in functions[:PROFILE_TOP])

    lines = [
        "",
        f"Profile, {label}: {profile.samples:,} samples of the event loop's thread, {share(profile.waiting)}"
        " of them waiting in the selector.",
    ]
    if profile.innermost:
        entry = " … ".join(f"`{function}`" for function in profile.entry) or "none"
        lines += [
            f"server.py functions on its stacks, beside the way in ({entry}):"
            f" {listed(profile.on_stack) or 'none'};",
            f"by the innermost server.py function (its own code and the library calls it makes):"
            f" {listed(profile.innermost)}.",
        ]
    if profile.other_samples:
        others = ", ".join(f"`{function}` {samples}" for samples, function in profile.other_top)
        lines.append(f"Other threads: {profile.other_samples:,} samples, most in {others}.")
    lines += [
        "",
        "| own samples | function | file:line | innermost server.py function |",
        "|---:|---|---|---|",
    ]
    for samples, function, where, ours in profile.top:
        shown = "—" if ours == "—" else f"`{ours}`"
        lines.append(f"| {share(samples)} | `{function}` | `{where}` | {shown} |")
    return lines


LIVE_ROWS = [
    ("live_ours", "server.py, `GET /events` over WebSocket"),
    ("live_ceiling", "ceiling: aiohttp, one pre-encoded frame to every socket"),
    ("live_peer", "python-socketio `AsyncServer.emit` to everyone"),
    (
        "live_topic_ours",
        "server.py, one topic of the 10 each stream subscribed to (memory: after the broadcast rounds)",
    ),
    ("live_topic_peer", "python-socketio `emit(..., room=)`, 10 rooms a client"),
]


def live_markdown(
    results: dict[str, dict[str, float]], ratio_rows: dict[str, tuple[float, float, str]], size: LiveSize
) -> list[str]:
    lines = [
        "",
        f"## Live events: {size.streams:,} streams on one process",
        "",
        f"Measured {datetime.date.today().isoformat()} with `{command_line()}`, on {machine()}.",
        f"Each server is one process on uvloop pinned to core {SERVER_CORE}; the load client",
        f"(`bench/live_client.py`: asyncio on uvloop, one protocol object per socket) holds {size.streams:,}",
        f"sockets pinned to core {LOAD_CORE}, beside PostgreSQL. server.py's events are published the real",
        "way, an `INSERT INTO events` per transaction; the ceiling's and the peer's by `POST /publish`.",
        f"Latency: {size.latency_events} events of ~200 bytes published one at a time, from the moment",
        "the INSERT (or POST) is sent to each receipt. Deliveries/s: events back to back for",
        f"{size.seconds:g} s with at most 8 not yet received everywhere. {size.rounds} rounds, alternating",
        "server.py, ceiling, peer; the median round by deliveries/s is kept. Memory: the server's resident",
        "set with the streams open minus before, per stream, in its first round.",
        "",
        "| server | memory/stream KiB | latency p50 ms | p99 ms | last receipt p50 ms | deliveries/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, label in LIVE_ROWS:
        row = results[key]
        lines.append(
            f"| {label} | {row['bytes_per_stream'] / 1024:.1f} | {row['latency_p50_ms']:.1f} | "
            f"{row['latency_p99_ms']:.1f} | {row['fanout_complete_p50_ms']:.1f} | "
            f"{row['deliveries_per_s']:,.0f} |"
        )
    sse = results["live_sse"]
    one, two, storm = results["live_logout_1"], results["live_logout_2"], results["live_storm"]
    sse_memory = sse["bytes_per_stream"] / 1024
    lines += [
        f"| server.py, `GET /events` as Server-Sent Events (held only) | {sse_memory:.1f} | — | — | — | — |",
        "",
        f"Logout under load: `DELETE /user` of one session among {size.streams:,} open streams, until its",
        f"stream gets the close frame: p50 {one['logout_p50_ms']:.1f} ms, p99 {one['logout_p99_ms']:.1f} ms"
        f" over {one['logouts']:.0f} logouts in one process ({one['closed_4001']:.0f} closed with 4001);",
        f"with two processes on the PostgreSQL store p50 {two['logout_p50_ms']:.1f} ms,"
        f" p99 {two['logout_p99_ms']:.1f} ms.",
        "",
        f"Reconnect storm: all {storm['streams']:,.0f} streams dropped at once while events kept coming"
        f" ({storm['events_published']:.0f} published),",
        f"reconnected with `?last_event_id`: all open again after {storm['reconnect_seconds']:.1f} s;"
        f" the last stream back on live events after {storm['catch_up_seconds']:.1f} s",
        f"(the median one after {storm['catch_up_p50_seconds']:.1f} s). At the end"
        f" {storm['complete_streams']:,.0f} streams hold every event exactly once;"
        f" {storm['duplicates']:.0f} duplicates in all.",
    ]
    lines += ratio_table(ratio_rows)
    lines += LIVE_NOTES
    return lines


# From gc.callbacks timing the collector in the server under this load, an earlier py-spy profile,
# and the code path itself.
LIVE_NOTES = """
Where the time goes at 10,000 streams, what was tried, and what it would take:

- **This machine.** Two cores, shared with other work at times: figures move with its load, the
  ceiling's and the peer's too, so only the ratios of one round compare. An earlier run of this
  command while other jobs kept the load average at 6 to 8 measured 34,231 deliveries/s (0.52 of
  the ceiling), a p99 of 775 ms and a storm of 76 s; the table above is from a quiet machine.
- **The system call.** Every delivery is one `send()` on a loopback TCP socket, and on this virtual
  machine that call alone costs about 11 µs (on loopback the kernel also does the receiving side's
  work inside it). The ceiling spends nearly all its time in `transport.write`. Fewer calls would
  take coalescing: several events to one stream in one write when they arrive together.
- **Python per delivery.** Beside that call server.py does about ten Python-level steps per stream
  and event (the registry's loop, `Stream.send`, the replay backlog check, the duplicate check by
  id, `is_closing()`, the write, the clock read for heartbeats, the buffer-size check for slow
  readers), about 3.4 µs in all (timed over 3,000 real socketpair transports), where the ceiling
  does one: the rest of the gap to the ceiling. What it would take: a fan-out loop that does only
  the write and the buffer check, reading the clock once per event rather than once per stream,
  and the slow-reader check through the transport's high-water callback (`pause_writing`) instead
  of a size read per write; or the loop in C (Cython).
- **Python's garbage collector.** 10,000 WebSockets keep about 825,000 objects alive (about 80 a
  stream: aiohttp's request, protocol, reader, writer, timers). Timed with `gc.callbacks` in the
  server, CPython's default thresholds ran 11 full collections during one loaded round, each
  walking them all for 1.4 to 3.1 s with every delivery stopped: the p99 was 6.0 s. server.py now
  freezes its start-up objects and sets the thresholds to `(50000, 20, 10)` once it serves
  (`tune_garbage_collector`): no full collection runs while the streams are open, and what is left
  of the p99 is young collections and the CPU the machine gives.
- **Handshakes: the reconnect storm's limit.** Opening 10,000 streams takes server.py five to ten
  times the ceiling's time (15 to 28 s against 2 to 3 s here): each is a full aiohttp request
  (middleware, the session lookup and renewal, the registry, the replay), where the ceiling's is a
  bare upgrade. The listen queue is 4,096 now (it was 128, and overflowed: the kernel dropped
  connections the client retried with backoff; 4,096 took a loaded storm from 76 s to 62 s). The
  replay itself is no longer the limit (below): the last stream is on live events a fraction of a
  second after it is back. What it would take: a lighter upgrade path (no middleware, one cached
  session lookup), or several processes sharing the storm.
- **The reconnect storm.** Each resuming stream used to read its missed events from the `events`
  table itself (two queries through a pool of 10 connections), so 10,000 queued behind each other.
  Now every process keeps the last 10,000 events it delivered (at most 16 MiB, none past the
  retention) encoded in memory, and a resume within them is served from there, with one shared
  read of how far the retention sweep went; older resumes still read the table. A storm now costs
  what its handshakes cost.
- **Heartbeats.** aiohttp pings each WebSocket every `heartbeat` seconds with a task per ping and
  a timer per socket: about a tenth of the server's time at 10,000 streams in an earlier py-spy
  profile. The ceiling and the peer run without.
- **python-socketio** runs a task per client and creates one more per client for every `emit`,
  then waits for all of them: per delivery that is several times server.py's work, and its
  latency grows with the number of clients.
""".splitlines()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a second per scenario; write nothing")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each scenario (default 10)")
    parser.add_argument(
        "--only",
        choices=list(PART_HEADINGS),
        help="run one part and rewrite only its section of BENCHMARKS.md",
    )
    parser.add_argument("--streams", type=int, help="live streams held at once (default 10,000)")
    parser.add_argument(
        "--rounds",
        type=int,
        help=f"rounds of the live part (default 3) and of the stores part (default {STORE_ROUNDS})",
    )
    args = parser.parse_args()
    seconds = 1.0 if args.smoke else args.seconds
    size = SMOKE_LIVE if args.smoke else LiveSize()
    if args.streams:
        size = dataclasses.replace(size, streams=args.streams)
    if args.rounds:
        size = dataclasses.replace(size, rounds=args.rounds)
    store_rounds = args.rounds or (1 if args.smoke else STORE_ROUNDS)
    parts = {args.only} if args.only else set(PART_HEADINGS)
    # Stopped from outside, still stop the servers and the PostgreSQL this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: stopped by SIGTERM"))
    started = time.monotonic()
    report = run(seconds, parts, size, store_rounds)
    text = markdown(report, seconds, size)
    print(text)
    print(f"bench: finished in {time.monotonic() - started:.0f} s")
    if not args.smoke and not args.streams:
        write_report(text, args.only)
    return 0


LIVE_HEADING = "\n## Live events"
STORES_HEADING = "\n## Session stores side by side"
NEAR_CACHE_HEADING = "\n## Near cache"  # written by bench/near_cache.py
PART_HEADINGS = {"http": "", "live": LIVE_HEADING, "stores": STORES_HEADING}  # the parts, in the file's order


def sections(text: str) -> dict[str, str]:
    """A report cut into its parts, each from its heading (http's from the top) to the next part's."""
    starts = sorted(
        (text.find(heading) if heading else 0, part)
        for part, heading in PART_HEADINGS.items()
        if heading in text
    )
    ends = [start for start, _ in starts[1:]] + [len(text)]
    return {part: text[start:end].strip("\n") for (start, part), end in zip(starts, ends, strict=True)}


def notes(section: str) -> str:
    """What follows a part's generated text under level-2 headings of its own: notes written by hand."""
    start = section.find("\n## ", 1)
    return "" if start < 0 else "\n" + section[start:]


def write_report(text: str, only: str | None) -> None:
    """BENCHMARKS.md from a full run; a run of one part replaces only that part's section. Notes
    written by hand after a part (under a level-2 heading of their own) stay after it."""
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else ""
    # bench/near_cache.py's section is its own: kept, at the end, whatever this run rewrites.
    old, near_heading, near_cache = old.partition(NEAR_CACHE_HEADING)
    kept = near_heading + near_cache
    before, now = sections(old), sections(text)
    parts = before | {part: section + notes(before.get(part, "")) for part, section in now.items()
                      if only is None or part == only}
    written = [parts[part] for part in PART_HEADINGS if parts.get(part)]
    path.write_text("\n\n".join(written) + "\n" + kept)


if __name__ == "__main__":
    sys.exit(main())
