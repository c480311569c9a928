"""Sentinel settings -> every Redis client's configuration (registry, broker, result backend,
beat), with no password where Celery shows settings unmasked."""

from __future__ import annotations

from typing import Any

import pytest
from celery.app.utils import filter_hidden_settings
from kombu import Connection
from kombu.utils.url import url_to_parts as url_parts
from redis.sentinel import SentinelConnectionPool

from dispatcher.celery.broker import broker_conf
from dispatcher.redis_connect import (
    SENTINEL_TIMEOUT_SECONDS,
    beat_conf,
    connect,
    result_backend_conf,
)
from dispatcher.settings import Settings, SettingsError, load_settings, sentinel_address

PASSWORD = "s3cr%t@pw"  # characters a URL must quote
SENTINEL_PASSWORD = "sentinel-only-pw"


@pytest.fixture
def sentinel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_REDIS_URL", "redis://:s3cr%25t%40pw@ignored:1/9")
    monkeypatch.setenv("DISPATCHER_REDIS_SENTINELS", "10.0.0.1:26379, [::1]:26380")
    monkeypatch.setenv("DISPATCHER_REDIS_SENTINEL_MASTER", "fleet")
    monkeypatch.setenv("DISPATCHER_REDIS_SENTINEL_PASSWORD", SENTINEL_PASSWORD)
    monkeypatch.setenv("DISPATCHER_KEY_PREFIX", "fx")


def _celery_conf(settings: Settings) -> dict[str, Any]:
    return {**broker_conf(settings), **result_backend_conf(settings, key_prefix="fx:celery:"),
            **beat_conf(settings)}


@pytest.mark.usefixtures("sentinel_env")
def test_broker_is_kombus_sentinel_transport_with_credentials_on_the_first_address() -> None:
    conf = broker_conf(load_settings())
    assert conf["broker_url"] == ("sentinel://:s3cr%25t%40pw@10.0.0.1:26379/9;"
                                  "sentinel://[::1]:26380/9")
    options = conf["broker_transport_options"]
    assert options["master_name"] == "fleet"
    assert options["global_keyprefix"] == "fx:celery:"
    assert options["sentinel_kwargs"] == {"socket_timeout": SENTINEL_TIMEOUT_SECONDS,
                                          "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
                                          "password": SENTINEL_PASSWORD}
    connection = Connection(conf["broker_url"], transport_options=options)
    assert connection.transport_cls == "sentinel"
    assert connection.password == PASSWORD and connection.virtual_host == "9"
    # What kombu's SentinelChannel reads the Sentinels' addresses from.
    assert [(url_parts(a).hostname, url_parts(a).port) for a in connection.alt] == [
        ("10.0.0.1", 26379), ("::1", 26380)]


@pytest.mark.usefixtures("sentinel_env")
def test_result_backend_is_celerys_sentinel_backend_under_the_prefix() -> None:
    conf = result_backend_conf(load_settings(), key_prefix="fx:celery:")
    assert conf["result_backend"].startswith("sentinel://:s3cr%25t%40pw@10.0.0.1:26379/9;")
    options = conf["result_backend_transport_options"]
    assert (options["master_name"], options["global_keyprefix"]) == ("fleet", "fx:celery:")


@pytest.mark.usefixtures("sentinel_env")
def test_beat_is_redbeats_sentinel_client_with_the_password_in_options() -> None:
    conf = beat_conf(load_settings())
    assert conf["redbeat_redis_url"] == "redis-sentinel://"
    assert conf["redbeat_redis_options"] == {
        "password": PASSWORD, "sentinels": [("10.0.0.1", 26379), ("::1", 26380)],
        "service_name": "fleet", "db": 9,
        "sentinel_kwargs": {"socket_timeout": SENTINEL_TIMEOUT_SECONDS,
                            "socket_connect_timeout": SENTINEL_TIMEOUT_SECONDS,
                            "password": SENTINEL_PASSWORD}}


@pytest.mark.usefixtures("sentinel_env")
def test_no_password_shows_in_what_celery_lets_inspect_conf_and_flower_show() -> None:
    shown = repr(filter_hidden_settings(_celery_conf(load_settings())))
    for secret in (PASSWORD, "s3cr%25t%40pw", SENTINEL_PASSWORD):
        assert secret not in shown


@pytest.mark.usefixtures("sentinel_env")
def test_the_registrys_client_asks_the_sentinels_for_the_master() -> None:
    client = connect(load_settings(), timeout=1.5)  # builds a client; connects on first use
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "fleet"
    kwargs = pool.connection_kwargs
    assert (kwargs["password"], kwargs["db"], kwargs["socket_timeout"]) == (PASSWORD, 9, 1.5)
    assert [(c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs[
        "password"]) for c in pool.sentinel_manager.sentinels] == [
        ("10.0.0.1", SENTINEL_PASSWORD), ("::1", SENTINEL_PASSWORD)]


def test_without_sentinels_every_client_uses_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_REDIS_URL", "redis://:pw@r:6390/3")
    settings = load_settings()
    conf = _celery_conf(settings)
    assert conf["broker_url"] == conf["result_backend"] == "redis://:pw@r:6390/3"
    assert "master_name" not in conf["broker_transport_options"]
    assert (conf["redbeat_redis_url"], conf["redbeat_redis_options"]) == (
        "redis://r:6390/3", {"password": "pw"})
    client = connect(settings, timeout=1.0)
    assert client.connection_pool.connection_kwargs["host"] == "r"


@pytest.mark.usefixtures("sentinel_env")
def test_an_explicit_url_bypasses_the_sentinels() -> None:
    client = connect(load_settings(), timeout=1.0, url="redis://other:6391/0")
    assert not isinstance(client.connection_pool, SentinelConnectionPool)


@pytest.mark.parametrize(("variables", "message"), [
    ({"DISPATCHER_REDIS_SENTINELS": "h:26379"},
     "DISPATCHER_REDIS_SENTINEL_MASTER is invalid: Value error, not set"),
    ({"DISPATCHER_REDIS_SENTINEL_MASTER": "fleet"},
     "DISPATCHER_REDIS_SENTINEL_MASTER is invalid: Value error, set without"),
    ({"DISPATCHER_REDIS_SENTINELS": "h", "DISPATCHER_REDIS_SENTINEL_MASTER": "fleet"},
     "DISPATCHER_REDIS_SENTINELS is invalid: Value error, 'h' is not host:port"),
    ({"DISPATCHER_REDIS_SENTINELS": "h:0", "DISPATCHER_REDIS_SENTINEL_MASTER": "fleet"},
     "DISPATCHER_REDIS_SENTINELS is invalid: Value error, 'h:0' is not host:port"),
    ({"DISPATCHER_REDIS_SENTINELS": "h:1", "DISPATCHER_REDIS_SENTINEL_MASTER": "fleet",
      "DISPATCHER_REDIS_URL": "rediss://h:6379/0"},
     "DISPATCHER_REDIS_SENTINEL_MASTER is invalid: Value error, Sentinel needs a `redis://`"),
])
def test_sentinel_settings_refused_with_one_line(monkeypatch: pytest.MonkeyPatch,
                                                 variables: dict[str, str], message: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(("address", "pair"), [
    ("127.0.0.1:26379", ("127.0.0.1", 26379)),
    ("sentinel-1.example:5000", ("sentinel-1.example", 5000)),
    ("[fd00::1]:26379", ("fd00::1", 26379)),
])
def test_sentinel_address(address: str, pair: tuple[str, int]) -> None:
    assert sentinel_address(address) == pair
