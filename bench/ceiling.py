"""The ceiling: the smallest aiohttp app that answers GET with a small JSON body from memory.

Run the same way as server.py (one process, pinned to one core), it is the most any handler
can serve here; the benchmark reports server.py's GET and DELETE /user as ratios of it.
"""

from __future__ import annotations

import argparse

from aiohttp import web

BODY = {"username": "user0", "expires_at": "2026-11-26T12:00:00Z"}


async def answer(request: web.Request) -> web.Response:
    return web.json_response(BODY)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    app = web.Application()
    app.router.add_get("/user", answer)
    loop = None
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
