"""The Celery glue: the app, its beat scheduler, and the worker's signals and bootsteps.

`celery -A dispatcher` looks for `dispatcher.celery` and takes its `app`.
"""

from dispatcher.celery.app import app

__all__ = ["app"]
