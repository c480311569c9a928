"""Serve the emulator with uvicorn on 127.0.0.1 until SIGTERM or Ctrl-C.

uvicorn installs the SIGTERM/SIGINT handlers and drains open requests (long polls end within a
second) before it exits. The protocol and loop are pinned, for CPU: a heartbeat capacity run
sends the emulator thousands of requests a second, and httptools (C) and uvloop (libuv) parse
and schedule them for less than h11's and asyncio's pure Python (with the proxy headers off, a
heartbeat's CPU fell by about a seventh). A dropped-connection fault relies on how uvicorn's
httptools protocol answers an ASGI call that returns a value: as its h11 protocol, it closes the
socket and writes nothing (`RequestResponseCycle.run_asgi`, uvicorn 0.54).
"""

from __future__ import annotations

import logging
import socket
import sys
from types import FrameType
from typing import Any

import uvicorn

from ..heap import freeze_startup_heap
from .app import create_app
from .config import EmulatorConfig
from .context import Emulator
from .faults import FaultSettings

__all__ = ["serve"]

# Long polls last under a second; give them that, and a margin, before closing at shutdown.
GRACEFUL_SHUTDOWN_S = 3


class _DroppedConnectionFilter(logging.Filter):
    """uvicorn logs an error for each deliberately dropped connection: that is the fault, not
    a failure of the server, so keep it out of the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ASGI callable should return None")


class _Server(uvicorn.Server):
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down; for the emulator a stop on request
        # is a clean finish, so it exits 0 (supervisors and `docker compose` show no failure).
        self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            host, port = self._bound()
            print(f"dispatcher emulator listening on http://{host}:{port}", flush=True)

    def _bound(self) -> tuple[str, int]:
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                return str(host), int(port)
        return self.config.host, self.config.port


async def _announce(emulator: Emulator) -> None:
    """`--create-environment NAME`: the environments a demo needs, with their ids printed."""
    for name in emulator.config.create_environments:
        environment = await emulator.store.create_environment(name, {"type": "self_hosted"})
        print(f"environment {name}: {environment['id']}", flush=True)
    for environment_id in emulator.config.environment_ids:
        await emulator.store.create_environment(environment_id, {"type": "self_hosted"},
                                                environment_id=environment_id)
        print(f"environment {environment_id}: {environment_id}", flush=True)


async def _started(emulator: Emulator) -> None:
    await _announce(emulator)
    freeze_startup_heap()


def serve(config: EmulatorConfig, faults: FaultSettings, *, log_level: str = "warning") -> int:
    app: Any = create_app(config, faults=faults, on_startup=_started)
    logging.getLogger("uvicorn.error").addFilter(_DroppedConnectionFilter())
    # No proxy headers: the emulator listens on loopback for its own clients, never behind a
    # proxy, and uvicorn's middleware for them cost a heartbeat about 4% of its CPU.
    server = _Server(uvicorn.Config(
        app, host=config.host, port=config.port, http="httptools", loop="uvloop",
        lifespan="on", proxy_headers=False, log_level=log_level, access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S))
    server.run()
    if not server.started:
        print("dispatcher emulator: did not start (see the errors above)", file=sys.stderr)
        return 1
    return 0
