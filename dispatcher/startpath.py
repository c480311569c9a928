"""When a session's start passed each step, from the poll reply to the sandbox's start.

Each side of the path notes its steps and logs them as one line when it is done: the poller's
claim in a control worker (`side=claim`) and the session task in a session worker
(`side=session`):

    start path work_id=... side=claim wall=1764508800.123456 mono=8123.456789 steps=polled:0.00,...

`wall` and `mono` are the first step's time on the wall clock and on the monotonic clock; each
step is milliseconds after it on the monotonic clock, which no clock step bends. The monotonic
clock is system-wide on Linux, so the two sides' steps compare directly; the wall clock lines
them up with the Work API server's request log and the sandbox's own records.
`python -m bench.breakdown` turns the lines into a table. Only times and ids: nothing secret.
"""

from __future__ import annotations

import time

from dispatcher.logs import event

__all__ = ["StartPath"]


class StartPath:
    """One side's steps. Not shared between threads: each claim and each task has its own."""

    def __init__(self, side: str, *, first: str, mono: float | None = None) -> None:
        self.side = side
        now = time.monotonic()
        self.mono = now if mono is None else mono
        # The wall clock of the first step, from the same instant as `mono`.
        self.wall = time.time() - (now - self.mono)
        self.steps: list[tuple[str, float]] = [(first, self.mono)]

    def mark(self, step: str, at: float | None = None) -> None:
        """The step passed now, or at `at` (monotonic: another thread noted it)."""
        self.steps.append((step, time.monotonic() if at is None else at))

    def log(self, work_id: str) -> None:
        steps = ",".join(f"{name}:{(at - self.mono) * 1000:.2f}" for name, at in self.steps)
        event("start path", work_id=work_id, side=self.side, wall=f"{self.wall:.6f}",
              mono=f"{self.mono:.6f}", steps=steps)
