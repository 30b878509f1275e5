"""Generated requests against a live server: schemathesis from openapi.yaml, Hypothesis on validation."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import server
from conftest import (
    REDIS_PREFIX,
    REDIS_URL,
    ROOT,
    STORE_KINDS,
    ServerProcess,
    clear_redis,
    free_port,
    raw_request,
    redis_or_skip,
    run_command,
)


@pytest.fixture(scope="module")
def live_server(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `python server.py` on the test database, with one user, alice."""
    directory = tmp_path_factory.mktemp("live")
    config = directory / "config.json"
    port = free_port()
    config.write_text(
        json.dumps(
            {
                "webserver": {"host": "127.0.0.1", "port": port},
                "passwords": {"time_cost": 1, "memory_cost": 256, "parallelism": 1},
            }
        )
    )
    env = {"DATABASE_URL": database_url}
    run_command(["deluser", "alice", "--config", str(config)], env=env)
    assert run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env).returncode == 0
    process = ServerProcess(["--config", str(config)], directory / "server.log", env)
    try:
        process.wait_until_serving()
        yield f"http://127.0.0.1:{port}"
        assert process.stop() == 0
        assert "Traceback" not in process.log, process.log
    finally:
        process.close()


# The spec is read from the file; the requests go to the live server given at call time.
api = schemathesis.openapi.from_path(ROOT / "openapi.yaml")


@api.parametrize()
@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_generated_request_conforms_to_the_spec(live_server: str, case: schemathesis.Case) -> None:
    # GET /events with a valid session is a stream that never ends; no generated case has one, so
    # /events answers 400 (last_event_id) or 401 at once. The timeout makes a stream a failure, not a hang.
    case.call_and_validate(base_url=live_server, timeout=10)


# The same for your-sessions operations, this time as a logged-in user: every case runs on a fresh
# session of alice's, so the listing answers 200 and ids are looked up among her sessions. (Not
# /events: with a valid session it answers a stream that stays open until its session ends.)
your_sessions = api.include(path_regex="^/user/sessions")


@your_sessions.parametrize()
@settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_with_a_valid_session_conform_to_the_spec(
    live_server: str, case: schemathesis.Case
) -> None:
    credentials = {"username": "alice", "password": "wonderland"}
    session_id = requests.post(f"{live_server}/user", json=credentials, timeout=10).json()["session_id"]
    response = case.call_and_validate(base_url=live_server, headers={"Authorization": session_id})
    # Generated cases include other methods (405); never a 401: the session stays valid.
    assert response.status_code in (200, 404, 405), response.text
    requests.delete(f"{live_server}/user", headers={"Authorization": session_id}, timeout=10)


