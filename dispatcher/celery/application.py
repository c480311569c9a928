"""The Celery app: `celery -A dispatcher worker` finds it here.

Two planes on two queues. The control queue carries short periodic tasks (poll, heartbeat,
stop bridge, recovery); the session queue carries one long task per session attempt. Session
tasks are acked early and never held by a worker without a free slot (`celery/broker.py`, on
Redis or RabbitMQ), so no broker redelivers a session (Redis' visibility timeout, RabbitMQ's
consumer timeout): a lost worker is recovered through the lease registry instead.
"""

from __future__ import annotations

import os
import sys

from celery import Celery
from kombu.entity import Exchange, Queue

from dispatcher.celery import broker, names
from dispatcher.celery.keys import CeleryKeys
from dispatcher.celery.names import CONTROL_QUEUE
from dispatcher.runtime import use_app
from dispatcher.settings import SettingsError, load_settings, split_redis_credentials

__all__ = ["CONTROL_QUEUE", "app"]

# Threads suit sessions, which wait on a subprocess: a few MB per session instead of a whole
# interpreter. `-P prefork` works too; both pools pass the same stop and recovery tests.
DEFAULT_POOL = "threads"
# The default pool is set as the default of the `-P` option, not as the `worker_pool` setting:
# Celery's CLI cannot tell an explicit `-P prefork` from its own default and replaces both by a
# configured `worker_pool` (celery/bin/worker.py, WorkersPool.convert: `if value == 'prefork'
# and worker_pool: value = get_implementation(worker_pool)`), so `-P prefork` would silently
# run threads. `celery` reads option defaults from CELERY_<COMMAND>_<OPTION> (its click group
# runs with auto_envvar_prefix="CELERY", celery/bin/celery.py), and `-A` imports this module
# before the worker's options are parsed. Any `-P`, or a CELERY_WORKER_POOL of the user's, wins.
POOL_ENVVAR = "CELERY_WORKER_POOL"
DEFAULT_CONCURRENCY = 10
# beat's lock (celery-redbeat) lapses this long after its holder died; a standby then takes over.
BEAT_LOCK_TIMEOUT_SECONDS = 10
BEAT_MAX_LOOP_SECONDS = 1

try:
    settings = load_settings()
except SettingsError as exc:
    sys.exit(f"dispatcher: {exc}")

os.environ.setdefault(POOL_ENVVAR, DEFAULT_POOL)  # see POOL_ENVVAR

app = Celery("dispatcher", include=sorted({name.rsplit(".", 1)[0] for name in
                                           (*names.CONTROL_TASKS, names.SESSION_RUN)}))
use_app(app)


# With webhooks: how soon a drain the full fleet cut short carries on once a slot frees (a
# Redis read when nothing is standing).
WAKE_TICK_SECONDS = 1.0


# Control ticks nobody took within this are dropped, so a control queue left without workers
# does not grow for ever. Celery stamps `expires` as an absolute time with beat's clock and each
# worker compares it with its own: it must be far longer than any skew between hosts (a tick
# that expired after 1 s was dropped by every control worker 1 s ahead of beat: no heartbeat,
# no poll). A worker back from an outage runs the two minutes of ticks it finds; each is one
# Redis read when nothing is due, and every tick does the same idempotent work.
CONTROL_TICK_EXPIRES_SECONDS = 120.0


def _schedule() -> dict[str, dict[str, object]]:
    """The control ticks, each on the control queue."""

    def every(task: str, seconds: float) -> dict[str, object]:
        return {"task": task, "schedule": seconds,
                "options": {"expires": max(seconds, CONTROL_TICK_EXPIRES_SECONDS),
                            "queue": CONTROL_QUEUE}}

    if settings.webhooks:
        # Deliveries wake the poller; the idle fleet polls once a sweep, which claims what a
        # lost delivery left, and the tick only reads Redis until a drain is left standing.
        polling = {"sweep": every(names.CLAIM_NOW, settings.webhook_sweep_seconds),
                   "poll": every(names.CLAIM_WOKEN, WAKE_TICK_SECONDS)}
    else:
        polling = {"poll": every(names.POLL, settings.poll_interval_seconds)}
    return {
        **polling,
        "heartbeat": every(names.HEARTBEAT, settings.heartbeat_tick_seconds),
        "stop-bridge": every(names.SCAN_STOPS, settings.bridge_interval_seconds),
        "recovery": every(names.RECOVER, settings.bridge_interval_seconds),
    }


def _queue(name: str) -> Queue:
    """A direct queue bound by its own name, so `queue=` in send_task reaches exactly it."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


_celery_keys = {"global_keyprefix": CeleryKeys(settings.key_prefix).broker}
_beat_url, _beat_options = split_redis_credentials(settings.redis_url)

app.conf.update(
    # Redis, or RabbitMQ when DISPATCHER_BROKER_URL names it; results stay in Redis.
    **broker.broker_conf(settings),
    result_backend_transport_options=_celery_keys,
    result_backend=settings.redis_url,
    broker_connection_retry_on_startup=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_expires=24 * 3600,
    task_queues=[_queue(CONTROL_QUEUE), *[_queue(name) for name in settings.session_queues]],
    task_default_queue=CONTROL_QUEUE,
    task_routes={names.SESSION_RUN: {"queue": settings.default_session_queue}},
    # Early ack, and no prefetch (broker_conf): a session message is never redelivered.
    task_acks_late=False,
    worker_prefetch_multiplier=1,
    task_track_started=True,
    worker_concurrency=DEFAULT_CONCURRENCY,
    worker_send_task_events=True,
    # No task-sent events: beat publishes the control ticks, several a second, and a session's
    # publishing is logged (`dispatched`); Flower shows sessions from their `received` event.
    task_send_sent_event=False,
    # beat: celery-redbeat, whose Redis lock makes `-B` safe on every node of a fleet, with a
    # tick that survives a Redis restart (dispatcher.celery.beat).
    beat_scheduler="dispatcher.celery.beat:Scheduler",
    # No password in the URL: `celery inspect conf` and Flower show this setting unmasked. It
    # travels in the options, whose `password` Celery masks (dispatcher.settings).
    redbeat_redis_url=_beat_url,
    # Set even when empty: unset, redbeat falls back to the broker's transport options.
    redbeat_redis_options=_beat_options,
    redbeat_key_prefix=f"{settings.key_prefix}:redbeat:",
    redbeat_lock_key=CeleryKeys(settings.key_prefix).beat_lock,
    redbeat_lock_timeout=BEAT_LOCK_TIMEOUT_SECONDS,
    beat_max_loop_interval=BEAT_MAX_LOOP_SECONDS,
    beat_schedule=_schedule(),
)

from dispatcher.celery import bootsteps, signals  # noqa: E402  (they need `app`)

bootsteps.install(app)
signals.quiet_control_ticks()
