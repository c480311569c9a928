"""One fleet serving many environments: fairness under a burst, and a thousand sessions at once.

Both start a dispatcher fleet whose environments come from a `DISPATCHER_ENVIRONMENTS_FILE`
(dispatcher/environments.py), as an operator of several environments runs it, on the same
emulator as the other parts.

* `fairness`: ten environments share the fleet's slots (dispatcher/control/capacity.py,
  `claim_allowance`). Nine trickle sessions at a steady rate, first alone, then while the tenth
  bursts 500 sessions at once: the trickling environments' dispatch latency with the burst
  against without it. Then all ten get a backlog, and the slots each holds are sampled while all
  are backlogged: Jain's fairness index of those shares.
* `thousand`: 1,000 sessions running at once on threads-pool session workers, ten
  environments, each sandbox a shell that notes its start and sleeps: every session started
  exactly once, the largest gap between two heartbeats of one lease (as the emulator counts
  them), memory per session (the session workers and their guardians), Redis memory per lease.
"""

from __future__ import annotations

import os
import secrets
import shlex
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from bench import breakdown, proc
from bench.emu import Created, Emulator
from bench.fleets import KEY_PREFIXES, WATCHDOG_MARK
from bench.records import summary, wait_for_event
from dispatcher.ops.stack import LocalStack

__all__ = ["MultiFleet", "fairness", "jain", "thousand"]


def jain(shares: list[float]) -> float:
    """Jain's fairness index: 1 when every share is equal, 1/n when one takes everything."""
    total, squares = sum(shares), sum(x * x for x in shares)
    return (total * total) / (len(shares) * squares) if squares else 1.0


class MultiFleet:
    """A control worker and session workers serving `n` environments of one emulator."""

    def __init__(self, stack: LocalStack, emu: Emulator, workdir: Path, n: int, *,
                 on_work: str | None = None, **env: str) -> None:
        self.stack, self.emu = stack, emu
        self.environment_ids = [emu.new_environment(f"scale-{i}") for i in range(n)]
        self.key_prefix = f"bench{secrets.token_hex(3)}"
        KEY_PREFIXES.append(self.key_prefix)
        self.tag = secrets.token_hex(2)
        key_file = workdir / f"{self.key_prefix}.key"
        key_file.write_text(stack.environment_key)
        key_file.chmod(0o600)
        environments = workdir / f"{self.key_prefix}-environments.toml"
        environments.write_text("".join(
            f'[[environment]]\nid = "{e}"\nkey_file = "{key_file}"\n\n'
            for e in self.environment_ids))
        self.records = workdir / "records"
        self.env = stack.fleet_env(
            DISPATCHER_ENVIRONMENTS_FILE=str(environments),
            DISPATCHER_KEY_PREFIX=self.key_prefix,
            DISPATCHER_FAKE_RECORD_DIR=str(self.records),
            DISPATCHER_SANDBOX_ENV_ALLOW="PATH,HOME,DISPATCHER_FAKE_RECORD_DIR",
            DISPATCHER_STOP_GRACE_SECONDS="5", **env)
        for variable in ("ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_ENVIRONMENT_KEY"):
            self.env.pop(variable, None)
        if on_work is not None:
            self.env["DISPATCHER_ON_WORK"] = on_work
        self.members: list[str] = []
        self.redis = redis.Redis.from_url(stack.redis_url, decode_responses=True)

    def start(self, slots: list[int]) -> None:
        name = f"scale-{self.tag}-control"
        # One pool slot per environment's poller, plus the heartbeat, bridge and recovery
        # ticks and a spare (docs/operations.md: "the number of environments plus 2").
        self.stack.worker(name, self.env, queues="dispatcher.control", beat=True,
                          concurrency=len(self.environment_ids) + 3)
        self.members.append(name)
        for i, concurrency in enumerate(slots):
            name = f"scale-{self.tag}-s{i}"
            self.stack.worker(name, self.env, concurrency=concurrency,
                              queues="dispatcher.sessions")
            self.members.append(name)
        for name in self.members:
            deadline = time.monotonic() + 120
            while " ready." not in self.stack.log(name):
                self.stack._check_alive(name)
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} not ready within 120 s")
                time.sleep(0.2)
        time.sleep(3.0)  # the session workers' first slot advertisements

    def held(self) -> dict[str, int]:
        from dispatcher.lease.registry import LeaseRegistry
        registry = LeaseRegistry(self.redis, prefix=self.key_prefix)
        return dict(registry.held_by_environment(self.environment_ids))

    def stop(self) -> None:
        for name in self.members:
            self.stack.stop(name, timeout=60)
        self.members.clear()
        self.redis.close()


