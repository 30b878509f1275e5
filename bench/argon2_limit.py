"""The hashing limit: argon2 verifies per second of one hash, in a tight loop on N threads.

Run pinned to the server's core with the server's parameters and pool size: no login rate can
exceed this, so the benchmark reports logins/s as a ratio of it.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor

import argon2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--time-cost", type=int, required=True)
    parser.add_argument("--memory-cost", type=int, required=True)
    args = parser.parse_args()
    hasher = argon2.PasswordHasher(time_cost=args.time_cost, memory_cost=args.memory_cost, parallelism=1)
    stored = hasher.hash("password0")
    deadline = time.monotonic() + args.seconds

    def loop() -> int:
        done = 0
        while time.monotonic() < deadline:
            hasher.verify(stored, "password0")
            done += 1
        return done

    started = time.monotonic()
    with ThreadPoolExecutor(args.threads) as pool:
        total = sum(pool.map(lambda _: loop(), range(args.threads)))
    print(json.dumps({"verifies_per_second": total / (time.monotonic() - started)}))


if __name__ == "__main__":
    main()
