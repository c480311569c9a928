"""The lease machine by tables: every (event, phase) pair of the rule table docs/architecture.md
shows, held to what it must do. No Redis, no network: `decide` is a pure function.

Each expectation names the phase after and the effects that must (and must not) be there; the
table itself is generated from the code (`dispatcher.lease.table`), so a rule that changes shows
up here as a failing row and in the doc as a changed one."""

from __future__ import annotations

import pytest

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.causes import Outcome
from dispatcher.lease.machine import (
    Delivery,
    Policy,
    Stuck,
    decide,
    heartbeat_interval,
    message_lost,
    stuck,
)
from dispatcher.lease.machine.running import DISPATCH_STALE_SECONDS
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
    ("offered", ("releasing",), "releasing", {"StopOnServer"}, {"Ack", "Publish"}),
    ("offered, unknown type", ("none",), "none", {"StopOnServer"}, {"Ack"}),
    ("offered, ended before", ("none",), "none", {"StopOnServer"}, {"Ack"}),
    ("offered, attempts used up", ("none",), "none", {"StopOnServer"}, {"Ack"}),
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
    # The session ended: its item is stopped whatever happens to the lease.
    ("heartbeat answered, not extended", ("releasing",), "releasing", {"StopOnServer"},
     {"DeleteRecord"}),
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
    ("heartbeat 412", ("releasing",), "releasing", {"StopOnServer"}, {"DeleteRecord"}),
    ("heartbeat 404", ("claimed", "dispatched", "releasing"), "none", {"DeleteRecord"},
     {"StopOnServer"}),
    ("heartbeat 404", ("running",), "running", {"FlagStop(force)"}, {"StopOnServer"}),
    ("heartbeat rejected (other 4xx)", ("claimed", "dispatched", "releasing"), "releasing",
     {"StopOnServer"}, {"Publish"}),
    ("heartbeat rejected (other 4xx)", ("running",), "running", {"FlagStop(force)"},
     {"StopOnServer"}),
    ("heartbeat failed (transient)", ANY, "=", {"Schedule"}, {"FlagStop(force)"}),
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
    assert "StopOnServer" in _effects(None, exhausted, policy=Policy(max_attempts=3))
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


@pytest.mark.parametrize("ttl,interval", [(0, 1.0), (3, 1.0), (30, 10.0), (600, 30.0)])
def test_the_heartbeat_interval_is_a_third_of_the_ttl_within_bounds(ttl: int,
                                                                    interval: float) -> None:
    assert heartbeat_interval(ttl) == interval


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
    acked = decide(offered.lease, ev.AckAnswered(), now=NOW + 0.002)
    assert acked.lease is not None
    assert fx.MarkProven(acked.lease) in acked.effects
    assert acked.lease.heartbeat_ok_at == NOW + 0.002
    started = decide(acked.lease, starting, now=NOW + 0.003)
    assert any(isinstance(e, fx.MarkRunning) for e in started.effects)
