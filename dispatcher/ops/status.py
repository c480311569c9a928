"""`dispatcher status`: the fleet as its lease registry sees it, from Redis alone.

    status            leases and workers, once
    status --watch    the same, redrawn in place every --interval seconds until Ctrl-C
    status --check    exit 0 if the fleet can work, 5 (one line per problem) if it cannot

`--check` is a container health check: it reads a few Redis keys (no broadcast to the fleet,
no Work API call) and answers in well under a second. The fleet cannot work when no live
worker offers a session slot, when no beat holds celery-redbeat's lock (nothing schedules the
poller and the heartbeats), or when a lease the fleet heartbeats has gone unbeaten for most of
its TTL (the server is about to hand it out again). Redis not answering exits 3.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dispatcher.lease.model import Heartbeater, Phase
from dispatcher.ops.output import (
    EXIT_OK,
    EXIT_UNHEALTHY,
    UsageError,
    command,
    connect_redis,
    duration,
    print_json,
    read_settings,
    redis_options,
    table,
)

if TYPE_CHECKING:
    from redis import Redis

    from dispatcher.control.capacity import WorkerSlots
    from dispatcher.lease.model import Lease

__all__ = ["FleetView", "problems", "register"]

# A health check answers in well under a second or says Redis is unreachable: a Redis that is
# there answers in milliseconds, and Docker's own check timeout must not be what fires.
CHECK_REDIS_TIMEOUT_SECONDS = 0.5
# The fleet beats a lease every third of its TTL, so one failed beat still leaves a retry. A
# lease unbeaten for two thirds has missed both: the next miss lets the server hand it out.
OVERDUE_SHARE_OF_TTL = 2 / 3
DEFAULT_WATCH_SECONDS = 2.0
# ANSI: cursor home, clear to the end of the screen. Redraws in place without flicker.
REDRAW = "\033[H\033[J"


def register(subcommands: Any) -> None:
    parser = command(subcommands, "status", _status, "the fleet as its lease registry sees it",
                     "Leases held (phase, attempt, worker, heartbeat, time to lease expiry, "
                     "stop flag) and workers (slots, used, free, draining), read from Redis "
                     "($DISPATCHER_REDIS_URL, keys under $DISPATCHER_KEY_PREFIX). Needs no "
                     "API key. --check exits 5 when the fleet cannot work: no live session "
                     "slot, beat's lock not held, or a lease overdue for its heartbeat; 3 "
                     "when Redis does not answer within "
                     f"{CHECK_REDIS_TIMEOUT_SECONDS} s.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true",
                      help="a health check: exit 0 if the fleet can work, else 5 (or 3)")
    mode.add_argument("--watch", action="store_true",
                      help="redraw the status in place until Ctrl-C")
    parser.add_argument("--interval", type=float, default=DEFAULT_WATCH_SECONDS,
                        help="seconds between redraws with --watch (default: %(default)s)")
    redis_options(parser)


# --- the decision: pure, tested by a table ----------------------------------------------------
@dataclass(frozen=True)
class FleetView:
    """What `--check` reads from Redis, at one instant."""

    leases: list[Lease]
    workers: list[WorkerSlots]
    beat_lock_held: bool
    now: float
    # Ready warm containers by pool owner (`<hostname>#<id>`), and the warm starts counted.
    warm: dict[str, int] = field(default_factory=dict)
    warm_starts: dict[str, int] = field(default_factory=dict)


def problems(view: FleetView) -> list[str]:
    """Why the fleet cannot work, one line each; empty when it can."""
    from dispatcher.control.capacity import (
        ENGINE_DOWN,
        ENGINE_NO_IMAGE,
        ENGINE_UP,
        WORKER_STALE_SECONDS,
    )

    found: list[str] = []
    live = [w for w in view.workers if _live(w, view.now, WORKER_STALE_SECONDS)]
    if not any(w.slots > 0 and w.engine in ("", ENGINE_UP) for w in live):
        found.append("no live session slots: no session worker has advertised in "
                     f"{WORKER_STALE_SECONDS:.0f} s, or every one is draining or without "
                     "its engine or image")
    down = [w.hostname for w in live if w.engine == ENGINE_DOWN]
    if down:
        found.append(f"{len(down)} worker(s) whose container engine does not answer, their "
                     f"session slots withdrawn: {', '.join(down[:3])}")
    imageless = [w.hostname for w in live if w.engine == ENGINE_NO_IMAGE]
    if imageless:
        found.append(f"{len(imageless)} worker(s) whose container engine lacks a sandbox image "
                     "(DISPATCHER_SANDBOX_IMAGE; the worker's log names it), their session "
                     f"slots withdrawn: {', '.join(imageless[:3])}")
    if not view.beat_lock_held:
        found.append("beat's lock is not held: no beat schedules the poller and the heartbeats")
    overdue = [lease for lease in view.leases if _overdue(lease, view.now)]
    if overdue:
        sample = ", ".join(lease.work_id for lease in overdue[:3])
        found.append(f"{len(overdue)} lease(s) overdue for a heartbeat: {sample}")
    return found


def _live(worker: WorkerSlots, now: float, stale_seconds: float) -> bool:
    return not worker.draining and now - worker.seen_at < stale_seconds


def _overdue(lease: Lease, now: float) -> bool:
    if lease.heartbeats_by != Heartbeater.DISPATCHER or lease.lost:
        return False  # the sandbox beats it, or it is being let go: none of the fleet's beats
    since = lease.heartbeat_ok_at or lease.claimed_at
    if not since:
        return False
    return now - since > lease.ttl * OVERDUE_SHARE_OF_TTL


# --- the effects ------------------------------------------------------------------------------
def _status(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError("--interval must be above 0 seconds")
    settings = read_settings()
    if args.check:
        redis, prefix = connect_redis(settings, args, timeout=CHECK_REDIS_TIMEOUT_SECONDS)
        return _check(redis, prefix, as_json=args.json)
    redis, prefix = connect_redis(settings, args)
    if not args.watch:
        _show(redis, prefix, as_json=args.json)
        return EXIT_OK
    try:
        while True:
            if sys.stdout.isatty():
                print(REDRAW, end="")
            _show(redis, prefix, as_json=args.json)
            print(f"\n(every {args.interval:g} s; Ctrl-C stops)", flush=True)
            time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK


def _read(redis: Redis, prefix: str) -> FleetView:
    from dispatcher.celery.keys import CeleryKeys
    from dispatcher.clock import RedisClock
    from dispatcher.control.capacity import Capacity
    from dispatcher.lease.registry import LeaseRegistry
    from dispatcher.metrics import Metrics, warm_starts
    from dispatcher.session.warm_book import WarmBook

    clock = RedisClock(redis)  # the clock the leases and workers were written with
    return FleetView(leases=LeaseRegistry(redis, prefix=prefix, clock=clock).all(),
                     workers=Capacity(redis, prefix=prefix, clock=clock).workers(),
                     beat_lock_held=bool(redis.exists(CeleryKeys(prefix).beat_lock)),
                     now=clock.now(), warm=WarmBook(redis, prefix=prefix).sizes(),
                     warm_starts=warm_starts(Metrics(redis, prefix=prefix).values()))


def _check(redis: Redis, prefix: str, *, as_json: bool) -> int:
    found = problems(_read(redis, prefix))
    if as_json:
        print_json({"ok": not found, "problems": found, "key_prefix": prefix})
    else:
        for line in found:
            print(f"dispatcher status: {line}", file=sys.stderr)
        if not found:
            print("ok: the fleet can work")
    return EXIT_UNHEALTHY if found else EXIT_OK


def _show(redis: Redis, prefix: str, *, as_json: bool) -> None:
    view = _read(redis, prefix)
    report = {"leases": [_lease_row(lease, view.now) for lease in view.leases],
              "workers": [_worker_row(worker, view.leases, view.now, view.warm)
                          for worker in view.workers],
              "summary": {**_summary(view.leases, view.workers), **_warm_summary(view)},
              "key_prefix": prefix}
    if as_json:
        print_json(report)
    else:
        print(_status_text(report))


# --- output -----------------------------------------------------------------------------------
def _lease_row(lease: Lease, now: float) -> dict[str, Any]:
    beat_age = now - lease.heartbeat_ok_at if lease.heartbeat_ok_at else None
    expires_in = (lease.ttl_seconds - beat_age
                  if beat_age is not None and lease.ttl_seconds else None)
    return {
        "work_id": lease.work_id, "session_id": lease.session_id, "phase": lease.phase,
        "attempt": lease.attempt, "worker": lease.worker or None, "queue": lease.queue,
        "mode": lease.mode, "task_id": lease.task_id or None,
        "age_seconds": now - lease.claimed_at if lease.claimed_at else None,
        "heartbeat_age_seconds": beat_age, "ttl_seconds": lease.ttl_seconds or None,
        "expires_in_seconds": expires_in, "heartbeats_by": lease.heartbeats_by,
        "stop": lease.stop or None, "stop_cause": lease.stop_cause or None,
        "lost": lease.lost,
    }


def _worker_row(worker: WorkerSlots, leases: list[Lease], now: float,
                warm: dict[str, int]) -> dict[str, Any]:
    used = sum(1 for lease in leases
               if lease.worker == worker.hostname and lease.phase == Phase.RUNNING)
    return {
        "hostname": worker.hostname, "slots": worker.slots, "used": used,
        "free": max(0, worker.slots - used), "pool": worker.pool, "queues": worker.queues,
        "warm": sum(n for owner, n in warm.items()
                    if owner.rpartition("#")[0] == worker.hostname),
        "draining": worker.draining, "live": worker.live, "engine": worker.engine or None,
        "last_seen_seconds": now - worker.seen_at if worker.seen_at else None,
    }


def _summary(leases: list[Lease], workers: list[WorkerSlots]) -> dict[str, int]:
    from dispatcher.control.capacity import free_slots

    total = sum(w.slots for w in workers if w.serving)
    return {"leases_held": len(leases), "live_workers": sum(1 for w in workers if w.live),
            "slots_total": total, "slots_free": free_slots(total=total, held=len(leases))}


def _warm_summary(view: FleetView) -> dict[str, int]:
    return {"warm_ready": sum(view.warm.values()), "warm_hits": view.warm_starts.get("hit", 0),
            "warm_misses": view.warm_starts.get("miss", 0)}


def _status_text(report: dict[str, Any]) -> str:
    summary = report["summary"]
    lines = [f"{summary['leases_held']} leases held; {summary['live_workers']} live workers, "
             f"{summary['slots_free']} of {summary['slots_total']} slots free "
             f"(prefix {report['key_prefix']})",
             f"warm containers: {summary['warm_ready']} ready; {summary['warm_hits']} sessions "
             f"started warm, {summary['warm_misses']} cold for want of one", ""]
    lines.append(table(
        ["WORK ID", "SESSION ID", "PHASE", "ATTEMPT", "WORKER", "AGE", "HEARTBEAT", "EXPIRES IN",
         "STOP"],
        [[r["work_id"], r["session_id"], r["phase"], r["attempt"], r["worker"],
          duration(r["age_seconds"]), duration(r["heartbeat_age_seconds"]),
          duration(r["expires_in_seconds"]), _stop_text(r)] for r in report["leases"]]))
    lines.append("")
    lines.append(table(
        ["WORKER", "SLOTS", "USED", "FREE", "WARM", "POOL", "DRAINING", "ENGINE", "LAST SEEN"],
        [[r["hostname"], r["slots"], r["used"], r["free"], r["warm"], r["pool"], r["draining"],
          _engine_text(r["engine"]), duration(r["last_seen_seconds"])]
         for r in report["workers"]]))
    return "\n".join(lines)


def _engine_text(engine: str | None) -> str | None:
    """A worker's container engine: `down` or `no-image` means its slots are withdrawn."""
    if engine in ("down", "no-image"):
        return f"{engine} (slots withdrawn)"
    return engine


def _stop_text(row: dict[str, Any]) -> str | None:
    if not row["stop"]:
        return None
    text = f"{row['stop']} ({row['stop_cause']})" if row["stop_cause"] else str(row["stop"])
    return text + (", lost" if row["lost"] else "")
