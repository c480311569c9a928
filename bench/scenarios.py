"""The measurements, each run the same way on either fleet.

Times come from two clocks on the same machine: the sandbox's own records (`started`,
`sigterm`, `heartbeat`, `exited`, epoch seconds) and the benchmark's clock when it asked the
emulator for something (create a session, stop it) or killed a process. Poll load and heartbeat
lapses come from the emulator's request log.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

import redis

from bench import proc
from bench.emu import Created
from bench.fleets import Fleet, Ours, Peer, fleet_memory
from bench.records import events, summary

__all__ = ["burst", "dispatch_idle", "dispatch_steady", "drain", "heartbeat_capacity", "memory",
           "poll_load", "recovery", "stop_latency"]


def wait_all(records: Path, work_ids: list[str], event: str, *, timeout: float,
             after: dict[str, float] | None = None,
             match: Any = None) -> dict[str, dict[str, Any]]:
    """The first `event` record of each item (later than `after[work_id]` if given)."""
    found: dict[str, dict[str, Any]] = {}
    pending = set(work_ids)
    deadline = time.monotonic() + timeout
    while pending:
        for work_id in list(pending):
            since = (after or {}).get(work_id, 0.0)
            hits = [r for r in events(records, work_id, event)
                    if r["time"] >= since and (match is None or match(r))]
            if hits:
                found[work_id] = hits[0]
                pending.discard(work_id)
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(work_ids)} items had no {event!r} "
                               f"record within {timeout:.0f} s")
        time.sleep(0.05)
    return found


def _latencies(created: list[Created], started: dict[str, dict[str, Any]]) -> list[float]:
    return [started[c.work_id]["time"] - c.time for c in created]


def dispatch_idle(fleet: Fleet, n: int, *, kept: list[Created] | None = None) -> dict[str, float]:
    """One session at a time on an idle fleet: created -> sandbox started. `kept` collects
    the sessions made (for the breakdown)."""
    latencies = []
    for _ in range(n):
        created = fleet.create(0.1)
        if kept is not None:
            kept.append(created)
        started = wait_all(fleet.records, [created.work_id], "started", timeout=60)
        latencies.append(started[created.work_id]["time"] - created.time)
        wait_all(fleet.records, [created.work_id], "exited", timeout=30)
        time.sleep(0.5)  # the fleet idles again (and the peer posts its stop)
    return summary(latencies)


def dispatch_steady(fleet: Fleet, rate: float, seconds: float, duration: float = 1.0, *,
                    kept: list[Created] | None = None) -> dict[str, float]:
    """Sessions arriving every 1/rate s, each running `duration` s."""
    created = []
    start = time.monotonic()
    for i in range(int(rate * seconds)):
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        created.append(fleet.create(duration))
    if kept is not None:
        kept.extend(created)
    ids = [c.work_id for c in created]
    started = wait_all(fleet.records, ids, "started", timeout=120)
    wait_all(fleet.records, ids, "exited", timeout=120)
    return {**summary(_latencies(created, started)), "rate": rate, "duration": duration}


def drain(fleet: Fleet, n: int, duration: float = 0.1) -> dict[str, float]:
    """A backlog of n sessions made at once: how fast do they all start?"""
    created = fleet.create_many(n, duration)
    ids = [c.work_id for c in created]
    first = min(c.time for c in created)
    made = max(c.time for c in created) - first
    started = wait_all(fleet.records, ids, "started", timeout=600)
    last = max(r["time"] for r in started.values())
    # Every session started is what the figure measures; one that never ends (the peer's SDK
    # 2.17 runner once left one of 300 unended) is counted and reported, not a failed part.
    try:
        wait_all(fleet.records, ids, "exited", timeout=120)
        unended = 0
    except TimeoutError:
        unended = sum(1 for work_id in ids if not events(fleet.records, work_id, "exited"))
    return {"n": n, "seconds": last - first, "per_second": n / (last - first),
            "unended": unended,
            "create_seconds": made, **{f"latency_{k}": v for k, v in
                                       summary(_latencies(created, started)).items()
                                       if k != "n"}}


def _stop_seen(fleet: Fleet) -> tuple[str, Any]:
    """The record that shows the sandbox learned of a graceful stop."""
    if isinstance(fleet, Peer):
        # `--on-work` never signals the command; it learns from its own heartbeat.
        return "heartbeat", lambda r: r.get("state") in ("stopping", "stopped")
    return "sigterm", None


def stop_latency(fleet: Fleet, k: int) -> dict[str, Any]:
    created = [fleet.create(300) for _ in range(k)]
    ids = [c.work_id for c in created]
    wait_all(fleet.records, ids, "started", timeout=120)
    if isinstance(fleet, Peer):
        # The fake session's first heartbeat interval is 15 s (half its assumed 30 s TTL, fixed
        # before the server answered); the SDK's is ttl/2 from the first answer. Stop only once
        # each sandbox beats at its steady ttl/2, or the peer would pay for the fake's quirk.
        _wait_second_beat(fleet, ids)
    time.sleep(1.0)
    requested = {}
    for work_id in ids:
        requested[work_id] = fleet.emu.stop(fleet.environment_id, work_id)
        time.sleep(0.3)
    event, match = _stop_seen(fleet)
    seen = wait_all(fleet.records, ids, event, timeout=120, after=requested, match=match)
    wait_all(fleet.records, ids, "exited", timeout=60)
    return {**summary([seen[w]["time"] - requested[w] for w in ids]), "event": event}


def _wait_second_beat(fleet: Fleet, ids: list[str]) -> None:
    deadline = time.monotonic() + 60
    while any(len(events(fleet.records, w, "heartbeat")) < 2 for w in ids):
        if time.monotonic() > deadline:
            raise TimeoutError("peer sandboxes did not heartbeat twice within 60 s")
        time.sleep(0.2)


def end_sessions(fleet: Fleet, ids: list[str], *, after: float = 0.0) -> None:
    """Clean-up, not a measurement: stop the items on the server and, for the peer, SIGTERM
    the sandboxes too (they would only learn of the stop at their next heartbeat); wait until
    every sandbox has exited so the next measurement finds an idle fleet."""
    for work_id in ids:
        fleet.emu.stop(fleet.environment_id, work_id)
    if isinstance(fleet, Peer):
        for work_id in ids:
            started = events(fleet.records, work_id, "started")
            if started and started[-1]["time"] >= after:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(started[-1]["pid"]), signal.SIGTERM)
    wait_all(fleet.records, ids, "exited", timeout=60, after=dict.fromkeys(ids, after))



def recovery(fleet: Fleet, k: int, *, wait: float) -> dict[str, Any]:
    """Kill the worker running a session (SIGKILL; for the peer its sandbox too, as a lost host
    would): how long until the session runs again (a new `started` record), waiting at most
    `wait` seconds?"""
    created = [fleet.create(300) for _ in range(k)]
    ids = [c.work_id for c in created]
    wait_all(fleet.records, ids, "started", timeout=120)
    time.sleep(1.0)
    runners = {w: fleet.runner_of(w) for w in ids}
    victim = runners[ids[0]]
    if victim is None:
        raise RuntimeError(f"cannot tell which process runs {ids[0]}")
    lost = [w for w in ids if runners[w] == victim]
    killed = fleet.kill(victim)
    try:
        again = wait_all(fleet.records, lost, "started", timeout=wait,
                         after=dict.fromkeys(lost, killed))
    except TimeoutError:
        # Under SDK 2.17's server model a lapsed lease ends its item: nobody runs it again.
        return {"never": len(lost), "waited": wait, "killed": victim}
    end_sessions(fleet, ids, after=killed)
    return {**summary([again[w]["time"] - killed for w in lost]), "killed": victim}


def poll_load(fleet: Fleet, slots: int, window: float) -> dict[str, float]:
    """Requests an idle fleet sends, per minute, from the emulator's request log."""
    time.sleep(1.0)  # let start-up polls pass
    t0 = time.time()
    time.sleep(window)
    t1 = time.time()
    log = [e for e in fleet.emu.requests(fleet.environment_id) if t0 <= e["time"] < t1]
    by_endpoint = Counter(e["endpoint"] for e in log)
    scale = 60.0 / (t1 - t0)
    return {"slots": slots, "window": t1 - t0, "polls_per_min": by_endpoint["poll"] * scale,
            "requests_per_min": len(log) * scale,
            "workers_polling": len({e.get("worker_id") for e in log if e["endpoint"] == "poll"})}


