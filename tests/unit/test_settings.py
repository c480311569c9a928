"""The settings model: defaults, the variables it reads, one-line errors naming the variable."""

from __future__ import annotations

import os

import pytest

from dispatcher.settings import (
    DEFAULT_BASE_URL,
    DEFAULT_REDIS_URL,
    DEFAULT_SESSION_QUEUE,
    LeaseMode,
    Settings,
    SettingsError,
    load_settings,
    split_redis_credentials,
)

KEY = "sk-ant-oat01-SETTINGS-SECRET"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The host's own ANTHROPIC_* and DISPATCHER_* variables must not leak into a test."""
    for name in list(os.environ):
        if name.startswith(("ANTHROPIC_", "DISPATCHER_")):
            monkeypatch.delenv(name)


def test_defaults() -> None:
    settings = load_settings()
    assert settings.base_url == DEFAULT_BASE_URL
    assert settings.redis_url == DEFAULT_REDIS_URL
    assert (settings.environment_id, settings.environment_key, settings.api_key) == (
        None, None, None)
    assert settings.lease_mode is LeaseMode.DISPATCHER
    assert settings.session_queues == [DEFAULT_SESSION_QUEUE]
    assert settings.default_session_queue == DEFAULT_SESSION_QUEUE
    assert settings.worker_id is None
    assert settings.key_prefix == "dispatcher"
    assert settings.session_slots is None
    assert settings.desired_ttl_seconds is None
    assert settings.stop_grace_seconds == 30.0
    assert settings.max_attempts == 3
    assert settings.http_timeout_seconds == 10.0
    assert settings.metrics_port is None
    assert "PATH" in settings.sandbox_env_allow


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("ANTHROPIC_BASE_URL", "http://127.0.0.1:8700", "base_url", "http://127.0.0.1:8700"),
        ("ANTHROPIC_ENVIRONMENT_ID", "env_1", "environment_id", "env_1"),
        ("DISPATCHER_REDIS_URL", "redis://r:6379/2", "redis_url", "redis://r:6379/2"),
        ("DISPATCHER_ON_WORK", "./spawn.sh --fg", "on_work", "./spawn.sh --fg"),
        ("DISPATCHER_LEASE_MODE", "handoff", "lease_mode", LeaseMode.HANDOFF),
        ("DISPATCHER_WORKER_ID", "w-1", "worker_id", "w-1"),
        ("DISPATCHER_KEY_PREFIX", "fleet2", "key_prefix", "fleet2"),
        ("DISPATCHER_SESSION_SLOTS", "4", "session_slots", 4),
        ("DISPATCHER_SESSION_QUEUES", " a, b,,c ", "session_queues", ["a", "b", "c"]),
        ("DISPATCHER_DESIRED_TTL_SECONDS", "60", "desired_ttl_seconds", 60),
        ("DISPATCHER_STOP_GRACE_SECONDS", "5.5", "stop_grace_seconds", 5.5),
        ("DISPATCHER_MAX_ATTEMPTS", "1", "max_attempts", 1),
        ("DISPATCHER_HTTP_TIMEOUT_SECONDS", "2", "http_timeout_seconds", 2.0),
        ("DISPATCHER_SANDBOX_ENV_ALLOW", "PATH,HOME", "sandbox_env_allow", ["PATH", "HOME"]),
        ("DISPATCHER_METRICS_PORT", "9100", "metrics_port", 9100),
    ],
)
def test_each_setting_is_read_from_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(), field) == expected


def test_keys_are_secret_and_stay_out_of_the_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_ENVIRONMENT_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY + "-org")
    settings = load_settings()
    assert settings.environment_key is not None and settings.api_key is not None
    assert settings.environment_key.get_secret_value() == KEY
    assert settings.api_key.get_secret_value() == KEY + "-org"
    assert KEY not in repr(settings) and KEY not in str(settings)


def test_field_names_are_not_read_as_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BASE_URL", "http://wrong")
    monkeypatch.setenv("ENVIRONMENT_ID", "env_wrong")
    settings = load_settings()
    assert (settings.base_url, settings.environment_id) == (DEFAULT_BASE_URL, None)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DISPATCHER_SESSION_SLOTS", "zero"),
        ("DISPATCHER_SESSION_SLOTS", "0"),
        ("DISPATCHER_LEASE_MODE", "sometimes"),
        ("DISPATCHER_METRICS_PORT", "70000"),
        ("DISPATCHER_HTTP_TIMEOUT_SECONDS", "-1"),
        ("DISPATCHER_MAX_ATTEMPTS", "3.5"),
    ],
)
def test_a_malformed_value_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{variable} is invalid: ")
    assert "\n" not in message


def test_a_worker_requires_the_environment_id_then_its_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(SettingsError, match=r"^ANTHROPIC_ENVIRONMENT_ID is not set") as caught:
        load_settings().require_worker()
    assert "\n" not in str(caught.value)
    monkeypatch.setenv("ANTHROPIC_ENVIRONMENT_ID", "env_1")
    with pytest.raises(SettingsError, match=r"^ANTHROPIC_ENVIRONMENT_KEY is not set"):
        load_settings().require_worker()
    monkeypatch.setenv("ANTHROPIC_ENVIRONMENT_KEY", KEY)
    environment_id, key = load_settings().require_worker()
    assert (environment_id, key.get_secret_value()) == ("env_1", KEY)