def test_the_spec_is_served_as_written(live_server: str) -> None:
    response = requests.get(f"{live_server}/openapi.yaml", timeout=5)
    assert response.status_code == 200
    assert response.text == (ROOT / "openapi.yaml").read_text()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(), children, max_size=3),
    max_leaves=8,
)
credential_objects = st.fixed_dictionaries(
    {}, optional={"username": json_values | st.text(max_size=1100), "password": json_values}
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(body=json_values | credential_objects)
def test_any_json_body_is_either_accepted_as_credentials_or_refused_with_422(
    live_server: str, body: object
) -> None:
    response = requests.post(f"{live_server}/user", data=json.dumps(body).encode(), timeout=10)
    valid = isinstance(body, dict) and all(
        _valid_credential(body.get(key)) for key in ("username", "password")
    )
    if valid:
        assert response.status_code in (401, 429), response.text
    else:
        assert response.status_code == 422, response.text
        assert response.json()["error"] == "invalid_credentials_format"


def _valid_credential(value: object) -> bool:
    try:
        server.check_credential(value, "value")
    except ValueError:
        return False
    return True


@settings(max_examples=300, derandomize=True, deadline=None)
@given(value=st.one_of(st.text(), st.integers(), st.none(), st.lists(st.text(), max_size=2)))
def test_check_credential_accepts_exactly_the_contracts_strings(value: object) -> None:
    expected = (
        isinstance(value, str)
        and 0 < len(value) <= 1024
        and "\x00" not in value
        and not any(0xD800 <= ord(char) <= 0xDFFF for char in value)
    )
    assert _valid_credential(value) == expected


@settings(max_examples=200, derandomize=True, deadline=None)
@given(body=st.binary(max_size=200))
def test_arbitrary_bytes_never_get_a_server_error(live_server: str, body: bytes) -> None:
    response = requests.post(f"{live_server}/user", data=body, timeout=10)
    assert response.status_code in (400, 401, 422, 429), response.text
    assert "error" in response.json()


async def test_the_spec_lists_every_route_the_server_has(config: server.Config) -> None:
    spec = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    documented = {
        (path, method.upper()) for path, operations in spec["paths"].items() for method in operations
    }
    app = await server.WebServer(config).initializer()
    served = {
        (resource.canonical, route.method)
        for resource in app.router.resources()
        for route in resource
        if route.method != "HEAD" and resource.canonical != "/openapi.yaml"
    }
    assert documented == served


@pytest.fixture(scope="module")
def store_servers(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, int]]:
    """A live `python server.py` per session store (name -> port), each behind a trusted proxy
    (127.0.0.1, so X-Forwarded-For is read), all on the test database, which has alice."""
    redis_or_skip()
    clear_redis()
    directory = tmp_path_factory.mktemp("stores")
    env = {"DATABASE_URL": database_url}
    processes: dict[str, tuple[ServerProcess, int]] = {}
    try:
        for store in STORE_KINDS:
            port = free_port()
            config = directory / f"{store}.json"
            config.write_text(
                json.dumps(
                    {
                        "webserver": {"host": "127.0.0.1", "port": port, "trusted_proxies": ["127.0.0.1"]},
                        "sessions": {"store": store, "redis_url": REDIS_URL, "redis_prefix": REDIS_PREFIX},
                        "login": {"max_failures": 100_000},
                        "passwords": {"time_cost": 1, "memory_cost": 256, "parallelism": 1},
                    }
                )
            )
            if not processes:
                run_command(["deluser", "alice", "--config", str(config)], env=env)
                added = run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env)
                assert added.returncode == 0, added.stderr
            processes[store] = (
                ServerProcess(["--config", str(config)], directory / f"{store}.log", env),
                port,
            )
        for process, _ in processes.values():
            process.wait_until_serving()
        yield {store: port for store, (_, port) in processes.items()}
        for process, _ in processes.values():
            assert process.stop() == 0
            assert "Traceback" not in process.log, process.log
    finally:
        for process, _ in processes.values():
            process.close()
        clear_redis()


def answer_of_every_store(ports: dict[str, int], head: bytes, body: bytes = b"") -> tuple[int, str]:
    """Send one request to each store's server; all must answer alike: (status, error or key)."""
    answers = {}
    for store, port in ports.items():
        response = raw_request(port, head, body)
        assert response.status < 500, (store, response)
        assert response.headers["content-type"].startswith("application/json"), (store, response)
        data = response.json()
        answers[store] = (response.status, data.get("error") or ",".join(sorted(data)))
    assert len(set(answers.values())) == 1, answers
    return next(iter(answers.values()))


# Bytes HTTP allows in a header value (RFC 9110 section 5.5: visible ASCII, space, tab, and
# obs-text, bytes 0x80-0xFF that are no UTF-8 of their own): any of them may come in.
FIELD_BYTES = [bytes([b]) for b in (9, *range(0x20, 0x7F), *range(0x80, 0x100))]
field_values = st.lists(st.sampled_from(FIELD_BYTES), max_size=40).map(b"".join)
text_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cc", "Cs")), max_size=20).map(
    str.encode
)
CREDENTIALS = json.dumps({"username": "alice", "password": "wonderland"}).encode()
WRONG_PASSWORD = json.dumps({"username": "alice", "password": "not-wonderland"}).encode()


