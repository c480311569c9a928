"""Lost replies: the API applies an ack, a heartbeat or a stop, and the connection drops before
its answer, mixed with 503s (never applied), on short leases, with both of the emulator's lapse
behaviours (a lapsed lease re-queued, or stopped).

What a lost reply tests (docs/architecture.md, "The lease"): an ack that landed unseen is
claimed with the `NO_HEARTBEAT` probe, not acked again nor left `starting`; a heartbeat that
landed unseen leaves the fleet with a token the server no longer holds, and the 412 that follows
adopts the server's token instead of killing a healthy session; a stop that landed unseen is
retried until the server says it is stopped, and the session is not run again. Promise: every
session runs to completion exactly once and ends `stopped`, whatever the lapse mode.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.chaos import ChaosFleet
from tests.support.invariants import NO_HEARTBEAT

pytestmark = pytest.mark.chaos

SESSIONS = 200
# Session lengths, seconds: a few heartbeats at most (TTL 6 s, one beat every 2 s), so most
# leases see a lost reply on their ack, a beat or their stop.
DURATION_RANGE_SECONDS = (0.5, 4.0)
TTL_SECONDS = 6
LOST_REPLY_RATE = 0.3
ERROR_RATE = 0.2
FAULTY_ENDPOINTS = ["ack", "heartbeat", "stop"]
SLOTS_PER_WORKER = 6
# 200 sessions of 2.25 s on average through 12 slots is under a minute of sandbox time; the
# rest is retries and a 2-core machine shared with other test runs.
FINISH_TIMEOUT_SECONDS = 420
# An item acked but never heartbeated lapses (re-queued or stopped, as the mode says) as long
# after its ack as the emulator's earlier default TTL: what this scenario was shown under.
UNCLAIMED_LAPSES = ("--unclaimed-limit", "120")


@pytest.mark.timeout(FINISH_TIMEOUT_SECONDS + 120)
@pytest.mark.parametrize("lapse", ["requeue", "stop"])
def test_lost_replies_on_ack_heartbeat_and_stop(lapse: str, chaos: Callable[..., ChaosFleet],
                                                report: Callable[..., None]) -> None:
    cf = chaos(f"lost replies 30% + 503 20% on ack, heartbeat, stop (lapse: {lapse})",
               ttl=TTL_SECONDS, emulator_flags=("--lease-expiry", lapse, *UNCLAIMED_LAPSES))
    cf.control()
    cf.sessions_worker("s1", concurrency=SLOTS_PER_WORKER)
    cf.sessions_worker("s2", concurrency=SLOTS_PER_WORKER)
    cf.fleet.wait_slots(2 * SLOTS_PER_WORKER)
    emulator = cf.fleet.emulator
    # 503s are drawn before lost replies: 20% answered 503, then 30% of the rest lost.
    emulator.set_faults(lost_reply_rate=LOST_REPLY_RATE, error_rate=ERROR_RATE,
                        error_status=503, endpoints=FAULTY_ENDPOINTS)
    for _ in range(SESSIONS):
        cf.create(1, fake_duration=round(cf.rng.uniform(*DURATION_RANGE_SECONDS), 2))
    try:
        figures = cf.finish(timeout=FINISH_TIMEOUT_SECONDS)
    finally:
        emulator.reset_faults()
    log = [e for e in emulator.requests_log() if e.get("environment_id") == cf.fleet.environment_id]
    injected = [e for e in log if e.get("fault")]
    figures.faults = len(injected)
    counts = Counter((str(e["fault"]), str(e["endpoint"])) for e in injected)
    figures.fault_kinds = ", ".join(f"{kind} on {endpoint} x{n}"
                                    for (kind, endpoint), n in sorted(counts.items()))
    lost_on = {e["endpoint"] for e in injected if e["fault"] == "lost_reply"}
    assert lost_on == set(FAULTY_ENDPOINTS), f"replies were lost on every endpoint: {lost_on}"
    given_up = _given_up_after_an_unseen_claim(log)
    # Nothing proves such an item is ours (no attempt of its ack was answered: all ten replies
    # lost or refused), so the lease machine gives it up after the 412 rather than risk taking
    # another holder's lease (claiming.py, `_lost_heartbeat_was_ours`), and never publishes it
    # (`proven_ours`): with `stop` the lapsed item never runs. At 30 % lost replies and 20 %
    # 503s about one item in 12,000 meets it (one in 500 with six ack attempts, as in four of
    # ten runs); only this exact sequence is excused, any other violation fails.
    report(figures, known=lambda v: v.split(":")[0] in given_up and (
        v.endswith("never ran to completion (lost)") or "ran to completion" in v),
        why="given up: no ack attempt answered, the NO_HEARTBEAT claim's reply lost, then 412")


def _given_up_after_an_unseen_claim(log: list[dict[str, Any]]) -> set[str]:
    """Items with a delivery whose ack was never answered (2xx, or 409 to a retry), whose
    NO_HEARTBEAT claim was applied but its reply lost, whose next claim was refused 412, and
    which no heartbeat of ours reached again before the next delivery."""
    deliveries: dict[str, list[list[dict[str, Any]]]] = {}
    for e in log:
        if not e.get("work_id"):
            continue
        runs = deliveries.setdefault(str(e["work_id"]), [])
        if e.get("endpoint") == "poll" or not runs:
            runs.append([])
        runs[-1].append(e)
    return {work_id for work_id, runs in deliveries.items() if any(map(_unseen_claim, runs))}


def _unseen_claim(entries: list[dict[str, Any]]) -> bool:
    def answered(e: dict[str, Any]) -> bool:
        return 200 <= int(e.get("status") or 0) < 300

    acks = [e for e in entries if e.get("endpoint") == "ack"]
    claims = [e for e in entries if e.get("endpoint") == "heartbeat"
              and e.get("expected_last_heartbeat") == NO_HEARTBEAT]
    beats = [e for e in entries if e.get("endpoint") == "heartbeat"]
    def acked(e: dict[str, Any]) -> bool:  # a 409 to a retry after a lost reply: ours, landed
        return answered(e) or int(e.get("status") or 0) == 409

    return (bool(acks) and not any(map(acked, acks))
            and any(e.get("fault") == "lost_reply" and e.get("applied_status") == 200
                    for e in claims)
            and any(int(e.get("status") or 0) == 412 for e in claims)
            and not any(map(answered, beats)))
