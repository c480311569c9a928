"""The warm pool of the docker runtime: containers created and started ahead of work, each bound
to one session at claim time, and destroyed after it.

A cold start pays the engine's create and start per session (a copy of the image's root on some
storage drivers, the runtime's set-up: hundreds of milliseconds to seconds). A session worker
keeps up to `DISPATCHER_WARM_CONTAINERS` containers (never more than its free session slots)
running an idle command, confined exactly as a cold container (`host_config_arguments`, the
same user, work directory and labels but the work item's). At claim, the session's command runs
in one through the engine's exec, with its contract variables and the work JSON on stdin; the
secret file, when one is delivered, is copied in first as for a cold container (`put_archive`
works on a running container; never in the environment or labels). One container, one session:
the container is removed at the attempt's end, whatever happened, and the pool makes another.

Stops reach the exec'd command as they reach a cold container's: the engine signals PID 1, the
idle shell, which passes SIGTERM on to the session's command (as the engine's init passes it to
a cold container's command); SIGKILL of PID 1 ends the PID namespace, every process with it;
`kill_group` removes the container. The exit code is the exec's
(`exec_inspect`), and its output, which goes to the exec's stream rather than the container's
log, is kept (its last `DISPATCHER_SANDBOX_OUTPUT_MAX_BYTES`) and written like a cold attempt's.

The pool's book (ready ids, bindings, owners) is in Redis (`warm_book.py`), so a prefork child
claims from the pool its main process fills, and the reaper can tell a bound container's
attempt and whether an unbound one's worker still lives.
"""

from __future__ import annotations

import contextlib
import logging
import select
import shlex
import signal
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import docker
from docker.errors import APIError, NotFound
from redis.exceptions import RedisError
from requests.exceptions import RequestException

from dispatcher.logs import event
from dispatcher.session.container import (
    EXIT_VANISHED,
    LABEL_ENVIRONMENT,
    LABEL_FLEET,
    LABEL_FLEET_ID,
    SECRET_DIRECTORY,
    ContainerSandbox,
    _feed,
    create_arguments,
    engine,
    host_config_arguments,
    pinned_image,
    secret_archive,
)
from dispatcher.session.output import write_output
from dispatcher.session.sandbox import SandboxSpec
from dispatcher.session.warm_book import Binding, WarmBook

if TYPE_CHECKING:
    from dispatcher.metrics import Metrics
    from dispatcher.settings import Settings

__all__ = ["LABEL_WARM_OWNER", "WarmPool", "WarmSandbox", "claim_warm"]

LABEL_WARM_OWNER = "dispatcher.warm_owner"
# The warm container's PID 1 (under the engine's init when DISPATCHER_SANDBOX_INIT), shell
# builtins and `sleep` only: idle until the engine signals it. A SIGTERM is passed on to the
# exec'd session command alone, as the engine's init passes it to a cold container's command
# alone: the session is the process whose parent is outside the container's PID namespace
# (`PPid: 0`), PID 1 aside. `wait` returns when the trap ran or the sleep ended: idle again.
IDLE_SCRIPT = (
    'term() { for d in /proc/[0-9]*; do p=${d#/proc/}; [ "$p" = 1 ] && continue; '
    'while read -r k v; do [ "$k" = PPid: ] && { [ "$v" = 0 ] && kill -TERM "$p"; break; }; '
    'done < "$d/status"; done 2>/dev/null; }; '
    'trap term TERM; while :; do sleep 3600 & wait $!; done')
# How often the pool looks whether it is full; a claim in this process wakes it at once.
FILL_INTERVAL_SECONDS = 0.25
# How often it compares its book with the engine's containers (one list call).
RECONCILE_SECONDS = 2.0
# After a failed create: first wait, and the most it doubles to.
BACKOFF_SECONDS = (1.0, 30.0)
# A session's exec is looked at this often when its stream says nothing (a child of the command
# may hold the stream open after the command exited).
LOOK_SECONDS = 1.0
# After the stream ended, how long the engine may take to record the exec's exit.
EXIT_RECORD_SECONDS = 5.0
# How long `kill_group` waits for the output stream to drain after the removal.
DRAIN_SECONDS = 2.0
# Claims tried before a cold start: a ready container may have died (engine restarted).
CLAIM_TRIES = 3
_FRAME = struct.Struct(">BxxxL")  # the engine's multiplexed stream: kind, size

_wakeups: list[threading.Event] = []  # the pool of this process, if any: woken by a claim


# --- the claim (in the process that runs the attempt) ----------------------------------------