def memory(fleet: Fleet, k: int, slots: int) -> dict[str, Any]:
    """Worker memory with k long sessions minus idle, per session, sandboxes excluded."""
    time.sleep(1.0)
    idle = fleet_memory(fleet)
    created = [fleet.create(300) for _ in range(k)]
    ids = [c.work_id for c in created]
    wait_all(fleet.records, ids, "started", timeout=120)
    time.sleep(2.0)
    busy = fleet_memory(fleet)
    end_sessions(fleet, ids)
    return {
        "k": k, "slots": slots, "idle": idle, "busy": busy,
        "per_session_kb": (busy["own_rss"] - idle["own_rss"]) / k,
        "per_session_pss_kb": (busy["own_pss"] - idle["own_pss"]) / k,
        "launcher_per_session_kb": busy["launcher_rss"] / k,
        "launcher_pss_per_session_kb": busy["launcher_pss"] / k,
        "per_slot_kb": busy["own_rss"] / slots,
        "per_slot_pss_kb": busy["own_pss"] / slots,
    }


# --- heartbeat capacity ----------------------------------------------------------------------

# Claimed, recorded and scheduled together (a lease claimed long before it is scheduled would
# count its wait as a gap).
CLAIM_CHUNK = 100
# A heartbeat capacity step keeps up while no gap between beats exceeds the interval by more
# than a quarter of it, or 2 s (a 1 s tick and a request) if that is more.
BEHIND_SHARE = 0.25
BEHIND_SLACK_SECONDS = 2.0


