"""The dispatcher against the official SDK's worker, on one emulator, in one run.

    python -m bench [--quick] [--out BENCHMARKS.md] [--json results.json] [--keep DIR]
    python -m bench --from-json results.json      # the report again, from saved figures
    python -m bench --from-json a.json --from-json b.json   # one report from parts run apart
    python -m bench --only capacity --out /tmp/cap.md   # heartbeat capacity alone
    python -m bench --only burst --json burst.json     # a burst into as many free slots,
                                                  # and a big backlog, ours and the peer's
    python -m bench --only capacity --hb-ttl 30 --hb-steps 1000,5000 --out /tmp/cap.md
                                                  # one TTL, chosen steps
    python -m bench --only fairness --json fairness.json   # ten environments, one bursting
    python -m bench --only thousand --json thousand.json   # 1,000 sessions at once

Starts Redis (or uses the one at $DISPATCHER_REDIS_URL) and one emulator, then measures each
system under the same load: dispatch latency (idle and steady arrivals), drain throughput,
stop latency, recovery time, poll load (1, 10, 50 slots), memory per session, and the
dispatcher's heartbeat capacity, fairness across ten environments under a burst, and a thousand
sessions at once. Writes BENCHMARKS.md with both figures and their ratio.
`--quick` is a smoke run with tiny sizes (about 4 minutes); its figures mean little.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis

from bench import breakdown, scale, scenarios
from bench.containers import carry_over
from bench.emu import Created, Emulator
from bench.fleets import KEY_PREFIXES, Fleet, Ours, Peer
from bench.report import write_report
from dispatcher.ops.stack import LocalStack


@dataclass
class Sizes:
    # The lease TTL the emulator gives when a heartbeat asks for none: the peer's sandbox beats
    # every ttl/2 and so learns of stops that late, and a lapsed lease is re-queued after it. The
    # service's default is unknown (its 412 fixture shows 120 s); 20 s keeps the run short.
    default_ttl: int = 20
    slots: int = 10
    idle: int = 30
    steady_rate: float = 4.0
    steady_seconds: float = 15.0
    backlog: int = 300
    stops: int = 10
    recoveries: int = 3
    # How long a killed session may take to run again before it is called never: several
    # lapses of `default_ttl` (the peer's only way back, under the earlier server model).
    recovery_wait: float = 180.0
    poll_window: float = 15.0
    poll_fleets: list[int] = field(default_factory=lambda: [1, 10, 50])
    memory_sessions: int = 10
    # Heartbeat capacity: a series of growing steps per TTL asked for, each series with its own
    # control worker, environment and leases. 30 s is the hard case (a beat every 10 s); 120 s
    # is the TTL a fleet gets when DISPATCHER_DESIRED_TTL_SECONDS is unset (the service's
    # default, as its 412 fixture shows; a beat every 30 s).
    hb_series: list[tuple[int, list[int]]] = field(default_factory=lambda: [
        (30, [1000, 2500, 5000, 7500]), (120, [5000, 10000])])
    # Each step is judged over this long, or 1.5 beat intervals if longer.
    hb_window: float = 25.0
    # Added to every heartbeat answer during capacity steps: 0 is the emulator on 127.0.0.1.
    hb_latency_ms: int = 0
    # Stops asked for after the first series' last step, with its leases held: the stop
    # bridge's sweep at that scale (stop -> the lease's stop flag).
    hb_stops: int = 20
    # The emulator's largest `list` page; None: its own default (100). The service documents
    # none; the bridge asks 1,000 past 1,000 leases held, and takes what a refusal names.
    list_limit: int | None = None
    # Fairness (bench/scale.py): ten environments on `fair_slots` slots; nine trickle
    # `fair_rate` sessions/s each for `fair_seconds`, alone and beside the tenth's burst.
    fair_slots: int = 20
    fair_burst: int = 500
    fair_rate: float = 0.2
    fair_seconds: float = 30.0
    fair_backlog: int = 40
    # DISPATCHER_IDLE_HEADROOM_SECONDS of the fairness fleet (None: the setting's default), to
    # measure its trade: the quiet environments' dispatch against the burst's drain.
    fair_idle_headroom: float | None = None
    # A thousand sessions at once, over ten environments, on threads-pool session workers.
    thousand: int = 1000
    thousand_workers: int = 2
    thousand_hold: float = 60.0
    # The burst part: `burst` sessions created at once into as many free slots, `burst_rounds`
    # times, each running `burst_duration` s (all at once: the burst fills the fleet); then a
    # backlog of `big_backlog` drained by the same slots, ours and the peer's.
    burst: int = 100
    burst_rounds: int = 3
    burst_duration: float = 3.0
    big_backlog: int = 1000


QUICK = Sizes(default_ttl=6, slots=4, idle=4, steady_rate=2.0, steady_seconds=3.0, backlog=16,
              stops=2, recoveries=1, recovery_wait=30.0, poll_window=3.0, poll_fleets=[4],
              memory_sessions=2,
              hb_series=[(6, [50])], hb_window=5.0, hb_stops=3,
              fair_slots=6, fair_burst=30, fair_rate=0.3, fair_seconds=6.0, fair_backlog=6,
              thousand=40, thousand_workers=2, thousand_hold=12.0, burst=6, burst_rounds=1,
              burst_duration=1.0, big_backlog=24)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_common(fleet: Fleet, sizes: Sizes, out: dict[str, Any]) -> dict[str, Any]:
    """The measurements both systems get, on a started fleet of `sizes.slots` slots."""
    log(f"{fleet.name}: poll load at {sizes.slots} slots")
    out[f"poll_{sizes.slots}"] = scenarios.poll_load(fleet, sizes.slots, sizes.poll_window)
    batches: dict[str, list[Created]] = {"idle": [], "steady": []}
    log(f"{fleet.name}: dispatch latency, idle fleet ({sizes.idle} sessions)")
    out["dispatch_idle"] = scenarios.dispatch_idle(fleet, sizes.idle, kept=batches["idle"])
    log(f"{fleet.name}: dispatch latency, {sizes.steady_rate}/s for {sizes.steady_seconds} s")
    out["dispatch_steady"] = scenarios.dispatch_steady(fleet, sizes.steady_rate,
                                                       sizes.steady_seconds,
                                                       kept=batches["steady"])
    log(f"{fleet.name}: where the dispatch time went")
    out["breakdown"] = breakdown.analyse(
        fleet.emu, fleet.environment_id, fleet.records,
        [fleet.stack.log(name) for name in fleet.members], batches, peer=isinstance(fleet, Peer))
    log(f"{fleet.name}: drain a backlog of {sizes.backlog}")
    out["drain"] = scenarios.drain(fleet, sizes.backlog)
    log(f"{fleet.name}: stop latency ({sizes.stops} sessions)")
    out["stop"] = scenarios.stop_latency(fleet, sizes.stops)
    return out


def run_ours(stack: LocalStack, emu: Emulator, records: Path, sizes: Sizes,
             out: dict[str, Any]) -> dict[str, Any]:
    fleet = Ours(stack, emu, records)
    half = sizes.slots // 2
    log(f"dispatcher: control worker + 2 session workers ({half}+{sizes.slots - half} threads)")
    fleet.start([half, sizes.slots - half])
    try:
        run_common(fleet, sizes, out)
        log("dispatcher: recovery (SIGKILL a session worker)")
        out["recovery"] = scenarios.recovery(fleet, sizes.recoveries,
                                             wait=sizes.recovery_wait)
        for slots in [s for s in sizes.poll_fleets if s != sizes.slots]:
            fleet.stop_members(fleet.session_workers())
            fleet.sessions(slots)
            log(f"dispatcher: poll load at {slots} slots")
            time.sleep(3.0)  # its first slot advertisement
            out[f"poll_{slots}"] = scenarios.poll_load(fleet, slots, sizes.poll_window)
        for pool in ("threads", "prefork"):
            fleet.stop_members(fleet.session_workers())
            log(f"dispatcher: memory, one {pool} session worker of {sizes.slots}")
            fleet.sessions(sizes.slots, pool)
            fleet.warm_up()
            out[f"memory_{pool}"] = scenarios.memory(fleet, sizes.memory_sessions, sizes.slots)
    finally:
        fleet.stop_members()
    return out


def run_peer(stack: LocalStack, emu: Emulator, records: Path, sizes: Sizes,
             out: dict[str, Any]) -> dict[str, Any]:
    fleet = Peer(stack, emu, records)
    log(f"peer: {sizes.slots} processes of bench.peer")
    fleet.start(sizes.slots)
    try:
        run_common(fleet, sizes, out)
        log("peer: memory")
        out["memory"] = scenarios.memory(fleet, min(sizes.memory_sessions, sizes.slots),
                                         sizes.slots)
        log("peer: recovery (SIGKILL a peer and its sandbox)")
        out["recovery"] = scenarios.recovery(fleet, sizes.recoveries,
                                             wait=sizes.recovery_wait)
        for slots in [s for s in sizes.poll_fleets if s != sizes.slots]:
            if slots < len(fleet.members):
                fleet.stop_members(fleet.members[slots:])
            else:
                fleet.add(slots - len(fleet.members))
            log(f"peer: poll load at {slots} slots")
            out[f"poll_{slots}"] = scenarios.poll_load(fleet, slots, sizes.poll_window)
    finally:
        fleet.stop_members()
    return out


def run_capacity(stack: LocalStack, emu: Emulator, records: Path, sizes: Sizes,
                 out: dict[str, Any]) -> dict[str, Any]:
    out["latency_ms"] = sizes.hb_latency_ms
    series = out.setdefault("series", [])
    for index, (ttl, steps) in enumerate(sizes.hb_series):
        fleet = Ours(stack, emu, records, DISPATCHER_DESIRED_TTL_SECONDS=str(ttl))
        log(f"dispatcher: heartbeat capacity of one control worker, TTL {ttl} s, steps {steps}")
        try:
            series.append(scenarios.heartbeat_capacity(
                fleet, steps, ttl, sizes.hb_window, log=log, latency_ms=sizes.hb_latency_ms,
                stops=sizes.hb_stops if index == 0 else 0))
        finally:
            fleet.stop_members()
    return out


def run_fairness(stack: LocalStack, emu: Emulator, records: Path, sizes: Sizes,
                 out: dict[str, Any]) -> dict[str, Any]:
    out.update(scale.fairness(stack, emu, records.parent, slots=sizes.fair_slots,
                              burst=sizes.fair_burst, rate=sizes.fair_rate,
                              seconds=sizes.fair_seconds, backlog=sizes.fair_backlog,
                              idle_headroom=sizes.fair_idle_headroom, log=log))
    return out


def run_thousand(stack: LocalStack, emu: Emulator, records: Path, sizes: Sizes,
                 out: dict[str, Any]) -> dict[str, Any]:
    out.update(scale.thousand(stack, emu, records.parent, n=sizes.thousand,
                              workers=sizes.thousand_workers, hold=sizes.thousand_hold,
                              log=log))
    return out


def run_burst(stack: LocalStack, emu: Emulator, records: Path, sizes: Sizes,
              out: dict[str, Any]) -> dict[str, Any]:
    """A burst into as many free slots (ours), and a big backlog drained by them (ours, then
    the peer's: as many processes as slots)."""
    slots = sizes.burst
    half = slots // 2
    # First with the light sandbox (a shell writing its records): the fleet's own spread.
    shell = Ours(stack, emu, records, DISPATCHER_ON_WORK=scenarios.SHELL_SESSION.format(
        duration=sizes.burst_duration))
    log(f"dispatcher, shell sandbox: control worker + 2 session workers "
        f"({half}+{slots - half} threads)")
    shell.start([half, slots - half])
    try:
        time.sleep(3.0)  # every worker's slots advertised
        log(f"dispatcher, shell sandbox: burst of {slots} into {slots} free slots, "
            f"{sizes.burst_rounds} times")
        out["burst_shell"] = scenarios.burst(shell, slots, sizes.burst_duration,
                                             sizes.burst_rounds)
    finally:
        shell.stop_members()
    # Then with the fake session program both systems run elsewhere, and its drain.
    fleet = Ours(stack, emu, records)
    log(f"dispatcher: control worker + 2 session workers ({half}+{slots - half} threads)")
    fleet.start([half, slots - half])
    try:
        time.sleep(3.0)  # every worker's slots advertised
        log(f"dispatcher: burst of {slots} into {slots} free slots, {sizes.burst_rounds} times")
        out["burst"] = scenarios.burst(fleet, slots, sizes.burst_duration, sizes.burst_rounds)
        log(f"dispatcher: drain a backlog of {sizes.big_backlog} with {slots} slots")
        out["drain_big"] = scenarios.drain(fleet, sizes.big_backlog)
    finally:
        fleet.stop_members()
    peer = Peer(stack, emu, records)
    log(f"peer: {slots} processes of bench.peer")
    peer.start(slots)
    try:
        log(f"peer: drain a backlog of {sizes.big_backlog} with {slots} slots")
        out["peer_drain_big"] = scenarios.drain(peer, sizes.big_backlog)
    finally:
        peer.stop_members()
    return out


def forget_keys(stack: LocalStack) -> None:
    """Delete the run's keys from a Redis that outlives it (the capacity part alone leaves
    tens of thousands: leases, work items, the emulator's records)."""
    if "redis" in stack.processes:
        return  # a private Redis, gone with the stack
    client = redis.Redis.from_url(stack.redis_url)
    try:
        for prefix in [f"{stack.key_prefix}-emulator", *KEY_PREFIXES]:
            batch = []
            for key in client.scan_iter(f"{prefix}:*", count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    client.delete(*batch)
                    batch.clear()
            if batch:
                client.delete(*batch)
    except redis.RedisError as exc:
        log(f"could not remove the run's Redis keys: {exc}")
    finally:
        client.close()


# Every part of a run, in the order a full run takes them (`--only` picks some).
PARTS = ["ours", "peer", "burst", "capacity", "fairness", "thousand"]


def merge_saved(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One report's figures from runs of separate parts (`--only`), merged in order: each
    part's figures, and its error, come from the last run that ran it; the run's own facts
    (sizes, load) from the last run; the duration is the longest, not the sum."""
    merged: dict[str, Any] = {}
    errors: dict[str, str] = {}
    part_sizes: dict[str, Any] = {}
    for run in runs:
        errors = {part: error for part, error in errors.items() if part not in run}
        errors.update(run.get("errors", {}))
        part_sizes.update({part: run["sizes"] for part in PARTS if part in run})
        merged.update(run)
    merged["errors"] = errors
    merged["part_sizes"] = part_sizes  # a part's sizes, where the run's own differ
    merged["seconds"] = max(run.get("seconds", 0.0) for run in runs)
    return merged


def _end_on_signals() -> None:
    """SIGTERM and SIGHUP end a run as Ctrl-C does, through `main`'s `finally`, which stops the
    emulator, both fleets and their sandboxes: each runs in a session of its own, so no signal
    sent to the benchmark or its terminal reaches them, and Python's default SIGTERM would
    leave them running."""
    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupt)


def _sizes(args: argparse.Namespace) -> Sizes:
    """The run's sizes: the defaults (or the quick ones), as the command line changes them."""
    sizes = replace(QUICK if args.quick else Sizes())
    if args.hb_steps or args.hb_ttl:
        ttl, steps = sizes.hb_series[0]
        sizes.hb_series = [(args.hb_ttl or ttl, [int(n) for n in args.hb_steps.split(",")]
                            if args.hb_steps else steps)]
    if args.hb_window:
        sizes.hb_window = args.hb_window
    if args.hb_latency_ms:
        sizes.hb_latency_ms = args.hb_latency_ms
    if args.thousand:
        sizes.thousand = args.thousand
    if args.idle_headroom is not None:
        sizes.fair_idle_headroom = args.idle_headroom
    if args.list_limit:
        sizes.list_limit = args.list_limit
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny sizes")
    parser.add_argument("--out", default=None,
                        help="the report to write (default: BENCHMARKS.md; with --quick: none)")
    parser.add_argument("--json", default=None, help="also write the raw figures here")
    parser.add_argument("--keep", default=None, help="keep logs and records in this directory")
    parser.add_argument("--from-json", default=None, metavar="FILE", action="append",
                        help="write the report from figures saved by --json; run nothing "
                             "(repeatable: parts run apart, merged in order, later wins)")
    parser.add_argument("--only", action="append", choices=PARTS,
                        help="run only these parts (repeatable)")
    parser.add_argument("--hb-steps", default=None, metavar="N,N,...",
                        help="heartbeat capacity: the lease counts to try, in one series")
    parser.add_argument("--hb-ttl", type=int, default=None, metavar="SECONDS",
                        help="heartbeat capacity: the lease TTL of that one series")
    parser.add_argument("--hb-window", type=float, default=None, metavar="SECONDS",
                        help="heartbeat capacity: how long each step is judged (default 25)")
    parser.add_argument("--hb-latency-ms", type=int, default=None, metavar="MS",
                        help="heartbeat capacity: delay every heartbeat answer this much")
    parser.add_argument("--idle-headroom", type=float, default=None, metavar="SECONDS",
                        help="fairness: the fleet's DISPATCHER_IDLE_HEADROOM_SECONDS "
                             "(default: the setting's)")
    parser.add_argument("--list-limit", type=int, default=None, metavar="N",
                        help="the emulator's largest `list` page (default: its own, 100); "
                             "the stop bridge asks 1,000 past 1,000 leases held")
    parser.add_argument("--thousand", type=int, default=None, metavar="N",
                        help="the thousand part: this many sessions at once (default 1000)")
    args = parser.parse_args()
    if args.from_json:
        saved = merge_saved([json.loads(Path(name).read_text()) for name in args.from_json])
        command = "python -m bench" + (" --quick" if saved["quick"] else "")
        target = Path(args.out or "BENCHMARKS.md")
        target.write_text(carry_over(target, write_report(saved, command=command)))
        return
    sizes = _sizes(args)
    out = args.out or (None if args.quick else "BENCHMARKS.md")
    parts = args.only or PARTS
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="dispatcher-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    records = workdir / "records"
    records.mkdir(exist_ok=True)
    started = time.time()
    _end_on_signals()
    stack = LocalStack(workdir=workdir,
                       redis_url=os.environ.get("DISPATCHER_REDIS_URL", LocalStack.redis_url))
    results: dict[str, Any] = {"sizes": asdict(sizes), "quick": args.quick,
                               "emulator_default_ttl": sizes.default_ttl,
                               "load_before": os.getloadavg()}
    try:
        stack.ensure_redis()
        stack.start_emulator("--min-ttl", "1", "--default-ttl", str(sizes.default_ttl),
                             *(("--max-list-limit", str(sizes.list_limit))
                               if sizes.list_limit else ()))
        emu = Emulator(stack)
        runners = {"ours": run_ours, "peer": run_peer, "capacity": run_capacity,
                   "burst": run_burst, "fairness": run_fairness, "thousand": run_thousand}
        for part in parts:
            try:
                runners[part](stack, emu, records, sizes, results.setdefault(part, {}))
            except Exception as exc:  # keep the other parts' figures; say what failed
                log(f"{part} failed: {exc!r}")
                results.setdefault("errors", {})[part] = repr(exc)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    finally:
        stack.stop_all()
        forget_keys(stack)
        if args.keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.time() - started
    results["finished_at"] = time.time()
    results["load_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    command = "python -m bench" + (" --quick" if args.quick else "")
    report = write_report(results, command=command)
    if out:
        Path(out).write_text(carry_over(Path(out), report))
        log(f"wrote {out}")
    else:
        print(report)
    log(f"done in {results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