def test_settings_are_frozen() -> None:
    settings = Settings()
    with pytest.raises(ValueError, match="frozen"):
        settings.base_url = "http://elsewhere"  # type: ignore[misc]


@pytest.mark.parametrize("variable", ["ANTHROPIC_ENVIRONMENT_KEY", "ANTHROPIC_API_KEY"])
@pytest.mark.parametrize("value", [KEY + "\n", KEY + "\r\n", " " + KEY, KEY + "\t",
                                   "sk-ant-oat01-a b", KEY + "\x01", KEY + "\x7f", KEY + "\x85",
                                   KEY + "\u00e9", KEY + "\u2028", "sk-ant-oat01-\uff41"])
def test_a_key_with_whitespace_or_a_control_character_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """A file-mounted secret's trailing newline would make every request a retried transient
    error; refused when settings load, naming the variable and never showing the key."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{variable} is invalid: ")
    assert "whitespace, a control character or a non-ASCII character" in message
    assert "SETTINGS-SECRET" not in message and "\n" not in message


def test_the_worker_id_is_read_as_the_cli_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_WORKER_ID", "cli-name")
    assert load_settings().worker_id == "cli-name"
    monkeypatch.setenv("DISPATCHER_WORKER_ID", "own-name")
    assert load_settings().worker_id == "cli-name"  # the CLI's name wins
    monkeypatch.delenv("ANTHROPIC_WORKER_ID")
    assert load_settings().worker_id == "own-name"
    monkeypatch.setenv("ANTHROPIC_WORKER_ID", "name\n")
    with pytest.raises(SettingsError, match=r"^ANTHROPIC_WORKER_ID is invalid: .*control"):
        load_settings()


@pytest.mark.parametrize("value", ["..", "env/../x", "env%2F", "env 1"])
def test_an_environment_id_that_would_walk_the_url_is_refused_at_load(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("ANTHROPIC_ENVIRONMENT_ID", value)
    with pytest.raises(SettingsError, match=r"^ANTHROPIC_ENVIRONMENT_ID is invalid: .*must be"):
        load_settings()


@pytest.mark.parametrize(
    ("url", "bare", "options"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0", {}),
        ("redis://:p%40ss@r:6379/2", "redis://r:6379/2", {"password": "p@ss"}),
        ("rediss://u:pw@r.example:6380/1?ssl_cert_reqs=required",
         "rediss://r.example:6380/1?ssl_cert_reqs=required", {"username": "u", "password": "pw"}),
        ("redis://[::1]:6379/0?password=pw&db=3", "redis://[::1]:6379/0?db=3",
         {"password": "pw"}),
        ("unix://:pw@/run/redis.sock?db=1", "unix:///run/redis.sock?db=1", {"password": "pw"}),
    ],
)
def test_beat_gets_the_redis_url_without_credentials_and_the_credentials_apart(
    url: str, bare: str, options: dict[str, str]
) -> None:
    assert split_redis_credentials(url) == (bare, options)


def test_an_unknown_broker_is_refused_without_showing_its_url(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_BROKER_URL", "sqs://AKIA:Pw-SECRET@queue")
    with pytest.raises(SettingsError, match=r"^DISPATCHER_BROKER_URL is invalid: .*'sqs'") as c:
        load_settings()
    assert "Pw-SECRET" not in str(c.value)


@pytest.mark.parametrize(("given", "read"), [
    ("redis://h:6379/0?password=p%40w&socket_timeout=3",
     "redis://:p%40w@h:6379/0?socket_timeout=3"),
    ("redis://h/0?username=fleet&password=pw", "redis://fleet:pw@h/0"),
    ("redis://fleet@h/0?password=pw", "redis://fleet:pw@h/0"),
    ("rediss://h:6380/0?password=pw&ssl_cert_reqs=required",
     "rediss://:pw@h:6380/0?ssl_cert_reqs=required"),
    ("unix:///run/redis.sock?password=pw&db=2", "unix://:pw@/run/redis.sock?db=2"),
    ("redis://:pw@h/0", "redis://:pw@h/0"),
    ("redis://h/0", "redis://h/0"),
])
def test_credentials_in_a_redis_url_query_move_into_its_user_part(given: str, read: str) -> None:
    """Celery masks a URL's user part wherever it shows one, never its query."""
    assert load_settings(DISPATCHER_REDIS_URL=given).redis_url == read
    broker = given.replace("redis://", "amqp://", 1) if given.startswith("redis://") else None
    if broker is not None:
        expected = read.replace("redis://", "amqp://", 1)
        assert load_settings(DISPATCHER_BROKER_URL=broker).broker_url == expected


def test_a_credential_given_twice_in_a_url_is_refused_unshown() -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(DISPATCHER_REDIS_URL="redis://:one-SECRET@h/0?password=two-SECRET")
    message = str(caught.value)
    assert message.startswith("DISPATCHER_REDIS_URL is invalid: ")
    assert "SECRET" not in message
