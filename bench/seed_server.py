"""The article's login, reproduced as the baseline: the password compared in SQL, no hashing.

Same libraries as server.py (aiohttp, aiopg.sa with a raw SQL string), same two dictionaries,
a uuid4 session id. Written here from the article's description, for measurement only: it stores
passwords in plain text and must never be used for anything else.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import AsyncIterator

import aiopg.sa
from aiohttp import web

VERIFY = "SELECT password = %s AS verified FROM seed_users WHERE username = %s"


class SeedServer:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.session_to_user: dict[str, str] = {}
        self.user_to_session: dict[str, str] = {}

    async def engine(self, app: web.Application) -> AsyncIterator[None]:
        async with aiopg.sa.create_engine(self.dsn) as engine:
            self.db = engine
            yield

    async def login(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            raise web.HTTPBadRequest() from None
        if "username" not in data or "password" not in data:
            raise web.HTTPUnprocessableEntity()
        row = None
        async with self.db.acquire() as conn:
            async for found in conn.execute(VERIFY, (data["password"], data["username"])):
                row = dict(found)
        if row is None or not row["verified"]:
            raise web.HTTPUnauthorized()
        session_id = str(uuid.uuid4())
        self.user_to_session[data["username"]] = session_id
        self.session_to_user[session_id] = data["username"]
        return web.Response(text=json.dumps({"session_id": session_id}), content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dsn", required=True)
    args = parser.parse_args()
    seed = SeedServer(args.dsn)
    app = web.Application()
    app.cleanup_ctx.append(seed.engine)
    app.router.add_post("/user", seed.login)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