def post_user(header: bytes, value: bytes, body: bytes) -> tuple[bytes, bytes]:
    head = b"POST /user HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: %d\r\n%s: %s" % (
        len(body),
        header,
        value,
    )
    return head, body


PROPERTY_SETTINGS = settings(max_examples=150, derandomize=True, deadline=None)


@PROPERTY_SETTINGS
@given(
    value=st.tuples(
        st.sampled_from([b"", b"Bearer ", b"bearer ", b"Basic "]), field_values | text_values
    ).map(b"".join)
    | st.from_regex(r"\A(Bearer )?[A-Za-z0-9_-]{1,200}\Z").map(str.encode),
    method=st.sampled_from([b"GET", b"DELETE"]),
)
def test_any_authorization_bytes_get_the_same_401_from_every_store(
    store_servers: dict[str, int], value: bytes, method: bytes
) -> None:
    head = method + b" /user HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: " + value
    assert answer_of_every_store(store_servers, head) == (401, "invalid_session")


@PROPERTY_SETTINGS
@given(
    value=st.tuples(
        st.sampled_from([b"", b"session=", b"a=b; session=", b'session="']), field_values | text_values
    ).map(b"".join),
    method=st.sampled_from([b"GET", b"DELETE"]),
)
def test_any_cookie_bytes_get_the_same_401_from_every_store(
    store_servers: dict[str, int], value: bytes, method: bytes
) -> None:
    # From the service's own origin (localhost), so a DELETE passes the origin rule and meets the cookie.
    head = (
        method + b" /user HTTP/1.1\r\nHost: localhost\r\nOrigin: http://localhost\r\nConnection: close\r\n"
        b"Cookie: " + value
    )
    assert answer_of_every_store(store_servers, head) == (401, "invalid_session")


CODINGS = st.sampled_from([b"gzip", b"deflate", b"identity", b"br", b"zstd", b"compress", b"x-gzip"])


@PROPERTY_SETTINGS
@given(
    value=CODINGS.flatmap(lambda c: st.sampled_from([c, c.upper(), c.title(), b" " + c + b" , gzip"]))
    | field_values
    | text_values
)
def test_any_content_encoding_gets_the_same_json_answer_from_every_store(
    store_servers: dict[str, int], value: bytes
) -> None:
    # aiohttp's parser refuses a coding it knows but cannot decode, in plain text (tested elsewhere).
    coding = value.strip().lower()
    assume(coding not in (b"br", b"zstd") or coding.decode() in server.CONTENT_CODINGS)
    status, _ = answer_of_every_store(store_servers, *post_user(b"Content-Encoding", value, CREDENTIALS))
    assert status in (200, 400, 415)


@PROPERTY_SETTINGS
@given(
    value=st.sampled_from(
        [b"application/json", b"text/plain; charset=utf-8", b"application/x-www-form-urlencoded"]
    )
    | field_values
    | text_values
)
def test_any_content_type_is_ignored_by_every_store(store_servers: dict[str, int], value: bytes) -> None:
    assert answer_of_every_store(store_servers, *post_user(b"Content-Type", value, CREDENTIALS)) == (
        200,
        "session_id",
    )


hops = (
    st.ip_addresses().map(lambda ip: str(ip).encode())
    | st.ip_addresses(v=6)
    .map(lambda ip: str(ip).encode())
    .flatmap(lambda ip: field_values.map(lambda z: ip + b"%" + z))
    | field_values
    | text_values
)


@PROPERTY_SETTINGS
@given(value=st.lists(hops, min_size=1, max_size=4).map(b", ".join), right=st.booleans())
def test_any_forwarded_for_from_a_trusted_proxy_gets_the_same_answer_from_every_store(
    store_servers: dict[str, int], value: bytes, right: bool
) -> None:
    body = CREDENTIALS if right else WRONG_PASSWORD
    expected = (200, "session_id") if right else (401, "invalid_credentials")
    assert answer_of_every_store(store_servers, *post_user(b"X-Forwarded-For", value, body)) == expected
