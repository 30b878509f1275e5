"""The demo page at GET /, driven in a real browser (Debian's chromium and chromedriver, via selenium).

Each test runs `python server.py` as a subprocess on the test database with the PostgreSQL session
store (so sessions outlive a restart), and a headless Chromium that uses the page as a person would:
typing into the login form, clicking, waiting for what the page shows. Events are published with
`python server.py publish`. The page logs in in cookie mode, so the tests read the session id the
way only the browser itself can: from its cookie jar, through WebDriver. Without a browser the
tests are skipped with the reason; CI sets REQUIRE_BROWSER=1, which turns that skip into a failure.
"""

from __future__ import annotations

import copy
import datetime
import http.server
import json
import os
import shutil
import threading
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

    def __init__(
        self,
        browser: Any,
        tmp_path: Path,
        database_url: str,
        start: Callable[..., ServerProcess],
        origins: list[str] | None = None,
        topics: list[dict[str, object]] | None = None,
    ):
        self.browser, self.start_process = browser, start
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"DATABASE_URL": database_url}
        self.config = tmp_path / "config.json"
        config = {
            "webserver": {"host": "127.0.0.1", "port": self.port, "origins": origins or []},
            "sessions": {"store": "postgres"},
            "passwords": {"time_cost": 1, "memory_cost": 256, "parallelism": 1},
            "events": {"topics": topics or []},
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
        self.browser.delete_all_cookies()  # cookies ignore ports: another test's server set them
        self.browser.execute_script("sessionStorage.clear(); localStorage.clear()")
        self.browser.get(self.url + "/")

    def session_id(self) -> str | None:
        """The session cookie, as the browser holds it (WebDriver sees HttpOnly cookies; pages do not)."""
        cookie = self.browser.get_cookie("session")
        return None if cookie is None else str(cookie["value"])

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

    def open_stream(self, session_id: str | None) -> Any:
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
def browser_factory() -> Iterator[Callable[[], Any]]:
    """More headless Chromiums, each with cookies of its own (another person at another computer)."""
    chromium, driver = browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    started: list[Any] = []

    def start() -> Any:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
            options.add_argument(argument)
        started.append(webdriver.Chrome(service=Service(driver), options=options))
        return started[-1]

    yield start
    for chrome in started:
        chrome.quit()


@pytest.fixture
def site(
    browser: Any, tmp_path: Path, database_url: str, db: object, start_server: Callable[..., ServerProcess]
) -> Site:
    found = Site(browser, tmp_path, database_url, start_server)
    found.command("adduser", "alice", stdin=PASSWORD + "\n")
    found.start()
    return found


class OtherOrigin:
    """Another local origin (another port of 127.0.0.1): a plain HTTP server of its own that
    serves one page. For the browser it is another origin, but the same site: SameSite=Strict lets
    the session cookie go with its requests to the service, so only the origin rules stop them."""

    def __init__(self) -> None:
        self.page = ""
        pages = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = pages.page.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def other_origin() -> Iterator[OtherOrigin]:
    found = OtherOrigin()
    yield found
    found.close()


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
    session_id = site.session_id()
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
    site.wait_for(lambda: site.session_id() is None, "the page to have the stale cookie cleared")


def test_the_logout_button_ends_the_session_on_the_server(site: Site) -> None:
    site.log_in()
    session_id = site.session_id()
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
    session_id = site.session_id()
    site.wait_for(lambda: len(site.browser.find_elements(By.CSS_SELECTOR, "#sessions li")) == 1, "the list")
    site.browser.execute_script("document.querySelector('#sessions li button.end').click()")
    site.wait_for(lambda: site.text("ended") == "Session ended: logout.", "the page to say the session ended")
    assert site.browser.find_element(By.ID, "login-form").is_displayed()
    assert not site.browser.find_element(By.ID, "sessions-section").is_displayed()
    with pytest.raises(urllib.error.HTTPError) as refused:
        site.http("GET", "/user", session_id)
    refused.value.close()
    assert refused.value.code == 401


# ---------------------------------------------------------------------------
# The session cookie in the browser
# ---------------------------------------------------------------------------


def test_the_page_holds_no_session_id_anywhere_a_script_can_read(site: Site) -> None:
    site.log_in_live()
    session_id = site.session_id()
    assert session_id and site.http("GET", "/user", session_id)["username"] == "alice"
    cookie = site.browser.get_cookie("session")
    assert cookie["httpOnly"] is True and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    readable = site.browser.execute_script(
        """return {
            cookie: document.cookie,
            session: Object.entries(sessionStorage),
            local: Object.entries(localStorage),
            html: document.documentElement.outerHTML,
            url: location.href,
        }"""
    )
    assert readable["cookie"] == ""
    assert readable["local"] == []
    assert all(session_id not in value for _, value in readable["session"])
    assert session_id not in readable["html"] and session_id not in readable["url"]
    # And it works: a reload is still signed in, an event arrives, the logout button ends it.
    site.browser.refresh()
    site.wait_for(lambda: site.text("status") == "Live.", "the stream to be live again after a reload")
    site.publish({"after": "reload"})
    site.wait_for(lambda: site.events() == [{"after": "reload"}], "the event after the reload")
    site.browser.find_element("id", "logout-button").click()
    site.wait_for(lambda: site.session_id() is None, "the logout to clear the cookie")
    with pytest.raises(urllib.error.HTTPError) as refused:
        site.http("GET", "/user", session_id)
    refused.value.close()
    assert refused.value.code == 401


def test_a_native_event_source_with_the_cookie_receives_a_published_event(site: Site) -> None:
    site.log_in()
    site.browser.execute_script(
        """window.received = [];
        window.source = new EventSource("/events");
        window.source.onopen = () => window.received.push("open");
        window.source.onmessage = (message) => window.received.push(JSON.parse(message.data).data);"""
    )
    site.wait_for(lambda: "open" in site.browser.execute_script("return window.received"), "it to open")
    site.publish({"to": "event source"})
    site.wait_for(
        lambda: {"to": "event source"} in site.browser.execute_script("return window.received"),
        "the native EventSource to receive the event",
    )
    site.browser.execute_script("window.source.close()")


ATTACK = """<!doctype html><meta charset="utf-8"><title>another origin</title><script>
const service = "{service}";
const tried = [];
async function attempt(name, url, options) {{
  try {{
    const response = await fetch(url, options);
    tried.push([name, response.type, response.status]);
  }} catch (error) {{
    tried.push([name, "error", 0]);
  }}
}}
(async () => {{
  await attempt("delete", service + "/user?all=true", {{method: "DELETE", credentials: "include"}});
  await attempt("end", service + "/user/sessions/{public_id}", {{method: "DELETE", credentials: "include"}});
  // A simple request (no preflight): a login CSRF into the attacker's account.
  await attempt("login", service + "/user?cookie=true", {{
    method: "POST", mode: "no-cors", credentials: "include",
    body: JSON.stringify({{username: "mallory", password: "{password}"}}),
  }});
  document.title = JSON.stringify(tried);
}})();
</script>"""


def test_a_page_of_another_local_origin_cannot_log_the_visitor_out_or_in(
    site: Site, other_origin: OtherOrigin
) -> None:
    site.command("adduser", "mallory", stdin=PASSWORD + "\n")
    site.log_in_live()
    session_id = site.session_id()
    [mine] = site.http("GET", "/user/sessions", session_id)["sessions"]
    other_origin.page = ATTACK.format(service=site.url, public_id=mine["id"], password=PASSWORD)
    site.browser.get(other_origin.url + "/")
    site.wait_for(lambda: site.browser.title.startswith("["), "the other origin's page to try")
    tried = json.loads(site.browser.title)
    # The DELETEs need a preflight, which is refused; the login goes, with the cookie, and is
    # refused by its Origin (the page cannot see the answer: an opaque response).
    assert tried == [["delete", "error", 0], ["end", "error", 0], ["login", "opaque", 0]]
    site.browser.get(site.url + "/")
    assert site.session_id() == session_id  # not replaced by mallory's session
    assert site.http("GET", "/user", session_id)["username"] == "alice"
    site.wait_for(lambda: site.text("who") == "alice", "the page to still be alice's")


APP = """<!doctype html><meta charset="utf-8"><title>an app of a listed origin</title><script>
const service = "{service}";
const steps = [];
(async () => {{
  const login = await fetch(service + "/user?cookie=true", {{
    method: "POST", credentials: "include", headers: {{"Content-Type": "application/json"}},
    body: JSON.stringify({{username: "alice", password: "{password}"}}),
  }});
  steps.push(["login", login.status, Object.keys(await login.json()).sort().join(",")]);
  const who = await fetch(service + "/user", {{credentials: "include"}});
  steps.push(["who", who.status, (await who.json()).username]);
  const source = new EventSource(service + "/events", {{withCredentials: true}});
  source.onopen = () => {{ document.title = "open"; }};
  source.onmessage = async (message) => {{
    steps.push(["event", 200, JSON.stringify(JSON.parse(message.data).data)]);
    source.close();
    const out = await fetch(service + "/user", {{method: "DELETE", credentials: "include"}});
    steps.push(["logout", out.status, JSON.stringify(await out.json())]);
    document.title = JSON.stringify(steps);
  }};
}})();
</script>"""


def test_a_page_of_a_listed_origin_uses_the_cookie_with_credentials_include(
    browser: Any,
    tmp_path: Path,
    database_url: str,
    db: object,
    start_server: Callable[..., ServerProcess],
    other_origin: OtherOrigin,
) -> None:
    site = Site(browser, tmp_path, database_url, start_server, origins=[other_origin.url])
    site.command("adduser", "alice", stdin=PASSWORD + "\n")
    site.start()
    site.open_page()  # no cookie left from another test
    other_origin.page = APP.format(service=site.url, password=PASSWORD)
    browser.get(other_origin.url + "/")
    site.wait_for(lambda: browser.title == "open", "the app's EventSource to open")
    site.publish({"for": "the app"})
    site.wait_for(lambda: browser.title.startswith("["), "the app to log in, stream and log out")
    assert json.loads(browser.title) == [
        ["login", 200, "expires_at,username"],
        ["who", 200, "alice"],
        ["event", 200, '{"for":"the app"}'],
        ["logout", 200, '{"logged_out":1}'],
    ]


# ---------------------------------------------------------------------------
# The lobby: a topic with presence (the shipped config.json's rule)
# ---------------------------------------------------------------------------

LOBBY_RULE = {"pattern": "lobby", "subscribe": "anyone", "publish": "anyone", "presence": True}


def online(page: Site) -> list[str]:
    from selenium.webdriver.common.by import By

    return [item.text for item in page.browser.find_elements(By.CSS_SELECTOR, "#online li")]


def lobby_messages(page: Site) -> list[tuple[str, str]]:
    from selenium.webdriver.common.by import By

    items = page.browser.find_elements(By.CSS_SELECTOR, "#lobby-messages li")
    return [
        (item.find_element(By.CLASS_NAME, "from").text, item.find_element(By.CLASS_NAME, "text").text)
        for item in items
    ]


def post(page: Site, text: str) -> None:
    page.browser.find_element("id", "lobby-text").send_keys(text)
    page.browser.find_element("id", "lobby-post").click()


def test_two_people_in_the_lobby_see_each_other_online_and_each_others_messages(
    browser: Any,
    browser_factory: Callable[[], Any],
    tmp_path: Path,
    database_url: str,
    db: object,
    start_server: Callable[..., ServerProcess],
) -> None:
    alice = Site(browser, tmp_path, database_url, start_server, topics=[LOBBY_RULE])
    alice.command("adduser", "alice", stdin=PASSWORD + "\n")
    alice.command("adduser", "bob", stdin=PASSWORD + "\n")
    alice.start()
    bob = copy.copy(alice)
    bob.browser = browser_factory()
    alice.log_in_live()
    alice.wait_for(lambda: online(alice) == ["alice"], "alice to see herself online")
    bob.log_in("bob")
    bob.wait_for(lambda: bob.text("status") == "Live.", "bob's stream to be live")
    bob.wait_for(lambda: online(bob) == ["alice", "bob"], "bob to see both online")
    alice.wait_for(lambda: online(alice) == ["alice", "bob"], "alice to see bob join")
    post(bob, "hello from bob")
    post(alice, "<b>hi</b> bob")  # text, never markup
    for page in (alice, bob):
        page.wait_for(
            lambda page=page: lobby_messages(page) == [("bob", "hello from bob"), ("alice", "<b>hi</b> bob")],
            "both messages, in order, from whom",
        )
    alice.command("publish", json.dumps({"text": "from the server"}), "--topic", "lobby")
    alice.wait_for(lambda: lobby_messages(alice)[-1] == ("server", "from the server"), "a server message")
    assert alice.events() == []  # lobby messages are not listed among the user's events
    bob.browser.find_element("id", "logout-button").click()
    alice.wait_for(lambda: online(alice) == ["alice"], "alice to see bob leave")


def test_without_a_lobby_rule_the_page_shows_no_lobby(site: Site) -> None:
    site.log_in_live()
    assert not site.browser.find_element("id", "lobby-section").is_displayed()
