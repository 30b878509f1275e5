"""The demo page at GET /, driven in a real browser (Debian's chromium and chromedriver, via selenium).

Each test runs `python server.py` as a subprocess on the test database with the PostgreSQL session
store (so sessions outlive a restart), and a headless Chromium that uses the page as a person would:
typing into the login form, clicking, waiting for what the page shows. Events are published with
`python server.py publish`. Without a browser the tests are skipped with the reason; CI sets
REQUIRE_BROWSER=1, which turns that skip into a failure.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, Client, ServerProcess, free_port, run_command

PASSWORD = "wonderland"
WAIT = 20.0  # seconds the page gets to show something (a reconnect after a restart included)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:selenium")


def browser_paths() -> tuple[str, str]:
    """chromium and chromedriver, or a skip (a failure where REQUIRE_BROWSER is set)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    reason = "no browser: install Debian's chromium and chromium-driver packages to run the page tests"
    if os.environ.get("REQUIRE_BROWSER"):
        pytest.fail(f"REQUIRE_BROWSER is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the module; each test opens the page afresh."""
    chromium, driver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    chrome = webdriver.Chrome(service=Service(driver), options=options)
    yield chrome
    chrome.quit()


class Site:
    """A real server on the test database, the page open in the browser, and the commands beside it."""

    def __init__(self, browser: Any, tmp_path: Path, database_url: str, start: Callable[..., ServerProcess]):
        self.browser, self.start_process = browser, start
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"DATABASE_URL": database_url}
        self.config = tmp_path / "config.json"
        config = {
            "webserver": {"host": "127.0.0.1", "port": self.port},
            "sessions": {"store": "postgres"},
            "passwords": {"time_cost": 1, "memory_cost": 256, "parallelism": 1},
        }
        self.config.write_text(json.dumps(config))
        self.server: ServerProcess | None = None

    def command(self, *args: str, stdin: str = "") -> str:
        done = run_command([*args, "--config", str(self.config)], stdin=stdin, env=self.env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def start(self) -> None:
        self.server = self.start_process(["--config", str(self.config)], env=self.env)
        self.server.wait_until_serving()

    def stop(self) -> None:
        assert self.server is not None
        assert self.server.stop() == 0

    def publish(self, data: object) -> None:
        self.command("publish", json.dumps(data))

    def open_page(self) -> None:
        self.browser.get(self.url + "/")
        self.browser.execute_script("sessionStorage.clear()")
        self.browser.get(self.url + "/")

    def log_in(self, username: str = "alice", password: str = PASSWORD) -> None:
        from selenium.webdriver.common.by import By

        self.open_page()
        self.browser.find_element(By.ID, "username").send_keys(username)
        self.browser.find_element(By.ID, "password").send_keys(password)
        self.browser.find_element(By.ID, "login-button").click()
        self.wait_for(lambda: self.text("who") == username, "the page to show who is logged in")

    def log_in_live(self) -> None:
        """Log in and wait until the page's event stream is open."""
        self.log_in()
        self.wait_for(lambda: self.text("status") == "Live.", "the event stream to be live")

    def text(self, element_id: str) -> str:
        from selenium.webdriver.common.by import By

        element = self.browser.find_element(By.ID, element_id)
        return str(element.text) if element.is_displayed() else ""

    def events(self) -> list[Any]:
        """The data of each event the page lists, in order."""
        from selenium.webdriver.common.by import By

        items = self.browser.find_elements(By.CSS_SELECTOR, "#events li .data")
        return [json.loads(item.text) for item in items]

    def wait_for(self, condition: Callable[[], bool], what: str, seconds: float = WAIT) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            WebDriverWait(self.browser, seconds, poll_frequency=0.1).until(lambda _: condition())
        except Exception as exc:
            shown = self.browser.find_element("tag name", "main").text
            raise AssertionError(f"waited {seconds} s for {what}; the page says: {shown}") from exc

    def open_stream(self, session_id: str) -> Any:
        """GET /events as Server-Sent Events from outside the browser, once its headers arrived."""
        request = urllib.request.Request(self.url + "/events", headers={"Authorization": session_id})
        response = urllib.request.urlopen(request, timeout=WAIT)
        assert response.headers["Content-Type"] == "text/event-stream"
        return response

    def http(self, method: str, path: str, session_id: str | None = None, body: object = None) -> Any:
        """A request from outside the browser, as curl would send it."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if session_id:
            request.add_header("Authorization", session_id)
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


@pytest.fixture
def site(
    browser: Any, tmp_path: Path, database_url: str, db: object, start_server: Callable[..., ServerProcess]
) -> Site:
    found = Site(browser, tmp_path, database_url, start_server)
    found.command("adduser", "alice", stdin=PASSWORD + "\n")
    found.start()
    return found


async def test_get_slash_serves_the_page_as_html_that_loads_nothing_from_elsewhere(client: Client) -> None:
    response = await client.get("/")
    assert response.status == 200
    assert response.content_type == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in policy and "connect-src 'self'" in policy
    page = await response.text()
    assert page == (ROOT / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # no outside scripts, styles or fonts


def test_logging_in_through_the_form_shows_who_and_when_the_session_expires(site: Site) -> None:
    site.log_in()
    assert "alice" in site.text("who")
    session_id = site.browser.execute_script("return sessionStorage.getItem('session_id')")
    shown = datetime.datetime.fromisoformat(
        site.browser.find_element("id", "expires").get_attribute("datetime")
    )
    answer = site.http("GET", "/user", session_id)  # a use: it renews the session a moment later
    assert answer["username"] == "alice"
    renewed_by = datetime.datetime.fromisoformat(answer["expires_at"]) - shown
    assert datetime.timedelta(0) <= renewed_by < datetime.timedelta(seconds=10)
    assert session_id not in site.browser.current_url


def test_a_wrong_password_shows_the_servers_message(site: Site) -> None:
    site.open_page()
    site.browser.find_element("id", "username").send_keys("alice")
    site.browser.find_element("id", "password").send_keys("not the password")
    site.browser.find_element("id", "login-button").click()
    site.wait_for(lambda: site.text("login-error") == "Wrong username or password.", "the login error")


def test_an_event_published_from_the_command_line_appears_on_the_page(site: Site) -> None:
    site.log_in_live()
    site.publish({"greeting": "hello from the command line"})
    site.wait_for(lambda: site.events() == [{"greeting": "hello from the command line"}], "the event")


def test_the_stream_resumes_without_loss_or_repeat_after_the_server_restarts(site: Site) -> None:
    site.log_in_live()
    site.publish({"n": 1})
    site.wait_for(lambda: site.events() == [{"n": 1}], "the first event")
    site.stop()
    site.wait_for(lambda: "reconnecting" in site.text("status"), "the page to notice the drop")
    site.publish({"n": 2})  # while no server runs: kept in the table
    site.start()
    site.publish({"n": 3})
    site.wait_for(lambda: site.events() == [{"n": 1}, {"n": 2}, {"n": 3}], "every event once, in order")
    assert site.text("status") == "Live."


def test_logging_out_everywhere_from_outside_shows_the_session_ended_reason(site: Site) -> None:
    site.log_in_live()
    other = site.http("POST", "/user", body={"username": "alice", "password": PASSWORD})["session_id"]
    assert site.http("DELETE", "/user?all=true", other) == {"logged_out": 2}
    site.wait_for(lambda: site.text("ended") == "Session ended: logout.", "the session_ended reason")
    assert site.browser.find_element("id", "login-form").is_displayed()
    assert site.browser.execute_script("return sessionStorage.getItem('session_id')") is None


def test_the_logout_button_ends_the_session_on_the_server(site: Site) -> None:
    site.log_in()
    session_id = site.browser.execute_script("return sessionStorage.getItem('session_id')")
    site.browser.find_element("id", "logout-button").click()
    site.wait_for(lambda: site.browser.find_element("id", "login-form").is_displayed(), "the login form")
    with pytest.raises(urllib.error.HTTPError) as refused:
        site.http("GET", "/user", session_id)
    refused.value.close()
    assert refused.value.code == 401


def test_your_sessions_lists_each_device_and_its_end_button_logs_that_one_out(site: Site) -> None:
    from selenium.webdriver.common.by import By

    site.log_in_live()
    other = site.http("POST", "/user", body={"username": "alice", "password": PASSWORD})["session_id"]
    other_stream = site.open_stream(other)

    def rows() -> list[str]:
        """Ask the page to refresh its list; the rows' text as it shows them now."""
        site.browser.find_element(By.ID, "sessions-refresh").click()
        script = "return [...document.querySelectorAll('#sessions li')].map((li) => li.innerText)"
        return list(site.browser.execute_script(script))

    # This page's session (its WebSocket open), and the one logged in from outside (urllib's
    # User-Agent) with an SSE stream open.
    site.wait_for(
        lambda: (
            [("this page" in row, "Python-urllib" in row, "1 live stream" in row) for row in rows()]
            == [(True, False, True), (False, True, True)]
        ),
        "both sessions listed with their streams, this page's marked",
    )
    # Clicked from the page's own script: a refresh still in flight may replace the row meanwhile.
    site.browser.execute_script("document.querySelector('#sessions li:nth-child(2) button.end').click()")
    site.wait_for(lambda: ["this page" in row for row in rows()] == [True], "only this page's session")
    ended = other_stream.read()  # the server ends the other session's stream: read to its end
    other_stream.close()
    assert ended.endswith(b'event: session_ended\ndata: {"type": "session_ended", "reason": "logout"}\n\n')
    with pytest.raises(urllib.error.HTTPError) as refused:
        site.http("GET", "/user", other)
    refused.value.close()
    assert refused.value.code == 401


def test_ending_this_pages_own_session_from_the_list_signs_the_page_out(site: Site) -> None:
    from selenium.webdriver.common.by import By

    site.log_in()
    session_id = site.browser.execute_script("return sessionStorage.getItem('session_id')")
    site.wait_for(lambda: len(site.browser.find_elements(By.CSS_SELECTOR, "#sessions li")) == 1, "the list")
    site.browser.execute_script("document.querySelector('#sessions li button.end').click()")
    site.wait_for(lambda: site.text("ended") == "Session ended: logout.", "the page to say the session ended")
    assert site.browser.find_element(By.ID, "login-form").is_displayed()
    assert not site.browser.find_element(By.ID, "sessions-section").is_displayed()
    with pytest.raises(urllib.error.HTTPError) as refused:
        site.http("GET", "/user", session_id)
    refused.value.close()
    assert refused.value.code == 401