def claim_warm(settings: Settings, spec: SandboxSpec, *, book: WarmBook, worker: str,
               metrics: Metrics | None = None) -> WarmSandbox | None:
    """The session started in a warm container of this worker's pool; None: the pool had none
    that works (the caller starts a cold one). Counted as a hit or a miss."""
    environment = spec.environment_id or settings.environment_id or ""
    settings = settings.sandbox_for(environment or None)
    sandbox = None
    for _ in range(CLAIM_TRIES):
        try:
            container_id = book.claim(worker, environment, Binding(spec.work_id, spec.attempt))
        except RedisError as exc:
            event("warm pool not read", level=logging.WARNING, work_id=spec.work_id,
                  error=str(exc), action_taken="cold start")
            break
        if container_id is None:
            break
        sandbox = WarmSandbox.bind(settings, spec, container_id, book=book)
        if sandbox is not None:
            break
    for wake in _wakeups:
        wake.set()
    if metrics is not None:
        metrics.inc("warm_starts", environment=environment,
                    result="hit" if sandbox is not None else "miss")
    return sandbox


class WarmSandbox(ContainerSandbox):
    """A session exec'd in a warm container: signalled through the container's PID 1, waited on
    through its exec, removed at the end like a cold one."""

    def __init__(self, api: docker.APIClient, container_id: str, *, settings: Settings,
                 spec: SandboxSpec, book: WarmBook) -> None:
        super().__init__(api, container_id, settings=settings, spec=spec)
        self.exec_id = ""
        self._book = book
        self._tail: deque[bytes] = deque()
        self._tail_size = 0
        self._follower: threading.Thread | None = None

    @classmethod
    def bind(cls, settings: Settings, spec: SandboxSpec, container_id: str, *,
             book: WarmBook) -> WarmSandbox | None:
        """Run the session in the container; None (and the container removed) when it cannot:
        the container died in the pool, or the engine refused."""
        sandbox = cls(engine(settings), container_id, settings=settings, spec=spec, book=book)
        try:
            stream = sandbox._exec(settings, spec)
        except (APIError, RequestException, OSError) as exc:
            event("warm container not usable", level=logging.WARNING, work_id=spec.work_id,
                  container=container_id[:12], error=str(exc), action_taken="removed")
            sandbox._settings = None  # nothing ran in it: no output to keep
            sandbox.kill_group()
            return None
        raw = getattr(stream, "_sock", stream)
        threading.Thread(target=_feed, args=(stream, spec.stdin), daemon=True).start()
        sandbox._follower = threading.Thread(target=sandbox._follow, args=(raw,), daemon=True)
        sandbox._follower.start()
        return sandbox

    def _exec(self, settings: Settings, spec: SandboxSpec) -> Any:
        api = self._api
        if spec.secret_file is not None:
            api.put_archive(self.id, SECRET_DIRECTORY,
                            secret_archive(spec.secret_file, settings.sandbox_user))
        arguments = create_arguments(settings, spec)
        created = api.exec_create(
            self.id, session_command(settings, api), stdin=True, stdout=True, stderr=True,
            environment=arguments["environment"], user=settings.sandbox_user,
            workdir=settings.sandbox_workdir)
        self.exec_id = str(created["Id"])
        self.started_at = time.time()
        return api.exec_start(self.exec_id, socket=True)

    def describe(self) -> dict[str, str | int]:
        return {"container": self.id[:12], "start": "warm"}

    def _follow(self, raw: socket.socket) -> None:
        """Read the exec's output until it ends, then its exit code from the engine."""
        pending = b""
        while True:
            try:
                readable, _, _ = select.select([raw], [], [], LOOK_SECONDS)
                if not readable:
                    if self._exec_exited():
                        break  # its stream is held open by something the command left
                    continue
                data = raw.recv(65536)
            except (OSError, ValueError):  # ValueError: closed under us
                break
            if not data:
                break
            pending = self._frames(pending + data)
        with contextlib.suppress(OSError):
            raw.close()
        deadline = time.monotonic() + EXIT_RECORD_SECONDS
        while self._exit_code is None and not self._exec_exited() \
                and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._exit_code is None:
            self._exit_code = EXIT_VANISHED
        self._exited.set()

    def _frames(self, buffer: bytes) -> bytes:
        """Keep the payload of each whole frame (the last `max_bytes`); returns the rest."""
        limit = self._settings.sandbox_output_max_bytes if self._settings else 0
        while len(buffer) >= _FRAME.size:
            _, size = _FRAME.unpack_from(buffer)
            if len(buffer) < _FRAME.size + size:
                break
            self._tail.append(buffer[_FRAME.size:_FRAME.size + size])
            self._tail_size += size
            while self._tail and self._tail_size - len(self._tail[0]) >= limit:
                self._tail_size -= len(self._tail.popleft())
            buffer = buffer[_FRAME.size + size:]
        return buffer

    def _exec_exited(self) -> bool:
        """Whether the engine says the exec ended; records its code when it did."""
        try:
            found = self._api.exec_inspect(self.exec_id)
        except NotFound:
            self._exit_code = EXIT_VANISHED
            return True
        except (APIError, RequestException):
            return False  # the engine restarting: look again later
        if found.get("Running"):
            return False
        code = found.get("ExitCode")
        self._exit_code = EXIT_VANISHED if code is None else int(code)
        return True

    def _wait_exit(self) -> None:
        raise AssertionError("a warm sandbox's exit is its exec's (`_follow`)")

    def kill_group(self) -> None:
        super().kill_group()
        if self._removed:
            with contextlib.suppress(RedisError):  # the reaper unbinds what is left
                self._book.unbind(self.id)

    def _keep_output(self) -> None:
        """Kill PID 1 (the namespace dies with it), let the stream drain, write its tail."""
        if self._settings is None or self._spec is None:
            return
        self.signal_group(signal.SIGKILL)
        if self._follower is not None:
            self._follower.join(DRAIN_SECONDS)
        settings, spec = self._settings, self._spec
        try:
            write_output(settings.output_directory, spec.work_id, spec.attempt,
                         list(self._tail), max_bytes=settings.sandbox_output_max_bytes,
                         keep=settings.sandbox_output_keep)
        except OSError as exc:
            event("output not kept", level=logging.WARNING, work_id=spec.work_id,
                  attempt=spec.attempt, container=self.id[:12], error=str(exc))


