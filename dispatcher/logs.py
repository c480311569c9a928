"""Structured lifecycle log lines.

Every lifecycle step is one line, `<action> work_id=... session_id=... attempt=...`, logged on
the `dispatcher` logger with the same fields in `extra` (`action`, `work_id`, ...), so an
operator can grep it and a JSON formatter or a test can read the fields. Values are quoted when
they hold spaces or quotes so hostile metadata cannot forge a field; keys and secrets are never
passed here.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["event", "logger"]

logger = logging.getLogger("dispatcher")


def _format(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return repr(text)
    return text


def event(action: str, /, level: int = logging.INFO, **fields: Any) -> None:
    """Log one lifecycle step: `action` then `key=value` pairs in the order given."""
    parts = " ".join(f"{k}={_format(v)}" for k, v in fields.items() if v is not None)
    logger.log(level, "%s %s", action, parts, extra={"action": action, **fields})
