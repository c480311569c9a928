"""A burst's claims, in process: how fast one poller run takes N waiting items, and its CPU.

    python -m bench.claims [--items 100] [--rounds 6] [--json]

N sessions are created on the emulator first; then one poller run (`run_poller`, a fleet of N
free slots) claims them, in this process, with a stand-in for Celery's publish (nothing is
sent). The figure is the run's start -> every item's lease recorded, and the CPU this process
(the claimer) and the emulator spent, per claim. Rounds alternate between the two ways the
Work API client can send: over the lean blocking transport (`http11.HTTP11Transport`, what a
fleet uses) and over httpx's own (what it uses when a proxy applies), so both are measured on
the same machine in the same minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.emu import Emulator
from bench.proc import cpu_seconds
from dispatcher.control.poller import run_poller
from dispatcher.ops.stack import LocalStack
from dispatcher.runtime import Runtime
from dispatcher.settings import load_settings
from dispatcher.workapi.http11 import HTTP11Transport

# A run long enough for a burst of a few hundred on a loaded machine; it ends on its own.
RUN_SECONDS = 8.0
# The poll outstanding before the burst is not measured: the items wait on the server first.
HELD_TIMEOUT_SECONDS = 30.0
WAYS = ("lean", "httpx")


class _Unsent:
    """Celery's app as the lease executor sees it; nothing is published."""

    def __init__(self) -> None:
        self.control = self

    def send_task(self, name: str, **kwargs: Any) -> None:
        pass

    def revoke(self, task_id: str, **kwargs: Any) -> None:
        pass


@contextmanager
def _sending(way: str) -> Iterator[None]:
    """The runtime's clients over the lean transport, or over httpx's own (as when a proxy
    applies: `for_url` answers None)."""
    if way == "lean":
        yield
        return
    original = HTTP11Transport.for_url
    HTTP11Transport.for_url = classmethod(lambda cls, url, **options: None)  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        HTTP11Transport.for_url = original  # type: ignore[method-assign]


def _round(stack: LocalStack, emu: Emulator, items: int, way: str, n: int) -> dict[str, float]:
    environment = emu.new_environment(f"claims-{way}-{n}")
    emu.create_sessions(environment, items, {}, concurrency=16)
    settings = load_settings(**{
        "ANTHROPIC_BASE_URL": stack.base_url, "ANTHROPIC_ENVIRONMENT_ID": environment,
        "ANTHROPIC_ENVIRONMENT_KEY": stack.environment_key,
        "DISPATCHER_REDIS_URL": stack.redis_url,
        "DISPATCHER_KEY_PREFIX": f"{stack.key_prefix}c{n}"})
    with _sending(way):
        runtime = Runtime(settings=settings, app=_Unsent())
        runtime.capacity.advertise(hostname="bench@claims", slots=items, pool="threads",
                                   queues=["dispatcher.sessions"])
        emulator_pid = stack.processes["emulator"].pid
        cpu, emulator_cpu = time.process_time(), cpu_seconds(emulator_pid)
        started = time.monotonic()
        run = threading.Thread(target=run_poller, args=(runtime,),
                               kwargs={"run_seconds": RUN_SECONDS})
        run.start()
        held = _wait(lambda: runtime.registry.held_count() >= items, started)
        figures = {"held_s": held,
                   "claimer_cpu_ms": (time.process_time() - cpu) / items * 1000,
                   "emulator_cpu_ms": (cpu_seconds(emulator_pid) - emulator_cpu) / items * 1000}
        run.join()
        runtime.close()
    return figures


def _wait(done: Callable[[], bool], started: float) -> float:
    while not done():
        if time.monotonic() - started > HELD_TIMEOUT_SECONDS:
            raise RuntimeError(f"the burst was not claimed within {HELD_TIMEOUT_SECONDS:.0f} s")
        time.sleep(0.002)
    return time.monotonic() - started


def run(*, items: int, rounds: int, workdir: Path) -> dict[str, Any]:
    stack = LocalStack(workdir=workdir)
    try:
        stack.ensure_redis()
        stack.start_emulator()
        emu = Emulator(stack)
        taken: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
        for n in range(rounds):
            for way in WAYS if n % 2 == 0 else reversed(WAYS):
                taken[way].append(_round(stack, emu, items, way, n))
        return {"items": items, "rounds": rounds, "load": os.getloadavg()[0],
                **{way: {key: statistics.median(r[key] for r in taken[way])
                         for key in taken[way][0]} for way in WAYS}}
    finally:
        stack.stop_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-claims-") as workdir:
        figures = run(items=args.items, rounds=args.rounds, workdir=Path(workdir))
    if args.json:
        print(json.dumps(figures))
        return
    print(f"a burst of {figures['items']} claimed by one poller run, medians of "
          f"{figures['rounds']} rounds each way, load {figures['load']:.1f}")
    for way in WAYS:
        f = figures[way]
        print(f"  {way:6} all held after {f['held_s'] * 1000:.0f} ms; CPU per claim: claimer "
              f"{f['claimer_cpu_ms']:.2f} ms, emulator {f['emulator_cpu_ms']:.2f} ms")


if __name__ == "__main__":
    main()
