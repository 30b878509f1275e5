"""The shared session stores with and without the near cache, against the memory store.

    python bench/near_cache.py            # about 6 minutes; rewrites BENCHMARKS.md's "Near cache" section
    python bench/near_cache.py --smoke    # a second per scenario; writes nothing

In one run, on an embedded PostgreSQL and a private Redis (both on the load core): server.py with
the memory store, and with the PostgreSQL and the Redis store each with `sessions.cache_size` 0
(every request a round trip: the service before the near cache) and with the default cache. One
worker is pinned to core 0 and wrk to core 1, as in bench/run.py; rounds alternate between the
servers (A B C … A B C …) and each keeps its median round, so ratios come from the same minutes.

- GET /user (one session, 50 connections) and logins (cheapest hashing, 99 users in turn, each
  holding at most `max_per_user` sessions as shipped): requests per second.
- CPU time per request: the user+system seconds of every process but wrk (the server, or its
  gunicorn arbiter and workers; the PostgreSQL backends; redis-server) during the wrk run, divided
  by the requests answered; for one worker and for two (two workers share both cores with wrk and
  the databases, so their throughput says little here, and their CPU time does).
- Revocation seen by a second process: two servers on one store, a session used on both; a
  DELETE /user through one, then GET /user through the other until it answers 401: the time from
  sending the DELETE to that 401, p50 and p99.
- Memory: resident bytes per cached session (100,000 sessions in a CachedSessionStore).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import run as bench  # bench/run.py: wrk, the embedded PostgreSQL, the report's helpers

server = bench.server
ROOT = bench.ROOT
HEADING = "\n## Near cache"
LOGIN_USERS = bench.USERS - 1  # user0 … user98 log in; user99's session is the one GET /user uses
LABELS = {"memory": "memory", "postgres": "PostgreSQL", "redis": "Redis"}
# name: (store, cache_size, workers); "memory-1" is the baseline of every ratio.
VARIANTS = {
    "memory-1": ("memory", 0, 1),
    **{
        f"{store}-{cache}-{workers}": (store, size, workers)
        for workers in (1, 2)
        for store in ("postgres", "redis")
        for cache, size in (("uncached", 0), ("cached", 100_000))
    },
}


@contextmanager
def private_redis() -> Iterator[tuple[str, int]]:
    """A Redis server of the benchmark's own on the load core: its URL and its pid."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench: redis-server is missing (Debian package redis-server)")
    port = bench.free_port()
    command = ["taskset", "-c", bench.LOAD_CORE, binary, "--port", str(port), "--bind", "127.0.0.1"]
    process = subprocess.Popen([*command, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        if not bench.port_opens(port, 10, process):
            sys.exit("bench: redis-server did not start")
        yield f"redis://127.0.0.1:{port}/0", process.pid
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def started(
    config: dict[str, Any], directory: Path, name: str, env: dict[str, str]
) -> Iterator[tuple[str, int]]:
    """server.py with this config, on core 0 (one worker) or both (two): its URL and pid."""
    port = bench.free_port()
    config["webserver"] |= {"host": "127.0.0.1", "port": port}
    path = directory / f"{name}.json"
    path.write_text(json.dumps(config))
    cores = bench.SERVER_CORE if config["webserver"].get("workers", 1) == 1 else "0,1"
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            ["taskset", "-c", cores, sys.executable, *bench.server_args(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )
        try:
            if not bench.port_opens(port, 60, process):
                log.seek(0)
                sys.exit(f"bench: {name} did not start:\n{log.read().decode(errors='replace')}")
            time.sleep(0.5 * config["webserver"].get("workers", 1))  # every worker up, not only one
            yield f"http://127.0.0.1:{port}", process.pid
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


def variant_config(store: str, cache_size: int, workers: int, redis_url: str) -> dict[str, Any]:
    # max_per_user as shipped (20): logins reach a steady state, each one ending its user's oldest.
    sessions: dict[str, Any] = {"store": store, "cache_size": cache_size}
    if store == "redis":
        sessions["redis_url"] = redis_url
    return {"webserver": {"workers": workers}, "sessions": sessions, "passwords": bench.CHEAP}


async def log_in(url: str) -> str:
    """A session of the last user, whom the login scenario leaves alone (its logins would end it)."""
    credentials = {"username": f"user{LOGIN_USERS}", "password": f"password{LOGIN_USERS}"}
    async with aiohttp.ClientSession() as http, http.post(f"{url}/user", json=credentials) as response:
        return str((await response.json())["session_id"])


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU seconds of these processes and all their descendants, now."""
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for process in [root, *root.children(recursive=True)]:
                times = process.cpu_times()
                total += times.user + times.system
        except psutil.NoSuchProcess:
            continue
    return total


def measured(url: str, script: str, seconds: float, pids: list[int], **env: str) -> dict[str, float]:
    """One wrk run, with the CPU time all processes but wrk spent per answered request (µs)."""
    before = cpu_seconds(pids)
    figures = bench.wrk(url, script, seconds, bench.THROUGHPUT_CONNECTIONS, **env)
    answered = figures["requests"] - figures["non_2xx"]
    figures["cpu_us"] = (cpu_seconds(pids) - before) / max(answered, 1) * 1e6
    return figures


async def revocation_latency(deleting: str, reading: str, count: int) -> dict[str, float]:
    """Log in through `deleting`, use the session through `reading` (now cached there), DELETE it
    through `deleting`, and GET through `reading` until 401: milliseconds from sending the DELETE."""
    credentials = {"username": "user0", "password": "password0"}
    took: list[float] = []
    async with aiohttp.ClientSession() as one, aiohttp.ClientSession() as other:
        for _ in range(count):
            async with one.post(f"{deleting}/user", json=credentials) as response:
                session_id = (await response.json())["session_id"]
            for _ in range(2):
                async with other.get(f"{reading}/user", headers={"Authorization": session_id}) as response:
                    assert response.status == 200
            started = time.perf_counter()
            async with one.delete(f"{deleting}/user", headers={"Authorization": session_id}) as response:
                assert response.status == 200
            while True:
                async with other.get(f"{reading}/user", headers={"Authorization": session_id}) as response:
                    if response.status == 401:
                        break
            took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return {"p50_ms": took[len(took) // 2], "p99_ms": took[min(len(took) - 1, int(len(took) * 0.99))]}


def memory_per_cached_session(count: int = 100_000) -> float:
    """Resident bytes per session in a CachedSessionStore, each session with its own strings, as
    read from a store (a browser-sized User-Agent, an address)."""

    def resident() -> int:
        gc.collect()
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    config = server.SessionConfig(store="postgres")
    cache = server.CachedSessionStore(server.MemorySessionStore(config), config, time.time, count)
    agent = (
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)"
        " Chrome/131.0.0.0 Safari/537.36"
    )
    now = time.time()
    before = resident()
    for number in range(count):
        session = server.Session(
            f"user{number % 1000}",
            now,
            now,
            now + 1800,
            server.new_public_id(),
            f"203.0.{number % 256}.{number // 256 % 256}",
            f"{agent} #{number}",
            number % 1000,
            0,
        )
        cache._fill(server.token_hash(server.new_session_id()), session, cache._generation)
    after = resident()
    assert len(cache) == count
    return (after - before) / count


def run(seconds: float, rounds: int, logouts: int) -> dict[str, dict[str, float]]:
    bench.ensure_wrk()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-near-") as temp, private_redis() as (redis_url, redis_pid):
        directory = Path(temp)
        postgres = bench.start_postgres(directory)
        try:
            url = bench.prepare_database(postgres.get_uri(), "near", bench.CHEAP)  # type: ignore[attr-defined]
            env = {"DATABASE_URL": url}
            infrastructure = [postgres.get_pid(), redis_pid]  # type: ignore[attr-defined]
            with ExitStack() as stack:
                servers = {
                    name: stack.enter_context(
                        started(variant_config(*variant, redis_url), directory, name, env)  # type: ignore[misc]
                    )
                    for name, variant in VARIANTS.items()
                }
                sessions = {name: asyncio.run(log_in(address)) for name, (address, _) in servers.items()}
                for name, (address, _) in servers.items():  # warm-up: pools filled, caches too
                    bench.wrk(
                        address, "get.lua", 1, bench.THROUGHPUT_CONNECTIONS, BENCH_SESSION=sessions[name]
                    )
                runs: dict[str, list[dict[str, float]]] = {}
                for number in range(rounds):
                    print(f"bench: round {number + 1} of {rounds}", flush=True)
                    for name, (address, pid) in servers.items():
                        pids = [pid, *infrastructure]
                        get = measured(address, "get.lua", seconds, pids, BENCH_SESSION=sessions[name])
                        login = measured(address, "login.lua", seconds, pids, BENCH_USERS=str(LOGIN_USERS))
                        runs.setdefault(f"{name}_get", []).append(get)
                        runs.setdefault(f"{name}_login", []).append(login)
                results |= {name: bench.median_run(found) for name, found in runs.items()}
            for store in ("postgres", "redis"):
                pair = [variant_config(store, 100_000, 1, redis_url) for _ in range(2)]
                with (
                    started(pair[0], directory, f"{store}-a", env) as (one, _),
                    started(pair[1], directory, f"{store}-b", env) as (other, _),
                ):
                    results[f"revocation_{store}"] = asyncio.run(revocation_latency(one, other, logouts))
        finally:
            postgres.cleanup()  # type: ignore[attr-defined]
    results["memory"] = {"bytes_per_cached_session": memory_per_cached_session()}
    return results


def ratios(r: dict[str, dict[str, float]]) -> dict[str, tuple[float, float, str]]:
    base_get, base_login = r["memory-1_get"]["rps"], r["memory-1_login"]["rps"]
    rows: dict[str, tuple[float, float, str]] = {}
    for store in ("postgres", "redis"):
        label = LABELS[store]
        rows[f"GET /user, {label} store with the cache / memory store"] = (
            r[f"{store}-cached-1_get"]["rps"] / base_get,
            0.8,
            ">=",
        )
        rows[f"GET /user, {label} store without it / memory store"] = (
            r[f"{store}-uncached-1_get"]["rps"] / base_get,
            0.0,
            "info",
        )
        rows[f"logins, {label} store with the cache / memory store"] = (
            r[f"{store}-cached-1_login"]["rps"] / base_login,
            0.8,
            ">=",
        )
        rows[f"revocation seen by a second process, {label} store, p99 (ms)"] = (
            r[f"revocation_{store}"]["p99_ms"],
            100.0,
            "<=",
        )
    return rows  # fmt: skip


def markdown(r: dict[str, dict[str, float]], seconds: float, rounds: int) -> str:
    lines = [
        HEADING.strip(),
        "",
        f"Measured {datetime.date.today().isoformat()} with `python bench/near_cache.py`"
        f" ({seconds:.0f} s a scenario, {rounds} alternating rounds, median kept), on {bench.machine()}.",
        "One worker is pinned to core 0, wrk to core 1 (50 connections), beside the embedded PostgreSQL",
        'and a private Redis. "Without" is `sessions.cache_size: 0`: every request a round trip to the',
        "store, as before the near cache. Ratios are against the memory store in the same run. CPU µs per",
        "request: user+system time of every process but wrk (server, or gunicorn's arbiter and workers;",
        "PostgreSQL backends; redis-server) over the wrk run, per answered request.",
        "",
        "| store | near cache | GET /user req/s | ÷ memory | p99 ms | CPU µs/GET, 1 worker | 2 workers"
        " | logins/s | ÷ memory | CPU µs/login, 1 worker | 2 workers |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base_get, base_login = r["memory-1_get"]["rps"], r["memory-1_login"]["rps"]
    for name, (store, size, workers) in VARIANTS.items():
        if workers != 1:
            continue
        two = name.removesuffix("-1") + "-2"
        get, login = r[f"{name}_get"], r[f"{name}_login"]
        get2 = r.get(f"{two}_get", {}).get("cpu_us")
        login2 = r.get(f"{two}_login", {}).get("cpu_us")
        cache = "—" if store == "memory" else ("with" if size else "without")
        lines.append(
            f"| {LABELS[store]} | {cache} | {get['rps']:,.0f} | {get['rps'] / base_get:.2f}"
            f" | {get['p99_ms']:.2f}"
            f" | {get['cpu_us']:.0f} | {'—' if get2 is None else f'{get2:.0f}'}"
            f" | {login['rps']:,.0f} | {login['rps'] / base_login:.2f}"
            f" | {login['cpu_us']:.0f} | {'—' if login2 is None else f'{login2:.0f}'} |"
        )
    lines += [
        "",
        "| revocation seen by a second process (DELETE /user through one, GET /user through the other"
        " until 401) | p50 ms | p99 ms |",
        "|---|---:|---:|",
    ]
    for store in ("postgres", "redis"):
        found = r[f"revocation_{store}"]
        lines.append(f"| {LABELS[store]} store, near cache | {found['p50_ms']:.2f} | {found['p99_ms']:.2f} |")
    lines += bench.ratio_table(ratios(r))
    lines += [
        "",
        f"Memory: {r['memory']['bytes_per_cached_session']:,.0f} bytes of resident memory per cached session"
        " (100,000 sessions, each with a browser's User-Agent), so the default `cache_size` of 100,000 costs"
        f" at most about {r['memory']['bytes_per_cached_session'] * 100_000 / 1e6:.0f} MB per process.",
        *LOGINS.splitlines(),
    ]
    return "\n".join(lines) + "\n"


LOGINS = """
Logins gain nothing from the cache: a new session must be in the store before its id is handed
out (the next request may reach another process), and the login throttle reads and clears the
shared failure counts on every login. With the PostgreSQL store a login is five round trips (the
account, the username's and the address's failure counts, clearing the username's count, the new
session) against the memory store's one (the account); with Redis, one to PostgreSQL and four to
Redis. The 0.8 target for logins would need those folded into one or two statements, or the
failure counts kept near as well (carried on the bus like revocations); that is not done.
"""


def write_section(text: str) -> None:
    """Replace (or add) the Near cache section of BENCHMARKS.md, leaving the others as they are."""
    path = ROOT / "BENCHMARKS.md"
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    before, found, after = old.partition(HEADING)
    rest = ""
    if found:
        _, heading, tail = after.partition("\n## ")
        rest = "\n## " + tail if heading else ""
    path.write_text(before.rstrip("\n") + "\n\n" + text + rest)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a second per scenario, one round; write nothing"
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each wrk run (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    args = parser.parse_args()
    seconds, rounds, logouts = (1.0, 1, 10) if args.smoke else (args.seconds, args.rounds, 200)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: stopped by SIGTERM"))
    begun = time.monotonic()
    results = run(seconds, rounds, logouts)
    text = markdown(results, seconds, rounds)
    print(text)
    print(f"bench: finished in {time.monotonic() - begun:.0f} s")
    if not args.smoke:
        write_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
