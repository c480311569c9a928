"""Rules for events of the claim path: an item offered by a poll, its ack, the first claim,
and every heartbeat after it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.machine.steps import (
    RETRY_SECONDS,
    Ctx,
    Decision,
    advance_claimed,
    count,
    end,
    flag_stop,
    heartbeat_interval,
    is_over,
    log,
    lose,
    proven_ours,
    publish,
    since_ok,
    stop_requested,
)
from dispatcher.lease.model import Beater, Ending, Lease, Phase, StopKind

# --- the poller --------------------------------------------------------------------------------

def _offered(lease: Lease | None, e: ev.Offered, c: Ctx) -> Decision:
    item = e.proposal
    if not e.known_type:
        return Decision(None, (
            count("work_refused", reason="unknown_type"),
            log("unknown work type", item, logging.WARNING, action_taken="stopped, not run"),
            fx.StopOnServer(force=True)))
    if lease is not None:
        return _offered_held(lease)
    if e.ended != Ending.NONE:
        return Decision(None, (
            count("work_refused", reason="already_ended"),
            log("re-delivered after it ended", item, logging.WARNING, ended=e.ended.value,
                 action_taken="stopped, not run"),
            fx.StopOnServer(force=True)))
    if e.failures >= c.policy.max_attempts:
        return Decision(None, (
            count("work_refused", reason="attempts_exhausted"),
            log("attempts exhausted", item, logging.WARNING, failures=e.failures,
                 action_taken="stopped, not run"),
            fx.StopOnServer(force=True)))
    return Decision(item.but(failures=e.failures), (fx.Ack(),))


def _offered_held(lease: Lease) -> Decision:
    """The server offers an item we still hold: our lease on it lapsed. Never ack it twice."""
    if is_over(lease):
        # The session is over: stop the item (its release may have failed so far).
        return Decision(lease, (
            log("polled a held lease", lease, logging.WARNING, phase=lease.phase.value,
                 action_taken="session already ended: stopped, not run"),
            fx.StopOnServer(force=True)))
    # A running attempt is fenced now and the item left unacked: the server delivers it again
    # once the record is gone, and only then is it claimed afresh (acking it now would start a
    # second attempt beside the first).
    failures = lease.failures + (1 if lease.phase == Phase.RUNNING else 0)
    fenced = Decision(lease.but(failures=failures),
                      (fx.RecordHistory(failures, Ending.NONE),))
    assert fenced.lease is not None
    return fenced.then(lose(fenced.lease, cause="re-delivered by the server",
                             action="polled a held lease", phase=lease.phase.value,
                             action_taken="attempt fenced; claimed again on re-delivery"))


# The lease mode whose sandbox continues the dispatcher's lease with its token.
HANDOFF = "handoff"


def _unreadable(lease: Lease | None, e: ev.Unreadable, c: Ctx) -> Decision:
    """An item we cannot read would be delivered again for ever: name it and stop it, when its
    id is legible (one that is not cannot go in a URL; the server's lease expiry ends it)."""
    effects: list[fx.Effect] = [
        count("work_refused", reason="invalid"),
        fx.Log("invalid work item", logging.ERROR, {
            "work_id": e.work_id or "unreadable", "error": e.error,
            "action_taken": "stopped, not run" if e.work_id else "none possible"}),
    ]
    if e.work_id is not None:
        effects.append(fx.StopOnServer(force=True))
    return Decision(None, tuple(effects))


def _acked(lease: Lease | None, e: ev.AckAnswered | ev.AckUncertain, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    if isinstance(e, ev.AckAnswered):
        # The server answered: the item is ours, and its lease cannot lapse before a TTL.
        lease = lease.but(heartbeat_ok_at=c.now)
    # Claimed first: a healthcheck is answered, not published; a hand-off gives the sandbox the
    # token at its start, which must be the claim's, not none yet; an ack nobody answered may
    # not be ours, and a session of another holder's item must never start here.
    claim_first = lease.heartbeats_by == Beater.DISPATCHER and (
        lease.kind == "healthcheck" or lease.mode == HANDOFF or not proven_ours(lease))
    # Otherwise published first, claimed right after: the first heartbeat's round trip never
    # delays the session, and the lease is never left unbeaten (a claim that fails is retried
    # by the heartbeat task at once). A session that starts before a rival's 412 comes back is
    # killed by that answer, as any lost lease is. Its record is created already dispatched:
    # one write before the publish, not a create and an update.
    published = (publish(lease, c.now, recorded=False)
                 if lease.heartbeats_by == Beater.DISPATCHER and not claim_first else None)
    record = lease if published is None or published.lease is None else published.lease
    effects: list[fx.Effect] = [
        fx.CreateRecord(record), count("work_claimed", type=lease.kind),
        log("claimed", lease, type=lease.kind, queue=lease.queue),
    ]
    uncertain = isinstance(e, ev.AckUncertain)
    if isinstance(e, ev.AckUncertain):
        effects.append(log("ack uncertain", lease, logging.WARNING, status=e.status,
                            action_taken="claimed; published once a claim is answered"))
    decision = Decision(record, tuple(effects))
    if lease.heartbeats_by != Beater.DISPATCHER:
        return decision.then(advance_claimed(lease, c))
    claim = fx.Claim(ack_uncertain=uncertain)
    if published is None:
        return decision.then(Decision(lease, (claim,)))
    return decision.then(published).then(Decision(published.lease, (claim,)))


def _ack_conflict(lease: Lease | None, e: ev.AckConflict, c: Ctx) -> Decision:
    """A 409 to a retry after an attempt whose reply never came is our own ack, which landed:
    only a poll can hand the item to another worker, and the server offers an unacked item
    again only after it idled far longer than the executor's retries take. A 409 otherwise
    leaves it uncertain: the first claim tells."""
    return _acked(lease, ev.AckAnswered() if e.after_lost_reply else ev.AckUncertain(409), c)


def _ack_refused(lease: Lease | None, e: ev.AckRefused, c: Ctx) -> Decision:
    return Decision(None, (
        count("work_refused", reason="ack_failed"),
        log("ack failed", lease, logging.WARNING, status=e.status,
             outcome="left for the server to re-deliver")))


def _record_failed(lease: Lease | None, e: ev.RecordFailed, c: Ctx) -> Decision:
    """Redis refused the record. A fresh claim is acked but owned by nobody (nobody could beat
    or run it): stop it rather than strand it in `starting`. A lease a running attempt was
    writing back is left to that attempt, which tries again at its next pulse."""
    lease = e.lease
    if lease.phase in (Phase.RUNNING, Phase.RELEASING):  # only a write-back is either
        return Decision(None, (log("write-back failed", lease, logging.WARNING, error=e.error,
                                   action_taken="tried again at the next pulse"),))
    return Decision(None, (
        count("work_refused", reason="abandoned"),
        log("abandoned", lease, logging.ERROR, reason=f"registry unavailable: {e.error}",
             outcome="stopped on the server"),
        fx.StopOnServer(force=True)))


def _claim_answered(lease: Lease | None, e: ev.ClaimAnswered, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    beat = _beat_answered(lease, ev.BeatAnswered(e.reply, e.sent_at), c)
    if beat.lease is None:
        return beat
    return beat.then(advance_claimed(beat.lease, c))


def _claim_refused(lease: Lease | None, e: ev.ClaimRefused, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    if _unclaimed(e.current):
        refused = _refused_unclaimed(lease, c)
        if refused.lease is None or not proven_ours(refused.lease):
            return refused
        return refused.then(advance_claimed(refused.lease, c))
    return lose(lease, cause="claimed by another worker", action="lease taken by another worker",
                server_state=e.current.state)


def _claim_not_acked(lease: Lease | None, e: ev.ClaimNotAcked, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    if e.ack_uncertain:
        # The ack never landed: the item is still queued on the server, which delivers it again.
        return Decision(lease, (count("work_refused", reason="ack_failed"),)).then(
            lose(lease, cause="ack never landed", action="ack failed", status=e.status,
                 outcome="left for the server to re-deliver"))
    if e.status == 404:
        return lose(lease, cause="claim 404", server_stopped=True)
    return _claim_failed(lease, ev.ClaimFailed(e.status), c)


def _claim_failed(lease: Lease | None, e: ev.ClaimFailed, c: Ctx) -> Decision:
    """Keep the lease: the heartbeat task claims again at once and judges the TTL. The claim
    may have landed, so its token may be the server's by now (`uncertain`)."""
    if lease is None:
        return Decision(None)
    failed = lease.but(uncertain=True)
    decision = Decision(failed, (
        fx.Update({"uncertain": True}), fx.Schedule(c.now),
        log("first heartbeat failed", lease, logging.WARNING, status=e.status)))
    return decision.then(advance_claimed(failed, c)) if proven_ours(failed) else decision


def _unclaimed(current: ev.ServerLease | None) -> bool:
    """A 412 to a NO_HEARTBEAT claim while the server's own state says nobody heartbeated
    the item: nobody else holds it, so the refusal is the server's hiccup, not a rival."""
    return (current is not None and current.last_heartbeat is None
            and current.state in (None, "starting"))


def _refused_unclaimed(lease: Lease, c: Ctx) -> Decision:
    """Claim the unclaimed item again soon; past the TTL, stop it (it is ours to stop).
    Giving up at once would strand the acked item in `starting` for good."""
    since = round(c.now - lease.claimed_at, 1)
    if c.now - lease.claimed_at > lease.ttl:
        flagged = flag_stop(lease, StopKind.FORCE, "claim refused") or Decision(lease)
        assert flagged.lease is not None
        return flagged.then(Decision(flagged.lease, (
            fx.Unschedule(),
            log("claim refused", lease, logging.WARNING, seconds_since_ack=since,
                 action_taken="stopped on the server")))).then(
            Decision(flagged.lease) if lease.phase == Phase.RUNNING
            else end(flagged.lease, Ending.STOPPED, reason="claim refused"))
    return Decision(lease, (
        fx.Schedule(c.now + RETRY_SECONDS),
        log("claim refused", lease, logging.WARNING, seconds_since_ack=since,
             action_taken="claimed again at the next heartbeat tick")))


# --- the heartbeat task ------------------------------------------------------------------------

def _beat_answered(lease: Lease | None, e: ev.BeatAnswered, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    reply = e.reply
    ttl = reply.ttl_seconds if reply.ttl_seconds > 0 else lease.ttl
    beaten = lease.but(token=reply.token, ttl_seconds=ttl, heartbeat_ok_at=e.sent_at,
                       uncertain=False)
    recorded = Decision(beaten, (fx.RecordBeat(reply.token, ttl, e.sent_at,
                                               e.sent_at + heartbeat_interval(ttl)),))
    if reply.state == "stopped":
        return recorded.then(lose(beaten, cause="server stopped", server_stopped=True))
    if not reply.extended and reply.state != "stopping":
        return recorded.then(lose(beaten, cause="lease not extended"))
    if reply.state == "stopping":
        return recorded.then(stop_requested(beaten, ev.StopRequested(
            StopKind.GRACEFUL, "server", "heartbeat"), c))
    # A lease claimed but held back (its ack unanswered, its first claim failed) is ours now.
    return recorded.then(advance_claimed(beaten, c))


def _beat_refused(lease: Lease | None, e: ev.BeatRefused, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    current = e.current
    if not lease.token and _unclaimed(current):
        return _refused_unclaimed(lease, c)
    if current is not None and current.state == "stopped":
        return lose(lease, cause="server stopped", server_stopped=True)
    if _lost_beat_was_ours(lease, current, c.now):
        assert current is not None and current.last_heartbeat is not None
        return Decision(lease.but(token=current.last_heartbeat, uncertain=False), (
            fx.Update({"token": current.last_heartbeat, "uncertain": False}),
            fx.Schedule(c.now),
            log("heartbeat token adopted", lease, logging.WARNING,
                 reason="a beat of ours was applied but its reply was lost")))
    return lose(lease, cause="heartbeat 412", server_state=current.state if current else None)


# The window to adopt in while the server's TTL is still unknown (no reply seen yet): the assumed
# 30 s may be far longer than what the server granted, and a window past the real TTL could take
# a lease the server already gave another worker. A lost claim's retry comes within a second.
UNKNOWN_TTL_WINDOW_SECONDS = 5


def _known_ttl(lease: Lease) -> float:
    return lease.ttl_seconds if lease.ttl_seconds > 0 else UNKNOWN_TTL_WINDOW_SECONDS


def _lost_beat_was_ours(lease: Lease, current: ev.ServerLease | None, now: float) -> bool:
    """After a beat whose reply was lost, a 412 whose server token we never saw is that beat's:
    the server hands an acked item to another holder only after its lease lapsed, and it cannot
    lapse before one TTL after the last beat it answered us was *sent* (or the ack it answered).
    Inside that window the only writer of the token is us, so adopting it cannot take another
    holder's lease. Without an answered ack or beat there is no window: an ack whose reply was
    lost may never have landed, and the server may have given the item to someone else."""
    return (lease.uncertain and lease.heartbeat_ok_at > 0 and current is not None
            and bool(current.last_heartbeat)
            and current.last_heartbeat != lease.token
            and current.state in ("starting", "active", "stopping")
            and since_ok(lease, now) < _known_ttl(lease))


def _beat_not_found(lease: Lease | None, e: ev.BeatNotFound, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    return lose(lease, cause="heartbeat 404", server_stopped=True)


def _beat_rejected(lease: Lease | None, e: ev.BeatRejected, c: Ctx) -> Decision:
    """The server will not take our beats (auth, a bad request): kill and stop the item."""
    if lease is None:
        return Decision(None)
    flagged = flag_stop(lease, StopKind.FORCE, "heartbeat rejected") or Decision(lease)
    assert flagged.lease is not None
    decision = flagged.then(Decision(flagged.lease, (
        fx.Unschedule(),
        log("heartbeat rejected", lease, logging.ERROR, status=e.status, error=e.error))))
    if lease.phase == Phase.RUNNING:
        return decision  # its supervisor kills the sandbox, then releases
    return decision.then(end(flagged.lease, lease.ended or Ending.STOPPED,
                              reason="heartbeat rejected"))


def _beat_failed(lease: Lease | None, e: ev.BeatFailed, c: Ctx) -> Decision:
    if lease is None:
        return Decision(None)
    since = since_ok(lease, c.now)
    if since > lease.ttl:
        return lose(lease, cause="assumed lost: no heartbeat succeeded within the TTL")
    return Decision(lease.but(uncertain=True), (
        fx.Update({"uncertain": True}), fx.Schedule(c.now + RETRY_SECONDS),
        log("heartbeat failed", lease, logging.WARNING, status=e.status, error=e.error,
             seconds_since_success=round(since, 1))))


HANDLERS: dict[type, Callable[[Any, Any, Ctx], Decision]] = {
    ev.Offered: _offered,
    ev.Unreadable: _unreadable,
    ev.AckAnswered: _acked,
    ev.AckUncertain: _acked,
    ev.AckConflict: _ack_conflict,
    ev.AckRefused: _ack_refused,
    ev.RecordFailed: _record_failed,
    ev.ClaimAnswered: _claim_answered,
    ev.ClaimRefused: _claim_refused,
    ev.ClaimNotAcked: _claim_not_acked,
    ev.ClaimFailed: _claim_failed,
    ev.BeatAnswered: _beat_answered,
    ev.BeatRefused: _beat_refused,
    ev.BeatNotFound: _beat_not_found,
    ev.BeatRejected: _beat_rejected,
    ev.BeatFailed: _beat_failed,
}
