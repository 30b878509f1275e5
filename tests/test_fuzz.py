"""Generated requests against a live server: schemathesis from openapi.yaml, Hypothesis on validation."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import server
from conftest import ROOT, ServerProcess, free_port, run_command


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
    case.call_and_validate(base_url=live_server)


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
