"""Time bounds the tests hold the fleet to, each with its reason, written once."""

from __future__ import annotations

__all__ = ["STATUS_CHECK_SECONDS"]

# `dispatcher status --check` takes about 0.4 s of CPU (an interpreter, pydantic, redis-py) and
# answers in about half a second on an idle machine. The bound catches a check that hangs: on a
# Redis call without a timeout, a retry loop, or replies awaited from the fleet. It is not
# sub-second because on two cores busy with the suite's parallel workers (load 15-20) the
# interpreter's start alone has taken over three seconds, and a whole check up to 12.4 s.
# (Under 17 s: the healthy fleet's lease, beaten 3 s before, is overdue after 20.)
STATUS_CHECK_SECONDS = 15.0
