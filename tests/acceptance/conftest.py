"""Fixtures of the acceptance tests (the fleet itself lives in fleet.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fleet import FLEET_REDIS_DB, Fleet


@pytest.fixture
def fleet(emulator: Any, tmp_path: Path) -> Iterator[Fleet]:
    base = os.environ.get("DISPATCHER_TEST_REDIS", "redis://127.0.0.1:6379")
    with redis.Redis.from_url(f"{base}/{FLEET_REDIS_DB}") as r:
        r.flushdb()
    f = Fleet(emulator, tmp_path, base)
    try:
        yield f
    finally:
        f.stop_all()
