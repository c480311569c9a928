"""Celery task modules: thin wrappers that hand each task to its `dispatcher` module."""
