"""The Celery glue: the app, its beat scheduler, the worker's signals and bootsteps, and the
task names every part refers to.

`celery -A dispatcher` looks for `dispatcher.celery` and takes its `app`, built on first use,
so importing a task name from here does not build the app (nor read the settings).
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from dispatcher.celery.application import app

        return app
    raise AttributeError(name)
