"""The lease machine by tables: every (event, phase) pair of the rule table docs/architecture.md
shows, held to what it must do. No Redis, no network: `decide` is a pure function.

Each expectation names the phase after and the effects that must (and must not) be there; the
table itself is generated from the code (`dispatcher.lease.table`), so a rule that changes shows
up here as a failing row and in the doc as a changed one."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.causes import Outcome
from dispatcher.lease.machine import (
    Delivery,
    Policy,
    Stuck,
    claiming,
    decide,
    heartbeat_interval,
    may_still_send,
    message_lost,
    pulse_is_quiet,
    renewal_due,
    running,
    stuck,
)
from dispatcher.lease.machine.running import DISPATCH_STALE_SECONDS, MISSING_CONFIRM_SECONDS
from dispatcher.lease.machine.steps import CATCH_UP_SHARE
from dispatcher.lease.model import Ending, Lease, Phase, StopKind
from dispatcher.lease.table import NOW, PHASES, SCENARIOS, describe, lease_in, rows

ANY = ("claimed", "dispatched", "running", "releasing")
HELD = ("claimed", "dispatched", "running")
QUEUED = ("claimed", "dispatched")

# (event, phases, phase after ("none": no record), effects that must be there, must not be).
EXPECTED: list[tuple[str, tuple[str, ...], str, set[str], set[str]]] = [
    # A plain session is recorded and published while its ack is in flight: its attempt
    # prepares meanwhile and starts only once the ack is answered ("attempt starting, ack in
    # flight").
    ("offered", ("none",), "dispatched", {"Ack", "CreateRecord", "Publish"},
     {"StopOnServer", "MarkRunning", "Claim"}),
    ("offered", QUEUED, "none", {"DeleteRecord", "log `polled a held lease`"},
     {"Ack", "StopOnServer", "Publish"}),
    ("offered", ("running",), "running", {"FlagStop(force)", "RecordHistory"},
     {"Ack", "Publish"}),
    # An item stopped at the poll is stopped as the delivery the poll returned (its token).
    ("offered", ("releasing",), "releasing", {"StopOnServer(polled token)"}, {"Ack", "Publish"}),
    ("offered, unknown type", ("none",), "none", {"StopOnServer(polled token)"}, {"Ack"}),
    ("offered, ended before", ("none",), "none", {"StopOnServer(polled token)"}, {"Ack"}),
    ("offered, attempts used up", ("none",), "none", {"StopOnServer(polled token)"}, {"Ack"}),
    ("unreadable item", ("none",), "none", {"StopOnServer", "log `invalid work item`"}, {"Ack"}),
    # A session is published first and claimed right after: the claim's round trip never
    # delays it.
    ("ack answered", ("claimed",), "dispatched", {"CreateRecord", "Publish", "Claim"}, set()),
    # An ack nobody answered may not be ours: claimed first, published once a claim answers.
    ("ack never answered", ("claimed",), "claimed",
     {"CreateRecord", "Claim", "log `ack uncertain`"}, {"Publish"}),
    # A 409 to a retry after an unanswered attempt is our own ack, which landed.
    ("ack 409 after an unanswered attempt", ("claimed",), "dispatched",
     {"CreateRecord", "Publish", "Claim"}, {"log `ack uncertain`"}),
    ("ack 409 at once", ("claimed",), "claimed",
     {"CreateRecord", "Claim", "log `ack uncertain`"}, {"Publish"}),
    ("claim failed (transient), ack unanswered", ("claimed",), "claimed", {"Schedule"},
     {"Publish"}),
    ("claim failed (transient), ack unanswered", ("dispatched",), "dispatched", {"Schedule"},
     {"Publish"}),
    ("claim 412, nobody heartbeated it, ack unanswered", ("claimed",), "claimed", {"Schedule"},
     {"Publish"}),
    ("claim 412, nobody heartbeated it, ack unanswered", ("dispatched",), "dispatched",
     {"Schedule"}, {"Publish"}),
    ("heartbeat answered, ack unanswered", ("claimed",), "dispatched",
     {"RecordHeartbeat", "Publish"}, set()),
    ("claim stranded, ack unanswered", ("claimed",), "claimed", {"Schedule"}, {"Publish"}),
    ("ack refused (4xx)", ("claimed",), "none", set(), {"CreateRecord", "StopOnServer"}),
    # Published with its ack: the answer proves the lease (its waiting attempt starts), and the
    # claim follows; no answer leaves it to the claim; a refusal takes the message back.
    ("ack answered", ("dispatched",), "dispatched", {"MarkProven", "Claim"},
     {"CreateRecord", "Publish"}),
    ("ack never answered", ("dispatched",), "dispatched", {"Claim", "log `ack uncertain`"},
     {"MarkProven", "CreateRecord", "Publish"}),
    ("ack 409 after an unanswered attempt", ("dispatched",), "dispatched",
     {"MarkProven", "Claim"}, {"log `ack uncertain`", "CreateRecord", "Publish"}),
    ("ack 409 at once", ("dispatched",), "dispatched", {"Claim", "log `ack uncertain`"},
     {"MarkProven", "CreateRecord", "Publish"}),
    ("ack refused (4xx)", ("dispatched",), "none", {"Revoke", "DeleteRecord"},
     {"StopOnServer", "Publish"}),
    # Acked, but Redis refused the record past the executor's retries: nobody could beat or run
    # it, so it is stopped rather than left in `starting`.
    ("record refused, fresh claim", ("dispatched",), "none",
     {"StopOnServer", "log `abandoned`"}, {"Publish", "Claim"}),
    # A running attempt's write-back: the attempt tries again at its next pulse.
    ("record refused, write-back", ("running",), "none", {"log `write-back failed`"},
     {"StopOnServer", "FlagStop(force)"}),
    ("claim answered", ("claimed",), "dispatched", {"RecordHeartbeat", "Publish"}, set()),
    ("claim 412, nobody heartbeated it", ("claimed",), "dispatched", {"Schedule", "Publish"},
     set()),
    ("claim 412, another holder", ("claimed",), "none", {"DeleteRecord"},
     {"StopOnServer", "Publish"}),
    ("claim 404/409 after an uncertain ack", ("claimed",), "none", {"DeleteRecord"},
     {"StopOnServer", "Publish"}),
    ("claim failed (transient)", ("claimed",), "dispatched", {"Schedule", "Publish"}, set()),
    ("claim answered", ("dispatched",), "dispatched", {"RecordHeartbeat"}, {"Publish"}),
    ("claim 412, nobody heartbeated it", ("dispatched",), "dispatched", {"Schedule"}, {"Publish"}),
    ("claim 412, another holder", ("dispatched",), "none", {"Revoke", "DeleteRecord"},
     {"StopOnServer"}),
    ("claim 404/409 after an uncertain ack", ("dispatched",), "none", {"Revoke", "DeleteRecord"},
     {"StopOnServer"}),
    ("claim failed (transient)", ("dispatched",), "dispatched", {"Schedule"}, {"Publish"}),
    ("heartbeat answered", ("dispatched", "running", "releasing"), "=", {"RecordHeartbeat"},
     {"StopOnServer"}),
    # A claimed lease held back (a healthcheck or hand-off whose claim failed) moves on.
    ("heartbeat answered", ("claimed",), "dispatched", {"RecordHeartbeat", "Publish"},
     {"StopOnServer"}),
    ("heartbeat answered, not extended", QUEUED, "none", {"DeleteRecord"}, {"StopOnServer"}),
    ("heartbeat answered, not extended", ("running",), "running", {"FlagStop(force)"},
     {"StopOnServer", "DeleteRecord"}),
    # The session ended: its item is stopped whatever happens to the lease, as the delivery the
    # lease was claimed from, since another worker may hold the item now.
    ("heartbeat answered, not extended", ("releasing",), "releasing",
     {"StopOnServer(lease token)"}, {"DeleteRecord", "StopOnServer"}),
    ("heartbeat answered, stopping", QUEUED, "releasing", {"FlagStop(graceful)", "StopOnServer"},
     {"Publish"}),
    ("heartbeat answered, stopping", ("running",), "running", {"FlagStop(graceful)"},
     {"StopOnServer"}),
    ("heartbeat answered, stopping", ("releasing",), "releasing", {"RecordHeartbeat"},
     {"FlagStop(graceful)"}),
    ("heartbeat answered, stopped", ("claimed", "dispatched", "releasing"), "none",
     {"DeleteRecord"}, {"StopOnServer"}),
    ("heartbeat answered, stopped", ("running",), "running", {"FlagStop(force)"}, {"StopOnServer"}),
    ("heartbeat 412 after a lost reply, inside the TTL", ANY, "=",
     {"Schedule", "log `heartbeat token adopted`"}, {"FlagStop(force)", "DeleteRecord"}),
    ("heartbeat 412", QUEUED, "none", {"DeleteRecord", "Unschedule"}, {"StopOnServer"}),
    ("heartbeat 412", ("running",), "running", {"FlagStop(force)", "Unschedule"}, {"StopOnServer"}),
    ("heartbeat 412", ("releasing",), "releasing", {"StopOnServer(lease token)"},
     {"DeleteRecord", "StopOnServer"}),
    ("heartbeat 404", ("claimed", "dispatched", "releasing"), "none", {"DeleteRecord"},
     {"StopOnServer"}),
    ("heartbeat 404", ("running",), "running", {"FlagStop(force)"}, {"StopOnServer"}),
    ("heartbeat rejected (other 4xx)", ("claimed", "dispatched", "releasing"), "releasing",
     {"StopOnServer"}, {"Publish"}),
    ("heartbeat rejected (other 4xx)", ("running",), "running", {"FlagStop(force)"},
     {"StopOnServer"}),
    ("heartbeat failed (transient)", ANY, "=", {"Schedule"}, {"FlagStop(force)"}),
    # The server's throttle: a due heartbeat waits it out, or, when the lease would lapse
    # first, waits to its last safe moment; there it goes through the throttle. A claim held
    # back by it publishes an acked session, as a failed claim does.
    ("heartbeat due, throttled briefly", ("dispatched", "running", "releasing"), "=",
     {"Schedule"}, {"HeartbeatNow", "FlagStop(force)"}),
    ("heartbeat due, throttled briefly", ("claimed",), "dispatched", {"Schedule", "Publish"},
     {"HeartbeatNow"}),
    ("heartbeat due, throttled past its last safe moment", ("claimed",), "dispatched",
     {"Schedule", "Publish"}, {"HeartbeatNow"}),
    ("heartbeat due at its last safe moment, throttled", ("claimed",), "dispatched",
     {"HeartbeatNow", "Publish"}, {"Schedule"}),
    ("heartbeat due, throttled past its last safe moment", ("dispatched", "running",
                                                             "releasing"), "=",
     {"Schedule"}, {"HeartbeatNow", "FlagStop(force)"}),
    ("heartbeat due at its last safe moment, throttled", ("dispatched", "running", "releasing"),
     "=", {"HeartbeatNow", "log `heartbeat sent through the throttle`"},
     {"Schedule", "FlagStop(force)"}),
    ("stop requested (server)", QUEUED, "releasing", {"FlagStop(graceful)", "StopOnServer"},
     {"Publish"}),
    ("stop requested (server)", ("running",), "running", {"FlagStop(graceful)"},
     {"StopOnServer"}),
    ("stop requested (force)", QUEUED, "releasing", {"FlagStop(force)", "StopOnServer"}, set()),
    ("stop requested (force)", ("running",), "running", {"FlagStop(force)"}, set()),
    ("server lists it stopped", ("claimed", "dispatched", "releasing"), "none",
     {"DeleteRecord"}, {"StopOnServer"}),
    ("server lists it stopped", ("running",), "running", {"FlagStop(force)"}, set()),
    ("operator terminated the task", QUEUED, "releasing", {"StopOnServer"}, set()),
    ("operator terminated the task", ("running",), "running", {"FlagStop(graceful)"},
     {"StopOnServer"}),
    ("operator revoked the task", QUEUED, "releasing", {"StopOnServer"}, set()),
    ("attempt starting", ("none",), "none", {"log `attempt skipped`", "AttemptOver(gone)"},
     {"MarkRunning"}),
    ("attempt starting", HELD, "running", {"MarkRunning"}, {"AttemptOver(gone)"}),
    # An unproven lease never runs: its attempt waits for the ack's answer.
    ("attempt starting, ack in flight", ("dispatched",), "dispatched", {"AwaitProof"},
     {"MarkRunning", "AttemptOver(lost)"}),
    ("attempt starting", ("releasing",), "releasing",
     {"log `attempt skipped`", "AttemptOver(gone)"}, {"MarkRunning"}),
    ("attempt starting, worker draining", ("none",), "none", set(), {"Publish"}),
    ("attempt starting, worker draining", HELD, "=", {"Publish", "AttemptOver(handed_over)"},
     {"MarkRunning"}),
    ("attempt starting, worker draining", ("releasing",), "releasing", set(), {"Publish"}),
    ("handing off to the sandbox", ANY, "=", {"Unschedule"}, set()),
    ("pulsed, superseded", ANY, "=", {"Fence", "AttemptOver(superseded)"}, {"Signal(force)"}),
    ("pulsed, stop flagged", ANY, "=", {"Signal(graceful)"}, set()),
    ("pulsed, worker draining", ANY, "=", {"Signal(graceful)"}, set()),
    ("sandbox could not start", ANY, "releasing",
     {"StopOnServer", "RecordHistory", "AttemptOver(failed)"}, {"Publish"}),
    # Past its maximum duration: a graceful stop, flagged for the supervisor's next pulse to
    # signal; the sandbox's exit then ends the session and stops its item.
    ("session past its deadline", ("running",), "running",
     {"FlagStop(graceful)", "log `deadline reached`"}, {"Signal(force)", "StopOnServer"}),
    ("a superseded attempt's deadline", ("running",), "running",
     {"AttemptOver(superseded)", "log `stale event ignored`"}, {"FlagStop(graceful)"}),
    # Fencing: an event of a superseded attempt leaves the lease to the current one, whatever
    # it says (a slow engine's start failure once ended the session of the attempt after it).
    ("pulsed, stale attempt", ANY, "=", {"Fence", "AttemptOver(superseded)"}, {"Signal(force)"}),
    ("a stale attempt's sandbox could not start", ANY, "=",
     {"AttemptOver(superseded)", "log `stale event ignored`"},
     {"StopOnServer", "RecordHistory", "DeleteRecord", "FlagStop(force)"}),
    ("a stale attempt's sandbox not started (infrastructure)", ANY, "=",
     {"AttemptOver(superseded)", "log `stale event ignored`"},
     {"NewAttempt", "Publish", "StopOnServer", "RecordHistory"}),
    ("a stale attempt's sandbox exited 1", ANY, "=",
     {"AttemptOver(superseded)", "log `stale event ignored`"},
     {"StopOnServer", "RecordHistory", "DeleteRecord", "NewAttempt"}),
    ("a stale attempt's sandbox exited 1", ("none",), "none",
     {"AttemptOver(superseded)", "log `stale event ignored`"}, {"StopOnServer"}),
    # The infrastructure failed the start: a new attempt, not counted, the item not stopped.
    ("sandbox not started (infrastructure)", HELD, "dispatched",
     {"NewAttempt", "Publish", "AttemptOver(handed_over)"},
     {"StopOnServer", "RecordHistory", "Update"}),
    ("sandbox not started (infrastructure)", ("releasing",), "releasing", {"StopOnServer"},
     {"NewAttempt", "Publish"}),
    ("sandbox exited 0", HELD, "releasing",
     {"StopOnServer", "RecordHistory", "AttemptOver(completed)"}, {"Publish"}),
    ("sandbox exited 1", HELD, "releasing",
     {"StopOnServer", "RecordHistory", "AttemptOver(failed)"}, {"Publish"}),
    ("sandbox exited 0", ("none",), "none", {"AttemptOver(superseded)"}, {"StopOnServer"}),
    ("sandbox exited 1", ("none",), "none", {"AttemptOver(superseded)"}, {"StopOnServer"}),
    ("sandbox exited, worker draining", ("none",), "none", {"AttemptOver(superseded)"},
     {"NewAttempt"}),
    ("sandbox exited 0", ("releasing",), "releasing", {"StopOnServer"}, {"Publish"}),
    ("sandbox exited 1", ("releasing",), "releasing", {"StopOnServer"}, {"Publish"}),
    ("sandbox exited, worker draining", HELD, "dispatched",
     {"NewAttempt", "Publish", "AttemptOver(handed_over)"}, {"StopOnServer"}),
    ("sandbox exited, worker draining", ("releasing",), "releasing", {"StopOnServer"},
     {"NewAttempt", "Publish"}),
    ("registry unreachable past 2/3 TTL", ANY, "=", {"Fence", "AttemptOver(lost)"}, set()),
    ("attempt went silent", ("running",), "dispatched", {"NewAttempt", "Publish"}, set()),
    # Its sandbox held the lease and died with its token: a new runner would be refused (412).
    # Left to lapse on the server; a re-delivery is claimed afresh.
    ("attempt went silent, the sandbox held the lease", ("running",), "none",
     {"RecordHistory", "DeleteRecord", "log `attempt lost with its lease`"},
     {"NewAttempt", "Publish", "StopOnServer", "StopOnServer(lease token)"}),
    # An exited attempt leaves once its lease is released (or another attempt's), and stays
    # while the release is pending (it alone could write the record back).
    ("an exited attempt awaits its release", ("none",), "none", {"AttemptOver(completed)"},
     set()),
    ("a superseded exited attempt awaits its release", ("none", *ANY), "=",
     {"AttemptOver(completed)"}, set()),
    ("message lost", ("dispatched",), "dispatched", {"NewAttempt", "Publish"}, set()),
    ("claim stranded", ("claimed",), "dispatched", {"Publish"}, set()),
    ("release answered (2xx, 404, 409)", ANY, "none", {"DeleteRecord"}, {"StopOnServer"}),
    ("release due again", ("releasing",), "releasing", {"StopOnServer"}, set()),
    ("release failed (transient)", ("none",), "none", {"log `stop failed`"}, set()),
    ("release failed (transient)", ANY, "releasing", {"Schedule"}, {"DeleteRecord"}),
    ("release refused (4xx)", ("none",), "none", {"log `stop failed`"}, set()),
    ("release refused (4xx)", ANY, "none", {"DeleteRecord", "log `release refused`"}, set()),
    # A delivery's token no longer opens the item: stopped gracefully with the environment key,
    # as SDK 2.17's poller does, since another worker may be serving it by now.
    ("stop token refused (401, or no token)", ("none", "releasing"), "=",
     {"StopOnServer(graceful)", "log `stop token refused`"},
     {"StopOnServer", "DeleteRecord", "FlagStop(force)"}),
    # A session that ended after its lease was lost, or whose sandbox held the lease (which it
    # may have lost unseen): stopped as the delivery the lease was claimed from.
    ("sandbox exited 0, lease lost", ("running",), "releasing",
     {"StopOnServer(lease token)", "RecordHistory", "AttemptOver(lost)"},
     {"StopOnServer", "Publish"}),
    ("sandbox exited 0, the sandbox held the lease", ("running",), "releasing",
     {"StopOnServer(lease token)", "RecordHistory", "AttemptOver(completed)"},
     {"StopOnServer", "Publish"}),
    ("release due again, lease lost", ("releasing",), "releasing",
     {"StopOnServer(lease token)"}, {"StopOnServer"}),
    ("healthcheck answered", ANY, "releasing", {"StopOnServer"}, {"Publish"}),
    ("registry reset", ("none",), "running", {"CreateRecord", "Schedule"}, set()),
    # An ended session is written back ending, with its history: its release is tried again
    # and a re-delivery of its item is stopped, not run.
    ("registry reset, session ended", ("none",), "releasing",
     {"CreateRecord", "RecordHistory", "Schedule"}, {"Publish", "NewAttempt"}),
]


def _expected() -> dict[tuple[str, str], tuple[str, set[str], set[str]]]:
    table = {}
    for event, phases, after, must, must_not in EXPECTED:
        for phase in phases:
            assert (event, phase) not in table, f"{event} in {phase} expected twice"
            table[(event, phase)] = (phase if after == "=" else after, must, must_not)
    return table


def _generated() -> dict[tuple[str, str], tuple[str, tuple[str, ...]]]:
    return {(row.event, phase): (row.outcome, row.effects) for row in rows()
            for phase in row.phases}


@pytest.mark.parametrize("event,phase", sorted(_generated()))
def test_every_rule_in_the_table_is_expected(event: str, phase: str) -> None:
    expected = _expected().get((event, phase))
    assert expected is not None, f"the table has a rule for {event!r} in {phase} no test expects"
    after, must, must_not = expected
    outcome, effects = _generated()[(event, phase)]
    assert outcome == after
    assert must <= set(effects), f"missing {must - set(effects)}"
    assert not must_not & set(effects), f"unexpected {must_not & set(effects)}"


def test_every_expected_rule_is_in_the_table() -> None:
    missing = set(_expected()) - set(_generated())
    assert not missing, f"expected but the machine does nothing: {sorted(missing)}"


def test_every_event_the_machine_knows_is_in_the_table() -> None:
    known = {type(e) for e in SCENARIOS.values()}
    assert known == set(ev.Event.__args__), "a new event needs a scenario in the table"


def _effects(lease: Lease | None, event: ev.Event, **kwargs: object) -> list[str]:
    decision = decide(lease, event, now=NOW, **kwargs)  # type: ignore[arg-type]
    return [d for d in map(describe, decision.effects) if d]


# --- rules the table's canonical leases do not show ----------------------------------------

def test_a_finished_session_whose_release_failed_is_stopped_after_a_412() -> None:
    """The failure of a fresh CI run, step by step: exit 0, stop fails (500), the next beat's
    reply is lost although applied, the stop fails again, then the stale token gets a 412."""
    lease = lease_in("running")
    assert lease is not None
    steps: list[ev.Event] = [
        ev.SandboxExited(1, 0, draining=False, next_task_id="t2"),
        ev.ReleaseFailed(500, "internal error"),
        ev.HeartbeatFailed(200, "malformed reply"),
        ev.ReleaseFailed(None, "connection dropped"),
        # The server moved on past the token we hold, and the TTL has passed since the last
        # beat it answered us: this 412 cannot be adopted.
        ev.HeartbeatRefused(ev.ServerLease("active", "tok-applied")),
    ]
    now = NOW
    current: Lease | None = lease
    stops = 0
    for step in steps:
        now += 20
        decision = decide(current, step, now=now)
        current = decision.lease
        stops += sum(isinstance(e, fx.StopOnServer) for e in decision.effects)
        assert not any(isinstance(e, fx.Publish | fx.MarkRunning) for e in decision.effects)
    assert current is not None and current.phase == Phase.RELEASING
    assert stops == 3, "stopped after the exit, on the retry, and after the 412"
    decision = decide(current, ev.ReleaseAnswered(200), now=now)
    assert decision.lease is None, "released once the server confirmed the stop"


def test_a_lost_beat_is_adopted_only_inside_the_ttl() -> None:
    lease = lease_in("running", uncertain=True)
    assert lease is not None
    refused = ev.HeartbeatRefused(ev.ServerLease("active", "tok-2"))
    inside = decide(lease, refused, now=lease.heartbeat_ok_at + lease.ttl - 1)
    assert inside.lease is not None and inside.lease.token == "tok-2" and not inside.lease.lost
    outside = decide(lease, refused, now=lease.heartbeat_ok_at + lease.ttl + 1)
    assert outside.lease is not None and outside.lease.lost
    certain = decide(lease.but(uncertain=False), refused, now=lease.heartbeat_ok_at + 1)
    assert certain.lease is not None and certain.lease.lost, "no lost reply: not ours"


def test_a_refused_token_is_never_kept() -> None:
    lease = lease_in("dispatched", uncertain=True)
    assert lease is not None
    same = ev.HeartbeatRefused(ev.ServerLease("active", lease.token))
    decision = decide(lease, same, now=NOW)
    assert decision.lease is None or decision.lease.lost


def test_a_refused_first_claim_is_stopped_after_a_ttl() -> None:
    lease = lease_in("claimed")
    assert lease is not None
    lease = lease.but(token="", claimed_at=NOW - 31)
    effects = _effects(lease, ev.ClaimRefused(ev.ServerLease("starting", None)))
    assert "StopOnServer" in effects and "Publish" not in effects


def test_attempts_are_counted_across_re_deliveries() -> None:
    proposal = Lease("w", "s", "e", "dispatcher", "q")
    offered = ev.Offered(proposal, known_type=True, failures=2)
    assert "Ack" in _effects(None, offered, policy=Policy(max_attempts=3))
    exhausted = ev.Offered(proposal, known_type=True, failures=3)
    assert "StopOnServer(polled token)" in _effects(None, exhausted, policy=Policy(max_attempts=3))
    running = lease_in("running")
    assert running is not None
    silent = decide(running.but(failures=2), ev.AttemptSilent("t2"), now=NOW,
                    policy=Policy(max_attempts=3))
    assert silent.lease is not None and silent.lease.ended == Ending.STOPPED
    assert any(isinstance(e, fx.StopOnServer) for e in silent.effects)


def test_a_drain_hands_a_sandbox_held_lease_back_by_ending_it() -> None:
    lease = lease_in("running")
    assert lease is not None
    held = lease.but(heartbeats_by="sandbox")
    decision = decide(held, ev.SandboxExited(1, 143, draining=True, next_task_id="t2"), now=NOW)
    assert decision.lease is not None and decision.lease.ended == Ending.STOPPED


def test_force_wins_over_graceful_and_the_first_cause_stays() -> None:
    lease = lease_in("running")
    assert lease is not None
    graceful = decide(lease, ev.StopRequested(StopKind.GRACEFUL, "server", "bridge"), now=NOW)
    assert graceful.lease is not None
    forced = decide(graceful.lease, ev.StopRequested(StopKind.FORCE, "operator", "revoke"),
                    now=NOW)
    assert forced.lease is not None and forced.lease.stop == StopKind.FORCE
    assert forced.lease.stop_cause == "server"
    again = decide(forced.lease, ev.StopRequested(StopKind.GRACEFUL, "server", "bridge"),
                   now=NOW)
    assert again.effects == () and again.lease == forced.lease


@pytest.mark.parametrize(
    ("turn_after", "request_seconds", "mark", "sent"),
    [
        (0.0, 5.0, 10.0, True),  # at once
        (5.0, 5.0, 10.0, True),  # a whole request still fits
        (5.01, 5.0, 10.0, False),  # it would outlive the mark
        (11.0, 5.0, 10.0, False),  # another tick may hold the lease already
        (0.0, 5.0, 4.0, False),  # a mark shorter than a request: never
        (1.0, 0.5, 1.5, True),
        (1.01, 0.5, 1.5, False),
    ],
)
def test_a_heartbeat_leaves_only_while_a_request_fits_in_its_in_flight_mark(
        turn_after: float, request_seconds: float, mark: float, sent: bool) -> None:
    claimed = 1000.0
    assert may_still_send(claimed, claimed + turn_after, request_seconds=request_seconds,
                          inflight_seconds=mark) is sent


@pytest.mark.parametrize("ttl,interval", [(0, 1.0), (3, 1.0), (30, 10.0), (600, 30.0)])
def test_the_heartbeat_interval_is_a_third_of_the_ttl_within_bounds(ttl: int,
                                                                    interval: float) -> None:
    assert heartbeat_interval(ttl) == interval


def test_a_burst_of_leases_renews_spread_over_the_interval_then_keeps_its_pace() -> None:
    """1,000 leases claimed in the same second: their first renewals fall evenly over the
    interval's ten seconds (none later than the interval, none in its first tenth), and each
    renewal after that comes a whole interval after the one before."""
    interval = heartbeat_interval(30)
    firsts = [renewal_due(NOW, 30, work_id=f"work_{i:06x}", first=True) - NOW
              for i in range(1000)]
    assert all(0.1 * interval <= due <= interval for due in firsts)
    seconds = Counter(int(due) for due in firsts)
    assert set(seconds) - {10} == set(range(1, 10)) and max(seconds.values()) <= 140, seconds
    assert renewal_due(NOW, 30, work_id="work_1", first=False) == NOW + interval
    assert renewal_due(NOW, 30, work_id="work_1", first=True) == \
        renewal_due(NOW + 5, 30, work_id="work_1", first=True) - 5  # a work id keeps its share


def test_the_claims_heartbeat_schedules_the_spread_renewal_and_later_ones_the_interval() -> None:
    lease = lease_in("running")
    assert lease is not None
    reply = ev.Reply(token="tok-2", extended=True, state="active", ttl_seconds=30)
    for heartbeat_ok_at, first in ((0.0, True), (NOW - 10, False)):
        decision = decide(lease.but(heartbeat_ok_at=heartbeat_ok_at),
                          ev.HeartbeatAnswered(reply, NOW), now=NOW)
        (record,) = [e for e in decision.effects if isinstance(e, fx.RecordHeartbeat)]
        assert record.due == renewal_due(NOW, 30, work_id=lease.work_id, first=first)


def test_a_renewal_counts_from_when_the_heartbeat_was_due_not_when_it_left() -> None:
    """A heartbeat that left 2 s after it was due is followed an interval after it was due: the
    lag of one round is not added to the next (a lease's period stays the interval, however
    loaded the tick). A heartbeat far later than its due time is followed at most a quarter
    of an interval sooner than an interval after it left; one with no known due time, or due
    after it left, an interval after it left."""
    interval = heartbeat_interval(30)
    assert renewal_due(NOW + 2, 30, work_id="w", first=False, due_at=NOW) == NOW + interval
    late = renewal_due(NOW + 7, 30, work_id="w", first=False, due_at=NOW)
    assert late == NOW + 7 - CATCH_UP_SHARE * interval + interval
    for due_at in (0.0, NOW + 1):
        assert renewal_due(NOW, 30, work_id="w", first=False, due_at=due_at) == NOW + interval
    # The first renewal keeps its spread share, counted from when the claim's heartbeat left.
    assert renewal_due(NOW, 30, work_id="w", first=True, due_at=NOW - 2) == \
        renewal_due(NOW, 30, work_id="w", first=True)
    lease = lease_in("running")
    assert lease is not None
    reply = ev.Reply(token="tok-2", extended=True, state="active", ttl_seconds=30)
    decision = decide(lease.but(heartbeat_ok_at=NOW - 10), ev.HeartbeatAnswered(
        reply, NOW, due_at=NOW - 1.5), now=NOW + 0.1)
    (record,) = [e for e in decision.effects if isinstance(e, fx.RecordHeartbeat)]
    assert record.sent_at == NOW and record.due == NOW - 1.5 + interval


def test_the_table_covers_every_phase() -> None:
    covered = {phase for row in rows() for phase in row.phases}
    assert covered == set(PHASES)


def test_a_claim_after_an_ack_whose_reply_was_lost_never_adopts_a_rivals_token() -> None:
    """Found by the stateful test: our ack and first claim both went unanswered (the ack never
    landed), the server gave the item to another worker, and its token came back in a 412."""
    proposal = Lease("w", "s", "e", "dispatcher", "q", task_id="task-1", claimed_at=NOW)
    acked = decide(proposal, ev.AckUncertain(503), now=NOW)
    assert acked.lease is not None
    claimed = decide(acked.lease, ev.ClaimFailed(503), now=NOW)
    assert claimed.lease is not None and claimed.lease.uncertain
    refused = decide(claimed.lease, ev.HeartbeatRefused(ev.ServerLease("active", "rival-1")),
                     now=NOW + 1)
    assert refused.lease is None or refused.lease.token != "rival-1"


def test_a_session_that_finished_after_its_lease_was_lost_is_stopped_not_run_again() -> None:
    """Found by the stateful test: the lease lapsed while the sandbox ran, and the sandbox
    exited 0 before the kill landed. The session is done: its item is stopped, its ending kept."""
    running = lease_in("running")
    assert running is not None
    lost = decide(running, ev.HeartbeatRefused(ev.ServerLease("queued", None)), now=NOW).lease
    assert lost is not None and lost.lost
    decision = decide(lost, ev.SandboxExited(1, 0, draining=False, next_task_id="t2"), now=NOW)
    assert decision.lease is not None and decision.lease.ended == Ending.COMPLETED
    assert fx.RecordHistory(0, Ending.COMPLETED) in decision.effects
    assert any(isinstance(e, fx.StopOnServer) for e in decision.effects)
    killed = decide(lost, ev.SandboxExited(1, 137, draining=False, next_task_id="t2"), now=NOW)
    assert killed.lease is None, "killed: an attempt that did not finish, the server's to give"


def test_a_lost_lease_is_stopped_as_its_delivery_then_gracefully_with_the_key() -> None:
    """SDK 2.17's poller stops an item it may no longer hold as the delivery it got (its
    sessions token, forced), and after a 401 gracefully with the environment key: another
    worker may be serving the item by now. A session that ended after its lease was lost goes
    the same way, and its record goes once the graceful stop is answered."""
    running = lease_in("running")
    assert running is not None
    lost = decide(running, ev.HeartbeatRefused(ev.ServerLease("active", "tok-x")), now=NOW).lease
    assert lost is not None and lost.lost
    exited = decide(lost, ev.SandboxExited(1, 0, draining=False, next_task_id="t2"), now=NOW)
    assert fx.StopOnServer(force=True, as_=fx.StopAs.LEASE_TOKEN) in exited.effects
    refused = decide(exited.lease, ev.ReleaseUnauthorized(401), now=NOW)
    assert refused.effects[-1] == fx.StopOnServer(force=False, as_=fx.StopAs.ENVIRONMENT_KEY)
    assert refused.lease == exited.lease, "the lease waits for the graceful stop's answer"
    assert decide(refused.lease, ev.ReleaseAnswered(200), now=NOW).lease is None
    # A transient failure of the graceful stop is retried as a release: the token first again.
    failed = decide(refused.lease, ev.ReleaseFailed(503, "unavailable"), now=NOW)
    again = decide(failed.lease, ev.ReleaseDue(), now=NOW + 2)
    assert fx.StopOnServer(force=True, as_=fx.StopAs.LEASE_TOKEN) in again.effects


def test_a_lease_the_fleet_holds_is_force_stopped_with_the_environment_key() -> None:
    running = lease_in("running")
    assert running is not None
    exited = decide(running, ev.SandboxExited(1, 0, draining=False, next_task_id="t2"), now=NOW)
    assert fx.StopOnServer(force=True, as_=fx.StopAs.ENVIRONMENT_KEY) in exited.effects
    # An unreadable item names no delivery the fleet could read a token from.
    unreadable = decide(None, ev.Unreadable("w", "bad", "e"), now=NOW)
    assert fx.StopOnServer(force=True, as_=fx.StopAs.ENVIRONMENT_KEY) in unreadable.effects


def test_a_hand_off_lease_is_claimed_before_it_is_published() -> None:
    """The sandbox of a hand-off starts with the lease's token: the claim's answer must come
    first, or a fast session worker would start it with none."""
    proposal = Lease("w", "s", "e", "handoff", "q", task_id="task-1", claimed_at=NOW)
    acked = decide(proposal, ev.AckAnswered(), now=NOW)
    assert not any(isinstance(e, fx.Publish) for e in acked.effects)
    assert any(isinstance(e, fx.Claim) for e in acked.effects)
    assert acked.lease is not None
    claimed = decide(acked.lease, ev.ClaimAnswered(ev.Reply("tok", True, "active", 30), NOW),
                     now=NOW)
    assert any(isinstance(e, fx.Publish) for e in claimed.effects)


def test_a_lost_finished_lease_whose_stop_failed_is_tried_again() -> None:
    """Found by the soak run: a releasing lease taken as lost in a heartbeat tick, whose stop
    then failed, was never due again (its retry deferred to a beat that no longer comes)."""
    releasing = lease_in("releasing")
    assert releasing is not None
    lost = decide(releasing, ev.HeartbeatFailed(503, "unavailable"), now=NOW + 60)
    assert lost.lease is not None and lost.lease.lost
    retry = decide(lost.lease, ev.ReleaseFailed(503, "unavailable"), now=NOW + 60)
    # A release is retried whoever heartbeated the lease (a sandbox, in runner mode).
    assert fx.Schedule(NOW + 62, sooner_only=False, heartbeated_by=None) in retry.effects


def test_a_lease_written_back_after_a_reset_adopts_a_token_it_did_not_see() -> None:
    """Found by the acceptance test of a Redis restart: a beat answered between the attempt's
    last pulse and the restart changed the token; the written-back lease's first beat got 412."""
    remembered = lease_in("running")
    assert remembered is not None
    back = decide(None, ev.RegistryReset(remembered), now=NOW).lease
    assert back is not None and back.uncertain
    refused = decide(back, ev.HeartbeatRefused(ev.ServerLease("active", "tok-newer")), now=NOW + 1)
    assert refused.lease is not None and refused.lease.token == "tok-newer"
    assert not refused.lease.lost


