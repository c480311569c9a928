"""The warm pool of the docker runtime: containers created and started ahead of work, each bound
to one session at claim time, and destroyed after it.

A cold start pays the engine's create and start per session (a copy of the image's root on some
storage drivers, the runtime's set-up: hundreds of milliseconds to seconds). A session worker
keeps up to `DISPATCHER_WARM_CONTAINERS` containers (never more than its free session slots)
started ahead of work, confined exactly as a cold container (`host_config_arguments`, the same
user, work directory, volume and labels but the work item's). Each runs the session's command
behind a few lines of shell that wait on stdin: the contract variables come first, one
`NAME=value` line each and an empty line, and are exported; then the shell execs the command,
which reads the rest of stdin, the work JSON, to its end, as a cold container's command does.
At claim the worker copies the secret file in when there is one (`put_archive` works on a
running container; never in the environment or labels) and writes both to the container's stdin.
Nothing is left of the shell: the command is the container's main process (under the engine's
init), so stops, the exit code and the output are exactly a cold container's
(`ContainerSandbox`). One container, one session: it is removed at the attempt's end, whatever
happened, and the pool makes another.

What the session waits for at claim is one Redis call and one write. The pool attaches each
container's stdin when it creates it (an engine round trip, and the engine's hijack of the
connection: 3 to 20 ms on this project's loaded test machine), and a claim in the pool's own
process (the threads pool, the default) writes to that socket. An attachment the engine closed
(it restarted, with or without live-restore) reads as EOF: that claim attaches anew and asks the
container's state, as a claim in another process (a prefork child) always does. A container
that dies idle otherwise is dropped by the pool's reconciliation; its launcher exits without
running the command if its stdin ends before the contract's last line, so no command ever runs
without its contract.

Why not the engine's exec: each exec is a `runc exec` (new process, namespaces joined, a hook
run), 100 to 170 ms on this project's loaded test machine, where a write to an attached stdin is
a few milliseconds; and an exec'd process is not the container's main process, so its signals,
exit code and output would each need a way of their own.

The pool's book (ready ids, bindings, owners) is in Redis (`warm_book.py`), so a prefork child
claims from the pool its main process fills, and the reaper can tell a bound container's
attempt and whether an unbound one's worker still lives.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import docker
from docker.errors import APIError, NotFound
from redis.exceptions import RedisError
from requests.exceptions import RequestException

from dispatcher.logs import event
from dispatcher.session.container import (
    LABEL_ENVIRONMENT,
    LABEL_FLEET,
    LABEL_FLEET_ID,
    SECRET_DIRECTORY,
    ContainerSandbox,
    create_arguments,
    engine,
    feed_stdin,
    host_config_arguments,
    pinned_image,
    secret_archive,
)
from dispatcher.session.sandbox import SandboxSpec
from dispatcher.session.warm_book import Binding, WarmBook

if TYPE_CHECKING:
    from dispatcher.metrics import Metrics
    from dispatcher.settings import Settings

__all__ = ["LABEL_WARM_OWNER", "WarmPool", "WarmSandbox", "claim_warm", "contract_header",
           "session_command"]

LABEL_WARM_OWNER = "dispatcher.warm_owner"
# What a warm container runs before its session: the contract's variables from stdin, one
# `NAME=value` line each up to an empty line, then the session's command (`"$@"`) in its place,
# reading the rest of stdin. `read` takes a pipe byte by byte, so not a byte of the work JSON is
# consumed. Stdin ending before the empty line (an attachment the engine closed while the
# container waited) exits with LAUNCHER_CUT_EXIT: the command never runs without its contract.
# Shell builtins only: the image needs `sh`.
LAUNCHER_CUT_EXIT = 75  # EX_TEMPFAIL: nothing ran; the pool removes it and makes another
LAUNCHER = (f'while IFS= read -r line || exit {LAUNCHER_CUT_EXIT}; [ -n "$line" ]; '
            'do export "$line"; done; exec "$@"')
# How often the pool looks whether it is full; a claim in this process wakes it at once.
FILL_INTERVAL_SECONDS = 0.25
# How often it compares its book with the engine's containers (one list call).
RECONCILE_SECONDS = 2.0
# After a failed create: first wait, and the most it doubles to.
BACKOFF_SECONDS = (1.0, 30.0)
# Claims tried before a cold start: a ready container may have died (engine restarted).
CLAIM_TRIES = 3

_wakeups: list[threading.Event] = []  # the pool of this process, if any: woken by a claim
# Container id -> its stdin, attached by the pool of this process (`_attached_pid`); a forked
# child never writes to its parent's sockets.
_attached: dict[str, Any] = {}
_attached_pid = os.getpid()


# --- the claim (in the process that runs the attempt) ----------------------------------------


def claim_warm(settings: Settings, spec: SandboxSpec, *, book: WarmBook, worker: str,
               metrics: Metrics | None = None) -> WarmSandbox | None:
    """The session started in a warm container of this worker's pool; None: the pool had none
    that works (the caller starts a cold one). Counted as a hit or a miss."""
    environment = spec.environment_id or settings.environment_id or ""
    settings = settings.sandbox_for(environment or None)
    sandbox = None
    header = contract_header(create_arguments(settings, spec)["environment"])
    for _ in range(CLAIM_TRIES if header is not None else 0):
        try:
            container_id = book.claim(worker, environment, Binding(spec.work_id, spec.attempt))
        except RedisError as exc:
            event("warm pool not read", level=logging.WARNING, work_id=spec.work_id,
                  error=str(exc), action_taken="cold start")
            break
        if container_id is None:
            break
        sandbox = WarmSandbox.bind(settings, spec, container_id, book=book,
                                   header=header or b"", stdin=take_attached(container_id))
        if sandbox is not None:
            break
    for wake in _wakeups:
        wake.set()
    if metrics is not None:
        metrics.inc("warm_starts", environment=environment,
                    result="hit" if sandbox is not None else "miss")
    return sandbox


def contract_header(env: dict[str, str]) -> bytes | None:
    """The variables as the launcher reads them; None when a value holds a line break, which
    no line could carry (that session starts cold)."""
    if any("\n" in value or "\0" in value for value in env.values()):
        return None
    return "".join(f"{name}={value}\n" for name, value in env.items()).encode() + b"\n"


def take_attached(container_id: str) -> Any | None:
    """The container's stdin as this process's pool attached it, if it did and the engine has
    not closed it since; None: the claim attaches itself."""
    if os.getpid() != _attached_pid:
        return None
    stream = _attached.pop(container_id, None)
    if stream is None:
        return None
    raw = getattr(stream, "_sock", stream)
    try:
        # Nothing ever comes on a stdin-only attachment: readable means the engine closed it.
        with _nonblocking(raw):
            closed = raw.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return stream
    except OSError:
        closed = True
    if closed:
        _close(stream)
    return None


@contextlib.contextmanager
def _nonblocking(raw: socket.socket) -> Iterator[None]:
    """One call that never waits: a socket with a timeout would wait for it (the flag
    MSG_DONTWAIT does not stop Python's wait for readiness)."""
    timeout = raw.gettimeout()
    raw.setblocking(False)
    try:
        yield
    finally:
        raw.settimeout(timeout)


def _forget_attached(container_id: str) -> None:
    stream = _attached.pop(container_id, None)
    if stream is not None:
        _close(stream)


def _close(stream: Any) -> None:
    with contextlib.suppress(OSError):
        stream.close()


def _send(stream: Any, data: bytes) -> None:
    """Write the stdin now, in this thread, as far as the socket's buffer takes it (all of a
    usual work item); a thread writes the rest and closes."""
    raw = getattr(stream, "_sock", stream)
    try:
        with _nonblocking(raw):
            sent = raw.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        sent = len(data)  # the container exited or closed stdin: its choice, as in feed_stdin
    if sent < len(data):
        threading.Thread(target=feed_stdin, args=(stream, data[sent:]), daemon=True).start()
        return
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_WR)
    _close(stream)


