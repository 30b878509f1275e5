"""The fan-out ceiling: the least an aiohttp WebSocket server can do to send one message to everyone.

It holds every WebSocket that connects and, on each `POST /publish`, writes one pre-encoded text
frame (the ~200-byte event the benchmark publishes) straight to every socket's transport in one loop:
no session, no database, no per-stream bookkeeping. Run like server.py (one process, pinned to one
core, same event loop), it is the most a Python fan-out over aiohttp can deliver on that core; the
benchmark reports server.py's deliveries per second as a ratio of it.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

FRAME_KEY = web.AppKey("frame", bytes)
SOCKETS = web.AppKey("sockets", dict)


def text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame (RFC 6455, section 5.2); payloads here are under 64 KiB."""
    size = len(payload)
    header = bytes((0x81, size)) if size < 126 else bytes((0x81, 126)) + size.to_bytes(2, "big")
    return header + payload


async def hold(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(compress=False, heartbeat=None)
    await ws.prepare(request)
    transport = request.transport
    assert transport is not None
    request.app[SOCKETS][ws] = transport
    try:
        async for _message in ws:
            pass
    finally:
        request.app[SOCKETS].pop(ws, None)
    return ws


async def publish(request: web.Request) -> web.Response:
    frame = request.app[FRAME_KEY]
    sent = 0
    for transport in request.app[SOCKETS].values():
        transport.write(frame)
        sent += 1
    return web.json_response({"sent": sent})


async def count(request: web.Request) -> web.Response:
    return web.json_response({"sockets": len(request.app[SOCKETS])})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--message", required=True, help="the JSON text every socket gets")
    parser.add_argument("--uvloop", action="store_true")
    args = parser.parse_args()
    app = web.Application()
    app[FRAME_KEY] = text_frame(args.message.encode())
    app[SOCKETS] = {}
    app.router.add_get("/events", hold)
    app.router.add_post("/publish", publish)
    app.router.add_get("/count", count)
    loop = None
    if args.uvloop:
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, loop=loop, backlog=4096)


if __name__ == "__main__":
    main()
