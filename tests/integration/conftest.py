"""The `runtime` fixture: a dispatcher runtime on real Redis and the session's emulator."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from dispatcher.runtime import Runtime
from tests.support.inprocess import in_process_runtime


@pytest.fixture
def runtime(emulator: Any) -> Iterator[Runtime]:
    with in_process_runtime(emulator) as rt:
        yield rt