def _tree_cpu(pid: int) -> float:
    return sum(proc.cpu_seconds(p.pid, with_children=False) for p in proc.tree(pid))


def heartbeat_capacity(fleet: Ours, steps: list[int], ttl: int, window: float,
                       log: Any = print, latency_ms: int = 0,
                       stops: int = 0) -> dict[str, Any]:
    """Leases one control worker keeps alive. The benchmark claims N items itself (ack and a
    NO_HEARTBEAT beat with `ttl`), records them in the dispatcher's registry as running,
    pulses them as a session worker would, and schedules their heartbeats due; a control-only
    worker then beats them. A lapse: a lease whose gap between two successful beats (or since
    its last beat, at the end) exceeds its TTL, or any refused beat. `latency_ms` delays every
    heartbeat answer that much once a step's leases are claimed (an API further away than the
    emulator on 127.0.0.1). With `stops`, that many of the leases held after the last step are
    then stopped on the server, one each 0.3 s: how long until the stop bridge raised each
    lease's stop flag (a running session's supervisor acts on it within 0.2 s)."""
    from dispatcher.lease.machine import heartbeat_interval
    from dispatcher.lease.registry import LeaseRegistry

    stack, emu = fleet.stack, fleet.emu
    control = fleet.control()
    _wait_ready(fleet, control)
    client = redis.Redis.from_url(stack.redis_url, decode_responses=True)
    registry = LeaseRegistry(client, prefix=fleet.key_prefix)
    held: list[str] = []
    beats = _Beats(emu, fleet.environment_id)
    stop = threading.Event()

    threads = _background(client, registry, stop)
    results: list[dict[str, Any]] = []
    stopped: dict[str, Any] = {}
    try:
        for n in steps:
            _claim(fleet, registry, beats, held, n - len(held), ttl)
            if latency_ms:
                emu.set_faults(latency_ms=latency_ms, endpoints=["heartbeat"])
            time.sleep(heartbeat_interval(ttl))  # one beat interval to settle
            cpu0 = _cpu(stack, control, client)
            beats.new_window()
            load0 = os.getloadavg()[0]
            time.sleep(max(window, 1.5 * heartbeat_interval(ttl)))  # every lease beats in it
            judged = beats.judge()
            cpu1 = _cpu(stack, control, client)
            w1 = judged.pop("until")
            overdue = cast("list[tuple[str, float]]", client.zrangebyscore(
                registry.keys.heartbeat_due, "-inf", w1 - 1, withscores=True))
            if latency_ms:
                emu.reset_faults()
            seconds = cpu1["wall"] - cpu0["wall"]
            used = {k: cpu1[k] - cpu0[k] for k in ("control", "emulator", "bench", "redis")}
            step = {"n": n, "ttl": ttl, "latency_ms": latency_ms,
                    "control_cpu_pct": 100 * used["control"] / seconds,
                    "emulator_cpu_pct": 100 * used["emulator"] / seconds,
                    "bench_cpu_pct": 100 * used["bench"] / seconds,
                    "redis_cpu_pct": 100 * used["redis"] / seconds,
                    "load_1min": [load0, os.getloadavg()[0]],
                    "overdue_now": len(overdue),
                    "max_overdue_s": max((w1 - s for _, s in overdue), default=0.0),
                    **judged}
            _judge_step(step, ttl, cpu=used)
            log(f"  heartbeat capacity n={n}: {step}")
            results.append(step)
            if step["lapsed"] or step["behind"]:
                break
        if stops and held:
            stopped = _stops_at_scale(fleet, registry, held, stops, log=log)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        if latency_ms:
            emu.reset_faults()
        emu.stop_counting_beats(fleet.environment_id)
        fleet.stop_members([control])
    ok = [s["n"] for s in results if not s["lapsed"] and not s["behind"]]
    return {"steps": results, "largest_without_lapse": max(ok, default=0), "ttl": ttl,
            **({"stops": stopped} if stopped else {})}


