"""The objects a process made while starting, set aside from the garbage collector's full passes.

A worker or the emulator holds a few hundred thousand objects once started (the modules of
Celery, kombu, FastAPI, pydantic, redis-py, httpx and ours) that live as long as the process.
CPython's oldest-generation collection walks every one of them each time, and while it does,
no thread of the process runs: measured at 20,000 leases held (2,000 heartbeats a second),
the emulator paused 50-100 ms every few seconds and the control worker up to 220 ms, and the
stop bridge's sweep, waiting behind both, got 3.4 pages of `list` a second (10-14 once both
froze their start-up objects; BENCHMARKS.md, "Stops with many leases held").
`gc.freeze()` moves what exists into a generation the collector never walks; what the process
makes afterwards is collected as before. Called once start-up is over, after a collection, so
no garbage is kept for good. In a pool child (prefork) the parent's frozen objects stay frozen;
the child freezes what its own start added.
"""

from __future__ import annotations

import gc

__all__ = ["freeze_startup_heap"]


def freeze_startup_heap() -> None:
    gc.collect()
    gc.freeze()
