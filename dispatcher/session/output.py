"""Each attempt's output, kept after its sandbox is gone: one file per attempt, rotated.

A container's output lives in the engine's log driver and goes with the container, which the
worker removes at the attempt's end; an operator asking why a session failed then finds
nothing. So the worker copies it first, into `<dir>/<work id>/<attempt>.log`. A process
sandbox's stdout and stderr are one pipe the worker reads as the sandbox runs (`LiveOutput`,
`pump`) into the same file, so `dispatcher output` shows a running attempt's output too.

A file keeps the last `max_bytes` of the output (the end is where a failure is told), and the
directory the files of at most `keep` work items: an attempt's end that finds more work items'
folders than that removes the oldest files, down to nine tenths of `keep` (`_rotate`). The disk
use is bounded by `keep * max_bytes` for each attempt an item may have, and the running
attempts' files (a live file may reach twice its cap before it is cut back to its end).

Why nine tenths, and why folders: reading every kept file's time costs 15-25 ms of a worker's
CPU at a thousand files, and a worker ends as many attempts as it starts. Read at every end, it
would be most of a session worker's CPU in a burst (100 sessions ending at once read a thousand
files' times a hundred times, on the GIL the next sessions' starts need). So an end reads only
the directory's names (under a millisecond at a thousand), and the files' times once every
tenth of `keep` ends.

Why a pipe read by the worker and not the file given to the process: a process writing its own
file could fill the disk before the attempt ends, and nothing but the writer can cut a file's
head off while it appends. The price: output written after its worker died is lost (the
guardian ends the sandbox then anyway), and one small thread per running sandbox.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

__all__ = ["TRUNCATED", "LiveOutput", "attempt_path", "pump", "read_outputs", "write_output"]

# One read of a sandbox's pipe: the pipe's default capacity, so a chatty sandbox is drained in
# few calls.
READ_BYTES = 65536

# The first line of a file whose output was longer than the cap: the head was dropped.
TRUNCATED = b"[dispatcher: earlier output dropped; the last %d bytes follow]\n"
# A work id is a path component here: anything but these characters could walk the tree.
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
# The share of `keep` a rotation removes beyond it, so that the ends after it only count the
# directory's folders: the files' times are read once every `keep * share` ends, not at each.
# Under 10 kept, a rotation removes exactly what is beyond `keep`.
ROTATE_SLACK_SHARE = 0.1
# One rotation at a time in a process: the threads ending attempts together would each read
# every file's time for the same result.
_ROTATING = threading.Lock()


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
    with _create(path) as file:
        if dropped:
            file.write(TRUNCATED % max_bytes)
        file.write(data)
    _rotate(directory, keep)
    return path


def _create(path: Path) -> BinaryIO:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # 0600: a session's output may hold what the session read; only the worker's user reads it.
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    return os.fdopen(descriptor, "w+b")


class LiveOutput:
    """An attempt's output file written as the output comes: appended, and cut back to its last
    `max_bytes` (behind the `TRUNCATED` line) once it holds twice that. Only its writer cuts
    it, so no append is lost to a cut."""

    def __init__(self, directory: Path, work_id: str, attempt: int, *, max_bytes: int,
                 keep: int) -> None:
        self.path = attempt_path(directory, work_id, attempt)
        self.directory = directory
        self.max_bytes = max_bytes
        self.keep = keep
        self._file = _create(self.path)
        self._size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        self._size += len(chunk)
        if self._size >= 2 * self.max_bytes:
            self._cut()

    def _cut(self) -> None:
        self._file.seek(-self.max_bytes, os.SEEK_END)
        tail = self._file.read(self.max_bytes)
        self._file.seek(0)
        self._file.truncate()
        header = TRUNCATED % self.max_bytes
        self._file.write(header + tail)
        self._size = len(header) + len(tail)

    def close(self) -> None:
        """Close the file, then rotate the directory (this file among those kept)."""
        self._file.close()
        _rotate(self.directory, self.keep)


def pump(fd: int, sink: LiveOutput) -> threading.Thread:
    """A thread copying what the pipe `fd` brings into `sink` until end-of-file (every writer
    gone), then closing both."""

    def copy() -> None:
        keeping = True
        try:
            while chunk := os.read(fd, READ_BYTES):
                if keeping:
                    try:
                        sink.write(chunk)
                    except OSError:  # a full disk: read on, or the sandbox blocks on the pipe
                        keeping = False
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                sink.close()

    thread = threading.Thread(target=copy, name=f"output-{sink.path.parent.name[:40]}",
                              daemon=True)
    thread.start()
    return thread


def _rotate(directory: Path, keep: int) -> None:
    """More than `keep` work items' folders: the oldest files go, down to `keep` less a tenth
    (`ROTATE_SLACK_SHARE`), so the next ends only count folders. One rotation of a process at a
    time: one that finds another under way leaves it the work."""
    try:
        if len(os.listdir(directory)) <= keep:
            return
    except OSError:
        return  # the directory is gone or unreadable: nothing of ours to rotate
    if not _ROTATING.acquire(blocking=False):
        return
    try:
        files = sorted(_attempt_files(directory), reverse=True)
        for _, old in files[keep - int(keep * ROTATE_SLACK_SHARE):]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
            # A rotation beside this one, or a new attempt of the item, may fill or empty it.
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(old))
    finally:
        _ROTATING.release()


def _attempt_files(directory: Path) -> list[tuple[float, str]]:
    """(modification time, path) of every attempt's file under `directory`."""
    found = []
    with os.scandir(directory) as items:
        for item in items:
            if not item.is_dir(follow_symlinks=False):
                continue
            with contextlib.suppress(OSError), os.scandir(item.path) as attempts:
                for attempt in attempts:
                    if attempt.name.endswith(".log"):
                        with contextlib.suppress(FileNotFoundError):
                            found.append((attempt.stat(follow_symlinks=False).st_mtime,
                                          attempt.path))
    return found


def read_outputs(directory: Path, work_id: str) -> list[tuple[int, Path]]:
    """The kept files of a work item, by attempt."""
    folder = attempt_path(directory, work_id, 0).parent
    found = [(int(p.stem), p) for p in folder.glob("*.log") if p.stem.isdigit()]
    return sorted(found)
