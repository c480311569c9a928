"""Where a session's start goes, step by step, from its creation to its sandbox's first record.

    python -m bench.breakdown [--idle 30] [--rate 4] [--seconds 15] [--peer] [--json FILE]

Uses the Redis at $DISPATCHER_REDIS_URL (default redis://127.0.0.1:6379/0) if it answers, else
starts its own; the run's keys are deleted at the end.

Runs the dispatcher as `python -m bench` does (a control worker and two session workers of 5
threads each, on the emulator), creates sessions one at a time on an idle fleet, then at a
steady rate, and lines up for each session:

* the benchmark's clock when it asked the emulator to create the session;
* the emulator's request log: when it answered the poll that delivered the item (`answered`),
  when the ack arrived;
* the `start path` lines the control worker and the session worker logged
  (`dispatcher/startpath.py`): monotonic offsets from a wall-clock anchor;
* the sandbox's `started` record (the fake session program, after its interpreter started).

It prints, per step, the milliseconds since the step before (p50 and p99) and since creation
(p50). With `--peer` it measures the official SDK's poller the same way, as far as its steps
show from outside (poll answered, ack, sandbox started). `python -m bench` runs the same
analysis on its own dispatch measurements and puts the table in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.emu import Created, Emulator
from bench.records import events, percentile

__all__ = ["OURS_STEPS", "PEER_STEPS", "Step", "analyse", "start_paths", "table", "timelines"]

Step = tuple[str, str]  # (name, what happened)

# In the order a session passes them. A step missing from a session's timeline (a prefork
# worker has no `received`) is skipped: the next one counts from the step before it.
OURS_STEPS: list[Step] = [
    ("poll_answered", "emulator answers the long poll with the item"),
    ("polled", "control worker has parsed the poll reply"),
    ("read", "lease and history read (Redis, one round trip)"),
    ("ack_sent", "ack about to be sent"),
    ("ack_arrived", "ack arrives at the emulator"),
    ("ack_answered", "emulator answers the ack"),
    ("acked", "control worker has the ack's answer"),
    ("recorded", "lease record created (Redis)"),
    ("published", "session task published (broker)"),
    ("received", "session worker's consumer has the message"),
    ("receipt", "receipt written with the start's reads: lease, work item, drain flag (Redis)"),
    ("task_started", "task body starts in a pool thread"),
    ("lease_read", "lease and drain flag read in the task (Redis; prefork, or reads gone stale)"),
    ("spec_built", "work item parsed, sandbox spec built"),
    ("running", "attempt marked running (Redis), the lease's proof awaited first if need be"),
    ("spawned", "command spawned (fork and exec returned)"),
    ("sandbox_started", "sandbox's first record: exec, the sandbox's own start"),
]
PEER_STEPS: list[Step] = [
    ("poll_answered", "emulator answers the long poll with the item"),
    ("ack_arrived", "ack arrives at the emulator"),
    ("ack_answered", "emulator answers the ack"),
    ("sandbox_started", "sandbox's first record: fork, exec, the sandbox's own start"),
]
# Off the start path, shown apart: the first heartbeat goes out after the publish.
AFTER_STEPS = ("claimed",)

_LINE = re.compile(r"start path work_id=(\S+) side=(\S+) wall=(\S+) mono=\S+ steps=(\S+)")


def start_paths(texts: Iterable[str]) -> dict[str, dict[str, float]]:
    """Every `start path` line in these logs: {work_id: {step: epoch seconds}}."""
    found: dict[str, dict[str, float]] = {}
    for text in texts:
        for work_id, _side, wall, steps in _LINE.findall(text):
            at = found.setdefault(work_id, {})
            for part in steps.split(","):
                name, _, offset = part.partition(":")
                at.setdefault(name, float(wall) + float(offset) / 1000)
    return found


def _server_times(requests: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """From the request log: when each item's delivering poll was answered, its first ack
    arrived and was answered."""
    found: dict[str, dict[str, float]] = {}
    for entry in requests:
        work_id = entry.get("work_id")
        if not work_id or not entry.get("answered"):
            continue
        at = found.setdefault(work_id, {})
        if entry.get("endpoint") == "poll":
            at.setdefault("poll_answered", float(entry["answered"]))
        elif entry.get("endpoint") == "ack":
            at.setdefault("ack_arrived", float(entry["time"]))
            at.setdefault("ack_answered", float(entry["answered"]))
    return found


def timelines(created: list[Created], requests: list[dict[str, Any]],
              paths: dict[str, dict[str, float]], records: Path) -> list[dict[str, float]]:
    """Each session's steps, in milliseconds since its creation."""
    server = _server_times(requests)
    out = []
    for c in created:
        at = {**server.get(c.work_id, {}), **paths.get(c.work_id, {})}
        started = events(records, c.work_id, "started")
        if started:
            at["sandbox_started"] = float(started[0]["time"])
        out.append({name: (t - c.time) * 1000 for name, t in at.items()})
    return out