# Where a session message went, as recorded in Redis on either broker -> lost? (received and
# published times are seconds before NOW.)
DELIVERIES: list[tuple[str, Delivery, bool]] = [
    ("never published (the send failed)", Delivery(published=False), True),
    ("published, never received: waits in its queue", Delivery(published=True), False),
    ("seen in its queue (or on RabbitMQ, never looked for): waits",
     Delivery(True, missing_since=None), False),
    ("gone from its queue a second ago: a worker may be noting it now",
     Delivery(True, missing_since=NOW - 1), False),
    ("gone from its queue and unreceived for 6 s: its worker died between taking and noting it",
     Delivery(True, missing_since=NOW - MISSING_CONFIRM_SECONDS - 1), True),
    ("gone from its queue long ago, received since: judged by the receipt",
     Delivery(True, NOW - 1, missing_since=NOW - 60), False),
    ("received a moment ago: starting", Delivery(True, NOW - 1), False),
    ("received, not started for 31 s: its worker died or holds it",
     Delivery(True, NOW - DISPATCH_STALE_SECONDS - 1), True),
    ("received, publish mark lost: judged by the receipt", Delivery(False, NOW - 1), False),
]


@pytest.mark.parametrize(("case", "delivery", "lost"), DELIVERIES,
                         ids=[case for case, _, _ in DELIVERIES])
