"""Celery task modules: thin wrappers that hand each task to its `dispatcher` module.

The control plane's ticks send no task events (`send_events=False`): several a second, every
second, they would bury the sessions in Flower's task list and in every event consumer. What
they do shows in the lifecycle log lines and the metrics instead."""
