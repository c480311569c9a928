"""The fleet woken by signed webhooks, polling at the slow sweep only.

    python -m bench.webhooks [--sessions 20] [--sweep 60] [--idle-window 120] [--json]
    python -m bench.webhooks --sessions 5 --sweep 10 --idle-window 30   # a quick run

Dispatch latency: session created on the emulator -> sandbox started, one at a time on an idle
fleet, the emulator delivering `session.status_run_started` to `dispatcher webhooks`. Idle load:
Work API requests per minute while nothing happens (target: at most one a minute per
environment with the default sweep). Missed delivery: with every delivery lost, session created
-> sandbox started, which the sweep must bring in (target: within one sweep).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.emu import Emulator
from bench.records import summary, wait_for_event
from dispatcher.emulator.cli import ENV_WEBHOOK_SIGNING_KEY
from dispatcher.ops.stack import LocalStack, free_port

# Sessions long enough to be seen running, short enough to keep the fleet idle between them.
SESSION_SECONDS = "0.1"
# Start-up (Redis, emulator, receiver, worker and beat) on a loaded machine.
START_TIMEOUT_SECONDS = 90.0


def run(*, sessions: int, sweep: float, idle_window: float, workdir: Path,
        redis_url: str) -> dict[str, Any]:
    records = workdir / "records"
    records.mkdir()
    key = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
    port = free_port()
    stack = LocalStack(workdir=workdir, redis_url=redis_url)
    try:
        stack.ensure_redis()
        stack.start_emulator("--webhook-url", f"http://127.0.0.1:{port}/webhooks",
                             env={ENV_WEBHOOK_SIGNING_KEY: key})
        env = stack.fleet_env(DISPATCHER_FAKE_RECORD_DIR=str(records),
                              DISPATCHER_SANDBOX_ENV_ALLOW="PATH,HOME,DISPATCHER_FAKE_RECORD_DIR",
                              DISPATCHER_WEBHOOKS="true",
                              DISPATCHER_WEBHOOK_SWEEP_SECONDS=str(sweep))
        stack.webhooks("webhooks", env, port=port, signing_key=key)
        stack.worker("bench", env, concurrency=4, beat=True)
        _session(stack, records, timeout=START_TIMEOUT_SECONDS)  # warm-up
        emu = Emulator(stack)
        return {"dispatch": summary([_session(stack, records, timeout=30)
                                     for _ in range(sessions)]),
                "idle": _idle(emu, stack.environment_id, idle_window),
                "missed_delivery": _missed(stack, emu, records, sweep)}
    finally:
        stack.stop_all()


def _session(stack: LocalStack, records: Path, *, timeout: float) -> float:
    created = time.time()
    _, work_id = stack.create_session({"fake.duration": SESSION_SECONDS})
    started = wait_for_event(records, work_id, "started", timeout=timeout)
    wait_for_event(records, work_id, "exited", timeout=30)
    time.sleep(0.3)  # an idle fleet for each session
    return float(started["time"] - created)


def _idle(emu: Emulator, environment_id: str, window: float) -> dict[str, float]:
    emu.clear_requests()
    began = time.monotonic()
    time.sleep(window)
    minutes = (time.monotonic() - began) / 60
    api = [e for e in emu.requests(environment_id) if e["endpoint"] != "webhook"]
    return {"window_seconds": round(minutes * 60, 1),
            "requests_per_minute": round(len(api) / minutes, 2),
            "polls_per_minute": round(sum(e["endpoint"] == "poll" for e in api) / minutes, 2)}


def _missed(stack: LocalStack, emu: Emulator, records: Path, sweep: float) -> dict[str, float]:
    emu.set_faults(webhook_drop_rate=1.0)
    try:
        latency = _session(stack, records, timeout=2 * sweep + 30)
    finally:
        emu.reset_faults()
    return {"sweep_seconds": sweep, "recovered_after_seconds": round(latency, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--sweep", type=float, default=60.0,
                        help="DISPATCHER_WEBHOOK_SWEEP_SECONDS (s, default %(default)s)")
    parser.add_argument("--idle-window", type=float, default=120.0,
                        help="how long the idle fleet is watched (s, default %(default)s)")
    parser.add_argument("--redis-url",
                        default=os.environ.get("DISPATCHER_REDIS_URL", "redis://127.0.0.1:6379/0"),
                        help="used under its own key prefixes; one is started if none answers "
                             "(default: $DISPATCHER_REDIS_URL or %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as tmp:
        figures = run(sessions=args.sessions, sweep=args.sweep, idle_window=args.idle_window,
                      workdir=Path(tmp), redis_url=args.redis_url)
    if args.json:
        print(json.dumps(figures))
        return
    dispatch, idle, missed = figures["dispatch"], figures["idle"], figures["missed_delivery"]
    print(f"dispatch  n={dispatch['n']:<4} p50={dispatch['p50'] * 1000:7.1f} ms "
          f"p99={dispatch['p99'] * 1000:7.1f} ms  (webhook wake-up, sweep {args.sweep:g} s)")
    print(f"idle      {idle['requests_per_minute']:.2f} Work API requests/min "
          f"({idle['polls_per_minute']:.2f} polls/min) over {idle['window_seconds']:.0f} s  "
          "target <= 1/min")
    print(f"missed    recovered by the sweep after {missed['recovered_after_seconds']:.1f} s  "
          f"target <= {args.sweep:g} s")


if __name__ == "__main__":
    main()
