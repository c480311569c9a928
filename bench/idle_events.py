"""What an idle fleet sends: Celery task events and Work API requests per minute.

    python -m bench.idle_events [--seconds 60]

Starts Redis (or uses $DISPATCHER_REDIS_URL), the emulator and one worker with beat (threads,
10 slots, the project's defaults), lets it settle, then counts for `--seconds` every Celery event
the fleet sends (as Flower or celery-exporter would receive them) and every Work API request the
emulator logs. Nothing is queued: these are the costs of doing nothing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from celery import Celery

from dispatcher.celery.keys import CeleryKeys
from dispatcher.ops.stack import LocalStack

SETTLE_SECONDS = 10.0


def _count_events(stack: LocalStack, seconds: float) -> Counter[str]:
    app = Celery(broker=stack.redis_url)
    app.conf.broker_transport_options = {"global_keyprefix": CeleryKeys(stack.key_prefix).broker}
    counts: Counter[str] = Counter()

    def note(event: dict[str, Any]) -> None:
        kind = str(event.get("type", "?"))
        if kind.startswith("worker-"):
            counts[kind] += 1  # heartbeats of the worker itself, not of a task
        else:
            counts[f"{kind} {event.get('name') or ''}".strip()] += 1

    deadline = time.monotonic() + seconds
    with app.connection() as connection:
        receiver = app.events.Receiver(connection, handlers={"*": note})
        while time.monotonic() < deadline:
            try:
                for _ in receiver.itercapture(timeout=1.0, wakeup=False):
                    if time.monotonic() >= deadline:
                        break
            except TimeoutError:
                continue
    return counts


def _api_requests(stack: LocalStack) -> int:
    return len(stack._admin("GET", "/_emulator/requests")["data"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_events")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="idle-events-"))
    stack = LocalStack(workdir=workdir,
                       redis_url=os.environ.get("DISPATCHER_REDIS_URL", LocalStack.redis_url))
    try:
        stack.ensure_redis()
        stack.start_emulator()
        stack.environment_id = stack.create_environment()
        stack.worker("w1", stack.fleet_env(), beat=True)
        time.sleep(SETTLE_SECONDS)
        before = _api_requests(stack)
        counts = _count_events(stack, args.seconds)
        api = _api_requests(stack) - before
    finally:
        stack.stop_all()
    per_minute = 60.0 / args.seconds
    task_events = sum(n for kind, n in counts.items() if kind.startswith("task-"))
    print(f"idle fleet, {args.seconds:.0f} s (one worker with beat, threads, 10 slots)")
    print(f"  task events per minute:     {task_events * per_minute:8.1f}")
    for kind, n in sorted(counts.items()):
        print(f"    {kind:50s} {n * per_minute:8.1f}")
    print(f"  Work API requests per minute: {api * per_minute:6.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