def test_a_dispatched_message_is_lost_on_the_same_facts_on_both_brokers(
        case: str, delivery: Delivery, lost: bool) -> None:
    assert message_lost(delivery, NOW) is lost


def test_only_a_dispatched_lease_silent_past_the_bound_asks_where_its_message_is() -> None:
    dispatched = lease_in("dispatched")
    assert stuck(dispatched.but(dispatched_at=NOW - 1), NOW) is None
    assert stuck(dispatched.but(dispatched_at=NOW - DISPATCH_STALE_SECONDS - 1),
                 NOW) is Stuck.QUEUED_TOO_LONG


def test_every_scenario_has_a_name_of_its_own() -> None:
    from dispatcher.lease.machine import claiming, running

    names = [s.name for s in (*claiming.SCENARIOS, *running.SCENARIOS)]
    assert len(names) == len(set(names)) == len(SCENARIOS)


@pytest.mark.parametrize(("started_ago", "stop", "stopped"), [
    (59.0, StopKind.NONE, False),  # not yet past the limit
    (61.0, StopKind.NONE, True),
    (61.0, StopKind.GRACEFUL, False),  # already stopping: nothing more to ask
    (61.0, StopKind.FORCE, False),
])
def test_a_deadline_counts_from_the_first_attempts_start(started_ago: float, stop: StopKind,
                                                          stopped: bool) -> None:
    """The record's `started_at`, kept across attempts, not the attempt's own start."""
    lease = lease_in("running")
    assert lease is not None
    lease = lease.but(attempt=2, started_at=NOW - started_ago, pulse_at=NOW - 1, stop=stop)
    decision = decide(lease, ev.DeadlineChecked(2, 60.0), now=NOW)
    flags = [e for e in decision.effects if isinstance(e, fx.FlagStop)]
    assert bool(flags) == stopped
    if stopped:
        assert flags[0].cause == "deadline" and flags[0].kind == StopKind.GRACEFUL


