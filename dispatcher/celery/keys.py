"""The Redis keys of Celery's own parts, under the fleet's prefix: kombu's queues, results and
pidbox channels, and celery-redbeat's lock. Fleets with different `DISPATCHER_KEY_PREFIX` share
one Redis without sharing queues or a beat."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CeleryKeys"]


@dataclass(frozen=True)
class CeleryKeys:
    prefix: str

    @property
    def broker(self) -> str:
        """Prefix of every key Celery and kombu write (kombu's `global_keyprefix`)."""
        return f"{self.prefix}:celery:"

    @property
    def beat_lock(self) -> str:
        """String lock (celery-redbeat's): held, with a TTL, by the one beat that ticks."""
        return f"{self.prefix}:redbeat:lock"
