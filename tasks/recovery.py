"""The recovery tick (control queue): sessions whose worker died, messages that were lost."""

from __future__ import annotations

from dispatcher.celery import names
from dispatcher.celery.application import app
from dispatcher.control.recovery import recover as recover_leases
from dispatcher.runtime import get_runtime


def _recover() -> int:
    """Start new attempts for sessions whose worker died; re-dispatch lost messages."""
    return recover_leases(get_runtime())


recover = app.task(name=names.RECOVER, ignore_result=True, send_events=False)(_recover)
# The previous release's name (`names.RENAMED`), for a rolling upgrade's old beat.
recover_before_rename = app.task(name=names.RECOVER_BEFORE_RENAME, ignore_result=True,
                                 send_events=False)(_recover)
