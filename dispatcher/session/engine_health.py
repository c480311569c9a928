"""Whether this worker's container engine answers: the probe behind slot withdrawal.

A worker whose engine does not answer cannot start a sandbox; it withdraws its session slots
(`capacity`), so the poller claims for workers that can, and gives them back once the engine
answers again. Sessions already running keep running: their containers do not need the engine
to run, and their supervisors wait out the outage (`container._wait_exit`).

The probe is a `/_ping` with a short timeout, on a client of its own (the sandboxes' client
waits up to `ENGINE_TIMEOUT_SECONDS` for a create): an engine that cannot answer a ping in
`PROBE_TIMEOUT_SECONDS` counts as down. An engine that answers but lost a configured image
(removed, pruned, a wiped data root) cannot start a sandbox either: every `IMAGE_CHECK_EVERY`
probes, and at every probe while one is missing, the probe inspects each image by the id the
worker resolved it to at start (a metadata look-up of milliseconds).

`engine_status` holds what the worker's probe last found, for the warm pool beside it in the
main process: it creates no container while the engine cannot start one, and refills at once
when it can again.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import docker
from docker.errors import DockerException, ImageNotFound
from requests.exceptions import RequestException

from dispatcher.control.capacity import ENGINE_DOWN, ENGINE_NO_IMAGE, ENGINE_UP
from dispatcher.settings import Settings

__all__ = ["IMAGE_CHECK_EVERY", "PROBE_INTERVAL_SECONDS", "PROBE_TIMEOUT_SECONDS",
           "EngineProbe", "EngineStatus", "engine_status", "image_setting"]

# How often a session worker asks its engine whether it answers: with the timeout, the bound on
# how late the fleet learns of an outage (slots withdrawn within 2 s of it, given back within
# 2 s of the engine answering again).
PROBE_INTERVAL_SECONDS = 0.5
# A ping answers in milliseconds; one slower than this is an engine too loaded to start a
# sandbox in time.
PROBE_TIMEOUT_SECONDS = 1.0
DEFAULT_ENGINE = "unix:///var/run/docker.sock"
# Probes between two looks at the images while they are there (every 2 s at the interval
# above): a lost image withdraws the slots within that, and a start that meets it first is
# restarted, not counted, so the look need not be as frequent as the ping.
IMAGE_CHECK_EVERY = 4


def image_setting(settings: Settings, image: str) -> str:
    """The setting an operator changes to fix `image`: the fleet's or the environments file."""
    return ("DISPATCHER_SANDBOX_IMAGE" if image == settings.sandbox_image
            else "DISPATCHER_ENVIRONMENTS_FILE")


class EngineProbe:
    """Pings the engine; keeps its client while it answers, makes a new one after a failure
    (a client made while the engine was down negotiated nothing)."""

    def __init__(self, settings: Settings, *, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
        self.address = settings.docker_host or DEFAULT_ENGINE
        self.timeout = timeout
        self.images = settings.sandbox_images()
        self._client: docker.APIClient | None = None
        self._probes = 0
        self.error = ""
        self.missing = ""  # the first configured image the engine lacks, as last looked

    def state(self) -> str:
        """ENGINE_UP, ENGINE_DOWN, or ENGINE_NO_IMAGE (`missing` names the image)."""
        if not self.answers():
            return ENGINE_DOWN
        if self.missing or self._probes % IMAGE_CHECK_EVERY == 0:
            try:
                self.missing = self._missing_image()
            except (DockerException, RequestException, OSError) as exc:
                self.error = str(exc) or type(exc).__name__
                self.close()
                return ENGINE_DOWN
        self._probes += 1
        return ENGINE_NO_IMAGE if self.missing else ENGINE_UP

    def _missing_image(self) -> str:
        from dispatcher.session.container import pinned_image

        assert self._client is not None  # answers() made it
        for image in self.images:
            try:
                self._client.inspect_image(pinned_image(image))
            except ImageNotFound:
                return image
        return ""

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


class EngineStatus:
    """What this process's engine probe last found; callbacks run when the engine can start
    sandboxes again."""

    def __init__(self) -> None:
        self.state = ENGINE_UP
        self._lock = threading.Lock()
        self._on_usable: list[Callable[[], None]] = []

    def usable(self) -> bool:
        return self.state == ENGINE_UP

    def on_usable(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._on_usable.append(callback)

    def set(self, state: str) -> None:
        with self._lock:
            was, self.state = self.state, state
            callbacks = list(self._on_usable) if state == ENGINE_UP != was else []
        for callback in callbacks:
            callback()


# The worker's main process has one probe (the slot advertiser's) and one warm pool.
engine_status = EngineStatus()