def _metadata(duration: float) -> dict[str, str]:
    return {"fake.duration": str(duration)}


def _latencies(records: Path, created: list[Created], timeout: float) -> list[float]:
    return [wait_for_event(records, c.work_id, "started", timeout)["time"] - c.time
            for c in created]


def _trickle(emu: Emulator, environments: list[str], rate: float, seconds: float,
             duration: float) -> list[Created]:
    """Each environment creates a session every 1/rate s (staggered), for `seconds`."""
    created: list[Created] = []
    start = time.monotonic()
    plan = sorted((i / rate + k / (rate * len(environments)), e)
                  for k, e in enumerate(environments) for i in range(int(rate * seconds)))
    for at, environment in plan:
        wait = start + at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        created.append(emu.create_session(environment, _metadata(duration)))
    return created


def fairness(stack: LocalStack, emu: Emulator, workdir: Path, *, slots: int = 20,
             burst: int = 500, rate: float = 0.2, seconds: float = 30.0,
             duration: float = 2.0, backlog: int = 40, idle_headroom: float | None = None,
             log: Any = print) -> dict[str, Any]:
    """Nine environments trickle `rate` sessions/s each (of `duration` s) for `seconds`, alone
    and then while the tenth bursts `burst` sessions; then every environment gets `backlog`
    sessions and each one's held slots are sampled while all ten still have queued work.
    `idle_headroom`: the fleet's DISPATCHER_IDLE_HEADROOM_SECONDS (None: its default)."""
    headroom = ({} if idle_headroom is None
                else {"DISPATCHER_IDLE_HEADROOM_SECONDS": f"{idle_headroom:g}"})
    fleet = MultiFleet(stack, emu, workdir, 10, **headroom)
    half = slots // 2
    fleet.start([half, slots - half])
    try:
        burster, trickling = fleet.environment_ids[0], fleet.environment_ids[1:]
        warm = emu.create_session(trickling[0], _metadata(0.1))
        wait_for_event(fleet.records, warm.work_id, "started", 90)
        log(f"fairness: nine environments trickle {rate:g}/s each, alone")
        alone = _trickle(emu, trickling, rate, seconds, duration)
        alone_latency = _latencies(fleet.records, alone, 120)
        time.sleep(duration + 2)
        log(f"fairness: the same while the tenth bursts {burst}")
        with _SlotSampler(fleet) as sampler:
            bursting = emu.create_sessions(burster, burst, _metadata(duration))
            loaded = _trickle(emu, trickling, rate, seconds, duration)
            loaded_latency = _latencies(fleet.records, loaded, 300)
        slots_seen = sampler.at_arrivals(loaded, burster, slots)
        burst_latency = _latencies(fleet.records, bursting, 900)
        a, b = summary(alone_latency), summary(loaded_latency)
        steps = _breakdown(fleet, emu, trickling, {"alone": alone, "beside_burst": loaded})
        log(f"fairness: all ten backlogged ({backlog} each)")
        shares = _backlogged_shares(fleet, emu, backlog, duration)
        return {
            "slots": slots, "environments": 10, "burst": burst, "rate_per_env": rate,
            "seconds": seconds, "duration": duration, "idle_headroom_seconds": idle_headroom,
            "trickle_alone": a, "trickle_with_burst": b,
            "p50_ratio": b["p50"] / a["p50"], "p99_ratio": b["p99"] / a["p99"],
            "burst_latency": summary(burst_latency),
            "burst_drained_s": max(burst_latency) if burst_latency else None,
            "breakdown": steps, **slots_seen,
            **shares,
        }
    finally:
        fleet.stop()


