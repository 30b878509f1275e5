"""What the session journal costs a login: the login rate with and without it, in one run,
rounds alternating (with, without, with, without, ...) so that a slow minute of the machine hits
both; the median round of each. By default hashing is the cheapest argon2 accepts, so that the login
path's other work, the journal's included, is what is measured (the worst case); `--passwords
owasp` measures logins as shipped, where argon2 is most of a login's time.

    python bench/journal_cost.py                 # 5 rounds of 5 s per store
    python bench/journal_cost.py --passwords owasp    # at the shipped hashing parameters
    python bench/journal_cost.py --rounds 1 --seconds 1    # smoke

- postgres store: one server; "without" is the same server with the journal's trigger on
  `sessions` disabled (ALTER TABLE sessions DISABLE TRIGGER sessions_journal) between rounds.
- memory store: "without" is server.py as it was before the journal (git: the commit that added
  /metrics, da7fa88), on a database of its own; "with" is this server.py. Both servers run at once,
  pinned to the server core, and take turns under load.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import psycopg2

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run  # noqa: E402  (the benchmark's helpers: the embedded PostgreSQL, pinned servers, wrk)

BEFORE_JOURNAL = "da7fa88"  # server.py with /metrics, before the session journal
CONNECTIONS = 16


PASSWORDS = {"cheap": run.CHEAP, "owasp": run.OWASP}
HASHING = run.CHEAP  # set by --passwords


def config(directory: Path, port: int, store: str) -> Path:
    path = directory / f"config-{port}.json"
    settings = {
        "webserver": {"host": "127.0.0.1", "port": port},
        "sessions": {"store": store, "max_per_user": 1_000_000},
        "passwords": HASHING,
    }
    path.write_text(json.dumps(settings))
    return path


def set_trigger(url: str, enabled: bool) -> None:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(f"ALTER TABLE sessions {'ENABLE' if enabled else 'DISABLE'} TRIGGER sessions_journal")
    conn.close()


def journal_entries(url: str) -> int:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM session_journal")
        (count,) = cur.fetchone()
    conn.close()
    return int(count)


Round = Callable[[int], dict[str, float]]


def alternate(rounds: int, seconds: int, with_journal: Round, without: Round) -> dict[str, dict[str, float]]:
    """Each callable runs one wrk round; they take turns, and each one's median round is kept."""
    runs: dict[str, list[dict[str, float]]] = {"with": [], "without": []}
    for _ in range(rounds):
        runs["with"].append(with_journal(seconds))
        runs["without"].append(without(seconds))
    return {name: run.median_run(found) for name, found in runs.items()}


def postgres_cost(directory: Path, admin_url: str, rounds: int, seconds: int) -> dict[str, dict[str, float]]:
    print("journal cost: postgres store, trigger on and off", flush=True)
    users = {"BENCH_USERS": str(run.USERS)}
    url = run.prepare_database(admin_url, "bench_journal_pg", HASHING)
    port = run.free_port()
    server_args = run.server_args(config(directory, port, "postgres"))
    with run.pinned_server(server_args, port, {"DATABASE_URL": url}) as base:
        run.wrk(base, "login.lua", 1, CONNECTIONS, **users)  # warm-up

        def logins(round_seconds: int, enabled: bool) -> dict[str, float]:
            set_trigger(url, enabled)
            before = journal_entries(url)
            figures = run.wrk(base, "login.lua", round_seconds, CONNECTIONS, **users)
            figures["journaled"] = journal_entries(url) - before
            return figures

        found = alternate(rounds, seconds, lambda s: logins(s, True), lambda s: logins(s, False))
        set_trigger(url, True)
    return found


def memory_cost(directory: Path, admin_url: str, rounds: int, seconds: int) -> dict[str, dict[str, float]]:
    print("journal cost: memory store, this server.py and the one before the journal", flush=True)
    users = {"BENCH_USERS": str(run.USERS)}
    old = directory / "before"
    old.mkdir()
    for file in ("server.py", "schema.sql"):
        shown = subprocess.run(
            ["git", "-C", str(run.ROOT), "show", f"{BEFORE_JOURNAL}:{file}"],
            capture_output=True,
            text=True,
            check=True,
        )
        (old / file).write_text(shown.stdout)
    with_url = run.prepare_database(admin_url, "bench_journal_on", HASHING)
    without_url = run.prepare_database(admin_url, "bench_journal_off", HASHING)
    ports = [run.free_port(), run.free_port()]
    new_args = run.server_args(config(directory, ports[0], "memory"))
    old_args = [str(old / "server.py"), "--config", str(config(directory, ports[1], "memory"))]
    with (
        run.pinned_server(new_args, ports[0], {"DATABASE_URL": with_url}) as journaled,
        run.pinned_server(old_args, ports[1], {"DATABASE_URL": without_url}) as plain,
    ):
        for base in (journaled, plain):
            run.wrk(base, "login.lua", 1, CONNECTIONS, **users)
        return alternate(
            rounds,
            seconds,
            lambda s: run.wrk(journaled, "login.lua", s, CONNECTIONS, **users),
            lambda s: run.wrk(plain, "login.lua", s, CONNECTIONS, **users),
        )


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--stores", default="postgres,memory", help="which (comma-separated)")
    parser.add_argument("--passwords", choices=sorted(PASSWORDS), default="cheap", help="hashing parameters")
    args = parser.parse_args()
    global HASHING
    HASHING = PASSWORDS[args.passwords]
    run.ensure_wrk()
    measures = {"postgres": postgres_cost, "memory": memory_cost}
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        postgres = run.start_postgres(directory)
        try:
            admin_url = postgres.get_uri()  # type: ignore[attr-defined]
            for store in args.stores.split(","):
                results[store] = measures[store](directory, admin_url, args.rounds, args.seconds)
        finally:
            postgres.cleanup()  # type: ignore[attr-defined]
    for store, found in results.items():
        ratio = found["with"]["rps"] / found["without"]["rps"]
        print(
            f"{store}: {found['with']['rps']:.0f} logins/s with the journal, "
            f"{found['without']['rps']:.0f} without: {ratio:.2f} "
            f"(p99 {found['with']['p99_ms']:.1f} ms / {found['without']['p99_ms']:.1f} ms)"
        )
    print("BENCH " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
