"""The peer: what a Python developer would pick for live events, python-socketio's AsyncServer on aiohttp.

Every client that connects (WebSocket transport, default namespace) joins; each `POST /publish`
calls `emit("message", data)` to everyone connected, the library's own broadcast, which encodes
the packet once and queues it to each client's writer task. Same process shape as server.py:
one process, pinned to one core, the same event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import socketio
from aiohttp import web

MESSAGE_KEY = web.AppKey("message", dict)
SERVER_KEY = web.AppKey("sio", socketio.AsyncServer)
ROOMS_KEY = web.AppKey("rooms", bool)


ROOM = "bench"  # bench/live_client.py --topics: its clients name their rooms in the query (topic=)


async def publish(request: web.Request) -> web.Response:
    sio = request.app[SERVER_KEY]
    room = ROOM if request.app[ROOMS_KEY] else None
    await sio.emit("message", request.app[MESSAGE_KEY], room=room)
    return web.json_response({"sent": True})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--message", required=True, help="the JSON object every client gets")
    parser.add_argument("--uvloop", action="store_true")
    parser.add_argument("--rooms", action="store_true", help="emit to the room 'bench' (clients join theirs)")
    args = parser.parse_args()
    # Pings every 25 s as by default; no monitor task is needed with the WebSocket transport.
    sio = socketio.AsyncServer(
        async_mode="aiohttp", cors_allowed_origins="*", logger=False, engineio_logger=False
    )
    app = web.Application()
    sio.attach(app)
    app[SERVER_KEY] = sio
    app[MESSAGE_KEY] = json.loads(args.message)
    app[ROOMS_KEY] = args.rooms

    @sio.on("connect")  # type: ignore[misc]
    async def join_rooms(sid: str, environ: dict[str, object], auth: object = None) -> None:
        query = str(environ.get("QUERY_STRING", ""))
        for part in query.split("&"):
            if part.startswith("topic="):
                await sio.enter_room(sid, part.removeprefix("topic="))

    app.router.add_post("/publish", publish)
    loop = uvloop_loop() if args.uvloop else asyncio.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop, backlog=4096)


def uvloop_loop() -> asyncio.AbstractEventLoop:
    import uvloop

    return uvloop.new_event_loop()


if __name__ == "__main__":
    main()
