"""The promises every chaos scenario is checked against, written once.

Each function takes plain data (the emulator's request log, the sandboxes' own records, what the
test observed) and returns a list of violations, one readable line each: an empty list means
the promise held. Tests assert on the list, so a failure names every broken case at once.

    every_session_stopped    every session created reaches `stopped`
    leases_kept_alive        no work item stays acked without heartbeats beyond its TTL
    no_overlapping_attempts  at no moment do two attempts of one session run together
    no_stale_token_after_412 no heartbeat repeats a token the server refused with 412
    no_sandbox_survives      no sandbox process (nor a child) outlives its session
    stops_honoured           a stop ends the sandbox within grace + margin
"""

from __future__ import annotations

import itertools
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

NO_HEARTBEAT = "NO_HEARTBEAT"

__all__ = [
    "SandboxSpan",
    "every_session_stopped",
    "leases_kept_alive",
    "no_overlapping_attempts",
    "no_sandbox_survives",
    "no_stale_token_after_412",
    "sandbox_spans",
    "stops_honoured",
]


# --- every session created reaches `stopped` ------------------------------------------------
def every_session_stopped(states: Mapping[str, str]) -> list[str]:
    return [f"{work_id} ended in state {state!r}, not 'stopped'"
            for work_id, state in sorted(states.items()) if state != "stopped"]


