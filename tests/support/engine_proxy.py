"""A unix-socket relay in front of the Docker engine's socket, to inject engine faults for real.

Workers are pointed at it through `DOCKER_HOST=unix://<relay.path>`; every byte goes to the
real engine and back, except what a fault changes:

* `down()`: the engine is gone: the socket stops accepting (connections are refused) and every
  open connection is cut, as when dockerd dies; `up()` brings it back.
* `delay_create`: each container create waits this long before it reaches the engine (an engine
  slow to create a container: vfs copying an image, a loaded host). A create waiting here is
  released at once by `down()` (cut), by `fail_create` (answered), or by a shorter delay.
* `fail_create`: each create, waiting or new, is answered 400 as the engine answers a container
  it refuses for its own reasons (the session's failure, not the infrastructure's).

A create is recognised by its request line at the start of a chunk from the client: the docker
client sends a request's head in one write, and a hijacked stream (attach) carries only what a
session reads on stdin. Threads, no asyncio: one pair of pumps per connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["EngineRelay"]

ENGINE_SOCKET = "/var/run/docker.sock"
# How often a held create looks whether a fault released it.
HOLD_POLL_SECONDS = 0.05
_REFUSAL = b'{"message":"injected: the engine refused the container as given"}'
REFUSED = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
           + f"Content-Length: {len(_REFUSAL)}\r\nConnection: close\r\n\r\n".encode()
           + _REFUSAL)


class EngineRelay:
    def __init__(self, upstream: str = ENGINE_SOCKET) -> None:
        self.upstream = upstream
        # Short: a unix socket's path is limited to 108 bytes, and pytest's tmp paths are long.
        self.directory = tempfile.mkdtemp(prefix="engrelay-", dir="/tmp")
        self.path = os.path.join(self.directory, "docker.sock")
        self.delay_create = 0.0
        self.fail_create = False
        self.creates = 0  # creates that reached the engine
        self.holding = 0  # creates being held now
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._closed = False
        self.up()

    @property
    def docker_host(self) -> str:
        return f"unix://{self.path}"

    # --- faults --------------------------------------------------------------------------------
    def up(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(self.path)
            os.chmod(self.path, 0o666)
            listener.listen(128)
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True,
                         name="relay-accept").start()

    def down(self) -> None:
        """The engine dies: refuse new connections, cut every open one."""
        with self._lock:
            listener, self._listener = self._listener, None
            connections = list(self._connections)
            self._connections.clear()
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        for conn in connections:
            _cut(conn)

    @property
    def is_down(self) -> bool:
        return self._listener is None

    def close(self) -> None:
        self._closed = True
        self.down()
        with contextlib.suppress(OSError):
            Path(self.directory).rmdir()

    # --- relaying ------------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            engine = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                engine.connect(self.upstream)
            except OSError:  # the engine behind is down itself (a test stopped it)
                _cut(engine)
                _cut(client)
                continue
            with self._lock:
                if self._listener is not listener:  # went down meanwhile
                    _cut(client)
                    _cut(engine)
                    return
                self._connections.update((client, engine))
            threading.Thread(target=self._pump, args=(client, engine, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(engine, client, False),
                             daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    with contextlib.suppress(OSError):
                        sink.shutdown(socket.SHUT_WR)
                    return
                if from_client and _is_create(data):
                    if not self._hold(source):
                        return
                    if self.fail_create:
                        source.sendall(REFUSED)
                        _cut(source)
                        _cut(sink)
                        return
                    self.creates += 1
                sink.sendall(data)
        except OSError:
            _cut(source)
            _cut(sink)

    def _hold(self, client: socket.socket) -> bool:
        """Keep a create for `delay_create` seconds; False if the engine went down meanwhile
        (the connection is cut)."""
        since = time.monotonic()
        with self._lock:
            self.holding += 1
        try:
            # The delay read on every turn: a test may shorten it to let held creates through.
            while time.monotonic() < since + self.delay_create and not self.fail_create:
                if self.is_down or self._closed:
                    _cut(client)
                    return False
                time.sleep(HOLD_POLL_SECONDS)
        finally:
            with self._lock:
                self.holding -= 1
        if self.is_down:
            _cut(client)
            return False
        return True


def _is_create(data: bytes) -> bool:
    line = data.split(b"\r\n", 1)[0]
    return line.startswith(b"POST ") and b"/containers/create" in line


def _cut(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        conn.close()
