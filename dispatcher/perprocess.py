"""One value per process, made on first use, and made again in a forked child.

A prefork pool forks its children from a parent that may already hold the value: a thread
(which does not survive a fork), an event loop run by one, or sockets the parent goes on using.
A child that used its parent's copy would wait on a thread that is not there, or interleave its
requests with the parent's on one connection. So the value is kept with the pid that made it,
and any other pid makes its own.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PerProcess"]

T = TypeVar("T")


class PerProcess(Generic[T]):
    """`make()`'s value, once per process: `get` makes it on first use in each process."""

    def __init__(self, make: Callable[[], T]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._pid = 0  # no process has pid 0: nothing made yet
        self._value: T | None = None

    def get(self) -> T:
        pid = os.getpid()
        with self._lock:
            value = self._value
            if self._pid != pid or value is None:
                # A parent's value is dropped, never closed: closing it would close the parent's.
                value = self._make()
                self._value, self._pid = value, pid
            return value

    def pop(self) -> T | None:
        """This process's value, forgotten (the next `get` makes another); None if this process
        made none."""
        with self._lock:
            value = self._value if self._pid == os.getpid() else None
            self._value, self._pid = None, 0
            return value