def _cpu(stack: Any, control: str, client: redis.Redis) -> dict[str, float]:
    """CPU seconds used so far by the control worker's and the emulator's process trees, this
    benchmark process (its pulses, its reads) and Redis (all its clients), and the time."""
    info = cast("dict[str, Any]", client.info("cpu"))
    return {"wall": time.time(), "control": _tree_cpu(stack.processes[control].pid),
            "emulator": _tree_cpu(stack.processes["emulator"].pid),
            "bench": time.process_time(),
            "redis": float(info["used_cpu_user"]) + float(info["used_cpu_sys"])}


# The capacity run's pulses: `pulse_at` on each held lease and its score in the index of last
# signs of progress, for a range of the held leases (by rank) in one call. The script reads the
# ids itself, so the benchmark sends a few short calls a second, not 20,000 ids (KEYS[1] the
# index, KEYS[2] the held leases; ARGV: the time, the lease key prefix, first and last rank).
_PULSE_LUA = """
local ids = redis.call('ZRANGE', KEYS[2], ARGV[3], ARGV[4])
for _, id in ipairs(ids) do
  redis.call('HSET', ARGV[2] .. id, 'pulse_at', ARGV[1])
  redis.call('ZADD', KEYS[1], ARGV[1], id)
end
return #ids
"""
# Leases a call. A script runs alone in Redis: at 2,000 a call, each held every other client
# (the emulator's heartbeats, the control worker's) 15-33 ms on this machine, stalls the fleet's
# own pulses never cause (`pulse_many` pipelines one short script per lease). 200: about 2 ms.
PULSE_CHUNK = 200


def _background(client: redis.Redis, registry: Any,
                stop: threading.Event) -> list[threading.Thread]:
    """The capacity run's pulser: what the sessions' supervisors would write."""

    stamp = client.register_script(_PULSE_LUA)

    def pulse() -> None:
        # What each running session's supervisor writes (5 times a second, here once): the
        # pulse time, on its lease and in the registry's index of last signs of progress
        # (`LeaseRegistry.pulse` does both in its Lua script, with more that only a session
        # needs), so recovery sees them alive. Those supervisors run on other hosts; here a
        # script a chunk, reading the held ids itself, keeps their writes from costing this
        # machine's cores more than Redis's own share (sent one by one through redis-py,
        # 20,000 commands a second cost a third of a core; their ids sent in each call, a
        # tenth).
        keys = [registry.keys.last_seen, registry.keys.leases]
        while not stop.wait(1.0):
            now, first = time.time(), 0
            while stamp(keys=keys, args=[now, registry.keys.lease(""), first,
                                         first + PULSE_CHUNK - 1]) == PULSE_CHUNK:
                first += PULSE_CHUNK

    thread = threading.Thread(target=pulse, daemon=True)
    thread.start()
    return [thread]


def _judge_step(step: dict[str, Any], ttl: int, *, cpu: dict[str, float]) -> None:
    """CPU per beat of the worker, the emulator, the benchmark and Redis; whether the step
    lapsed or fell behind."""
    from dispatcher.lease.machine import heartbeat_interval

    beats = max(1, step["beats"])
    for name in ("control", "emulator", "bench", "redis"):
        step[f"{name}_cpu_ms_per_beat"] = 1000 * cpu[name] / beats
    step["lapsed"] = bool(step["max_gap_s"] > ttl or step["refused"])
    # Beaten later than the schedule allows (an interval, plus a tick and a request): beats
    # queue, and the gaps grow until leases lapse, however long that takes.
    interval = heartbeat_interval(ttl)
    step["behind"] = step["max_gap_s"] > interval + max(BEHIND_SLACK_SECONDS,
                                                        BEHIND_SHARE * interval)


