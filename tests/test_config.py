"""config.json: the seed's shape works unchanged, defaults are the contract's, errors name the key."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg2.extensions
import pytest

import server
from conftest import ROOT

SEED_CONFIG = {
    "webserver": {"host": "localhost", "port": 8000},
    "db": {"user": "app", "password": "secret", "host": "db.example", "database": "app"},
}


def write(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_the_seed_articles_config_works_unchanged(tmp_path: Path) -> None:
    config = server.load_config(write(tmp_path, SEED_CONFIG), environ={})
    assert (config.webserver.host, config.webserver.port) == ("localhost", 8000)
    assert config.db.dsn is not None and not config.db.embedded
    params = psycopg2.extensions.parse_dsn(config.db.dsn)
    assert params == {"user": "app", "password": "secret", "host": "db.example", "dbname": "app"}


def test_db_may_carry_a_port(tmp_path: Path) -> None:
    raw = {"db": {**SEED_CONFIG["db"], "port": 6543}}
    config = server.load_config(write(tmp_path, raw), environ={})
    assert config.db.dsn is not None
    assert psycopg2.extensions.parse_dsn(config.db.dsn)["port"] == "6543"


def test_the_shipped_config_runs_embedded_with_the_contracts_defaults() -> None:
    config = server.load_config(ROOT / "config.json", environ={})
    assert config.db.embedded
    assert config.db.data_dir == ROOT / ".pgdata"
    lobby = server.TopicRule("lobby", subscribe="anyone", publish="anyone", presence=True)
    assert config == server.Config(
        db=server.DatabaseConfig(dsn=None, data_dir=ROOT / ".pgdata"),
        events=server.EventsConfig(topics=(lobby,)),  # the demo page's lobby
    )


@pytest.mark.parametrize(
    "rules",
    [
        "lobby",
        [{"subscribe": "anyone"}],
        [{"pattern": "bad topic"}],
        [{"pattern": "room*x"}],
        [{"pattern": "lobby", "subscribe": "everyone"}],
        [{"pattern": "lobby", "publish": "members only"}],
        [{"pattern": "lobby", "presence": "yes"}],
        [{"pattern": "lobby", "colour": "red"}],
    ],
    ids=[
        "not-a-list",
        "no-pattern",
        "bad-name",
        "star-inside",
        "subscribe",
        "publish",
        "presence",
        "unknown-key",
    ],
)
def test_a_bad_topic_rule_is_one_clear_error(tmp_path: Path, rules: object) -> None:
    with pytest.raises(server.ConfigError, match=r"'events.topics' must be"):
        server.load_config(write(tmp_path, {"events": {"topics": rules}}), environ={})


def test_topic_rules_match_a_name_exactly_or_a_prefix_ending_in_a_star() -> None:
    rules = server.topic_rules(
        [{"pattern": "room:*"}, {"pattern": "lobby"}, {"pattern": "*", "subscribe": "anyone"}]
    )
    config = server.EventsConfig(topics=rules)
    assert config.rule("room:7") is rules[0] and config.rule("room:") is rules[0]
    assert config.rule("lobby") is rules[1]
    assert config.rule("lobby2") is rules[2] and config.rule("x") is rules[2]


def test_defaults_are_the_contracts() -> None:
    config = server.Config()
    assert (config.webserver.host, config.webserver.port) == ("localhost", 8000)
    assert config.sessions == server.SessionConfig(idle_timeout=1800, absolute_timeout=86400, max_per_user=20)
    assert config.login == server.LoginConfig(max_failures=5, failure_window=300)
    assert config.passwords == server.PasswordConfig(time_cost=2, memory_cost=19456, parallelism=1, threads=0)
    assert not config.passwords.below_owasp_minimum


def test_no_db_key_means_embedded_with_data_beside_the_config(tmp_path: Path) -> None:
    config = server.load_config(write(tmp_path, {"webserver": {"port": 9000}}), environ={})
    assert config.db.embedded and config.db.data_dir == tmp_path / ".pgdata"


def test_data_dir_moves_the_embedded_data(tmp_path: Path) -> None:
    config = server.load_config(write(tmp_path, {"db": {"embedded": True, "data_dir": "pg"}}), environ={})
    assert config.db.data_dir == tmp_path / "pg"


def test_database_url_overrides_the_file(tmp_path: Path) -> None:
    url = "postgresql://u:p@somewhere:5433/other"
    config = server.load_config(write(tmp_path, SEED_CONFIG), environ={"DATABASE_URL": url})
    assert config.db.dsn == url


def test_optional_sections_are_read(tmp_path: Path) -> None:
    raw = {
        "sessions": {"idle_timeout": 60, "absolute_timeout": 600.5, "max_per_user": 2},
        "login": {"max_failures": 3, "failure_window": 10},
        "passwords": {"time_cost": 1, "memory_cost": 8, "parallelism": 1, "threads": 4},
    }
    config = server.load_config(write(tmp_path, raw), environ={})
    assert config.sessions == server.SessionConfig(60, 600.5, 2)
    assert config.login == server.LoginConfig(3, 10)
    assert config.passwords == server.PasswordConfig(1, 8, 1, 4)
    assert config.passwords.below_owasp_minimum


def test_the_metrics_and_journal_sections_are_read_and_default_as_documented(tmp_path: Path) -> None:
    assert [str(net) for net in server.Config().metrics.allow] == ["127.0.0.0/8", "::1/128"]
    assert server.Config().journal == server.JournalConfig(retention=2592000, streams=False)
    raw = {"metrics": {"allow": ["10.1.2.0/24"]}, "journal": {"retention": 60, "streams": True}}
    config = server.load_config(write(tmp_path, raw), environ={})
    assert [str(net) for net in config.metrics.allow] == ["10.1.2.0/24"]
    assert config.journal == server.JournalConfig(retention=60, streams=True)


def test_webserver_options_are_read(tmp_path: Path) -> None:
    raw = {"webserver": {"trusted_proxies": ["10.0.0.0/8", "::1"], "uvloop": True, "access_log": True}}
    webserver = server.load_config(write(tmp_path, raw), environ={}).webserver
    assert [str(net) for net in webserver.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert webserver.uvloop and webserver.access_log


BAD_CONFIGS = [
    pytest.param("{not json", "not valid JSON", id="bad-json"),
    pytest.param("[]", "top level must be a JSON object", id="not-an-object"),
    pytest.param({"webserver": {"port": "8000"}}, "'webserver.port' must be an integer", id="port-string"),
    pytest.param({"webserver": {"port": 70000}}, "'webserver.port' must be an integer", id="port-range"),
    pytest.param({"webserver": {"port": True}}, "'webserver.port' must be an integer", id="port-bool"),
    pytest.param({"webserver": {"host": 5}}, "'webserver.host' must be a non-empty string", id="host-int"),
    pytest.param(
        {"webserver": {"host": "localhost\u0000x"}}, "'webserver.host' must be a host name", id="host-nul"
    ),
    pytest.param(
        {"webserver": {"host": "local host"}}, "'webserver.host' must be a host name", id="host-space"
    ),
    pytest.param(
        '{"sessions": {"idle_timeout": 1e400}}',
        "'sessions.idle_timeout' must be a positive",
        id="infinite-seconds",
    ),
    pytest.param(
        '{"sessions": {"idle_timeout": 1' + "0" * 400 + "}}",
        "'sessions.idle_timeout' must be a positive number of seconds, at most 100 years",
        id="integer-seconds-too-large-for-a-float",
    ),
    pytest.param({"sessions": {"absolute_timeout": 1e300}}, "at most 100 years", id="seconds-past-any-date"),
    pytest.param('{"events": {"publish_rate": 1e400}}', "'events.publish_rate' must be", id="infinite-rate"),
    pytest.param(
        {"sessions": {"max_per_user": 10**30}},
        "'sessions.max_per_user' must be an integer from 1 to 2147483647",
        id="integer-beyond-postgresql-integer",
    ),
    pytest.param({"webserver": []}, "'webserver' must be an object", id="section-not-object"),
    pytest.param({"cache": {}}, "unknown section 'cache'", id="unknown-section"),
    pytest.param(
        {"webserver": {"trusted_proxies": ["nonsense"]}},
        "'webserver.trusted_proxies' must be a list of IP addresses or networks",
        id="bad-proxy",
    ),
    pytest.param(
        {"webserver": {"trusted_proxies": "10.0.0.1"}},
        "'webserver.trusted_proxies' must be a list",
        id="proxies-not-a-list",
    ),
    pytest.param(
        {"webserver": {"access_log": 1}}, "'webserver.access_log' must be true or false", id="log-is-int"
    ),
    pytest.param({"sessions": {"idle": 5}}, "unknown key 'sessions.idle'", id="unknown-key"),
    pytest.param({"sessions": {"idle_timeout": 0}}, "'sessions.idle_timeout' must be a positive", id="zero"),
    pytest.param({"sessions": {"max_per_user": 0}}, "'sessions.max_per_user' must be", id="no-sessions"),
    pytest.param({"login": {"max_failures": 1.5}}, "'login.max_failures' must be an integer", id="float"),
    pytest.param({"passwords": {"time_cost": 0}}, "'passwords.time_cost' must be", id="time-cost-zero"),
    pytest.param(
        {"passwords": {"memory_cost": 15, "parallelism": 2}},
        "'passwords.memory_cost' must be an integer at least 16",
        id="memory-below-8-per-lane",
    ),
    pytest.param({"passwords": {"threads": -1}}, "'passwords.threads' must be", id="negative-threads"),
    pytest.param({"db": {"embedded": "yes"}}, "'db.embedded' must be true or false", id="embedded-string"),
    pytest.param(
        {"db": {"embedded": True, "host": "x"}}, "cannot be combined with 'db.host'", id="embedded-and-host"
    ),
    pytest.param({"db": {"user": 5}}, "'db.user' must be a non-empty string", id="db-user-int"),
    pytest.param({"db": {"password": None}}, "'db.password' must be a string", id="db-password-null"),
    pytest.param(
        {"sessions": {"redis_url": "nonsense"}}, "'sessions.redis_url' must be a Redis URL", id="redis-url"
    ),
    pytest.param(
        {"sessions": {"redis_url": "redis://localhost:99999/0"}},
        "'sessions.redis_url' must be a Redis URL",
        id="redis-url-port",
    ),
    pytest.param(
        {"metrics": {"allow": "127.0.0.1"}}, "'metrics.allow' must be a list", id="metrics-allow-not-a-list"
    ),
    pytest.param({"metrics": {"deny": []}}, "unknown key 'metrics.deny'", id="metrics-unknown-key"),
    pytest.param({"journal": {"retention": 0}}, "'journal.retention' must be a positive", id="journal-zero"),
    pytest.param(
        {"journal": {"streams": "yes"}}, "'journal.streams' must be true or false", id="journal-streams"
    ),
]


@pytest.mark.parametrize(("content", "message"), BAD_CONFIGS)
def test_a_bad_config_names_the_file_and_the_problem(tmp_path: Path, content: object, message: str) -> None:
    path = write(tmp_path, content)
    with pytest.raises(server.ConfigError) as error:
        server.load_config(path, environ={})
    assert message in str(error.value)
    assert str(path) in str(error.value)


def test_a_missing_config_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(server.ConfigError, match="no such config file"):
        server.load_config(tmp_path / "absent.json", environ={})
