"""Each attempt's output, kept after its sandbox is gone: one file per attempt, rotated.

A container's output lives in the engine's log driver and goes with the container, which the
worker removes at the attempt's end; an operator asking why a session failed then finds
nothing. So the worker copies it first, into `<dir>/<work id>/<attempt>.log`. A file keeps the
last `max_bytes` of the output (the end is where a failure is told), and the directory keeps
the newest `keep` files: writing a new one removes the oldest beyond that, so the disk use is
bounded by `keep * max_bytes`.
"""

from __future__ import annotations

import os
import re
from collections import deque
from collections.abc import Iterable
from pathlib import Path

__all__ = ["TRUNCATED", "attempt_path", "read_outputs", "write_output"]

# The first line of a file whose output was longer than the cap: the head was dropped.
TRUNCATED = b"[dispatcher: earlier output dropped; the last %d bytes follow]\n"
# A work id is a path component here: anything but these characters could walk the tree.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def attempt_path(directory: Path, work_id: str, attempt: int) -> Path:
    return directory / _UNSAFE.sub("_", work_id) / f"{attempt}.log"


def write_output(directory: Path, work_id: str, attempt: int, chunks: Iterable[bytes], *,
                 max_bytes: int, keep: int) -> Path:
    """Write the attempt's output (its last `max_bytes`), then rotate the directory."""
    tail: deque[bytes] = deque()
    size = 0
    dropped = False
    for chunk in chunks:
        tail.append(chunk)
        size += len(chunk)
        while size - len(tail[0]) >= max_bytes:
            size -= len(tail.popleft())
            dropped = True
    data = b"".join(tail)
    if len(data) > max_bytes:
        data, dropped = data[-max_bytes:], True
    path = attempt_path(directory, work_id, attempt)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # 0600: a session's output may hold what the session read; only the worker's user reads it.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        if dropped:
            file.write(TRUNCATED % max_bytes)
        file.write(data)
    _rotate(directory, keep)
    return path


def _rotate(directory: Path, keep: int) -> None:
    files = sorted(directory.glob("*/*.log"), key=_mtime, reverse=True)
    for old in files[keep:]:
        old.unlink(missing_ok=True)
        if not any(old.parent.iterdir()):
            old.parent.rmdir()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def read_outputs(directory: Path, work_id: str) -> list[tuple[int, Path]]:
    """The kept files of a work item, by attempt."""
    folder = attempt_path(directory, work_id, 0).parent
    found = [(int(p.stem), p) for p in folder.glob("*.log") if p.stem.isdigit()]
    return sorted(found)