def _claim(fleet: Ours, registry: Any, beats: _Beats, held: list[str], add: int,
           ttl: int) -> None:
    """Create `add` items and claim them as the dispatcher would, a chunk at a time: each
    chunk is recorded and its next heartbeat scheduled as the claim's first beat schedules it
    in the fleet (`renewal_due`: its work id's share of the interval after that beat, so the
    leases of a burst of claims beat spread over the interval; scheduled all due at once, they
    would beat in the same seconds every interval), as soon as the chunk is claimed (a lease
    claimed long before it is scheduled would count its wait as a gap)."""
    from dispatcher.lease.machine import renewal_due
    from dispatcher.lease.model import Lease, LeaseMode, Phase

    made = fleet.emu.create_sessions(fleet.environment_id, add, {"fake.duration": "0"})
    for chunk in range(0, len(made), CLAIM_CHUNK):
        batch = made[chunk:chunk + CLAIM_CHUNK]
        claims = fleet.emu.claim_leases(fleet.environment_id, [c.work_id for c in batch],
                                        ttl=ttl, concurrency=32)
        now = time.time()
        for c in batch:
            token, beat_at, created_at = claims[c.work_id]
            lease = Lease(work_id=c.work_id, session_id=c.session_id,
                          environment_id=fleet.environment_id, mode=LeaseMode("dispatcher"),
                          queue="dispatcher.sessions", phase=Phase.RUNNING,
                          task_id=f"bench-{c.work_id}", worker="bench-sessions@bench",
                          claimed_at=now, dispatched_at=now, pulse_at=now,
                          created_at=created_at, token=token, ttl_seconds=ttl,
                          heartbeat_ok_at=beat_at)
            registry.create(lease, work_json="{}")
            registry.schedule_heartbeat(c.work_id, renewal_due(beat_at, ttl, work_id=c.work_id,
                                                               first=True))
            beats.hold(c.work_id, beat_at)
            held.append(c.work_id)


class _Beats:
    """Each held lease's heartbeats as the emulator counts them (`Emulator.count_beats`; its
    heartbeats are left out of the request log): the gaps, refused and failed beats judged per
    window, without reading back 2,000 log entries a second."""

    def __init__(self, emu: Any, environment_id: str) -> None:
        self.emu = emu
        self.environment_id = environment_id
        self.emu.count_beats(environment_id, log_heartbeats=False)
        self.since = 0.0
        self.claimed: dict[str, float] = {}

    def hold(self, work_id: str, beat_at: float) -> None:
        """A lease the benchmark claimed, with when its first beat was answered."""
        self.claimed[work_id] = beat_at

    def new_window(self) -> None:
        self.since = self.emu.count_beats(self.environment_id, log_heartbeats=False)

    def judge(self) -> dict[str, Any]:
        """The window so far: the largest gap between two beats of a lease ending in it (or
        since a held lease's last beat, at its end), refused and failed beats, and how evenly
        the beats spread over it (its busiest 100 ms against the mean)."""
        counted = self.emu.beats(self.environment_id)
        since, end = float(counted["since"]), float(counted["until"])
        last = counted["last_beat"]
        unbeaten = max((end - max(at, last.get(w, 0.0)) for w, at in self.claimed.items()),
                       default=0.0)
        per_tenth = {int(t): n for t, n in counted["per_100ms"].items()}
        tenths = [per_tenth.get(t, 0) for t in range(int(since * 10) + 1, int(end * 10))]
        mean = sum(tenths) / len(tenths) if tenths else 0.0
        seconds = end - since
        return {"window": seconds, "until": end, "beats": counted["beats"],
                "beats_per_s": counted["beats"] / seconds,
                "max_gap_s": max(float(counted["max_gap_s"]), unbeaten),
                "refused": counted["refused"], "failed": counted["failed"],
                "list_per_s": counted["endpoints"].get("list", 0) / seconds,
                "busiest_100ms_beats": max(tenths, default=0),
                "busiest_100ms_vs_mean": max(tenths, default=0) / mean if mean else 0.0}