def table(lines: list[dict[str, float]], steps: list[Step]) -> list[dict[str, Any]]:
    """Per step: how long after the step before it (p50, p99) and after creation (p50)."""
    rows = []
    for index, (name, what) in enumerate(steps):
        gaps, since = [], []
        for line in lines:
            if name not in line:
                continue
            before = [line[n] for n, _ in steps[:index] if n in line]
            gaps.append(line[name] - (before[-1] if before else 0.0))
            since.append(line[name])
        if gaps:
            rows.append({"step": name, "what": what, "n": len(gaps),
                         "p50": percentile(gaps, 50), "p99": percentile(gaps, 99),
                         "since_created_p50": percentile(since, 50),
                         "since_created_p99": percentile(since, 99)})
    for name in AFTER_STEPS:
        since = [line[name] for line in lines if name in line]
        if since:
            rows.append({"step": name, "what": "first heartbeat answered (after the publish)",
                         "n": len(since), "p50": None, "p99": None,
                         "since_created_p50": percentile(since, 50)})
    return rows


def analyse(emu: Emulator, environment_id: str, records: Path, logs: list[str],
            batches: dict[str, list[Created]], *, peer: bool = False) -> dict[str, Any]:
    """The breakdown of each batch of sessions (e.g. idle, steady) of one fleet."""
    requests = emu.requests(environment_id)
    paths = start_paths(logs)
    steps = PEER_STEPS if peer else OURS_STEPS
    return {name: table(timelines(created, requests, paths, records), steps)
            for name, created in batches.items()}


def render(breakdown: dict[str, list[dict[str, Any]]]) -> str:
    """A Markdown table: one column pair per batch."""
    names = list(breakdown)
    header = "| step | what | " + " | ".join(
        f"{n}: p50 / p99 (ms) | {n}: since created p50" for n in names) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(names))]
    order: list[tuple[str, str]] = []
    for rows in breakdown.values():
        for row in rows:
            if (row["step"], row["what"]) not in order:
                order.append((row["step"], row["what"]))
    for step, what in order:
        cells = []
        for n in names:
            row = next((r for r in breakdown[n] if r["step"] == step), None)
            if row is None:
                cells += ["-", "-"]
            elif row["p50"] is None:
                cells += ["(after)", f"{row['since_created_p50']:.1f}"]
            else:
                cells += [f"{row['p50']:.1f} / {row['p99']:.1f}",
                          f"{row['since_created_p50']:.1f}"]
        lines.append(f"| `{step}` | {what} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    from bench import scenarios
    from bench.__main__ import forget_keys
    from bench.fleets import Ours, Peer
    from dispatcher.ops.stack import LocalStack

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle", type=int, default=30, help="sessions on an idle fleet")
    parser.add_argument("--rate", type=float, default=4.0, help="steady arrivals per second")
    parser.add_argument("--seconds", type=float, default=15.0, help="steady arrivals for so long")
    parser.add_argument("--peer", action="store_true", help="also the official SDK's poller")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dispatcher-breakdown-") as tmp:
        workdir = Path(tmp)
        records = workdir / "records"
        records.mkdir()
        stack = LocalStack(workdir=workdir, redis_url=os.environ.get("DISPATCHER_REDIS_URL",
                                                                     LocalStack.redis_url))
        try:
            stack.ensure_redis()
            stack.start_emulator("--min-ttl", "1", "--default-ttl", "20")
            emu = Emulator(stack)
            fleets: list[Any] = [Ours(stack, emu, records)]
            if args.peer:
                fleets.append(Peer(stack, emu, records))
            for fleet in fleets:
                fleet.start([5, 5] if isinstance(fleet, Ours) else 10)
                batches: dict[str, list[Created]] = {"idle": [], "steady": []}
                scenarios.dispatch_idle(fleet, args.idle, kept=batches["idle"])
                scenarios.dispatch_steady(fleet, args.rate, args.seconds,
                                          kept=batches["steady"])
                logs = [stack.log(name) for name in fleet.members]
                results[fleet.name] = analyse(emu, fleet.environment_id, records, logs,
                                              batches, peer=isinstance(fleet, Peer))
                fleet.stop_members()
        finally:
            stack.stop_all()
            forget_keys(stack)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    for name, breakdown in results.items():
        print(f"\n{name}\n")
        print(render(breakdown))


if __name__ == "__main__":
    main()
