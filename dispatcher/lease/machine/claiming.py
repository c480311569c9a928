"""Rules for events of the claim path: an item offered by a poll, its ack, the first claim,
and every heartbeat after it."""

from __future__ import annotations

import logging

from dispatcher.lease import effects as fx
from dispatcher.lease import events as ev
from dispatcher.lease.causes import LossCause, Refusal, SeenBy, StopCause
from dispatcher.lease.machine.examples import CLAIMED, ITEM, NOW, REPLY, RUNNING, Scenario
from dispatcher.lease.machine.steps import (
    RETRY_SECONDS,
    Ctx,
    Decision,
    Plan,
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
    renewal_due,
    request_stop,
    revoke_forgotten,
    schedule,
    scheduled_for,
    since_ok,
)
from dispatcher.lease.model import Ending, Heartbeater, Kind, Lease, LeaseMode, Phase, StopKind

# --- the poller --------------------------------------------------------------------------------

def on_offered(lease: Lease | None, e: ev.Offered, c: Ctx) -> Decision:
    item = e.proposal
    if not e.known_type:
        return _refused(item, Refusal.UNKNOWN_TYPE, "unknown work type")
    if lease is not None:
        return _offered_held(lease)
    if e.ended != Ending.NONE:
        return _refused(item, Refusal.ALREADY_ENDED, "re-delivered after it ended",
                        ended=e.ended)
    if e.failures >= c.policy.max_attempts:
        return _refused(item, Refusal.ATTEMPTS_EXHAUSTED, "attempts exhausted",
                        failures=e.failures)
    item = item.but(failures=e.failures)
    if not _published_with_ack(item):
        return Decision(item, (fx.Ack(),))
    # Recorded and published while the ack is in flight: the message reaches its worker and
    # the attempt prepares meanwhile, but it starts only once the ack (or a claim) is answered
    # (`running.on_attempt_starting`): an unproven lease never runs. The record counts the slot
    # at once, so claims in flight side by side never take more than the free slots.
    p = Plan(item.but(phase=Phase.DISPATCHED, dispatched_at=c.now))
    p.add(fx.Ack(), fx.CreateRecord(p.held))
    publish(p, c.now, recorded=False)
    return p.decided()


def _published_with_ack(item: Lease) -> bool:
    """A plain session we heartbeat ourselves goes out with its ack. A healthcheck is answered,
    not published; a hand-off or a runner gives the sandbox the lease at its start, which must
    be claimed by then: those wait for the ack."""
    return (item.kind == Kind.SESSION and item.mode == LeaseMode.DISPATCHER
            and item.heartbeats_by == Heartbeater.DISPATCHER)


def _refused(item: Lease, reason: Refusal, action: str, **details: object) -> Decision:
    """A polled item not run: stopped on the server, never acked, as the delivery the poll
    returned (its sessions token): an item refused for its history was delivered again."""
    return Decision(None, (
        count("work_refused", reason=reason),
        log(action, item, logging.WARNING, **details, action_taken="stopped, not run"),
        fx.StopOnServer(force=True, as_=fx.StopAs.POLLED_TOKEN)))


def _offered_held(lease: Lease) -> Decision:
    """The server offers an item we still hold: our lease on it lapsed. Never ack it twice."""
    p = Plan(lease)
    if is_over(lease):
        # The session is over: stop the item (its release may have failed so far), as this new
        # delivery of it: the token the lease was claimed with may have expired meanwhile.
        p.add(log("polled a held lease", lease, logging.WARNING, phase=lease.phase.value,
                  action_taken="session already ended: stopped, not run"),
              fx.StopOnServer(force=True, as_=fx.StopAs.POLLED_TOKEN))
        return p.decided()
    # A running attempt is fenced now and the item left unacked: the server delivers it again
    # once the record is gone, and only then is it claimed afresh (acking it now would start a
    # second attempt beside the first).
    failures = lease.failures + (1 if lease.phase == Phase.RUNNING else 0)
    p.assume(failures=failures)
    p.add(fx.RecordHistory(failures, Ending.NONE))
    lose(p, cause=LossCause.RE_DELIVERED, action="polled a held lease",
         phase=lease.phase.value, action_taken="attempt fenced; claimed again on re-delivery")
    return p.decided()


