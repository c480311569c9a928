"""The heartbeat tick at scale: one long-lived sender per process (its connections outlive
ticks), a tick's plain replies recorded in one round trip, the exceptional ones one by one.
Real Redis and the emulator over HTTP."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from dispatcher.control import heartbeat
from dispatcher.control.heartbeat import close_sender, heartbeat_due_leases
from dispatcher.control.poller import claim
from dispatcher.lease import events as ev
from dispatcher.lease.model import Phase
from dispatcher.runtime import Runtime
from dispatcher.workapi.http11 import AsyncHTTP11Transport
from tests.support.inprocess import poll_until

pytestmark = pytest.mark.integration


def _claimed(emulator: Any, runtime: Runtime, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        _, work_id = emulator.create_session(runtime.environment_id, metadata={})
        assert claim(runtime, poll_until(runtime, work_id))
        ids.append(work_id)
    return ids


def _all_due(runtime: Runtime, ids: list[str]) -> None:
    for work_id in ids:
        runtime.registry.schedule_heartbeat(work_id, time.time() - 1)


def _beats(emulator: Any, ids: list[str]) -> list[dict[str, Any]]:
    return [e for e in emulator.requests_log()
            if e.get("work_id") in ids and e.get("endpoint") == "heartbeat"]


def test_ticks_from_any_thread_share_one_sender_and_its_connections(
        emulator: Any, runtime: Runtime) -> None:
    ids = _claimed(emulator, runtime, 3)
    tallies = []
    _all_due(runtime, ids)
    tallies.append(heartbeat_due_leases(runtime))
    sender = heartbeat._sender()
    (client,) = [c for c in sender.clients.values()
                 if c.environment_id == runtime.environment_id]
    assert isinstance(client.transport, AsyncHTTP11Transport)
    # As many connections as requests the heartbeat keeps in flight: fewer would queue some.
    assert client.transport.max_connections == heartbeat.MAX_CONCURRENT_REQUESTS
    opened = client.transport.connections_opened
    assert opened >= 1
    _all_due(runtime, ids)
    worker = threading.Thread(target=lambda: tallies.append(heartbeat_due_leases(runtime)))
    worker.start()
    worker.join()
    assert [t.sent for t in tallies] == [3, 3]
    assert heartbeat._sender() is sender, "one sender per process"
    assert client.transport.connections_opened == opened, "no connection made for tick two"
    for work_id in ids:
        lease = runtime.registry.get(work_id)
        assert lease is not None and lease.inflight_until == 0
        beats = [e for e in _beats(emulator, [work_id]) if e["status"] == 200]
        assert lease.token == beats[-1]["last_heartbeat"], "the newest token is kept"
        due = runtime.registry.next_due(work_id)
        assert due is not None and due > time.time() + lease.ttl_seconds / 3 - 2
    close_sender()
    _all_due(runtime, ids)
    assert heartbeat_due_leases(runtime).sent == 3, "a closed sender is made again on the next tick"
    assert heartbeat._sender() is not sender


def test_a_lease_released_or_handed_to_its_sandbox_during_the_beat_is_left_alone(
        emulator: Any, runtime: Runtime) -> None:
    released, handed, releasing = _claimed(emulator, runtime, 3)
    registry = runtime.registry
    registry.update(releasing, heartbeats_by="sandbox", phase=Phase.RELEASING)
    handed_lease = registry.get(handed)
    assert handed_lease is not None
    runtime.executor.run(handed_lease, ev.HandingOff())
    # As the tick decided them: the first two read as the dispatcher's, the third releasing.
    plain = [(w, f"token-{w}", 30, time.time(), time.time() + 10, by)
             for w, by in ((released, "dispatcher"), (handed, "dispatcher"), (releasing, ""))]
    registry.delete(released)
    assert registry.record_heartbeats(plain) == [released]
    assert registry.get(released) is None, "never written back"
    handed_lease, releasing_lease = registry.get(handed), registry.get(releasing)
    assert handed_lease is not None and handed_lease.token == f"token-{handed}"
    assert registry.next_due(handed) is None, "the sandbox beats it now"
    assert releasing_lease is not None and registry.next_due(releasing) is not None, (
        "a release to retry stays scheduled whoever beat the lease")


def test_a_stopping_reply_in_a_big_tick_still_raises_the_stop_flag(
        emulator: Any, runtime: Runtime) -> None:
    ids = _claimed(emulator, runtime, 4)
    emulator.http.post(emulator.work_url(runtime.environment_id, f"/{ids[0]}/stop"),
                       headers=emulator.org_headers, json={"force": False}).raise_for_status()
    _all_due(runtime, ids)
    queued = runtime.registry.get(ids[0])
    assert queued is not None
    tally = heartbeat_due_leases(runtime)
    assert tally.sent == 4
    # Its task still waits in a queue: revoked, and the item stopped at once.
    assert runtime.registry.get(ids[0]) is None
    assert queued.task_id in runtime.app.revoked
    assert emulator.get(runtime.environment_id, ids[0])["state"] == "stopped"
    for work_id in ids[1:]:
        lease = runtime.registry.get(work_id)
        assert lease is not None and not lease.stop


def test_a_throttled_answer_to_the_probe_ends_the_doubt_and_is_honoured(
        emulator: Any, runtime: Runtime) -> None:
    """A control worker that doubts its link probes with `stats`; the server answering it 429
    is the server speaking: the link is trusted again, the throttle stands for the fleet, and
    the next probe waits for it."""
    ids = _claimed(emulator, runtime, 2)
    sender = heartbeat._sender()
    sender.reach = heartbeat.Reach(cut_since=time.monotonic())
    emulator.set_faults(endpoints=["stats"], rate_limit_rate=1.0, retry_after_seconds=30.0)
    try:
        _all_due(runtime, ids)
        heartbeat_due_leases(runtime)
        assert sender.reach == heartbeat.Reach()  # the tick's heartbeats then meet the throttle
        assert runtime.pacing.remaining(runtime.environment_id) > 20
        probes = [e for e in emulator.requests_log() if e.get("endpoint") == "stats"]
        sender.reach = heartbeat.Reach(cut_since=time.monotonic())
        assert heartbeat_due_leases(runtime) == heartbeat.Tally()  # throttled: no probe sent
        assert [e for e in emulator.requests_log() if e.get("endpoint") == "stats"] == probes
    finally:
        emulator.reset_faults()
        close_sender()


def test_a_beat_a_tick_could_not_send_in_time_is_due_again_at_once(
        emulator: Any, runtime: Runtime) -> None:
    """Every place in flight held past the time a request still fits in the lease's in-flight
    mark (a server that answers nothing for seconds): the tick's beat is not sent, and is due
    again when it was due, not when its mark lapses; the next tick sends it."""
    (work_id,) = _claimed(emulator, runtime, 1)
    before = runtime.registry.get(work_id)
    assert before is not None
    _all_due(runtime, [work_id])
    due = runtime.registry.next_due(work_id)
    assert due is not None
    sender = heartbeat._sender()
    held = threading.Event()
    # Past a request's time inside the mark, the beat's turn comes too late to be sent.
    hold_seconds = heartbeat.INFLIGHT_SECONDS - heartbeat.REQUEST_TIMEOUT_SECONDS + 0.5

    async def hold_every_place() -> None:
        limit = sender.limit()
        for _ in range(heartbeat.MAX_CONCURRENT_REQUESTS):
            await limit.acquire()
        held.set()
        await asyncio.sleep(hold_seconds)
        for _ in range(heartbeat.MAX_CONCURRENT_REQUESTS):
            limit.release()

    sent_before = len(_beats(emulator, [work_id]))
    holder = asyncio.run_coroutine_threadsafe(hold_every_place(), sender.loop)
    assert held.wait(5)
    tally = heartbeat_due_leases(runtime)
    holder.result(5)
    assert (tally.sent, tally.late) == (0, 1)
    assert len(_beats(emulator, [work_id])) == sent_before, "nothing sent by the late tick"
    after = runtime.registry.get(work_id)
    assert after is not None and after.inflight_until == 0 and after.token == before.token
    assert runtime.registry.next_due(work_id) == pytest.approx(due), "due again when it was due"
    tally = heartbeat_due_leases(runtime)
    assert (tally.sent, tally.late) == (1, 0)
    beaten = runtime.registry.get(work_id)
    assert beaten is not None and beaten.token != before.token
    later = runtime.registry.next_due(work_id)
    assert beaten.inflight_until == 0 and later is not None and later > time.time(), (
        "the answer scheduled the next beat")