class _SlotSampler:
    """The slots each environment holds, read every `SAMPLE_SECONDS` while the burst runs:
    whether a trickling session arrived to a full fleet (it then waits for a slot, whatever
    the CPU), and how many slots the burst held meanwhile (its drain's pace)."""

    SAMPLE_SECONDS = 0.05

    def __init__(self, fleet: MultiFleet) -> None:
        self.fleet = fleet
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _SlotSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._done.wait(self.SAMPLE_SECONDS):
            self.samples.append((time.time(), self.fleet.held()))

    def at_arrivals(self, created: list[Created], burster: str, slots: int) -> dict[str, Any]:
        """Of the trickling sessions, how many arrived when the last sample before them found
        every slot held; and the burst's mean slots held from the first arrival to the last."""
        full = 0
        for c in created:
            before = [held for at, held in self.samples if at <= c.time]
            if before and sum(before[-1].values()) >= slots:
                full += 1
        first, last = created[0].time, created[-1].time
        burst_held = [held.get(burster, 0) for at, held in self.samples if first <= at <= last]
        return {"arrived_to_full_fleet": full, "arrivals": len(created),
                "burst_mean_slots": (sum(burst_held) / len(burst_held)) if burst_held else None}


def _breakdown(fleet: MultiFleet, emu: Emulator, environments: list[str],
               batches: dict[str, list[Created]]) -> dict[str, Any]:
    """Where the trickling sessions' start went, alone and beside the burst: an item that
    waited on the server for its poller to have room shows in `poll_answered`, one that waited
    for a pool thread in `received`, a busy CPU in every step a little."""
    wanted = set(environments)
    requests = [r for r in emu.requests() if r.get("environment_id") in wanted]
    paths = breakdown.start_paths(fleet.stack.log(name) for name in fleet.members)
    return {name: breakdown.table(breakdown.timelines(created, requests, paths, fleet.records),
                                  breakdown.OURS_STEPS)
            for name, created in batches.items()}


def _backlogged_shares(fleet: MultiFleet, emu: Emulator, backlog: int,
                       duration: float) -> dict[str, Any]:
    # All ten at once, not one after another: on a loaded machine the first environment's
    # backlog was claimed (the others idle, it may fill the fleet) and drained before the last
    # one's was created, and no sample found all ten backlogged.
    with ThreadPoolExecutor(len(fleet.environment_ids)) as pool:
        made = dict(zip(fleet.environment_ids, pool.map(
            lambda e: emu.create_sessions(e, backlog, _metadata(duration), concurrency=4),
            fleet.environment_ids), strict=True))
    samples: list[dict[str, int]] = []
    time.sleep(2 * duration)  # past the first claims
    while True:
        held = fleet.held()
        queued = {e: emu_depth(emu, e) for e in fleet.environment_ids}
        if min(queued.values()) == 0:
            break  # one environment ran out of work: no longer all backlogged
        samples.append(held)
        time.sleep(0.5)
    for created in made.values():
        for c in created:
            wait_for_event(fleet.records, c.work_id, "exited", 300)
    indices = [jain([float(s.get(e, 0)) for e in fleet.environment_ids]) for s in samples]
    mean_share = {e: sum(s.get(e, 0) for s in samples) / max(1, len(samples))
                  for e in fleet.environment_ids}
    return {"backlog_per_env": backlog, "samples": len(samples),
            "jain_mean": sum(indices) / len(indices) if indices else None,
            "jain_min": min(indices, default=None),
            "jain_of_mean_shares": jain(list(mean_share.values())),
            "mean_slots_held": sorted(round(v, 2) for v in mean_share.values())}


def emu_depth(emu: Emulator, environment_id: str) -> int:
    """Items queued on the server for one environment (`stats.depth`)."""
    reply = emu.http.get(f"/v1/environments/{environment_id}/work/stats", headers=emu.env)
    reply.raise_for_status()
    return int(reply.json()["depth"])