@pytest.mark.parametrize(("exists", "current", "superseded", "stop", "draining", "operator"),
                         list(itertools.product((True, False), (True, False), (False, True),
                                                list(StopKind), (False, True), (False, True))))
def test_a_quiet_pulse_is_exactly_one_the_machine_decides_nothing_on(
        exists: bool, current: bool, superseded: bool, stop: StopKind, draining: bool,
        operator: bool) -> None:
    """The supervision hub wakes an attempt only for a pulse that is not quiet: a quiet one
    must be one `on_pulsed` has nothing for, and every other one must ask something."""
    lease = lease_in("running")
    assert lease is not None
    lease = lease.but(attempt=2, stop=stop)
    pulsed = ev.Pulsed(1 if superseded else 2, exists=exists, current=current, stop=stop,
                       draining=draining, operator=operator)
    decision = decide(lease, pulsed, now=NOW)
    quiet = pulse_is_quiet(lease, pulsed)
    assert quiet == (exists and current and not superseded and stop == StopKind.NONE
                     and not draining and not operator)
    assert quiet == (not decision.effects and decision.lease == lease)


def test_an_attempt_starts_the_sessions_clock_once() -> None:
    lease = lease_in("dispatched")
    assert lease is not None
    starting = ev.AttemptStarting(1, "task-1", "w1", 42, draining=False)
    first = decide(lease, starting, now=NOW).lease
    assert first is not None and first.started_at == NOW
    again = decide(first.but(phase=Phase.DISPATCHED), starting, now=NOW + 30).lease
    assert again is not None and again.started_at == NOW


