"""Whether this worker's container engine answers: the probe behind slot withdrawal.

A worker whose engine does not answer cannot start a sandbox; it withdraws its session slots
(`capacity`), so the poller claims for workers that can, and gives them back once the engine
answers again. Sessions already running keep running: their containers do not need the engine
to run, and their supervisors wait out the outage (`container._wait_exit`).

The probe is a `/_ping` with a short timeout, on a client of its own (the sandboxes' client
waits up to `ENGINE_TIMEOUT_SECONDS` for a create): an engine that cannot answer a ping in
`PROBE_TIMEOUT_SECONDS` counts as down.
"""

from __future__ import annotations

import docker
from docker.errors import DockerException
from requests.exceptions import RequestException

from dispatcher.settings import Settings

__all__ = ["PROBE_INTERVAL_SECONDS", "PROBE_TIMEOUT_SECONDS", "EngineProbe"]

# How often a session worker asks its engine whether it answers: with the timeout, the bound on
# how late the fleet learns of an outage (slots withdrawn within 2 s of it, given back within
# 2 s of the engine answering again).
PROBE_INTERVAL_SECONDS = 0.5
# A ping answers in milliseconds; one slower than this is an engine too loaded to start a
# sandbox in time.
PROBE_TIMEOUT_SECONDS = 1.0
DEFAULT_ENGINE = "unix:///var/run/docker.sock"


class EngineProbe:
    """Pings the engine; keeps its client while it answers, makes a new one after a failure
    (a client made while the engine was down negotiated nothing)."""

    def __init__(self, settings: Settings, *, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
        self.address = settings.docker_host or DEFAULT_ENGINE
        self.timeout = timeout
        self._client: docker.APIClient | None = None
        self.error = ""

    def answers(self) -> bool:
        try:
            if self._client is None:
                self._client = docker.APIClient(base_url=self.address, version="auto",
                                                timeout=self.timeout)
            self._client.ping()
        except (DockerException, RequestException, OSError) as exc:
            self.error = str(exc) or type(exc).__name__
            self.close()
            return False
        self.error = ""
        return True

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