# --- a thousand at once ----------------------------------------------------------------------

# The sandbox: notes its work id and start time, then sleeps (no interpreter: 1,000 of them fit
# in a few hundred MB). `exec` so the process the dispatcher signals is the sleep itself.
SLEEPER = ("/bin/sh -c 'echo \"$ANTHROPIC_WORK_ID $(date +%s.%N)\" >> {log}; "
           "exec sleep {seconds}'")


SLEEP_SECONDS = 7200


def thousand(stack: LocalStack, emu: Emulator, workdir: Path, *, n: int = 1000,
             environments: int = 10, workers: int = 2, hold: float = 60.0,
             ttl: int = 30, log: Any = print) -> dict[str, Any]:
    started_log = workdir / f"thousand-{secrets.token_hex(2)}.log"
    started_log.touch()
    per_worker = -(-n // workers)
    # Each sandbox sleeps far longer than claiming them all and the measuring window take, on
    # a loaded machine too (claims ran at under one a second at a load average of 30); the
    # benchmark then stops them all.
    on_work = SLEEPER.format(log=shlex.quote(str(started_log)), seconds=SLEEP_SECONDS)
    fleet = MultiFleet(stack, emu, workdir, environments, on_work=on_work,
                       DISPATCHER_DESIRED_TTL_SECONDS=str(ttl))
    fleet.start([per_worker] * workers)
    try:
        sessions_workers = [m for m in fleet.members if not m.endswith("-control")]
        idle = _workers_memory(stack, sessions_workers)
        redis_before = _prefix_memory(fleet.redis, fleet.key_prefix)
        # Each environment's beats counted by the emulator from here on (not read back from
        # its request log, which then leaves them out).
        for environment in fleet.environment_ids:
            emu.count_beats(environment, log_heartbeats=False)
        log(f"thousand: {n} sessions over {environments} environments")
        t0 = time.time()
        created: list[Created] = []
        share = n // environments
        for environment in fleet.environment_ids:
            created += emu.create_sessions(environment, share, _metadata(0))
        ids = {c.work_id for c in created}
        # On a machine too busy to start them all, the figures are taken with those that run
        # (`sandboxes`, `held_at_full`), and the report says how many never started.
        deadline = time.monotonic() + 900
        while True:
            lines = started_log.read_text().splitlines()
            if len({line.split()[0] for line in lines}) >= len(ids):
                break
            if time.monotonic() > deadline:
                log(f"thousand: only {len(lines)} of {len(ids)} started within 900 s")
                break
            time.sleep(1.0)
        all_running = time.time()
        log(f"thousand: {len(lines)} started after {all_running - t0:.0f} s; holding {hold} s")
        w0 = time.time()
        time.sleep(5.0)
        busy = _workers_memory(stack, sessions_workers)
        held = sum(fleet.held().values())
        running = max(1, busy.get("sandboxes", 0))  # the sandboxes alive as memory was read
        redis_busy = _prefix_memory(fleet.redis, fleet.key_prefix)
        # CPU over the rest of the window, all sessions running: what supervising and keeping
        # them costs (the sandboxes sleep; their own CPU is not counted).
        cpu0 = {name: _own_cpu(stack, name) for name in [*fleet.members, "emulator"]}
        c0 = time.time()
        time.sleep(max(0.0, hold - (time.time() - w0)))
        w1 = time.time()
        cpu = {name: (_own_cpu(stack, name) - before) / (w1 - c0)
               for name, before in cpu0.items()}
        counted = [emu.beats(environment) for environment in fleet.environment_ids]
        # Since each lease's last beat, at the time its environment's counts were read.
        last_gap = {w: float(c["until"]) - at for c in counted
                    for w, at in c["last_beat"].items() if w in ids}
        gaps = [float(c["max_gap_s"]) for c in counted if c["beats"]]
        starts = Counter(line.split()[0] for line in started_log.read_text().splitlines())
        log("thousand: stopping them")
        return {
            "n": len(ids), "environments": environments, "workers": workers,
            "threads_per_worker": per_worker, "ttl": ttl,
            "seconds_to_all_running": all_running - t0,
            "started_once": sum(1 for w in ids if starts[w] == 1),
            "started_twice_or_more": sum(1 for w in ids if starts[w] > 1),
            "never_started": sum(1 for w in ids if starts[w] == 0),
            "held_at_full": held,
            "leases_beaten": len(last_gap),
            "max_gap_between_beats_s": max(gaps, default=None),
            "max_since_last_beat_s": max(last_gap.values(), default=None),
            "heartbeat_interval_s": ttl / 3,
            "window_s": w1 - w0,
            "worker_rss_per_session_kb": (busy["rss"] - idle["rss"]) / running,
            "worker_pss_per_session_kb": (busy["pss"] - idle["pss"]) / running,
            "guardian_rss_kb": busy["guardian_rss"],
            "guardians": busy["guardians"],
            "per_session_with_watchdog_kb":
                (busy["rss"] - idle["rss"] + busy["guardian_rss"]) / running,
            "sandboxes": busy["sandboxes"],
            "sandbox_rss_per_session_kb": busy["sandbox_rss"] / max(1, busy["sandboxes"]),
            "redis_bytes_per_lease": (redis_busy - redis_before) / max(1, held),
            # Cores used (1.0 = one core) over the window, by role.
            "session_workers_cpu": sum(cpu[m] for m in sessions_workers),
            "control_cpu": sum(v for m, v in cpu.items() if m.endswith("-control")),
            "emulator_cpu": cpu["emulator"],
            "cpu_ms_per_session_second":
                1000 * sum(cpu[m] for m in sessions_workers) / running,
            "load": os.getloadavg(),
        }
    finally:
        for environment in fleet.environment_ids:
            emu.stop_counting_beats(environment)
        _stop_all(emu, fleet)
        fleet.stop()


def _stop_all(emu: Emulator, fleet: MultiFleet) -> None:
    """Clean-up: a forced stop of every item the fleet holds (its sandboxes sleep for minutes)."""
    from dispatcher.lease.registry import LeaseRegistry
    registry = LeaseRegistry(fleet.redis, prefix=fleet.key_prefix)

    def stop(batch: list[tuple[str, str]]) -> None:
        for environment, work_id in batch:
            fleet.emu.http.post(f"/v1/environments/{environment}/work/{work_id}/stop",
                                headers=emu.org, json={"force": True})

    held = [(lease.environment_id, lease.work_id)
            for lease in registry.get_many(registry.held_ids())]
    threads = [threading.Thread(target=stop, args=(held[i::8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 120
    while registry.held_count() and time.monotonic() < deadline:
        time.sleep(1.0)


def _workers_memory(stack: LocalStack, names: list[str]) -> dict[str, int]:
    everything = proc.processes()
    out = Counter[str]()
    for name in names:
        for p in proc.tree(stack.processes[name].pid, everything):
            if WATCHDOG_MARK in p.cmdline:
                out["guardian_rss"] += p.rss_kb
                out["guardians"] += 1
            elif "sleep" in p.cmdline or p.cmdline.startswith("/bin/sh"):
                out["sandbox_rss"] += p.rss_kb
                out["sandboxes"] += 1
            else:
                out["rss"] += p.rss_kb
                out["pss"] += p.pss_kb
    return dict(out)


def _own_cpu(stack: LocalStack, name: str) -> float:
    """CPU seconds of a member's process tree, its sandboxes excluded (sleeping shells)."""
    return sum(proc.cpu_seconds(p.pid, with_children=False)
               for p in proc.tree(stack.processes[name].pid)
               if not ("sleep" in p.cmdline or p.cmdline.startswith("/bin/sh")))


def _prefix_memory(client: redis.Redis, prefix: str) -> int:
    """Bytes Redis uses for the fleet's own keys (`MEMORY USAGE` of each)."""
    total = 0
    pipe = client.pipeline(transaction=False)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    for key in keys:
        pipe.memory_usage(key, samples=0)
    for used in pipe.execute():
        total += int(used or 0)
    return total
