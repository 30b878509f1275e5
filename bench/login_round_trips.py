"""A login's round trips to each session store, and logins per second, before and after the
sessions owner folded them (throttle reservation, account, session).

    python bench/login_round_trips.py                 # about 5 minutes; prints a Markdown table
    python bench/login_round_trips.py --smoke         # a second per scenario (CI)
    python bench/login_round_trips.py --before REV    # compare with server.py at another commit

In one run, on an embedded PostgreSQL and a private Redis (both on the load core): server.py as it
is ("after") and as it was at REV ("before", default: the main branch before the change), each
with the memory, the PostgreSQL and the Redis store, one worker pinned to core 0, wrk on core 1,
cheapest hashing, as in bench/run.py. Each version has a database of its own.

- Round trips per login: 100 logins one after another (right passwords, then wrong ones), and
  the transactions PostgreSQL counted (pg_stat_database; every statement of a login is one; the
  servers' own housekeeping, a few statements a minute, is in there too) and the requests Redis
  received (its MONITOR, less what scripts ran) meanwhile, divided by 100.
- Logins per second: wrk with 50 connections; rounds alternate between the six servers and each
  keeps its median round; the ratio is against the memory store of the same version, same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import psycopg2
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run import (  # bench/run.py: the same processes, pinning and wrk
    CHEAP,
    ROOT,
    THROUGHPUT_CONNECTIONS,
    USERS,
    free_port,
    pinned_server,
    prepare_database,
    private_redis,
    start_postgres,
    wrk,
)

BEFORE = "82c90cba4b89569e0535fb13ecb2a879f4e83880"  # main before the sessions owner (issue 18)
STORES = ("memory", "postgres", "redis")
SEQUENTIAL_LOGINS = 100


def checkout(rev: str, directory: Path) -> Path:
    """server.py and the files it serves with, as they were at rev."""
    directory.mkdir()
    for name in ("server.py", "schema.sql", "index.html", "openapi.yaml"):
        shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{name}"], capture_output=True)
        if shown.returncode == 0:
            (directory / name).write_bytes(shown.stdout)
    return directory / "server.py"


def config_file(directory: Path, name: str, store: str, redis_url: str) -> tuple[Path, int]:
    port = free_port()
    sessions: dict[str, object] = {"store": store, "max_per_user": 1_000_000}
    if store == "redis":
        sessions["redis_url"], sessions["redis_prefix"] = redis_url, f"{name}:"
    config = {
        "webserver": {"host": "127.0.0.1", "port": port},
        "sessions": sessions,
        "login": {"max_failures": 1_000_000},  # the wrong passwords counted here must not be refused
        "passwords": CHEAP,
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    return path, port


async def log_in_one_by_one(url: str, right: bool) -> None:
    async with aiohttp.ClientSession() as http:
        for number in range(SEQUENTIAL_LOGINS):
            n = number % USERS
            body = {"username": f"user{n}", "password": f"password{n}" if right else "wrong-password"}
            async with http.post(f"{url}/user", json=body) as response:
                assert response.status == (200 if right else 401), await response.text()


def transactions(database_url: str) -> int:
    with psycopg2.connect(database_url) as conn, conn.cursor() as cur:
        cur.execute(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"
        )
        (count,) = cur.fetchone()
    conn.close()
    return int(count) - 1  # this query's own


def redis_round_trips(commands: list[str]) -> int:
    """Requests clients sent, from what MONITOR saw of them (scripts' own commands left out): a
    MULTI ... EXEC block (a pipelined transaction, one write) counts as one."""
    trips, in_multi = 0, False
    for command in commands:
        name = command.split(" ", 1)[0].upper()
        if name == "MULTI":
            in_multi = True
        elif name == "EXEC":
            in_multi = False
            trips += 1
        elif not in_multi and name not in ("HELLO", "SELECT", "CLIENT"):  # a new connection's
            trips += 1
    return trips


def round_trips(url: str, database_url: str, redis_url: str, right: bool, wait: float) -> tuple[float, float]:
    """PostgreSQL statements and Redis requests per login, over SEQUENTIAL_LOGINS logins."""
    pg = transactions(database_url)
    seen: list[str] = []
    stop = "bench-monitor-stop"

    def watch() -> None:
        with redis.Redis.from_url(redis_url).monitor() as monitor:
            for found in monitor.listen():
                if found.get("command", "").endswith(stop):
                    return
                if found.get("client_type") != "lua":
                    seen.append(found.get("command", ""))

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.3)
    asyncio.run(log_in_one_by_one(url, right))
    with redis.Redis.from_url(redis_url) as client:
        client.echo(stop)
    watcher.join(30)
    time.sleep(wait)
    pg = transactions(database_url) - pg
    return round(pg / SEQUENTIAL_LOGINS, 2), round(redis_round_trips(seen) / SEQUENTIAL_LOGINS, 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=BEFORE)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--smoke", action="store_true")
    options = parser.parse_args()
    rounds, seconds = (1, 1) if options.smoke else (options.rounds, options.seconds)
    with tempfile.TemporaryDirectory() as temporary, ExitStack() as stack:
        directory = Path(temporary)
        postgres = start_postgres(directory)
        stack.callback(postgres.cleanup)  # type: ignore[attr-defined]
        redis_url = stack.enter_context(private_redis())
        if redis_url is None:
            sys.exit("bench: redis-server is needed")
        admin_url = postgres.get_uri()  # type: ignore[attr-defined]
        versions = {"before": checkout(options.before, directory / "before"), "after": ROOT / "server.py"}
        urls: dict[tuple[str, str], str] = {}
        databases: dict[str, str] = {}
        for version, program in versions.items():
            databases[version] = prepare_database(admin_url, version, CHEAP)
            for store in STORES:
                path, port = config_file(directory, f"{version}-{store}", store, redis_url)
                args = [str(program), "--config", str(path)]
                env = {"DATABASE_URL": databases[version]}
                urls[version, store] = stack.enter_context(pinned_server(args, port, env))
        print("bench: warming up (the first login of each user may re-hash it)", flush=True)
        for url in urls.values():
            asyncio.run(log_in_one_by_one(url, True))
        # A backend publishes its counts once it has been idle for 10 s (PGSTAT_IDLE_INTERVAL).
        wait = 0 if options.smoke else 11
        time.sleep(wait)
        trips = {
            (version, store, right): round_trips(url, databases[version], redis_url, right, wait)
            for (version, store), url in urls.items()
            for right in (True, False)
        }
        print("bench: logins per second, rounds alternating", flush=True)
        rates: dict[tuple[str, str], list[float]] = {key: [] for key in urls}
        for _ in range(rounds):
            for (version, store), url in urls.items():
                found = wrk(url, "login.lua", seconds, THROUGHPUT_CONNECTIONS, BENCH_USERS=str(USERS))
                rates[version, store].append(found["rps"])
        median = {key: statistics.median(values) for key, values in rates.items()}
    lines = [
        f"Login round trips and rate, before ({options.before[:7]}) and after, in one run "
        f"(`python bench/login_round_trips.py`, {rounds} rounds of {seconds:g} s):",
        "",
        "| store | version | PostgreSQL statements / right login | Redis requests | "
        "PostgreSQL / wrong login | Redis | logins/s | ÷ memory |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for store in STORES:
        for version in versions:
            pg_right, rd_right = trips[version, store, True]
            pg_wrong, rd_wrong = trips[version, store, False]
            rate = median[version, store]
            lines.append(
                f"| {store} | {version} | {pg_right:g} | {rd_right:g} | {pg_wrong:g} | {rd_wrong:g} | "
                f"{rate:,.0f} | {rate / median[version, 'memory']:.2f} |"
            )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