def on_unreadable(e: ev.Unreadable) -> Decision:
    """An item we cannot read would be delivered again for ever: name it and stop it, when its
    id is legible (one that is not cannot go in a URL; the server's lease expiry ends it)."""
    p = Plan(None)
    p.add(count("work_refused", reason=Refusal.INVALID),
          fx.Log("invalid work item", logging.ERROR, {
              "work_id": e.work_id or "unreadable", "error": e.error,
              "action_taken": "stopped, not run" if e.work_id else "none possible"}))
    if e.work_id is not None:
        p.add(fx.StopOnServer(force=True))
    return p.decided()


def on_acked(lease: Lease, e: ev.AckAnswered | ev.AckUncertain, c: Ctx) -> Decision:
    if lease.phase == Phase.DISPATCHED:
        return _acked_published(lease, e, c)
    if isinstance(e, ev.AckAnswered):
        # The server answered: the item is ours, and its lease cannot lapse before a TTL.
        lease = lease.but(heartbeat_ok_at=c.now)
    p = Plan(lease)
    # Claimed first: a healthcheck is answered, not published; a hand-off gives the sandbox the
    # token at its start, which must be the claim's, not none yet; an ack nobody answered may
    # not be ours, and a session of another holder's item must never start here.
    claim_first = lease.heartbeats_by == Heartbeater.DISPATCHER and (
        lease.kind == Kind.HEALTHCHECK or lease.mode == LeaseMode.HANDOFF
        or not proven_ours(lease))
    # Otherwise published first, claimed right after: the first heartbeat's round trip never
    # delays the session, and the lease is never left without heartbeats (a claim that fails is
    # retried by the heartbeat task at once). A session that starts before a rival's 412 comes
    # back is killed by that answer, as any lost lease is. Its record is created already
    # dispatched: one write before the publish, not a create and an update.
    published = lease.heartbeats_by == Heartbeater.DISPATCHER and not claim_first
    record = lease.but(phase=Phase.DISPATCHED, dispatched_at=c.now) if published else lease
    p.add(fx.CreateRecord(record), count("work_claimed", type=lease.kind),
          log("claimed", lease, type=lease.kind, queue=lease.queue))
    if isinstance(e, ev.AckUncertain):
        p.add(log("ack uncertain", lease, logging.WARNING, status=e.status,
                  action_taken="claimed; published once a claim is answered"))
    if lease.heartbeats_by != Heartbeater.DISPATCHER:
        advance_claimed(p, c)
        return p.decided()
    if published:
        publish(p, c.now, recorded=False)
    p.add(fx.Claim(ack_uncertain=isinstance(e, ev.AckUncertain)))
    return p.decided()


def _acked_published(lease: Lease, e: ev.AckAnswered | ev.AckUncertain, c: Ctx) -> Decision:
    """The ack of a session recorded and published at its offer: answered, the lease is proven
    and its waiting attempt starts; unanswered, the claim must answer first (a 404 or 409 to it
    says the ack never landed, and the lease is lost before the attempt ever starts)."""
    p = Plan(lease)
    if isinstance(e, ev.AckAnswered):
        p.assume(heartbeat_ok_at=c.now)
        p.add(fx.MarkProven(p.held))
    p.add(count("work_claimed", type=lease.kind),
          log("claimed", lease, type=lease.kind, queue=lease.queue))
    if isinstance(e, ev.AckUncertain):
        p.add(log("ack uncertain", lease, logging.WARNING, status=e.status,
                  action_taken="claimed; started once a claim is answered"))
    p.add(fx.Claim(ack_uncertain=isinstance(e, ev.AckUncertain)))
    return p.decided()


def on_ack_conflict(lease: Lease, e: ev.AckConflict, c: Ctx) -> Decision:
    """A 409 to a retry after an attempt whose reply never came is our own ack, which landed:
    only a poll can hand the item to another worker, and the server offers an unacked item
    again only after it idled far longer than the executor's retries take. A 409 otherwise
    leaves it uncertain: the first claim tells."""
    return on_acked(lease, ev.AckAnswered() if e.after_lost_reply else ev.AckUncertain(409), c)


