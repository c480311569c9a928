"""Time bounds the tests hold the fleet to, each with its reason, written once."""

from __future__ import annotations

__all__ = ["STATUS_CHECK_SECONDS"]

# `dispatcher status --check` takes about 0.3 s of CPU (an interpreter, pydantic, redis-py) and
# answers in well under a second on an idle machine. The bound is what a broadcast to the fleet
# (Celery's `inspect` waits a second at least) or a long Redis timeout would cost, with room
# for the interpreter to start on two cores busy with the suite's parallel workers.
STATUS_CHECK_SECONDS = 3.0