def _stops_at_scale(fleet: Ours, registry: Any, held: list[str], k: int,
                    log: Any = print) -> dict[str, Any]:
    """Stop k of the held leases on the server, one each 0.3 s, spread over the held set (the
    oldest and the newest listed too): stop requested -> the lease's stop flag raised by the
    stop bridge (or a heartbeat reply, whichever came first). Only leases still held with no
    stop flag are picked: one lost in a step that lapsed carries an older flag, which read as a
    negative latency."""
    live = [lease.work_id for lease in registry.get_many(held) if not lease.stop_seen_at]
    if not live:
        return {}
    picks = [live[round(i * (len(live) - 1) / max(1, k - 1))] for i in range(min(k, len(live)))]
    k = len(picks)
    requested = {}
    for work_id in picks:
        requested[work_id] = fleet.emu.stop(fleet.environment_id, work_id)
        time.sleep(0.3)
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(seen) < k and time.monotonic() < deadline:
        for work_id in picks:
            if work_id in seen:
                continue
            lease = registry.get(work_id)
            if lease is not None and lease.stop_seen_at:
                seen[work_id] = lease.stop_seen_at
        time.sleep(0.05)
    latencies = [seen[w] - requested[w] for w in picks if w in seen]
    result = {**summary(latencies), "held": len(live), "asked": k,
              "unseen_after_60s": k - len(seen)}
    log(f"  stops with {len(live)} leases held: {result}")
    return result


def _wait_ready(fleet: Ours, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while " ready." not in fleet.stack.log(name):
        fleet.stack._check_alive(name)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} not ready within {timeout} s")
        time.sleep(0.2)
    time.sleep(2.0)  # beat's first ticks


# --- bursts and big backlogs -------------------------------------------------------------------

# The burst's light sandbox: a shell that writes the fake session's `started` and `exited`
# records itself (the same JSON lines, `date` for the clock), and sleeps between them. 100 Python
# interpreters starting at once on two cores measure the interpreter's start, not the fleet's;
# this measures the fleet's own spread. `{duration}` is filled in; the rest is the shell's.
SHELL_SESSION = (
    "/bin/sh -c 'r=\"$DISPATCHER_FAKE_RECORD_DIR/$ANTHROPIC_WORK_ID.jsonl\"; "
    "echo \"{{\\\"event\\\": \\\"started\\\", \\\"time\\\": $(date +%s.%N), "
    "\\\"pid\\\": $$}}\" >> \"$r\"; sleep {duration}; "
    "echo \"{{\\\"event\\\": \\\"exited\\\", \\\"time\\\": $(date +%s.%N), "
    "\\\"pid\\\": $$}}\" >> \"$r\"'")


class _CpuWatch:
    """CPU spent from now on: by the whole machine (both cores: everything on it), by each of
    the fleet's workers and the emulator (their own threads, not their children: a session
    worker's sandboxes are in the rest), and by this benchmark (its sessions' creation and
    its reading of their records)."""

    def __init__(self, fleet: Fleet) -> None:
        self.pids = {**fleet.pids(), "emulator": fleet.stack.processes["emulator"].pid,
                     "benchmark": os.getpid()}
        self.wall, self.busy = time.monotonic(), proc.busy_seconds()
        self.each = {name: proc.cpu_seconds(pid, with_children=False)
                     for name, pid in self.pids.items()}

    def spent(self) -> dict[str, float]:
        each = {name: proc.cpu_seconds(pid, with_children=False) - self.each[name]
                for name, pid in self.pids.items()}
        busy = proc.busy_seconds() - self.busy
        return {"wall_s": time.monotonic() - self.wall, "machine_busy_s": busy,
                "cores": os.cpu_count() or 1, **each, "rest": busy - sum(each.values())}


def burst(fleet: Fleet, n: int, duration: float, rounds: int) -> dict[str, Any]:
    """n sessions created at once into n free slots, `rounds` times: created -> sandbox started
    of every session (pooled), and each round's own figures. A flat burst has its p99 close to
    its p50: the last of the burst waits for nothing but the Work API's answers."""
    pooled: list[float] = []
    each = []
    for _ in range(rounds):
        cpu = _CpuWatch(fleet)
        created = fleet.create_many(n, duration)
        ids = [c.work_id for c in created]
        started = wait_all(fleet.records, ids, "started", timeout=300)
        spent = cpu.spent()
        latencies = _latencies(created, started)
        pooled += latencies
        made = max(c.time for c in created) - min(c.time for c in created)
        each.append({**summary(latencies), "create_seconds": made, "cpu": spent})
        wait_all(fleet.records, ids, "exited", timeout=300)
        time.sleep(2.0)  # every slot free again (the leases released, the slots advertised)
    figures = summary(pooled)
    return {**figures, "rounds": each, "duration": duration,
            "flatness": figures["p99"] / figures["p50"] if figures["p50"] else float("nan")}