def on_ack_refused(lease: Lease | None, e: ev.AckRefused) -> Decision:
    refused = (count("work_refused", reason=Refusal.ACK_FAILED),
               log("ack failed", lease, logging.WARNING, status=e.status,
                   outcome="left for the server to re-deliver"))
    if lease is None or lease.phase != Phase.DISPATCHED:
        return Decision(None, refused)
    # Recorded and published at the offer: its record is dropped and its message revoked, so
    # the waiting attempt finds nothing to start. The item was never ours.
    p = Plan(None)
    p.add(*refused, fx.DeleteRecord())
    revoke_forgotten(p, lease.task_id)
    return p.decided()


def on_record_failed(e: ev.RecordFailed) -> Decision:
    """Redis refused the record. A fresh claim is acked but owned by nobody (nobody could heartbeat
    or run it): stop it rather than strand it in `starting`. A lease a running attempt was
    writing back is left to that attempt, which tries again at its next pulse."""
    lease = e.lease
    if lease.phase in (Phase.RUNNING, Phase.RELEASING):  # only a write-back is either
        return Decision(None, (log("write-back failed", lease, logging.WARNING, error=e.error,
                                   action_taken="tried again at the next pulse"),))
    return Decision(None, (
        count("work_refused", reason=Refusal.ABANDONED),
        log("abandoned", lease, logging.ERROR, reason="registry unavailable", error=e.error,
            outcome="stopped on the server"),
        fx.StopOnServer(force=True)))


def on_claim_answered(lease: Lease, e: ev.ClaimAnswered, c: Ctx) -> Decision:
    p = Plan(lease)
    heartbeat_answered(p, e.reply, e.sent_at)
    if p.lease is not None:
        advance_claimed(p, c)
    return p.decided()


def on_claim_refused(lease: Lease, e: ev.ClaimRefused, c: Ctx) -> Decision:
    p = Plan(lease)
    if not _unclaimed(e.current):
        lose(p, cause=LossCause.TAKEN, action="lease taken by another worker",
             server_state=e.current.state)
        return p.decided()
    _refused_unclaimed(p, c)
    if p.lease is not None and proven_ours(p.lease):
        advance_claimed(p, c)
    return p.decided()


def on_claim_not_acked(lease: Lease, e: ev.ClaimNotAcked, c: Ctx) -> Decision:
    p = Plan(lease)
    if e.ack_uncertain:
        # The ack never landed: the item is still queued on the server, which delivers it again.
        p.add(count("work_refused", reason=Refusal.ACK_FAILED))
        lose(p, cause=LossCause.ACK_NOT_LANDED, action="ack failed", status=e.status,
             outcome="left for the server to re-deliver")
        return p.decided()
    if e.status == 404:
        lose(p, cause=LossCause.SERVER_STOPPED, server_stopped=True, status=404)
        return p.decided()
    return on_claim_failed(lease, ev.ClaimFailed(e.status), c)


def on_claim_failed(lease: Lease, e: ev.ClaimFailed, c: Ctx) -> Decision:
    """Keep the lease: the heartbeat task claims again at once and judges the TTL. The claim
    may have landed, so its token may be the server's by now (`uncertain`)."""
    p = Plan(lease)
    p.change(uncertain=True)
    schedule(p, c.now)
    p.add(log("first heartbeat failed", lease, logging.WARNING, status=e.status))
    if proven_ours(p.held):
        advance_claimed(p, c)
    return p.decided()


def _unclaimed(current: ev.ServerLease | None) -> bool:
    """A 412 to a NO_HEARTBEAT claim while the server's own state says nobody heartbeated
    the item: nobody else holds it, so the refusal is the server's hiccup, not a rival."""
    return (current is not None and current.last_heartbeat is None
            and current.state in (None, ev.ServerState.STARTING))


