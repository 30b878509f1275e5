"""Every malformed request gets the contract's 4xx with a JSON error body, never a 500,
and changes nothing: the server goes on serving and existing sessions stay valid."""

from __future__ import annotations

import json

import pytest

from conftest import Client, add_user, log_in

LONG = "x" * 1025


def credentials(username: object = "alice", password: object = "wonderland") -> bytes:
    return json.dumps({"username": username, "password": password}).encode()


LOGIN_BODIES = [
    pytest.param(b"not json", 400, "bad_json", id="not-json"),
    pytest.param(b"", 400, "bad_json", id="empty-body"),
    pytest.param(b'{"username": "alice", "password": "wonderland"', 400, "bad_json", id="truncated-json"),
    pytest.param(b'{"username": "\xff\xfe", "password": "x"}', 400, "bad_json", id="not-utf8"),
    pytest.param(b"[" * 10000 + b"]" * 10000, 413, "body_too_large", id="deep-nesting-too-large"),
    pytest.param(b"[" * 5000 + b"]" * 5000, 400, "bad_json", id="deep-nesting"),
    pytest.param(b"1" * 5000, 400, "bad_json", id="integer-too-long-to-parse"),
    pytest.param(b"null", 422, "invalid_credentials_format", id="json-null"),
    pytest.param(b"5", 422, "invalid_credentials_format", id="json-number"),
    pytest.param(b'"str"', 422, "invalid_credentials_format", id="json-string"),
    pytest.param(b"[]", 422, "invalid_credentials_format", id="json-array"),
    pytest.param(b"true", 422, "invalid_credentials_format", id="json-true"),
    pytest.param(b"{}", 422, "invalid_credentials_format", id="empty-object"),
    pytest.param(b'{"password": "wonderland"}', 422, "invalid_credentials_format", id="no-username"),
    pytest.param(b'{"username": "alice"}', 422, "invalid_credentials_format", id="no-password"),
    pytest.param(credentials(username=5), 422, "invalid_credentials_format", id="username-number"),
    pytest.param(credentials(password=None), 422, "invalid_credentials_format", id="password-null"),
    pytest.param(credentials(username=["alice"]), 422, "invalid_credentials_format", id="username-list"),
    pytest.param(credentials(password={"a": 1}), 422, "invalid_credentials_format", id="password-object"),
    pytest.param(credentials(password=True), 422, "invalid_credentials_format", id="password-bool"),
    pytest.param(credentials(username=""), 422, "invalid_credentials_format", id="empty-username"),
    pytest.param(credentials(password=""), 422, "invalid_credentials_format", id="empty-password"),
    pytest.param(credentials(username=LONG), 422, "invalid_credentials_format", id="username-too-long"),
    pytest.param(credentials(password=LONG), 422, "invalid_credentials_format", id="password-too-long"),
    pytest.param(credentials(username="al\x00ice"), 422, "invalid_credentials_format", id="nul-in-username"),
    pytest.param(credentials(password="wonder\x00"), 422, "invalid_credentials_format", id="nul-in-password"),
    pytest.param(
        b'{"username": "\\ud800", "password": "x"}', 422, "invalid_credentials_format", id="lone-surrogate"
    ),
    pytest.param(b"{" + b" " * 17000 + b"}", 413, "body_too_large", id="body-over-16-KiB"),
]


@pytest.mark.parametrize(("body", "status", "error"), LOGIN_BODIES)
async def test_bad_login_body_gets_a_clear_4xx(client: Client, body: bytes, status: int, error: str) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    response = await client.post("/user", data=body)
    assert response.status == status
    assert response.content_type == "application/json"
    answer = await response.json()
    assert answer["error"] == error and answer["message"]
    # Nothing was lost: the old session still works and a good login still succeeds.
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200
    await log_in(client, "alice", "wonderland")


async def test_credentials_of_exactly_1024_characters_are_accepted(client: Client) -> None:
    name, password = "n" * 1024, "p" * 1024
    await add_user(client.app, name, password)
    await log_in(client, name, password)


async def test_a_body_of_exactly_16_kib_is_read(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    body = credentials()
    body = body[:-1] + b" " * (16 * 1024 - len(body)) + b"}"
    assert len(body) == 16 * 1024
    response = await client.post("/user", data=body)
    assert response.status == 200


BAD_AUTHORIZATION = [
    pytest.param(None, id="missing"),
    pytest.param("", id="empty"),
    pytest.param("   ", id="blank"),
    pytest.param("Bearer", id="bearer-alone"),
    pytest.param("Bearer ", id="bearer-with-nothing-after"),
    pytest.param("unknown-session-id", id="unknown"),
    pytest.param("Bearer unknown-session-id", id="bearer-unknown"),
    pytest.param("Basic YWxpY2U6d29uZGVybGFuZA==", id="basic-scheme"),
    pytest.param("x" * 8000, id="absurdly-long"),
    pytest.param("Bearer " + "x" * 8000, id="bearer-absurdly-long"),
]


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("header", BAD_AUTHORIZATION)
async def test_bad_authorization_is_401(client: Client, method: str, header: str | None) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    headers = {} if header is None else {"Authorization": header}
    response = await client.request(method, "/user", headers=headers)
    assert response.status == 401
    assert (await response.json())["error"] == "invalid_session"
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200


async def test_session_id_with_extra_characters_is_not_accepted(client: Client) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    for near_miss in (session_id + "x", session_id[:-1], session_id.upper()):
        response = await client.get("/user", headers={"Authorization": near_miss})
        assert response.status == 401


@pytest.mark.parametrize("value", ["yes", "1", "TRUE", ""])
async def test_logout_all_with_a_value_other_than_true_or_false_is_400(client: Client, value: str) -> None:
    await add_user(client.app, "alice", "wonderland")
    session_id = await log_in(client, "alice", "wonderland")
    response = await client.delete(f"/user?all={value}", headers={"Authorization": session_id})
    assert response.status == 400
    assert (await response.json())["error"] == "bad_request"
    assert (await client.get("/user", headers={"Authorization": session_id})).status == 200


@pytest.mark.parametrize("path", ["/", "/users", "/user/", "/user/alice", "/health/x", "/%00"])
async def test_unknown_path_is_a_json_404(client: Client, path: str) -> None:
    response = await client.get(path)
    assert response.status == 404
    assert (await response.json())["error"] == "not_found"


@pytest.mark.parametrize(("method", "path"), [("PUT", "/user"), ("PATCH", "/user"), ("POST", "/health")])
async def test_other_method_is_a_json_405(client: Client, method: str, path: str) -> None:
    response = await client.request(method, path)
    assert response.status == 405
    assert (await response.json())["error"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]
