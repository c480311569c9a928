"""Ids that go into a URL path, checked before they do.

Its own module, free of dependencies: settings check the environment id at load, and importing
the Work API client there would cost every process that reads its settings.
"""

from __future__ import annotations

import re

__all__ = ["InvalidId", "check_id"]

# What an id may be before it goes into a URL path: letters, digits, `_`, `-`, and dots after
# the first character (so never `.` or `..`, which walk the path). Real ids are `work_...`.
_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,255}")


class InvalidId(ValueError):
    """An id that cannot be one URL path segment; raised before any request is sent."""


def check_id(value: str, what: str = "id") -> str:
    """``value`` if it is safe as one URL path segment; ValueError naming ``what`` if not."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        shown = repr(value[:40] if isinstance(value, str) else value)
        raise InvalidId(f"{what} must be 1-256 letters, digits, '_', '-' or '.' (not first); "
                         f"got {shown}")
    return value