def _refused_unclaimed(p: Plan, c: Ctx) -> None:
    """Claim the unclaimed item again soon; past the TTL, stop it (it is ours to stop).
    Giving up at once would strand the acked item in `starting` for good."""
    lease = p.held
    since = round(c.now - lease.claimed_at, 1)
    if c.now - lease.claimed_at <= lease.ttl:
        schedule(p, c.now + RETRY_SECONDS)
        p.add(log("claim refused", lease, logging.WARNING, seconds_since_ack=since,
                  action_taken="claimed again at the next heartbeat tick"))
        return
    flag_stop(p, StopKind.FORCE, StopCause.CLAIM_REFUSED)
    p.add(fx.Unschedule(),
          log("claim refused", lease, logging.WARNING, seconds_since_ack=since,
              action_taken="stopped on the server"))
    if lease.phase != Phase.RUNNING:
        end(p, Ending.STOPPED)


# --- the heartbeat task ------------------------------------------------------------------------

def on_heartbeat_answered(lease: Lease, e: ev.HeartbeatAnswered, c: Ctx) -> Decision:
    p = Plan(lease)
    if heartbeat_answered(p, e.reply, e.sent_at, due_at=e.due_at):
        # A lease claimed but held back (its ack unanswered, its first claim failed) is ours now.
        advance_claimed(p, c)
    return p.decided()


def heartbeat_answered(p: Plan, reply: ev.Reply, sent_at: float, *,
                       due_at: float = 0.0) -> bool:
    """What a heartbeat's 200 says: its token recorded, and the lease lost or stopped if the
    server says so. True if the lease simply goes on."""
    lease = p.held
    ttl = reply.ttl_seconds if reply.ttl_seconds > 0 else lease.ttl
    p.assume(token=reply.token, ttl_seconds=ttl, heartbeat_ok_at=sent_at, uncertain=False)
    due = renewal_due(sent_at, ttl, work_id=lease.work_id, first=not lease.heartbeat_ok_at,
                      due_at=due_at)
    p.add(fx.RecordHeartbeat(reply.token, ttl, sent_at, due, scheduled_for(lease)))
    if reply.state == ev.ServerState.STOPPED:
        lose(p, cause=LossCause.SERVER_STOPPED, server_stopped=True)
    elif not reply.extended and reply.state != ev.ServerState.STOPPING:
        lose(p, cause=LossCause.NOT_EXTENDED)
    elif reply.state == ev.ServerState.STOPPING:
        request_stop(p, StopKind.GRACEFUL, StopCause.SERVER, SeenBy.HEARTBEAT)
    else:
        return True
    return False


def on_heartbeat_refused(lease: Lease, e: ev.HeartbeatRefused, c: Ctx) -> Decision:
    p = Plan(lease)
    current = e.current
    if not lease.token and _unclaimed(current):
        _refused_unclaimed(p, c)
    elif current is not None and current.state == ev.ServerState.STOPPED:
        lose(p, cause=LossCause.SERVER_STOPPED, server_stopped=True)
    elif _lost_heartbeat_was_ours(lease, current, c.now):
        assert current is not None and current.last_heartbeat is not None
        p.change(token=current.last_heartbeat, uncertain=False)
        schedule(p, c.now)
        p.add(log("heartbeat token adopted", lease, logging.WARNING,
                  reason="a heartbeat of ours was applied but its reply was lost"))
    else:
        lose(p, cause=LossCause.HEARTBEAT_REFUSED, status=412,
             server_state=current.state if current else None)
    return p.decided()


# The window to adopt in while the server's TTL is still unknown (no reply seen yet): the assumed
# 30 s may be far longer than what the server granted, and a window past the real TTL could take
# a lease the server already gave another worker. A lost claim's retry comes within a second.
UNKNOWN_TTL_WINDOW_SECONDS = 5


# The server's states of an item it leases to somebody.
_LEASED = (ev.ServerState.STARTING, ev.ServerState.ACTIVE, ev.ServerState.STOPPING)


def _known_ttl(lease: Lease) -> float:
    return lease.ttl_seconds if lease.ttl_seconds > 0 else UNKNOWN_TTL_WINDOW_SECONDS


def _lost_heartbeat_was_ours(lease: Lease, current: ev.ServerLease | None, now: float) -> bool:
    """After a heartbeat whose reply was lost, a 412 whose server token we never saw is that
    heartbeat's: the server hands an acked item to another holder only after its lease lapsed,
    and it cannot lapse before one TTL after the last heartbeat it answered us was *sent* (or the
    ack it answered). Inside that window the only writer of the token is us, so adopting it
    cannot take another holder's lease. Without an answered ack or heartbeat there is no window:
    an ack whose reply was lost may never have landed, and the server may have given the item to
    someone else."""
    return (lease.uncertain and lease.heartbeat_ok_at > 0 and current is not None
            and bool(current.last_heartbeat)
            and current.last_heartbeat != lease.token
            and current.state in _LEASED
            and since_ok(lease, now) < _known_ttl(lease))


