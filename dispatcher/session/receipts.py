"""What a session worker's consumer noted as a session task's message arrived, for the task's
start: when (its `start path`), and the reads the start needs, taken in the receipt's own round
trip.

The consumer writes the receipt to Redis before the message is acknowledged
(`lease/deliveries.py`); the start's reads (`LeaseRegistry.start_reads`: the lease, its work
item, the epoch, the drain flag) ride on that round trip. A pool thread then takes the task a
moment later and goes straight to the machine's decision, the proof's wait if need be and the
running mark: one round trip less between the message and the sandbox. Only the threads pool
runs its tasks in the consumer's process; a prefork child reads for itself.

Reads taken a moment early change no rule: the running mark is guarded (only the current
attempt takes the lease), an unproven lease still waits for its proof (the wait reads the record
again), and a stop or a drain raised meanwhile reaches the attempt at its first pulse, as one
raised just after a read at the task's start does.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from dispatcher.lease.deliveries import Deliveries
from dispatcher.lease.registry import LeaseRegistry, StartReads

__all__ = ["READS_FRESH_SECONDS", "Receipt", "received", "take_received", "write_receipt"]

# Receipts kept for tasks that have not started yet. A receipt is taken when its task starts;
# one whose task never starts in this process (prefork runs it in a child, which cannot see the
# parent's memory) is dropped oldest first past this many.
MAX_RECEIPTS = 1024
# Reads taken at the receipt serve a task that starts within this; one that started later (a
# pool slow to pick it up) reads again. On the threads pool a task starts within milliseconds
# of its receipt: its consumer fetches a message only while a slot is free.
READS_FRESH_SECONDS = 1.0


@dataclass(frozen=True)
class Receipt:
    at: float  # when the message arrived (monotonic)
    written_at: float | None = None  # when the receipt was written (and the reads came back)
    reads: StartReads | None = None  # the start's reads, if taken with the receipt

    def fresh_reads(self, now: float) -> StartReads | None:
        """The reads, if still fresh enough to start on at `now` (monotonic)."""
        return self.reads if now - self.at <= READS_FRESH_SECONDS else None


def write_receipt(registry: LeaseRegistry, deliveries: Deliveries, task_id: str, *,
                  worker: str, work_id: str | None) -> StartReads | None:
    """Record in Redis that `worker` received the task's message and, given the task's
    `work_id`, take the start's reads in the same round trip (None: the receipt alone)."""
    if work_id is None:
        deliveries.received(task_id, worker=worker)
        return None
    return registry.start_reads(
        work_id, worker=worker,
        before=lambda pipe: deliveries.received(task_id, worker=worker, pipe=pipe))


_receipts: OrderedDict[str, Receipt] = OrderedDict()
_lock = threading.Lock()


def received(task_id: str, *, at: float, written_at: float | None = None,
             reads: StartReads | None = None) -> None:
    """A session worker's consumer took the task's message at `at` (monotonic)."""
    with _lock:
        _receipts[task_id] = Receipt(at, written_at, reads)
        while len(_receipts) > MAX_RECEIPTS:
            _receipts.popitem(last=False)


def take_received(task_id: str) -> Receipt | None:
    """The task's receipt in this process, if it was received here; taken once."""
    with _lock:
        return _receipts.pop(task_id, None)
