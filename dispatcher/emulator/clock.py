"""Timestamps as the Work API writes them: RFC 3339, UTC, always with microseconds.

Microseconds matter: the lease token (`last_heartbeat`) is this string, compared by exact match,
so two heartbeats in one second must still produce two different tokens.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

__all__ = ["after", "from_epoch", "now", "rfc3339"]

_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def now() -> float:
    """Wall-clock seconds since the epoch (leases are wall-clock, like the service's)."""
    return time.time()


def from_epoch(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime(_FORMAT)


def rfc3339() -> str:
    return from_epoch(now())


def after(token: str) -> str:
    """The token one microsecond after `token`: keeps successive lease tokens strictly distinct."""
    moment = datetime.strptime(token, _FORMAT).replace(tzinfo=UTC) + timedelta(microseconds=1)
    return moment.strftime(_FORMAT)