def on_heartbeat_not_found(lease: Lease, e: ev.HeartbeatNotFound, c: Ctx) -> Decision:
    p = Plan(lease)
    lose(p, cause=LossCause.HEARTBEAT_REFUSED, server_stopped=True, status=404)
    return p.decided()


def on_heartbeat_rejected(lease: Lease, e: ev.HeartbeatRejected, c: Ctx) -> Decision:
    """The server will not take our heartbeats (auth, a bad request): kill and stop the item."""
    p = Plan(lease)
    flag_stop(p, StopKind.FORCE, StopCause.REJECTED)
    p.add(fx.Unschedule(),
          log("heartbeat rejected", lease, logging.ERROR, status=e.status, error=e.error))
    if lease.phase != Phase.RUNNING:  # a running one: its supervisor kills, then releases
        end(p, lease.ended or Ending.STOPPED)
    return p.decided()


def on_heartbeat_failed(lease: Lease, e: ev.HeartbeatFailed, c: Ctx) -> Decision:
    p = Plan(lease)
    since = since_ok(lease, c.now)
    if since > lease.ttl:
        lose(p, cause=LossCause.ASSUMED_LOST)
        return p.decided()
    p.change(uncertain=True)
    schedule(p, c.now + RETRY_SECONDS)
    p.add(log("heartbeat failed", lease, logging.WARNING, status=e.status, error=e.error,
              seconds_since_success=round(since, 1)))
    return p.decided()


def on_heartbeat_throttled(lease: Lease, e: ev.HeartbeatThrottled, c: Ctx) -> Decision:
    """The server asks the fleet to keep away from the lease's environment a while: a due
    heartbeat (a first claim, a release retry) waits the throttle out, unless the lease would
    lapse first. Then the heartbeat waits as long as the lease allows and goes through the
    throttle at its last safe moment (`last_safe_heartbeat`): about one heartbeat per lease in
    two thirds of a TTL, half the usual rate, and no lease lapses for the server's asking.

    A claim held back this way sends nothing, so it proves nothing either way: an acked
    session is published as after a claim that failed, and claimed by a later tick."""
    p = Plan(lease)
    ends = c.now + e.seconds
    if lease.heartbeats_by != Heartbeater.DISPATCHER or lease.lost:
        schedule(p, ends)  # only a release is retried here, and only once the throttle lapses
        return p.decided()
    last = last_safe_heartbeat(lease)
    if ends <= last:
        schedule(p, ends)
        p.add(count("heartbeats_throttled", decision="deferred"))
    elif c.now < last:
        schedule(p, last)
        p.add(count("heartbeats_throttled", decision="deferred"))
    else:
        p.add(fx.HeartbeatNow(), count("heartbeats_throttled", decision="sent"),
              log("heartbeat sent through the throttle", lease, logging.INFO,
                  throttled_seconds=round(e.seconds, 1),
                  seconds_since_success=round(since_ok(lease, c.now), 1)))
    if lease.phase == Phase.CLAIMED and proven_ours(lease):
        advance_claimed(p, c)
    return p.decided()


def last_safe_heartbeat(lease: Lease) -> float:
    """The latest a lease's heartbeat may go and still leave a retry before the lease lapses:
    one heartbeat interval before the server's lapse (one TTL after the last heartbeat it
    answered was sent, or the ack), the window the usual schedule keeps for retries. A TTL the
    server never told is taken as the short window adoption uses (`_known_ttl`)."""
    ttl = _known_ttl(lease)
    return (lease.heartbeat_ok_at or lease.claimed_at) + ttl - heartbeat_interval(int(ttl))


# --- the rule table's examples of these events -------------------------------------------------