class _Look:
    """One engine call made in a thread of its own; `result` waits for it (and raises what it
    raised)."""

    def __init__(self, call: Callable[[], bool]) -> None:
        self._call = call
        self._value = False
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._call()
        except (APIError, RequestException) as exc:
            self._error = exc

    def result(self) -> bool:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


class WarmSandbox(ContainerSandbox):
    """A session bound to a warm container: from then on a cold container's twin (signalled,
    waited on and removed through the engine), and unbound in the book when removed."""

    def __init__(self, api: docker.APIClient, container_id: str, *, settings: Settings,
                 spec: SandboxSpec, book: WarmBook) -> None:
        super().__init__(api, container_id, settings=settings, spec=spec)
        self._book = book

    @classmethod
    def bind(cls, settings: Settings, spec: SandboxSpec, container_id: str, *,
             book: WarmBook, header: bytes, stdin: Any | None = None) -> WarmSandbox | None:
        """Start the session in the container, through `stdin` when the pool attached it;
        None (and the container removed) when it cannot: it died in the pool, or the engine
        refused."""
        api = engine(settings)
        sandbox = cls(api, container_id, settings=settings, spec=spec, book=book)
        # A container that died in the pool (an engine restarted without live-restore) still
        # takes an attach, and would end the attempt at once: when the session must attach, it
        # asks beside the attach, so it waits for the slower of the two calls, not for both.
        # A stdin the pool attached was attached to a running container.
        running = None if stdin is not None else _Look(
            lambda: bool(api.inspect_container(container_id)["State"]["Running"]))
        try:
            if spec.secret_file is not None:
                api.put_archive(container_id, SECRET_DIRECTORY,
                                secret_archive(spec.secret_file, settings.sandbox_user))
            if running is not None:
                stdin = api.attach_socket(container_id, params={"stdin": 1, "stream": 1})
                if not running.result():
                    raise APIError("the container does not run any more")
        except (APIError, RequestException) as exc:
            if stdin is not None:
                _close(stdin)
            sandbox._unusable(exc)
            return None
        _send(stdin, header + spec.stdin)
        threading.Thread(target=sandbox._wait_exit, daemon=True).start()
        return sandbox

    def _unusable(self, exc: Exception) -> None:
        assert self._spec is not None
        event("warm container not usable", level=logging.WARNING, work_id=self._spec.work_id,
              container=self.id[:12], error=str(exc), action_taken="removed")
        self._settings = None  # nothing ran in it: no output to keep
        self.kill_group()

    def describe(self) -> dict[str, str | int]:
        return {"container": self.id[:12], "start": "warm"}

    def kill_group(self) -> None:
        super().kill_group()
        if self._removed:
            with contextlib.suppress(RedisError):  # the reaper unbinds what is left
                self._book.unbind(self.id)


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
    the slots they leave free. `engine_usable` is the worker's engine probe (`engine_health`):
    while it says the engine cannot start a sandbox (down, or an image lost), the pool neither
    creates nor reconciles (every call would fail, and a backoff grown meanwhile would delay
    the refill); `engine_back` refills at once when it can again, reconciling first, so warm
    containers that did not survive a restart are dropped and removed. `attach_stdin`: the
    sessions are claimed in this process, so each container's stdin is attached when it is
    made, off the session's path."""

    def __init__(self, settings: Settings, book: WarmBook, *, worker: str, slots: int,
                 environments: list[str], busy: Callable[[], int],
                 engine_usable: Callable[[], bool] = lambda: True,
                 attach_stdin: bool = True) -> None:
        self.settings = settings
        self.engine_usable = engine_usable
        self.book = book
        self.worker = worker
        self.slots = slots
        self.environments = environments or [""]
        self.busy = busy
        self.attach_stdin = attach_stdin
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

    def engine_back(self) -> None:
        """The engine can start sandboxes again: drop the idle containers, then reconcile
        (which removes them) and fill now, no backoff left. Called by the probe before it
        gives the slots back, so no session is bound to one of them meanwhile.

        Why drop containers that may still run: a dockerd restarted with live-restore takes
        its running containers back, and a new attach still writes to their stdin, but closing
        it no longer closes theirs (the engine's stdin-once is lost in the restore; dockerd
        20.10 here). A warm container's command reads the work JSON to its end: bound to one,
        a session would wait forever. After a mere lapse of the probe this costs a re-create."""
        with contextlib.suppress(RedisError):  # the book unreachable: the next tick says so
            for environment in self.environments:
                while self.book.take_ready(self.worker, environment) is not None:
                    pass
        self._retry_at, self._backoff = 0.0, BACKOFF_SECONDS[0]
        self._reconciled_at = 0.0
        self.wake.set()

    def tick(self) -> None:
        # First: a container being created (seconds on a copying storage driver) must never
        # be seen by a reaper without its owner's key.
        self.book.alive(self.owner, self._size)
        if not self.engine_usable():
            return
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
                   "entrypoint": ["sh", "-c", LAUNCHER, "warm"],
                   "command": session_command(settings, api), "environment": {},
                   "name": f"{settings.key_prefix}-warm-{uuid.uuid4().hex[:12]}",
                   "labels": self._labels(settings, environment)})
            container_id = str(created["Id"])
            try:
                api.start(container_id)
                if self.attach_stdin:
                    _attached[container_id] = api.attach_socket(
                        container_id, params={"stdin": 1, "stream": 1})
            except (APIError, RequestException):
                _forget_attached(container_id)
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
        died = 0
        for environment in self.environments:
            for container_id in self.book.ready(self.worker, environment):
                if container_id not in running and self.book.forget_ready(
                        self.worker, environment, container_id):
                    self._remove(container_id)
                    died += 1
                else:
                    ready.add(container_id)
        if died:  # an engine restarted, or an image whose `sh` is missing: do not churn
            self._failed("warm container not created", APIError(
                f"{died} warm container(s) exited while idle (an engine restart, or an image "
                "without `sh`)"))
        others = [str(c["Id"]) for c in listed if str(c["Id"]) not in ready]
        bound = self.book.bindings(others)
        for container_id in others:
            if container_id not in bound:
                self._remove(container_id)

    def _remove(self, container_id: str) -> None:
        _forget_attached(container_id)
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