# --- no acked item left without heartbeats beyond its TTL -----------------------------------
def _by_work(log: Iterable[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    per: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for entry in log:
        if entry.get("work_id"):
            per[str(entry["work_id"])].append(entry)
    for entries in per.values():
        entries.sort(key=lambda e: float(e["time"]))
    return per


def _applied_status(entry: Mapping[str, Any]) -> int:
    """The status of what the server did: for a lost reply (applied, its answer thrown away,
    logged with status 0) the status the answer had; 0 for a request never applied."""
    if entry.get("fault") == "lost_reply":
        return int(entry.get("applied_status") or 0)
    return int(entry.get("status") or 0)


def _ends_holding(entry: Mapping[str, Any]) -> bool:
    """A request after which the fleet rightly holds the lease no more."""
    endpoint, status = entry.get("endpoint"), _applied_status(entry)
    if (endpoint == "stop" and 200 <= status < 300) or (endpoint == "stop" and status == 409):
        return True
    if endpoint == "heartbeat":
        if status in (404, 412):
            return True
        if 200 <= status < 300 and (entry.get("state") == "stopped"):
            return True
    return False


def leases_kept_alive(log: Iterable[Mapping[str, Any]], *, ttl: float, margin: float,
                      end_time: float) -> list[str]:
    """From the request log: while the fleet holds a lease (from a successful ack until a stop
    lands, or the server says the lease is gone: 412, 404, `stopped`), a heartbeat follows the
    ack, and each heartbeat the previous one, within `ttl` (+ margin); the lease never lapses
    (a poll delivering the item again while held); and no item is left acked but never
    heartbeated (stranded in `starting`). A lease still held at `end_time` must have been
    beaten within the TTL before it. Leases are the server's: a lost reply counts as what the
    server did with it."""
    problems = []
    for work_id, entries in _by_work(log).items():
        held_since: float | None = None  # time of the last successful ack or heartbeat
        acked_unbeaten: float | None = None  # acked, and no heartbeat has succeeded since
        for entry in entries:
            t, status = float(entry["time"]), _applied_status(entry)
            endpoint = entry.get("endpoint")
            ok = 200 <= status < 300
            if endpoint == "ack" and ok:
                acked_unbeaten = t
            elif (endpoint == "heartbeat" and ok) or endpoint == "poll" or (
                    endpoint == "stop" and (ok or status == 409)):
                acked_unbeaten = None
            if held_since is not None and (_ends_holding(entry) or endpoint == "heartbeat"):
                gap = t - held_since
                if gap > ttl + margin:
                    problems.append(f"{work_id}: {gap:.1f}s without a heartbeat while held "
                                    f"(TTL {ttl:.0f}s), until {endpoint} {status}")
            if _ends_holding(entry):
                held_since = None
            elif (endpoint == "ack" and ok) or (endpoint == "heartbeat" and held_since):
                # Any attempt counts: under a failing API the fleet must keep trying; if the
                # lease lapses anyway, the server re-queues it and a poll shows that below.
                held_since = t
            elif endpoint == "poll" and held_since is not None:
                # Delivered again: the server re-queued it, so the lease had lapsed unbeaten.
                problems.append(f"{work_id}: re-delivered by poll while held: its lease lapsed")
                held_since = None
        if acked_unbeaten is not None and end_time - acked_unbeaten > ttl + margin:
            # The server never lets such an item go (anthropic-sdk-python#1746): a 412 on its
            # first heartbeat does not end it either.
            problems.append(f"{work_id}: acked {end_time - acked_unbeaten:.1f}s before the end, "
                            "never heartbeated nor stopped since: stranded in `starting`")
        elif held_since is not None and end_time - held_since > ttl + margin:
            problems.append(f"{work_id}: still acked, last beaten {end_time - held_since:.1f}s "
                            f"before the end (TTL {ttl:.0f}s): stranded")
    return problems


# --- no stale `expected_last_heartbeat` after a 412 -----------------------------------------
def no_stale_token_after_412(log: Iterable[Mapping[str, Any]]) -> list[str]:
    """After a 412, no later heartbeat of that item presents the refused token again; and every
    token presented is one the server handed out for that item (never a made-up one). A token
    issued by a heartbeat whose reply was lost was handed out too (the fleet may adopt it from a
    later 412's `current_state`); a 412 whose reply was lost was never seen, so it refuses
    nothing the fleet knew of."""
    problems = []
    for work_id, entries in _by_work(log).items():
        issued: set[str] = set()
        refused: dict[str, float] = {}
        for entry in entries:
            if entry.get("endpoint") != "heartbeat":
                continue
            t, status = float(entry["time"]), int(entry.get("status") or 0)
            expected = entry.get("expected_last_heartbeat")
            if expected and expected != NO_HEARTBEAT:
                if expected in refused:
                    problems.append(f"{work_id}: heartbeat at {t:.2f} repeats token {expected} "
                                    f"refused with 412 at {refused[expected]:.2f}")
                if expected not in issued:
                    problems.append(f"{work_id}: heartbeat at {t:.2f} presents token {expected} "
                                    "the server never issued")
            if status == 412 and expected:
                refused.setdefault(str(expected), t)
            if 200 <= _applied_status(entry) < 300 and entry.get("last_heartbeat"):
                issued.add(str(entry["last_heartbeat"]))
    return problems


# --- attempts never overlap -------------------------------------------------------------------
@dataclass(frozen=True)
class SandboxSpan:
    """One attempt's sandbox: when it started, and the bound on when it ended."""

    work_id: str
    pid: int
    start: float
    # The earliest moment it is known to have ended: its own `exited` record; else the later of
    # when its worker was SIGKILLed and when it was last seen alive (a lower bound on its death,
    # so an overlap found with it is a real one).
    end: float | None


def sandbox_spans(records: Mapping[str, list[Mapping[str, Any]]], *,
                  last_seen_alive: Mapping[int, float], killed_at: Mapping[int, float],
                  first_seen_dead: Mapping[int, float]) -> list[SandboxSpan]:
    """Spans of every recorded sandbox. A sandbox killed with SIGKILL records no exit: its end
    is when the process table first showed it gone (`first_seen_dead`, a bound that can only
    lengthen a span, never hide an overlap); failing that, the latest moment it was known alive
    (`last_seen_alive` from the process table, `killed_at` when its worker was SIGKILLed)."""
    spans = []
    for work_id, lines in records.items():
        starts = {int(r["pid"]): float(r["time"]) for r in lines if r["event"] == "started"}
        exits = {int(r["pid"]): float(r["time"]) for r in lines if r["event"] == "exited"}
        for pid, start in starts.items():
            end = exits.get(pid) or first_seen_dead.get(pid)
            if end is None:
                bounds = [b for b in (last_seen_alive.get(pid), killed_at.get(pid)) if b]
                end = max(bounds) if bounds else None
            spans.append(SandboxSpan(work_id, pid, start, end))
    return spans


def no_overlapping_attempts(spans: Iterable[SandboxSpan]) -> list[str]:
    problems = []
    per: dict[str, list[SandboxSpan]] = defaultdict(list)
    for span in spans:
        per[span.work_id].append(span)
    for work_id, mine in per.items():
        ordered = sorted(mine, key=lambda s: s.start)
        for before, after in itertools.pairwise(ordered):
            if before.end is None:
                problems.append(f"{work_id}: attempt pid {before.pid} has no known end before "
                                f"pid {after.pid} started")
            elif after.start < before.end:
                problems.append(f"{work_id}: pid {after.pid} started {before.end - after.start:.2f}"
                                f"s before pid {before.pid} ended")
    return problems


# --- no sandbox process survives its session --------------------------------------------------
# A process counts as the one that wrote a record only if it started before the record was
# written; this slack covers reading the clock and /proc/uptime (10 ms ticks) apart.
SAME_PROCESS_SLACK_SECONDS = 0.5
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _alive(pid: int, *, wrote_at: float | None = None) -> bool:
    """The pid runs (a zombie is dead). With `wrote_at` (when it wrote a record), only if it is
    still that process: pids wrap quickly on a busy machine (32,768 of them), and a new process
    with an old sandbox's pid would otherwise keep that sandbox "alive"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[-1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return False
    if fields[0] == "Z":
        return False
    if wrote_at is None:
        return True
    started = time.time() - uptime + int(fields[19]) / _CLOCK_TICKS
    return started <= wrote_at + SAME_PROCESS_SLACK_SECONDS


def _group_members(pgids: set[int]) -> dict[int, list[int]]:
    members: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[-1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        state, pgid = fields[0], int(fields[2])
        if pgid in pgids and state != "Z":
            members[pgid].append(int(entry))
    return members


def no_sandbox_survives(records: Mapping[str, list[Mapping[str, Any]]]) -> list[str]:
    """Every pid a sandbox or its child recorded is gone, and so is every process in their
    process groups (children that never wrote a record included)."""
    problems = []
    pgids: dict[int, str] = {}
    for work_id, lines in records.items():
        for r in lines:
            pgids[int(r["pgid"])] = work_id
            if _alive(int(r["pid"]), wrote_at=float(r["time"])):
                problems.append(f"{work_id}: {r['event']} pid {r['pid']} still runs")
    for pgid, pids in _group_members(set(pgids)).items():
        problems.append(f"{pgids[pgid]}: process group {pgid} still has {sorted(pids)}")
    return sorted(set(problems))


# --- stops are honoured in time ---------------------------------------------------------------
def stops_honoured(requested: Mapping[str, float], ended: Mapping[str, float | None], *,
                   bound: float) -> list[str]:
    """Each stop (work id -> when asked) ended that session's sandbox within `bound` seconds."""
    problems = []
    for work_id, asked in sorted(requested.items()):
        end = ended.get(work_id)
        if end is None:
            problems.append(f"{work_id}: stopped at {asked:.2f}, its sandbox's end never seen")
        elif end - asked > bound:
            problems.append(f"{work_id}: sandbox ended {end - asked:.1f}s after the stop "
                            f"(bound {bound:.1f}s)")
    return problems
