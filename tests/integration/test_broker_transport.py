"""The broker's Redis transport: kombu's, with one client per channel instead of one per command.
Real Redis, real kombu connections, a real Celery app publishing and a kombu consumer taking."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from kombu import Connection

from dispatcher.celery.broker import RedisTransport, broker_conf
from dispatcher.settings import load_settings
from tests.support.isolation import integration_db, redis_url

pytestmark = pytest.mark.integration


@pytest.fixture
def app() -> Iterator[Celery]:
    settings = load_settings(DISPATCHER_REDIS_URL=redis_url(integration_db()),
                             DISPATCHER_KEY_PREFIX=f"transport{uuid.uuid4().hex[:8]}")
    app = Celery("transport", set_as_current=False)
    app.conf.update(broker_conf(settings), task_create_missing_queues=True)
    try:
        yield app
    finally:
        with app.connection_for_write() as connection:
            client = connection.default_channel.client
            for key in client.scan_iter(f"{settings.key_prefix}:*"):
                client.delete(key)
        app.close()


@pytest.mark.parametrize("broker", [{}, {"DISPATCHER_BROKER_URL": "redis://127.0.0.1:6379/4"}])
def test_a_plain_redis_broker_gets_our_transport(broker: dict[str, str]) -> None:
    """The fleet's Redis, or a Redis broker of its own (Sentinels: tests/unit/
    test_redis_sentinel.py)."""
    settings = load_settings(DISPATCHER_REDIS_URL="redis://127.0.0.1:6379/3", **broker)
    conf = broker_conf(settings)
    connection = Connection(conf["broker_url"], transport=conf["broker_transport"])
    assert type(connection.transport) is RedisTransport


def test_tls_keeps_kombus_own_transport_which_sets_tls_up_from_the_scheme() -> None:
    settings = load_settings(DISPATCHER_REDIS_URL="redis://127.0.0.1:6379/3",
                             DISPATCHER_BROKER_URL="rediss://127.0.0.1:6380/3")
    conf = broker_conf(settings)
    assert "broker_transport" not in conf
    assert Connection(conf["broker_url"]).transport_cls == "rediss"


def test_a_channel_sends_every_command_through_one_client_and_delivers(app: Celery) -> None:
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(connection.transport, RedisTransport)
        with channel.conn_or_acquire() as first, channel.conn_or_acquire() as second:
            assert first is second, "one client for the channel's commands"
        given = object()
        with channel.conn_or_acquire(given) as passed:
            assert passed is given, "a client the caller gives is the one used"
        queue = connection.SimpleQueue(f"q{uuid.uuid4().hex[:6]}")
        try:
            for number in range(3):
                queue.put({"n": number})
            got = []
            for _ in range(3):
                message = queue.get(timeout=5)
                got.append(message.payload["n"])
                message.ack()
            assert got == [0, 1, 2]
        finally:
            queue.close()


def test_a_new_pool_gets_a_new_client(app: Celery) -> None:
    """kombu drops a channel's pool when it closes or its connection breaks: the client over
    the old pool is not used again."""
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        with channel.conn_or_acquire() as before:
            assert before.ping()
        old = channel.pool
        channel._pool = None  # as kombu's own `_disconnect_pools` leaves it
        with channel.conn_or_acquire() as after:
            assert after is not before and after.connection_pool is channel.pool
            assert after.connection_pool is not old and after.ping()
        old.disconnect()


def test_a_celery_app_publishes_over_it(app: Celery) -> None:
    """The app's producer publishes through our channel, and the task's message lands in its
    queue under the fleet's prefix."""
    queue = f"q{uuid.uuid4().hex[:6]}"
    app.send_task("some.task", args=[1], queue=queue)
    with app.connection_for_read() as connection:
        assert isinstance(connection.transport, RedisTransport)
        with connection.SimpleQueue(queue) as reader:
            message = reader.get(timeout=5)
            assert message.headers["task"] == "some.task"
            message.ack()