def test_a_long_throttle_halves_the_heartbeats_and_lapses_no_lease() -> None:
    """`429 retry-after: 120` against a 30 s TTL, ticked every second as the heartbeat task
    does: each heartbeat waits to the lease's last safe moment (20 s after the last answered),
    none is later than that, and the lease never goes a TTL without an answered heartbeat."""
    lease = lease_in("running", quiet_seconds=0)
    assert lease is not None
    throttle_ends = NOW + 120
    due, sent = NOW + heartbeat_interval(30), [NOW]
    for tick in range(1, 121):
        now = NOW + tick
        if now < due:
            continue
        decision = decide(lease, ev.HeartbeatThrottled(throttle_ends - now), now=now)
        assert decision.lease is not None
        lease = decision.lease
        if fx.HeartbeatNow() in decision.effects:
            sent.append(now)
            reply = ev.Reply(token=f"tok-{tick}", extended=True, state="active", ttl_seconds=30)
            answered = decide(lease, ev.HeartbeatAnswered(reply, now), now=now)
            assert answered.lease is not None
            lease = answered.lease
            due = next(e.due for e in answered.effects if isinstance(e, fx.RecordHeartbeat))
        else:
            due = next(e.due for e in decision.effects if isinstance(e, fx.Schedule))
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert gaps and all(19 <= gap < 30 for gap in gaps), gaps
    assert len(sent) - 1 <= 120 / 20 + 1, "about one heartbeat per two thirds of a TTL"


