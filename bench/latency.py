"""Dispatch and stop latency of the dispatcher against the emulator.

    python -m bench.latency [--sessions 40] [--pool threads]

Dispatch latency: session created on the emulator -> sandbox process started (its own record),
one session at a time on an idle fleet. Stop latency: graceful stop requested -> SIGTERM
received by the sandbox. Targets: dispatch p50 < 100 ms and p99 < 1 s; stop p99 < 2 s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.records import summary, wait_for_event
from dispatcher.ops.stack import API_HEADERS, LocalStack

TARGETS = {"dispatch": (0.100, 1.0), "stop": (None, 2.0)}


def run(*, sessions: int, pool: str, workdir: Path) -> dict[str, dict[str, float]]:
    records = workdir / "records"
    records.mkdir()
    stack = LocalStack(workdir=workdir)
    try:
        stack.ensure_redis()
        stack.start_emulator()
        env = stack.fleet_env(DISPATCHER_FAKE_RECORD_DIR=str(records),
                              DISPATCHER_SANDBOX_ENV_ALLOW="PATH,HOME,DISPATCHER_FAKE_RECORD_DIR",
                              DISPATCHER_STOP_GRACE_SECONDS="5")
        stack.worker("bench", env, pool=pool, concurrency=sessions + 2, beat=True)
        _warm_up(stack, records)
        return {"dispatch": _dispatch(stack, records, sessions),
                "stop": _stop(stack, records, sessions)}
    finally:
        stack.stop_all()


def _warm_up(stack: LocalStack, records: Path) -> None:
    _, work_id = stack.create_session({"fake.duration": "0.1"})
    wait_for_event(records, work_id, "started", timeout=60)


def _dispatch(stack: LocalStack, records: Path, sessions: int) -> dict[str, float]:
    latencies = []
    for _ in range(sessions):
        created = time.time()
        _, work_id = stack.create_session({"fake.duration": "0.1"})
        started = wait_for_event(records, work_id, "started", timeout=30)
        latencies.append(started["time"] - created)
        wait_for_event(records, work_id, "exited", timeout=30)
        time.sleep(0.3)  # an idle fleet for each session
    return summary(latencies)


def _stop(stack: LocalStack, records: Path, sessions: int) -> dict[str, float]:
    import httpx

    work_ids = [stack.create_session({"fake.duration": "120"})[1] for _ in range(sessions)]
    for work_id in work_ids:
        wait_for_event(records, work_id, "started", timeout=60)
    latencies = []
    for work_id in work_ids:
        requested = time.time()
        httpx.post(f"{stack.base_url}/v1/environments/{stack.environment_id}/work/{work_id}/stop",
                   headers={**API_HEADERS, "x-api-key": stack.api_key}, json={"force": False},
                   timeout=10)
        term = wait_for_event(records, work_id, "sigterm", timeout=30)
        latencies.append(term["time"] - requested)
        time.sleep(0.2)
    return summary(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--pool", choices=["threads", "prefork"], default="threads")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as tmp:
        figures = run(sessions=args.sessions, pool=args.pool, workdir=Path(tmp))
    if args.json:
        print(json.dumps(figures))
        return
    for name, stats in figures.items():
        p50_target, p99_target = TARGETS[name]
        print(f"{name:9} n={stats['n']:<4} p50={stats['p50'] * 1000:7.1f} ms "
              f"p99={stats['p99'] * 1000:7.1f} ms  target p50<"
              f"{'-' if p50_target is None else f'{p50_target * 1000:.0f} ms'} "
              f"p99<{p99_target * 1000:.0f} ms")


if __name__ == "__main__":
    main()
