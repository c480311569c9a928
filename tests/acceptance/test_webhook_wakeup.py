"""Webhook wake-up end to end: the emulator delivers signed `session.status_run_started`
webhooks to a real `dispatcher webhooks`, which wakes a real fleet (celery worker and beat) whose
polling is down to the slow sweep."""

from __future__ import annotations

import base64
import itertools
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from dispatcher.celery import names
from dispatcher.celery.keys import CeleryKeys
from dispatcher.emulator.cli import ENV_WEBHOOK_SIGNING_KEY
from dispatcher.emulator.webhooks import run_started_event
from dispatcher.lease.machine import heartbeat_interval
from tests.support import invariants
from tests.support.fleet import Fleet, flush_fleet_db
from tests.support.isolation import free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.acceptance

KEY = "whsec_" + base64.b64encode(b"the acceptance tests' signing k").decode()
FORGED_KEY = "whsec_" + base64.b64encode(b"a key the receiver does not know").decode()
# Long enough that nothing in a test but a webhook (or a test's own sweep) explains a claim.
NO_SWEEP_SECONDS = "600"


class WebhookFleet:
    def __init__(self, fleet: Fleet, url: str) -> None:
        self.fleet = fleet
        self.url = url
        self.port = int(url.rsplit(":", 1)[1].split("/")[0])
        self.http = httpx.Client(timeout=10)

    def start(self, *, sweep_seconds: str = NO_SWEEP_SECONDS) -> None:
        self.fleet.overrides.update({"DISPATCHER_WEBHOOKS": "true",
                                     "DISPATCHER_WEBHOOK_SWEEP_SECONDS": sweep_seconds})
        self.fleet.stack.webhooks("webhooks", self.fleet.env(), port=self.port,
                                  signing_key=KEY)
        self.fleet.worker("w1", concurrency=4, beat=True)
        self.fleet.wait_slots(2)
        # Beat runs the sweep once as it starts; what follows is the idle fleet.
        wait_for(lambda: self.polls(), timeout=30, what="the first sweep's poll")

    def polls(self) -> list[dict[str, Any]]:
        return [r for r in self.fleet.emulator.requests_log() if r["endpoint"] == "poll"]

    def api_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.fleet.emulator.requests_log() if r["endpoint"] != "webhook"]

    def deliveries(self, work_id: str) -> list[dict[str, Any]]:
        return [r for r in self.fleet.emulator.requests_log()
                if r["endpoint"] == "webhook" and r["work_id"] == work_id]

    def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.http.post(self.url, content=body, headers=headers)


@pytest.fixture
def webhooks(emulator_factory: Callable[..., Any], tmp_path: Path) -> Iterator[WebhookFleet]:
    url = f"http://127.0.0.1:{free_port()}/webhooks"
    emulator = emulator_factory("--webhook-url", url, env={ENV_WEBHOOK_SIGNING_KEY: KEY})
    flush_fleet_db()
    fleet = Fleet(emulator, tmp_path)
    wf = WebhookFleet(fleet, url)
    try:
        yield wf
    finally:
        wf.http.close()
        fleet.stop_all()


def signed(session_id: str, *, key: str = KEY, age: timedelta = timedelta(0),
           webhook_id: str | None = None) -> tuple[bytes, dict[str, str]]:
    event = run_started_event(session_id)
    body = json.dumps(event)
    moment = datetime.now(tz=UTC) - age
    message_id = webhook_id or event["id"]
    return body.encode(), {"content-type": "application/json", "webhook-id": message_id,
                           "webhook-timestamp": str(int(moment.timestamp())),
                           "webhook-signature": Webhook(key).sign(message_id, moment, body)}


def test_a_signed_webhook_wakes_the_idle_fleet_which_claims_the_session(
        webhooks: WebhookFleet) -> None:
    webhooks.start()
    fleet = webhooks.fleet
    fleet.emulator.clear_requests()
    time.sleep(3)
    assert webhooks.api_requests() == [], "an idle fleet woken by webhooks asks nothing"

    created = time.time()
    work_id = fleet.create(fake_duration=0.2)
    fleet.wait_event(work_id, "started", timeout=30)
    fleet.wait_stopped([work_id], timeout=30)
    started = fleet.events(work_id, "started")[0]["time"]

    assert [d["status"] for d in webhooks.deliveries(work_id)] == [202]
    polls = webhooks.polls()
    assert polls and all(p["block_ms"] is None for p in polls), "the wake-up drains, not blocks"
    assert any(p.get("work_id") == work_id for p in polls)
    assert len(polls) <= 3, f"one drain: the item, then an empty poll ({len(polls)} polls)"
    assert started - created < 10, "the webhook, not the sweep, brought the session in"
    assert "webhook accepted" in fleet.log("webhooks")


def test_forged_stale_and_replayed_deliveries_are_refused_and_claim_nothing(
        webhooks: WebhookFleet) -> None:
    webhooks.start()
    fleet = webhooks.fleet
    fleet.emulator.set_faults(webhook_drop_rate=1.0)  # only the test's deliveries arrive
    work_id = fleet.create(fake_duration=0.2)
    session_id = fleet.admin.get(work_id).session_id
    fleet.emulator.clear_requests()

    forged = webhooks.post(*signed(session_id, key=FORGED_KEY))
    stale = webhooks.post(*signed(session_id, age=timedelta(minutes=6)))
    body, headers = signed(session_id)
    unsigned = webhooks.post(body, {k: v for k, v in headers.items()
                                    if k != "webhook-signature"})
    assert (forged.status_code, stale.status_code, unsigned.status_code) == (401, 401, 400)
    time.sleep(2)
    assert webhooks.polls() == [], "a refused delivery wakes nothing"
    assert fleet.state(work_id) == "queued"

    assert webhooks.post(body, headers).status_code == 202
    fleet.wait_stopped([work_id], timeout=30)
    fleet.emulator.clear_requests()
    replayed = webhooks.post(body, headers)
    assert replayed.status_code == 400 and "replayed" in replayed.text
    time.sleep(2)
    assert webhooks.polls() == [], "a replayed delivery wakes nothing"


