"""GET /topics/{topic}/presence of a topic with 10,000 users online, over real HTTP.

    DATABASE_URL=postgresql://... python bench/presence_get.py [--users 10000] [--requests 50]

One server (server.py's app in this process, on a real port) hears another process announce
10,000 users on the lobby, as a process does over PostgreSQL (the same payloads, given to its
Presence as its bus would), then a client times GET /topics/lobby/presence. Prints the median and
p99 in ms, and how long the 10,000 announcements took to take in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import server

RULE = {"pattern": "lobby", "subscribe": "anyone", "publish": "anyone", "presence": True}


async def main(users: int, requests: int) -> None:
    config = server.Config(
        webserver=server.WebServerConfig(host="127.0.0.1", port=0),
        db=server.DatabaseConfig(dsn=os.environ["DATABASE_URL"]),
        passwords=server.PasswordConfig(time_cost=1, memory_cost=8, parallelism=1),
        events=server.EventsConfig(topics=server.topic_rules([RULE])),
    )
    app = await server.WebServer(config).initializer()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        engine = app[server.db_engine]
        async with server.connection(engine) as conn:
            await conn.execute("DELETE FROM users WHERE username = 'bench'")
        await server.insert_user(engine, "bench", await app[server.passwords].hash("password1"))
        items = [["lobby", 1_000_000 + n, f"user{n}", 1] for n in range(users)]
        backend = app[server.event_bus].backend
        assert backend is not None
        # Named as a live bus connection (this process's own), so the check for dead ones keeps it.
        head = {"process": "elsewhere", "backend": server.backend_name(*backend)}
        began = time.perf_counter()
        for payload in server.notify_chunks(head, items):
            app[server.presence].heard(payload)
        taken_in = time.perf_counter() - began
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}"
            async with http.post(f"{url}/user", json={"username": "bench", "password": "password1"}) as r:
                session = (await r.json())["session_id"]
            times = []
            for _ in range(requests):
                began = time.perf_counter()
                async with http.get(f"{url}/topics/lobby/presence", headers={"Authorization": session}) as r:
                    body = await r.json()
                times.append((time.perf_counter() - began) * 1000)
            assert len(body["users"]) == users, len(body["users"])
        times.sort()
        p99 = times[min(len(times) - 1, int(len(times) * 0.99))]
        print(
            json.dumps(
                {
                    "users": users,
                    "get_median_ms": round(statistics.median(times), 1),
                    "get_p99_ms": round(p99, 1),
                    "announcements_taken_in_ms": round(taken_in * 1000, 1),
                }
            )
        )
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50)
    options = parser.parse_args()
    asyncio.run(main(options.users, options.requests))