SCENARIOS = [
    Scenario("offered", ev.Offered(ITEM, known_type=True)),
    Scenario("offered, unknown type", ev.Offered(ITEM, known_type=False), phases=("none",)),
    Scenario("offered, ended before",
             ev.Offered(ITEM, known_type=True, ended=Ending.COMPLETED),
             phases=("none",)),
    Scenario("unreadable item", ev.Unreadable("w", "data: field required"), phases=("none",)),
    Scenario("offered, attempts used up",
             ev.Offered(ITEM, known_type=True, failures=3),
             phases=("none",)),
    Scenario("ack answered", ev.AckAnswered(), phases=("claimed", "dispatched"),
             unproven=True),
    Scenario("ack never answered", ev.AckUncertain(None), phases=("claimed", "dispatched"),
             unproven=True),
    Scenario("ack 409 after an unanswered attempt",
             ev.AckConflict(after_lost_reply=True),
             phases=("claimed", "dispatched"), unproven=True),
    Scenario("ack 409 at once",
             ev.AckConflict(after_lost_reply=False),
             phases=("claimed", "dispatched"), unproven=True),
    Scenario("ack refused (4xx)", ev.AckRefused(400), phases=("claimed", "dispatched"),
             unproven=True),
    Scenario("record refused, fresh claim",
             ev.RecordFailed(CLAIMED, "connection refused"),
             phases=("dispatched",)),
    Scenario("record refused, write-back",
             ev.RecordFailed(RUNNING, "connection refused"),
             phases=("running",)),
    Scenario("claim answered", ev.ClaimAnswered(REPLY, NOW), phases=("claimed", "dispatched")),
    Scenario("claim 412, nobody heartbeated it",
             ev.ClaimRefused(ev.ServerLease("starting", None)),
             phases=("claimed", "dispatched")),
    Scenario("claim 412, another holder",
             ev.ClaimRefused(ev.ServerLease("active", "tok-x")),
             phases=("claimed", "dispatched")),
    Scenario("claim 404/409 after an uncertain ack",
             ev.ClaimNotAcked(409, ack_uncertain=True),
             phases=("claimed", "dispatched")),
    Scenario("claim failed (transient)", ev.ClaimFailed(503), phases=("claimed", "dispatched")),
    Scenario("claim failed (transient), ack unanswered",
             ev.ClaimFailed(503),
             phases=("claimed", "dispatched"), unproven=True),
    Scenario("claim 412, nobody heartbeated it, ack unanswered",
             ev.ClaimRefused(ev.ServerLease("starting", None)),
             phases=("claimed", "dispatched"), unproven=True),
    Scenario("heartbeat answered, ack unanswered",
             ev.HeartbeatAnswered(REPLY, NOW),
             phases=("claimed",), unproven=True),
    Scenario("heartbeat answered", ev.HeartbeatAnswered(REPLY, NOW)),
    Scenario("heartbeat answered, not extended",
             ev.HeartbeatAnswered(
                 ev.Reply("tok-2", extended=False, state="active", ttl_seconds=30), NOW)),
    Scenario("heartbeat answered, stopping",
             ev.HeartbeatAnswered(
                 ev.Reply("tok-2", extended=True, state="stopping", ttl_seconds=30), NOW)),
    Scenario("heartbeat answered, stopped",
             ev.HeartbeatAnswered(
                 ev.Reply("tok-2", extended=False, state="stopped", ttl_seconds=30), NOW)),
    Scenario("heartbeat 412 after a lost reply, inside the TTL",
             ev.HeartbeatRefused(ev.ServerLease("active", "tok-2")),
             uncertain=True),
    Scenario("heartbeat 412", ev.HeartbeatRefused(ev.ServerLease("active", "tok-x"))),
    Scenario("heartbeat 404", ev.HeartbeatNotFound()),
    Scenario("heartbeat rejected (other 4xx)", ev.HeartbeatRejected(401, "unauthorized")),
    Scenario("heartbeat failed (transient)", ev.HeartbeatFailed(503, "unavailable")),
    Scenario("heartbeat due, throttled briefly", ev.HeartbeatThrottled(2.0)),
    Scenario("heartbeat due, throttled past its last safe moment",
             ev.HeartbeatThrottled(120.0)),
    Scenario("heartbeat due at its last safe moment, throttled",
             ev.HeartbeatThrottled(120.0), quiet_seconds=21),
]