# Image id -> its entry point and command, read once per process (an id never changes).
_commands: dict[str, tuple[list[str], list[str]]] = {}


def session_command(settings: Settings, api: docker.APIClient) -> list[str]:
    """What a cold container of these settings would run: the image's entry point, then
    DISPATCHER_SANDBOX_COMMAND or the image's command (the engine's own rule)."""
    image = pinned_image(settings.sandbox_image or "")
    if image not in _commands:
        config = api.inspect_image(image).get("Config") or {}
        _commands[image] = (list(config.get("Entrypoint") or []), list(config.get("Cmd") or []))
    entrypoint, command = _commands[image]
    if settings.sandbox_command:
        return [*entrypoint, *shlex.split(settings.sandbox_command)]
    return [*entrypoint, *command]


# --- the pool (in the worker's main process) -------------------------------------------------


class WarmPool:
    """Keeps each environment's ready containers at its share of the target, in the background.

    `busy` says how many sessions the worker runs now: the pool never holds more containers than
    the slots they leave free."""

    def __init__(self, settings: Settings, book: WarmBook, *, worker: str, slots: int,
                 environments: list[str], busy: Callable[[], int]) -> None:
        self.settings = settings
        self.book = book
        self.worker = worker
        self.slots = slots
        self.environments = environments or [""]
        self.busy = busy
        self.owner = f"{worker}#{uuid.uuid4().hex[:8]}"
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._failing = False
        self._retry_at = 0.0
        self._backoff = BACKOFF_SECONDS[0]
        self._reconciled_at = 0.0
        self._size = 0

    def targets(self) -> dict[str, int]:
        """Each environment's share of the containers to keep ready now."""
        total = max(0, min(self.settings.warm_containers, self.slots - self.busy()))
        share, extra = divmod(total, len(self.environments))
        return {e: share + (1 if i < extra else 0) for i, e in enumerate(self.environments)}

    def run(self) -> None:
        """The pool's thread: fill, shrink, reconcile, until `stop`; never raises."""
        _wakeups.append(self.wake)
        for environment in self.environments:
            with contextlib.suppress(RedisError):
                self.book.clear(self.worker, environment)
        while not self._stop.is_set():
            try:
                self.tick()
            except RedisError as exc:
                self._failed("warm pool book unreachable", exc)
            self.wake.wait(FILL_INTERVAL_SECONDS)
            self.wake.clear()
        self._empty()

    def stop(self) -> None:
        self._stop.set()
        self.wake.set()

    def tick(self) -> None:
        # First: a container being created (seconds on a copying storage driver) must never
        # be seen by a reaper without its owner's key.
        self.book.alive(self.owner, self._size)
        now = time.monotonic()
        if now - self._reconciled_at >= RECONCILE_SECONDS and now >= self._retry_at:
            self._reconcile()
            self._reconciled_at = now
        size = 0
        for environment, target in self.targets().items():
            ready = self.book.ready(self.worker, environment)
            while len(ready) > target:  # more than the free slots: give some back
                extra = self.book.take_ready(self.worker, environment)
                if extra is None:
                    break
                if extra in ready:
                    ready.remove(extra)
                self._remove(extra)
            while len(ready) < target and time.monotonic() >= self._retry_at \
                    and not self._stop.is_set():
                created = self._create(environment)
                if created is None:
                    break
                self.book.add_ready(self.worker, environment, created)
                ready.append(created)
                self.book.alive(self.owner, self._size)  # creates may outlast the key
            size += len(ready)
        self._size = size
        self.book.alive(self.owner, size)

    def _create(self, environment: str) -> str | None:
        settings = self.settings.sandbox_for(environment or None)
        try:
            api = engine(settings)
            arguments = create_arguments(settings, _IDLE_SPEC,
                                         image=pinned_image(settings.sandbox_image or ""))
            created = api.create_container(
                host_config=api.create_host_config(**host_config_arguments(settings)),
                **{**arguments,
                   "entrypoint": ["sh", "-c", IDLE_SCRIPT, "warm"], "command": [],
                   "stdin_open": False, "environment": {},
                   "name": f"{settings.key_prefix}-warm-{uuid.uuid4().hex[:12]}",
                   "labels": self._labels(settings, environment)})
            container_id = str(created["Id"])
            try:
                api.start(container_id)
            except (APIError, RequestException):
                with contextlib.suppress(APIError, RequestException):
                    api.remove_container(container_id, force=True, v=True)
                raise
        except (APIError, RequestException) as exc:
            self._failed("warm container not created", exc)
            return None
        if self._failing:
            event("warm pool filling again", worker=self.worker)
        self._failing, self._backoff = False, BACKOFF_SECONDS[0]
        return container_id

    def _labels(self, settings: Settings, environment: str) -> dict[str, str]:
        labels = dict(label.split("=", 1) for label in settings.sandbox_labels)
        labels.update({LABEL_FLEET: settings.key_prefix, LABEL_FLEET_ID: settings.fleet_id or "",
                       LABEL_ENVIRONMENT: environment, LABEL_WARM_OWNER: self.owner})
        return labels

    def _failed(self, what: str, exc: Exception) -> None:
        """Said once per outage; tried again after a backoff that doubles up to its bound."""
        if not self._failing:
            event(what, level=logging.WARNING, worker=self.worker,
                  error=str(getattr(exc, "explanation", None) or exc),
                  action_taken="sessions start cold; retried with backoff")
        self._failing = True
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, BACKOFF_SECONDS[1])

    def _reconcile(self) -> None:
        """Drop ready ids whose container no longer runs (an engine restarted without
        live-restore), and remove containers of ours that are neither ready nor bound."""
        try:
            api = engine(self.settings)
            listed = api.containers(all=True, filters={
                "label": [f"{LABEL_WARM_OWNER}={self.owner}"]})
        except (APIError, RequestException) as exc:
            self._failed("warm pool cannot list its containers", exc)
            return
        running = {str(c["Id"]) for c in listed if c.get("State") == "running"}
        ready: set[str] = set()
        for environment in self.environments:
            for container_id in self.book.ready(self.worker, environment):
                if container_id not in running and self.book.forget_ready(
                        self.worker, environment, container_id):
                    self._remove(container_id)
                else:
                    ready.add(container_id)
        others = [str(c["Id"]) for c in listed if str(c["Id"]) not in ready]
        bound = self.book.bindings(others)
        for container_id in others:
            if container_id not in bound:
                self._remove(container_id)

    def _remove(self, container_id: str) -> None:
        try:
            engine(self.settings).remove_container(container_id, force=True, v=True)
        except NotFound:
            pass
        except (APIError, RequestException) as exc:
            event("warm container not removed", level=logging.WARNING,
                  container=container_id[:12], error=str(exc), action_taken="left to the reaper")

    def _empty(self) -> None:
        """At the worker's stop: its idle containers go; the bound ones end with their sessions."""
        with contextlib.suppress(ValueError):
            _wakeups.remove(self.wake)
        try:
            for environment in self.environments:
                while (container_id := self.book.take_ready(self.worker, environment)):
                    self._remove(container_id)
            self.book.gone(self.owner)
        except RedisError as exc:
            event("warm pool not emptied", level=logging.WARNING, worker=self.worker,
                  error=str(exc), action_taken="left to the reaper")


# What a warm container is created with: no work item yet, but a secret directory, so a
# session that gets the secret as a file can be bound to any of them.
_IDLE_SPEC = SandboxSpec(argv=[], env={}, stdin=b"", secret_file="")