def test_503_while_the_fleet_drains_and_the_senders_retry_is_claimed(
        webhooks: WebhookFleet) -> None:
    webhooks.start()
    fleet = webhooks.fleet
    fleet.kill("w1", signal.SIGTERM)
    fleet.stack.processes["w1"].wait(timeout=30)
    fleet.emulator.clear_requests()

    work_id = fleet.create(fake_duration=0.2)
    wait_for(lambda: webhooks.deliveries(work_id), timeout=10, what="the first delivery")
    assert webhooks.deliveries(work_id)[0]["status"] == 503
    session_id = fleet.admin.get(work_id).session_id
    assert webhooks.post(*signed(session_id)).status_code == 503

    fleet.worker("w2", concurrency=4, beat=True)
    fleet.wait_stopped([work_id], timeout=60)
    statuses = [d["status"] for d in webhooks.deliveries(work_id)]
    assert statuses[-1] == 202 and set(statuses[:-1]) == {503}, statuses


def test_a_lost_delivery_is_recovered_by_the_sweep(webhooks: WebhookFleet) -> None:
    webhooks.start(sweep_seconds="4")
    fleet = webhooks.fleet
    fleet.emulator.set_faults(webhook_drop_rate=1.0)
    work_id = fleet.create(fake_duration=0.2)
    fleet.wait_stopped([work_id], timeout=30)
    assert [d["fault"] for d in webhooks.deliveries(work_id)] == ["webhook_dropped"]

    fleet.emulator.clear_requests()
    time.sleep(9)
    assert 1 <= len(webhooks.polls()) <= 3, "the idle fleet polls once a sweep"


BURST = 10_000
SENDERS = 16  # concurrent connections, as a sender's retry pool would open
BURST_TTL_S = 9  # heartbeats every 3 s, the retry window 6 s
# The burst's senders, the receiver and the fleet share this machine's two cores: heartbeat
# ticks run late by the CPU they wait for (4.0-5.6 s between heartbeats seen here at an
# interval of 2 s), not by the queue (one wake-up at most in it). On schedule, here: a
# heartbeat follows the one before within the TTL less this, so no lease comes near its lapse.
LAPSE_MARGIN_S = 2.0


def _pending_wakeups(fleet: Fleet) -> int:
    """Wake-up messages waiting in the control queue, not yet taken by a worker."""
    count = 0
    for queue in fleet.redis.keys(f"{CeleryKeys(fleet.prefix).broker}dispatcher.control*"):
        for raw in fleet.redis.lrange(queue, 0, -1):
            count += json.loads(raw).get("headers", {}).get("task") == names.CLAIM_NOW
    return count


def test_a_burst_of_ten_thousand_deliveries_keeps_heartbeats_on_schedule(
        webhooks: WebhookFleet) -> None:
    """While sessions hold short leases, 10,000 deliveries arrive: at most one wake-up is ever
    pending on the control queue, and every lease is heartbeated on its schedule (the control
    queue's heartbeat ticks are never stuck behind wake-ups)."""
    fleet = webhooks.fleet
    fleet.overrides["DISPATCHER_DESIRED_TTL_SECONDS"] = str(BURST_TTL_S)
    webhooks.start()
    work_ids = [fleet.create(fake_duration=600) for _ in range(2)]
    for work_id in work_ids:
        fleet.wait_event(work_id, "started", timeout=30)
    pending: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            pending.append(_pending_wakeups(fleet))
            done.wait(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    deliveries = [signed(f"session_{n}") for n in range(BURST)]
    began = time.time()
    chunks = [deliveries[i::SENDERS] for i in range(SENDERS)]

    def send(chunk: list[tuple[bytes, dict[str, str]]]) -> list[int]:
        with httpx.Client(timeout=30) as http:
            return [http.post(webhooks.url, content=body, headers=headers).status_code
                    for body, headers in chunk]

    with ThreadPoolExecutor(SENDERS) as pool:
        statuses = [s for chunk in pool.map(send, chunks) for s in chunk]
    ended = time.time()
    done.set()
    watcher.join(timeout=5)
    for work_id in work_ids:
        fleet.admin.stop(work_id, force=True)
    fleet.wait_stopped(work_ids, timeout=30)

    assert statuses == [202] * BURST, {s: statuses.count(s) for s in set(statuses)}
    assert pending and max(pending) <= 1, f"wake-ups pending at once: {max(pending)}"
    log = fleet.emulator.requests_log()
    assert not invariants.leases_kept_alive(log, ttl=BURST_TTL_S, margin=0.5,
                                            end_time=time.time())
    late = []
    for work_id in work_ids:
        beats = [float(e["time"]) for e in log
                 if e.get("endpoint") == "heartbeat" and e.get("work_id") == work_id]
        for before, after in itertools.pairwise(beats):
            if began <= after <= ended and after - before > BURST_TTL_S - LAPSE_MARGIN_S:
                late.append(f"{work_id}: {after - before:.1f}s after the one before")
    assert not late, (f"heartbeats late during the burst ({ended - began:.0f} s, interval "
                      f"{heartbeat_interval(BURST_TTL_S):.0f} s): {late}")