def test_a_short_throttle_is_waited_out() -> None:
    lease = lease_in("running")
    assert lease is not None
    decision = decide(lease, ev.HeartbeatThrottled(8.0), now=NOW)
    assert fx.Schedule(NOW + 8.0, sooner_only=False) in decision.effects
    assert fx.HeartbeatNow() not in decision.effects


def test_an_attempt_whose_lease_stays_unproven_for_a_ttl_never_starts() -> None:
    """Published with its ack, whose answer never came, nor a claim's: past one TTL since the
    claim a rival may hold the item, so the lease is lost and the attempt never starts."""
    lease = lease_in("dispatched", unproven=True)
    assert lease is not None
    starting = ev.AttemptStarting(1, "task-1", "w1", 42, draining=False)
    waiting = decide(lease, starting, now=lease.claimed_at + lease.ttl)
    assert [type(e) for e in waiting.effects] == [fx.AwaitProof]
    late = decide(lease, starting, now=lease.claimed_at + lease.ttl + 1)
    assert fx.AttemptOver(Outcome.LOST) in late.effects
    assert not any(isinstance(e, fx.MarkRunning) for e in late.effects)
    assert late.lease is None, "lost and forgotten: the server re-delivers it"


def test_a_session_published_with_its_ack_starts_only_once_proven() -> None:
    """The whole path: offered (recorded, published, ack sent), the attempt arrives before the
    ack's answer and waits; the answer proves it; the attempt then starts."""
    proposal = Lease("w", "s", "e", "dispatcher", "q", task_id="task-1", claimed_at=NOW)
    offered = decide(None, ev.Offered(proposal, known_type=True), now=NOW)
    assert offered.lease is not None and offered.lease.phase == Phase.DISPATCHED
    kinds = [type(e) for e in offered.effects]
    assert kinds.index(fx.Ack) < kinds.index(fx.CreateRecord) < kinds.index(fx.Publish)
    starting = ev.AttemptStarting(1, "task-1", "w1", 42, draining=False)
    early = decide(offered.lease, starting, now=NOW + 0.001)
    assert not any(isinstance(e, fx.MarkRunning) for e in early.effects)
    (wait,) = early.effects
    assert isinstance(wait, fx.AwaitProof) and wait.run is not None
    assert wait.awaited == {"heartbeat_ok_at": 0.0}, "taken in the wait only once proven"
    assert wait.expected["task_id"] == "task-1" and wait.expected["stop"] == StopKind.NONE
    assert wait.run.fields["phase"] == Phase.RUNNING
    acked = decide(offered.lease, ev.AckAnswered(), now=NOW + 0.002)
    assert acked.lease is not None
    assert fx.MarkProven(acked.lease) in acked.effects
    assert acked.lease.heartbeat_ok_at == NOW + 0.002
    started = decide(acked.lease, starting, now=NOW + 0.003)
    assert any(isinstance(e, fx.MarkRunning) for e in started.effects)


