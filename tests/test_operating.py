"""Operating the service: names and log lines nobody can forge, the command line's edges, the
first minutes on a fresh machine. Real subprocesses, a real pseudo-terminal, a real access log."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import PYTHON, SERVER, Client, PrivateCluster, Start, free_port, run_command

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}

# Names a log line or a reader could be fooled by: none may be a username.
FORGING_NAMES = [
    pytest.param("alice\nINFO server: bob logged in", id="newline"),
    pytest.param("alice\rbob", id="carriage-return"),
    pytest.param("alice\x1b[2Kbob", id="escape-sequence"),
    pytest.param("alice\tbob", id="tab"),
    pytest.param("ali\u200bce", id="zero-width-space"),
    pytest.param("alice\u202egnp.exe", id="right-to-left-override"),
    pytest.param("alice\u2028bob", id="line-separator"),
    pytest.param(" alice", id="leading-space"),
    pytest.param("alice ", id="trailing-space"),
    pytest.param("alice\u00a0", id="trailing-no-break-space"),
]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"passwords": FAST}))
    return path


@pytest.mark.parametrize("name", FORGING_NAMES)
async def test_a_login_naming_a_control_or_format_character_is_422(client: Client, name: str) -> None:
    response = await client.post("/user", json={"username": name, "password": "wonderland"})
    assert response.status == 422
    assert (await response.json())["error"] == "invalid_credentials_format"


@pytest.mark.parametrize("name", FORGING_NAMES)
def test_adduser_refuses_a_name_with_control_or_format_characters_in_one_line(
    config_file: Path, database_url: str, db: object, name: str
) -> None:
    result = run_command(
        ["adduser", name, "--config", str(config_file)], "wonderland\n", {"DATABASE_URL": database_url}
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: 'username' must not")


def test_names_in_other_scripts_and_inner_spaces_are_still_usernames(
    config_file: Path, database_url: str, db: object
) -> None:
    for name in ("José", "山田 太郎", "Ωmega-🔑"):
        result = run_command(
            ["adduser", name, "--config", str(config_file)], "wonderland\n", {"DATABASE_URL": database_url}
        )
        assert result.returncode == 0, result.stderr


def serve_with(
    start_server: Start, tmp_path: Path, database_url: str, **webserver: object
) -> tuple[int, object]:
    port = free_port()
    config = tmp_path / "server.json"
    config.write_text(
        json.dumps({"webserver": {"host": "127.0.0.1", "port": port, **webserver}, "passwords": FAST})
    )
    server = start_server(["--config", str(config)], {"DATABASE_URL": database_url})
    server.wait_until_serving()
    return port, server


async def test_the_access_log_escapes_control_characters_in_the_path(
    start_server: Start, tmp_path: Path, database_url: str, db: object
) -> None:
    port, server = serve_with(start_server, tmp_path, database_url, access_log=True)
    forged = "/x%0A2026-01-01 00:00:00,000 INFO server.access: 10.0.0.1 POST /admin 200%1B[8m"
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{forged}") as response:
        assert response.status == 404
    await asyncio.sleep(0.3)
    lines = server.log.splitlines()  # type: ignore[attr-defined]
    assert not any(line.startswith("2026-01-01") for line in lines)
    assert "\x1b" not in server.log  # type: ignore[attr-defined]
    (line,) = [line for line in lines if "server.access" in line and "/x" in line]
    assert "/x\\n2026-01-01" in line and "\\x1b[8m 404" in line


async def test_the_access_log_names_the_client_the_throttle_sees_behind_a_trusted_proxy(
    start_server: Start, tmp_path: Path, database_url: str, db: object
) -> None:
    port, server = serve_with(
        start_server, tmp_path, database_url, access_log=True, trusted_proxies=["127.0.0.1/32"]
    )
    async with aiohttp.ClientSession() as http:
        headers = {"X-Forwarded-For": "203.0.113.7"}
        async with http.get(f"http://127.0.0.1:{port}/health", headers=headers) as response:
            assert response.status == 200
    await asyncio.sleep(0.3)
    (line,) = [line for line in server.log.splitlines() if "server.access" in line]  # type: ignore[attr-defined]
    assert "server.access: 203.0.113.7 GET /health 200" in line


@pytest.mark.parametrize(
    ("request_bytes", "says"),
    [
        (b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "length"),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 9000 + b"\r\n\r\n", "more than 8190 bytes"),
        (b"POST /user HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk"),
    ],
    ids=["two-content-lengths", "long-header", "bad-chunk"],
)
async def test_a_request_the_parser_refuses_is_one_log_line_that_says_why(
    start_server: Start, tmp_path: Path, database_url: str, db: object, request_bytes: bytes, says: str
) -> None:
    port, server = serve_with(start_server, tmp_path, database_url)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_bytes)
    status_line = await reader.readline()
    writer.close()
    assert status_line.split()[1] == b"400", status_line
    await asyncio.sleep(0.3)
    log = server.log  # type: ignore[attr-defined]
    (line,) = [line for line in log.splitlines() if "Error handling request" in line]
    assert "WARNING" in line and says.lower() in line.lower(), line


async def test_host_0_on_the_command_line_is_a_host_not_a_number(
    start_server: Start, tmp_path: Path, database_url: str, db: object
) -> None:
    port = free_port()
    (tmp_path / "config.json").write_text(json.dumps({"passwords": FAST}))
    server = start_server(["--host", "0", "--port", str(port)], {"DATABASE_URL": database_url})
    server.wait_until_serving()
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/health") as response:
        assert response.status == 200
    # The URL it serves, said as an address a browser takes, not "http://0:PORT".
    assert f"serving on http://0.0.0.0:{port}" in server.log  # type: ignore[attr-defined]


async def test_server_py_without_its_page_and_api_file_answers_404_not_500(
    start_server: Start, tmp_path: Path, database_url: str, db: object
) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("server.py", "schema.sql"):
        shutil.copy(Path(SERVER).parent / name, alone / name)
    port = free_port()
    (alone / "config.json").write_text(
        json.dumps({"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST})
    )
    process = subprocess.Popen(  # noqa: ASYNC220 (started once, before the test's requests)
        [PYTHON, str(alone / "server.py")],
        cwd=alone,
        env={**os.environ, "DATABASE_URL": database_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/health") as response:
                        break
                except aiohttp.ClientConnectionError:
                    assert time.monotonic() < deadline and process.poll() is None
                    await asyncio.sleep(0.1)
            for path in ("/", "/openapi.yaml"):
                async with http.get(f"http://127.0.0.1:{port}{path}") as response:
                    assert response.status == 404
                    assert (await response.json())["error"] == "not_found"
    finally:
        process.terminate()
        process.wait(10)


def prompt_in_a_terminal(args: list[str], env: dict[str, str], keys: bytes) -> tuple[int, str]:
    """Run `python server.py ARGS` in a real pseudo-terminal (its controlling terminal, so Ctrl-C
    is a SIGINT from the terminal driver); type `keys` at the password prompt."""
    import fcntl
    import termios

    master, slave = pty.openpty()

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # As a shell gives a foreground job: a test runner started in the background ignores it.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    process = subprocess.Popen(
        [PYTHON, SERVER, *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, **env},
        start_new_session=True,
        preexec_fn=take_terminal,
    )
    os.close(slave)
    output = b""

    def read_until(text: bytes, timeout: float = 30) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while text not in output:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {text!r} in {output!r}"
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            output += chunk

    read_until(b"Password: ")
    os.write(master, keys)
    code = process.wait(30)
    with_rest = b""
    while select.select([master], [], [], 0.2)[0]:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        with_rest += chunk
    os.close(master)
    return code, (output + with_rest).decode(errors="replace")


@pytest.mark.parametrize("keys", [pytest.param(b"\x03", id="ctrl-c"), pytest.param(b"\x04", id="ctrl-d")])
def test_ctrl_c_or_ctrl_d_at_the_password_prompt_is_one_line_and_exit_1(
    config_file: Path, database_url: str, db: object, keys: bytes
) -> None:
    args = ["adduser", "alice", "--config", str(config_file)]
    code, output = prompt_in_a_terminal(args, {"DATABASE_URL": database_url}, keys)
    assert code == 1
    after_prompt = output.split("Password: ", 1)[1].strip()
    assert after_prompt.splitlines() == ["error: no password given; nothing was changed"]
    assert "Traceback" not in output


def serve_limited(
    tmp_path: Path, database_url: str, soft: int, hard: int
) -> tuple[subprocess.Popen[bytes], int, Path]:
    """`python server.py` started under `ulimit -S -n soft -H -n hard`; returns it, its port, its log."""
    import resource

    port = free_port()
    config = tmp_path / "limited.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST}))
    log_path = tmp_path / "limited.log"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [PYTHON, SERVER, "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "DATABASE_URL": database_url},
            preexec_fn=limit,
        )
    deadline = time.monotonic() + 60
    while "serving on" not in log_path.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)
    return process, port, log_path


def test_the_open_files_limit_is_raised_to_the_hard_limit_at_start(
    tmp_path: Path, database_url: str, db: object
) -> None:
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    process, _, log_path = serve_limited(tmp_path, database_url, 256, hard)
    try:
        limits = Path(f"/proc/{process.pid}/limits").read_text()
        (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
        assert line.split()[3:5] == [str(hard), str(hard)]
        assert f"open-files limit raised from 256 to {hard}" in log_path.read_text()
    finally:
        process.terminate()
        assert process.wait(20) == 0


def test_running_out_of_file_descriptors_is_logged_at_a_limited_rate_and_served_through(
    tmp_path: Path, database_url: str, db: object
) -> None:
    import socket
    import urllib.request

    process, port, log_path = serve_limited(tmp_path, database_url, 100, 100)
    try:
        clients = [
            socket.create_connection(("127.0.0.1", port)) for _ in range(200)
        ]  # the kernel queues them
        time.sleep(6)
        log = log_path.read_text()
        assert "Traceback" not in log and "Logging error" not in log
        assert 1 <= log.count("out of file descriptors (open-files limit 100)") <= 2
        for client in clients:
            client.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=20) as response:
            assert response.status == 200
    finally:
        process.terminate()
        assert process.wait(20) == 0
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


def test_gunicorn_with_the_memory_store_warns_that_workers_do_not_share_sessions(
    tmp_path: Path, database_url: str, db: object
) -> None:
    import sys

    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"passwords": FAST}))  # the shipped config's store: memory
    command = [sys.executable, "-m", "gunicorn", f"server:app_factory('{config}')"]
    command += ["--pythonpath", str(Path(SERVER).parent), "--worker-class", "aiohttp.GunicornWebWorker"]
    command += ["--bind", f"127.0.0.1:{port}", "--workers", "2", "--no-control-socket"]
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
        gunicorn = subprocess.Popen(
            command, env={**os.environ, "DATABASE_URL": database_url}, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while log_path.read_text().count("serving on http://") < 2:
            assert time.monotonic() < deadline and gunicorn.poll() is None, log_path.read_text()
            time.sleep(0.1)
        assert "each gunicorn worker keeps sessions of its own" in log_path.read_text()
    finally:
        gunicorn.terminate()
        assert gunicorn.wait(20) == 0


def health(port: int) -> int:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_workers_replaced_during_a_long_outage_serve_503s_and_recover_when_postgres_returns(
    tmp_path: Path, private_cluster: PrivateCluster, start_server: Start
) -> None:
    """A SIGHUP while PostgreSQL has been away for longer than start-up waits (30 s): the new
    workers start anyway, answer 503, gunicorn goes on, and all recover when PostgreSQL is back."""
    import psutil

    port = free_port()
    config = tmp_path / "config.json"
    webserver = {"host": "127.0.0.1", "port": port, "workers": 2}
    config.write_text(
        json.dumps({"webserver": webserver, "sessions": {"store": "postgres"}, "passwords": FAST})
    )
    env = {"DATABASE_URL": private_cluster.url}
    assert run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env).returncode == 0
    served = start_server(["--config", str(config)], env)
    served.wait_until_serving(processes=2)
    assert health(port) == 200
    old = psutil.Process(served.process.pid).children()

    private_cluster.stop()
    served.process.send_signal(signal.SIGHUP)
    served.wait_until_serving(processes=4, timeout=30)  # two new workers, without PostgreSQL
    _, alive = psutil.wait_procs(old, timeout=20)
    assert alive == []
    time.sleep(35)  # longer than start-up's wait: a worker that waited would have failed by now
    assert served.process.poll() is None, served.log
    assert health(port) == 503
    assert len(psutil.Process(served.process.pid).children()) == 2

    private_cluster.start()
    deadline = time.monotonic() + 20
    while health(port) != 200:
        assert time.monotonic() < deadline, served.log
        time.sleep(0.5)
    import urllib.request

    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/user",
        data=json.dumps({"username": "alice", "password": "wonderland"}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert served.stop(timeout=20) == 0
    assert "Worker failed to boot" not in served.log and "Traceback" not in served.log


async def test_commands_and_start_up_take_no_table_lock_when_the_schema_is_up_to_date(
    tmp_path: Path, database_url: str, db: object, start_server: Start
) -> None:
    """An application transaction reading events and users stays open (it holds their ACCESS
    SHARE locks); schema.sql would need ACCESS EXCLUSIVE ones. publish, adduser, a server's
    start-up and a login all go on, since the tables are already as schema.sql makes them."""
    import psycopg2

    env = {"DATABASE_URL": database_url}
    port = free_port()
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST}))
    assert run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env).returncode == 0
    application = psycopg2.connect(database_url)
    try:
        with application.cursor() as cur:
            cur.execute("SELECT count(*) FROM events")
            cur.execute("SELECT count(*) FROM users")
        published = run_command(["publish", '{"price": 3}', "--config", str(config)], env=env)
        assert published.returncode == 0, published.stderr
        assert published.stdout.startswith("published event")
        added = run_command(["adduser", "bob", "--config", str(config)], "wonderland\n", env)
        assert added.returncode == 0, added.stderr
        served = start_server(["--config", str(config)], env)
        served.wait_until_serving()
        async with aiohttp.ClientSession() as http:
            body = {"username": "bob", "password": "wonderland"}
            async with http.post(f"http://127.0.0.1:{port}/user", json=body) as response:
                assert response.status == 200
        assert application.get_transaction_status() == psycopg2.extensions.TRANSACTION_STATUS_INTRANS
    finally:
        application.rollback()
        application.close()


async def test_a_changed_schema_sql_is_applied_once(database_url: str, db: object) -> None:
    """A database whose recorded schema.sql is not today's gets it run, and records it."""
    import psycopg2

    import server

    with psycopg2.connect(database_url) as direct, direct.cursor() as cur:
        cur.execute("UPDATE schema_version SET digest = 'older'")
    direct.close()
    async with (
        server.open_database(server.DatabaseConfig(dsn=database_url)) as engine,
        server.connection(engine) as conn,
    ):
        digest = await server.schema_digest(conn)
    assert digest == server.hashlib.sha256(server.SCHEMA_PATH.read_bytes()).hexdigest()
