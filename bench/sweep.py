"""The stop bridge's sweep at scale, alone: CPU per pass and stop latency with many leases held.

    python -m bench.sweep [--held 20000] [--page-size 1000] [--passes 5] [--stops 20] [--json]

N items are created on the emulator and recorded as held in the registry (no session runs,
nothing heartbeats, so only the sweep can see a stop). A bridge process of its own (as beat
starts the tick, in one process) first sweeps `--passes` whole passes back to back: the CPU of
the emulator, the bridge and Redis (private to the run) per pass. Then it ticks once a second as
beat would, and `--stops` held items are stopped on the server one each 0.3 s, picked at random:
stop requested -> the lease's stop flag raised, p50 and p99.

`--page-size` above the emulator's 100 raises its limit for the run (the service documents no
maximum; the bridge asks pages of 1,000 past 1,000 held).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from bench.emu import Emulator
from bench.proc import cpu_seconds
from bench.records import summary
from dispatcher.emulator.config import MAX_LIST_LIMIT
from dispatcher.ops.stack import LocalStack, free_port

# Where the bridge process reads its settings: the fleet's own variables.
_BRIDGE_ENV = ("ANTHROPIC_BASE_URL", "ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_ENVIRONMENT_KEY",
               "DISPATCHER_REDIS_URL", "DISPATCHER_KEY_PREFIX")


def _hold(stack: LocalStack, emu: Emulator, n: int) -> list[str]:
    """N items created on the server and recorded as held (running), newest last."""
    from dispatcher.lease.model import Lease, LeaseMode, Phase
    from dispatcher.runtime import Runtime
    from dispatcher.settings import load_settings

    created = emu.create_sessions(stack.environment_id, n, {}, concurrency=16)
    runtime = Runtime(settings=load_settings(**_settings(stack)), app=None)
    now = time.time()
    for c in created:
        runtime.registry.create(Lease(
            work_id=c.work_id, session_id=c.session_id, environment_id=stack.environment_id,
            mode=LeaseMode.DISPATCHER, queue="dispatcher.sessions", phase=Phase.RUNNING,
            task_id=f"t-{c.work_id}", worker="w@h", claimed_at=now, dispatched_at=now,
            pulse_at=now, created_at=""), work_json="{}")
    runtime.close()
    return [c.work_id for c in created]


def _settings(stack: LocalStack) -> dict[str, Any]:
    return {"ANTHROPIC_BASE_URL": stack.base_url, "ANTHROPIC_ENVIRONMENT_ID": stack.environment_id,
            "ANTHROPIC_ENVIRONMENT_KEY": stack.environment_key,
            "DISPATCHER_REDIS_URL": stack.redis_url, "DISPATCHER_KEY_PREFIX": stack.key_prefix}


def _redis_cpu(client: redis.Redis) -> float:
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def bridge(passes: int) -> None:
    """The bridge process: whole passes back to back (one line each: CPU and wall seconds),
    then a tick a second, until killed."""
    from dispatcher.control import bridge as stop_bridge
    from dispatcher.runtime import Runtime
    from dispatcher.settings import load_settings

    runtime = Runtime(settings=load_settings(**{k: os.environ[k] for k in _BRIDGE_ENV}),
                      app=None)
    share = stop_bridge.TICK_BUDGET_SHARE
    stop_bridge.TICK_BUDGET_SHARE = 1_000.0  # a whole pass, whatever it takes
    for _ in range(passes):
        cpu, wall = time.process_time(), time.monotonic()
        stop_bridge.scan_server_stops(runtime)
        print(json.dumps({"pass_cpu": time.process_time() - cpu,
                          "pass_wall": time.monotonic() - wall}), flush=True)
    stop_bridge.TICK_BUDGET_SHARE = share
    print(json.dumps({"ticking": True}), flush=True)
    interval = runtime.settings.bridge_interval_seconds
    next_tick = time.monotonic()
    while True:
        stop_bridge.scan_server_stops(runtime)
        next_tick += interval
        time.sleep(max(0.0, next_tick - time.monotonic()))


def run(*, held: int, page_size: int, passes: int, stops: int, workdir: Path) -> dict[str, Any]:
    stack = LocalStack(workdir=workdir, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        stack.ensure_redis()  # private: its CPU is the run's
        # The emulator's `list` limit raised to the page size (the service names none).
        stack.start_emulator("--max-list-limit", str(max(MAX_LIST_LIMIT, page_size)))
        emu = Emulator(stack)
        ids = _hold(stack, emu, held)
        env = {**os.environ, **{k: str(v) for k, v in _settings(stack).items()}}
        rcli = redis.Redis.from_url(stack.redis_url)
        emulator_pid = stack.processes["emulator"].pid
        before = cpu_seconds(emulator_pid), _redis_cpu(rcli)
        child = subprocess.Popen([sys.executable, "-m", "bench.sweep", "--role-bridge",
                                  "--passes", str(passes)], env=env, stdout=subprocess.PIPE,
                                 text=True)
        try:
            lines = []
            assert child.stdout is not None
            for line in child.stdout:
                got = json.loads(line)
                if got.get("ticking"):
                    break
                lines.append(got)
            after = cpu_seconds(emulator_pid), _redis_cpu(rcli)
            per_pass = {
                "emulator_cpu_s": (after[0] - before[0]) / passes,
                "bridge_cpu_s": sum(p["pass_cpu"] for p in lines) / passes,
                "redis_cpu_s": (after[1] - before[1]) / passes,
                "wall_s": sorted(p["pass_wall"] for p in lines)[passes // 2]}
            latencies = _stops(stack, emu, ids, stops)
        finally:
            child.kill()
            child.wait()
        return {"held": held, "page_size": page_size, "per_pass": per_pass,
                "stops": latencies, "load": os.getloadavg()[0]}
    finally:
        stack.stop_all()


def _stops(stack: LocalStack, emu: Emulator, ids: list[str], k: int) -> dict[str, float]:
    from dispatcher.runtime import Runtime
    from dispatcher.settings import load_settings

    runtime = Runtime(settings=load_settings(**_settings(stack)), app=None)
    time.sleep(2)  # a tick or two of the loop first
    picks = random.sample(ids, k)
    requested = {}
    for work_id in picks:
        requested[work_id] = emu.stop(stack.environment_id, work_id)
        time.sleep(0.3)
    seen: dict[str, float] = {}
    deadline = time.monotonic() + 60
    while len(seen) < k and time.monotonic() < deadline:
        for lease in runtime.registry.get_many([w for w in picks if w not in seen]):
            if lease.stop_seen_at:
                seen[lease.work_id] = lease.stop_seen_at
        time.sleep(0.05)
    runtime.close()
    return {**summary([seen[w] - requested[w] for w in seen]), "unseen_after_60s": k - len(seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--held", type=int, default=20_000)
    parser.add_argument("--page-size", type=int, default=1000)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--stops", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--role-bridge", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role_bridge:
        bridge(args.passes)
        return
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as workdir:
        figures = run(held=args.held, page_size=args.page_size, passes=args.passes,
                      stops=args.stops, workdir=Path(workdir))
    if args.json:
        print(json.dumps(figures))
        return
    p, s = figures["per_pass"], figures["stops"]
    print(f"{figures['held']:,} held, pages of {figures['page_size']}, load {figures['load']:.1f}")
    print(f"per pass: emulator {p['emulator_cpu_s']:.3f} s, bridge {p['bridge_cpu_s']:.3f} s, "
          f"redis {p['redis_cpu_s']:.3f} s of CPU; wall {p['wall_s']:.3f} s (median)")
    print(f"stops: p50 {s['p50'] * 1000:.0f} ms, p99 {s['p99'] * 1000:.0f} ms "
          f"(n={s['n']}, unseen {s['unseen_after_60s']})")


if __name__ == "__main__":
    main()
