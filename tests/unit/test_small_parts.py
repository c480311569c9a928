"""Routing, slots, event lines, the broker's settings and queues."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest

from dispatcher.celery.bootsteps import running_revoked, session_slots
from dispatcher.celery.broker import broker_conf, pool_full
from dispatcher.celery.names import HEARTBEAT, SESSION_RUN
from dispatcher.celery.waiting import RedisQueues
from dispatcher.control.routing import choose_queue
from dispatcher.logs import event
from dispatcher.runtime import Runtime
from dispatcher.settings import Settings

QUEUES = ["dispatcher.sessions", "dispatcher.gpu"]


def test_metadata_may_name_a_declared_queue() -> None:
    assert choose_queue({"queue": "dispatcher.gpu"}, QUEUES, work_id="w") == "dispatcher.gpu"
    assert choose_queue({}, QUEUES, work_id="w") == "dispatcher.sessions"


def test_an_unknown_queue_falls_back_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="dispatcher"):
        assert choose_queue({"queue": "x; rm -rf /"}, QUEUES, work_id="w") == QUEUES[0]
    assert "unknown session queue" in caplog.text
    assert "wanted='x; rm -rf /'" in caplog.text


@pytest.mark.parametrize(
    ("concurrency", "queues", "configured", "expected"),
    [
        (10, ["dispatcher.control", "dispatcher.sessions"], None, 8),
        (2, ["dispatcher.control", "dispatcher.sessions"], None, 1),
        (4, ["dispatcher.sessions"], None, 4),
        (4, ["dispatcher.control"], None, 0),
        (4, ["dispatcher.sessions"], 9, 9),
    ],
)
def test_session_slots_keep_room_for_control_tasks(
    concurrency: int, queues: list[str], configured: int | None, expected: int
) -> None:
    assert session_slots(concurrency=concurrency, queues=queues, configured=configured,
                         control_queue="dispatcher.control",
                         session_queues=QUEUES) == expected


def test_event_lines_are_greppable_and_quote_hostile_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="dispatcher"):
        event("claimed", work_id="work_1", session_id="s\nattempt=9", attempt=1, skip=None)
    record = caplog.records[-1]
    assert record.getMessage() == "claimed work_id=work_1 session_id='s\\nattempt=9' attempt=1"
    assert record.action == "claimed"  # type: ignore[attr-defined]


# --- the broker's settings ---------------------------------------------------------------------
def test_redis_is_the_broker_unless_rabbitmq_is_named() -> None:
    redis_only = broker_conf(Settings(DISPATCHER_REDIS_URL="redis://r:6379/2",
                                      DISPATCHER_KEY_PREFIX="f1"))
    assert redis_only["broker_url"] == "redis://r:6379/2"
    assert redis_only["broker_transport_options"] == {"global_keyprefix": "f1:celery:"}
    assert redis_only["worker_disable_prefetch"] is True
    amqp = broker_conf(Settings(DISPATCHER_REDIS_URL="redis://r:6379/2",
                                DISPATCHER_BROKER_URL="amqp://u:p@mq:5672/f1"))
    assert amqp["broker_url"] == "amqp://u:p@mq:5672/f1"
    # Celery would warn that it ignores it; the session gate does its work on RabbitMQ.
    assert "worker_disable_prefetch" not in amqp
    assert amqp["broker_transport_options"] == {"confirm_publish": True}
    assert amqp["worker_enable_prefetch_count_reduction"] is False


def test_recovery_looks_into_the_queues_of_a_redis_broker_only() -> None:
    """The key prefix is kombu's (`global_keyprefix`, as `broker_conf` sets it); no connection
    is made until a queue is read."""
    fleet = Runtime(settings=Settings(DISPATCHER_REDIS_URL="redis://r:6379/2",
                                      DISPATCHER_KEY_PREFIX="f1"), app=None)
    assert isinstance(fleet.waiting, RedisQueues) and fleet.waiting.prefix == "f1:celery:"
    assert fleet.waiting.redis is fleet.redis
    other = Runtime(settings=Settings(DISPATCHER_REDIS_URL="redis://r:6379/2",
                                      DISPATCHER_BROKER_URL="redis://b:6379/0"), app=None)
    assert isinstance(other.waiting, RedisQueues) and other.waiting.redis is not other.redis
    amqp = Runtime(settings=Settings(DISPATCHER_REDIS_URL="redis://r:6379/2",
                                     DISPATCHER_BROKER_URL="amqp://u:p@mq:5672/f1"), app=None)
    assert amqp.waiting.among("dispatcher.sessions", {"t1"}) is None


@pytest.mark.parametrize(("reserved", "pool_size", "full"), [
    (0, 1, False), (1, 1, True), (7, 8, False), (8, 8, True), (9, 8, True)])
def test_a_pool_is_full_when_every_slot_holds_a_received_task(
        reserved: int, pool_size: int, full: bool) -> None:
    assert pool_full(reserved=reserved, pool_size=pool_size) is full


def test_a_prefork_worker_relays_only_its_running_revoked_sessions() -> None:
    def request(task_id: str, name: str = SESSION_RUN, **kwargs: str) -> SimpleNamespace:
        return SimpleNamespace(id=task_id, name=name, kwargs=kwargs)

    active = [request("t1", work_id="work_1"), request("t2", work_id="work_2"),
              request("t3", work_id="work_3"), request("t4", name=HEARTBEAT),
              request("t5")]
    revoked = {"t1", "t3", "t4", "t5", "t9"}
    assert running_revoked(active, revoked, relayed={"t3"}) == [("t1", "work_1")]
    assert running_revoked(active, set(), relayed=set()) == []