def _record_as_the_revoke_goes_out(lease: Lease | None, effects: tuple[fx.Effect, ...],
                                   ) -> Lease | None:
    """The record as the executor has left it when it performs the decision's Revoke: the
    effects before it applied in order (a worker's `task_revoked` may read it at once)."""
    record = lease
    for effect in effects:
        if isinstance(effect, fx.Revoke):
            return record
        if isinstance(effect, fx.CreateRecord):
            record = effect.lease
        elif isinstance(effect, fx.DeleteRecord):
            record = None
        elif isinstance(effect, fx.Update) and record is not None:
            record = record.but(**effect.fields)
        elif isinstance(effect, fx.FlagStop) and record is not None:
            record = record.but(stop=effect.kind)
    raise AssertionError("no Revoke")


def _revoking_decisions() -> list[tuple[str, str, Lease | None, tuple[fx.Effect, ...]]]:
    found = []
    for scenario in (*claiming.SCENARIOS, *running.SCENARIOS):
        for phase in scenario.phases or PHASES:
            lease = lease_in(phase, uncertain=scenario.uncertain, unproven=scenario.unproven,
                             lost=scenario.lost, sandbox_held=scenario.sandbox_held,
                             quiet_seconds=scenario.quiet_seconds)
            decision = decide(lease, scenario.event, now=NOW, policy=Policy(max_attempts=3))
            if any(isinstance(e, fx.Revoke) for e in decision.effects):
                found.append((scenario.name, phase, lease, decision.effects))
    return found


@pytest.mark.parametrize(("name", "phase", "lease", "effects"), _revoking_decisions(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_the_fleets_own_revoke_is_never_taken_for_an_operators(
        name: str, phase: str, lease: Lease | None, effects: tuple[fx.Effect, ...]) -> None:
    """The machine revokes a published task it lets go (an ack refused, a lease lost before its
    session started, a session ended): the revoke fires `task_revoked` in the worker holding
    the message, which reads the record at once. If that record still looks like a live,
    queued session, the revoke is taken for an operator's and the session recorded as ended
    (`stopped`), so the server's next delivery of the item is refused and the session never
    runs (chaos, 429s: an ack throttled, its item re-delivered 5 s later, stopped not run)."""
    record = _record_as_the_revoke_goes_out(lease, effects)
    task_id = next(e.task_id for e in effects if isinstance(e, fx.Revoke))
    answer = decide(record, ev.OperatorRevoked(task_id, terminated=False, force=False), now=NOW)
    ended = [e for e in answer.effects if isinstance(e, fx.RecordHistory)
             and e.ended != Ending.NONE]
    assert not ended, f"{name} in {phase}: its own revoke ended the session as an operator's"
