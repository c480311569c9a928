"""The docker sandbox runtime: one container per session attempt, through the Docker Engine API.

A `docker run` client inside an on-work script cannot be killed reliably: SIGKILL of the client
leaves its container running, with the environment key and the work secret. Here the worker
talks to the engine itself, so every stop reaches the container and every container is removed.

What a container gets is what a process sandbox gets: the contract variables in its environment
and the work item JSON, secret included, on its stdin (attached before the start, written, then
closed). The secret is never in the container's environment, labels or command, so `docker
inspect` never shows it; a sandbox that holds its own lease may get it as a 0600 file copied
into the container before it starts. Labels name the fleet, environment, work item, session and
attempt, so the reaper can find containers nobody supervises any more.

The docker client is created per process, never shared across a fork (a forked copy would share
the parent's sockets).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shlex
import socket
import tarfile
import threading
import time
from typing import Any

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from requests.exceptions import RequestException

from dispatcher.logs import event
from dispatcher.session.infra import Blame, engine_blame
from dispatcher.session.output import write_output
from dispatcher.session.sandbox import (
    EngineError,
    SandboxInfraError,
    SandboxSpec,
    SandboxStartError,
)
from dispatcher.settings import PullPolicy, Settings

__all__ = [
    "CONTAINER_SECRET_PATH",
    "LABEL_ATTEMPT",
    "LABEL_ENVIRONMENT",
    "LABEL_FLEET",
    "LABEL_FLEET_ID",
    "LABEL_WORK_ID",
    "ContainerSandbox",
    "EngineError",
    "check_engine",
    "container_labels",
    "container_name",
    "create_arguments",
    "engine",
    "feed_stdin",
    "log_pinned_images",
    "pinned_image",
    "sandbox_texts",
]

LABEL_FLEET = "dispatcher.fleet"
LABEL_FLEET_ID = "dispatcher.fleet_id"
LABEL_ENVIRONMENT = "dispatcher.environment"
LABEL_WORK_ID = "dispatcher.work_id"
LABEL_SESSION_ID = "dispatcher.session_id"
LABEL_ATTEMPT = "dispatcher.attempt"
DEFAULT_ENGINE = "unix:///var/run/docker.sock"
# Where a sandbox that holds its lease finds the work secret (runner, handoff modes).
SECRET_DIRECTORY = "/run/dispatcher"
CONTAINER_SECRET_PATH = f"{SECRET_DIRECTORY}/work-secret"
# The worker's variables that describe its host, not the sandbox: the image's own stay.
HOST_ONLY = frozenset({"PATH", "HOME", "TMPDIR"})
# Every engine call but the exit wait; a create or a kill answers in well under a second.
ENGINE_TIMEOUT_SECONDS = 30
# Connections one process keeps to the engine: each running container holds one for its exit
# wait, plus calls of the supervisors; the default (10) would be exhausted by a full worker.
ENGINE_POOL_SIZE = 64
# Between tries of an exit wait that failed (the engine restarting).
WAIT_RETRY_SECONDS = 1.0
# The exit code reported for a container that vanished without a known status.
EXIT_VANISHED = 255

_clients: dict[int, docker.APIClient] = {}
# Image reference -> the id it was resolved to at start; inherited by forked pool children.
_pinned: dict[str, tuple[str, str]] = {}  # -> (id, registry digests)
_clients_lock = threading.Lock()


def engine(settings: Settings) -> docker.APIClient:
    """This process's client of the engine (created on first use; never a forked parent's)."""
    pid = os.getpid()
    with _clients_lock:
        client = _clients.get(pid)
        if client is None:
            _clients.clear()  # a parent's client shares its sockets: never use it after fork
            client = _clients[pid] = _connect(settings)
        return client


def _connect(settings: Settings) -> docker.APIClient:
    address = settings.docker_host or DEFAULT_ENGINE
    try:
        return docker.APIClient(base_url=address, version="auto",
                                timeout=ENGINE_TIMEOUT_SECONDS, max_pool_size=ENGINE_POOL_SIZE)
    except DockerException as exc:
        if "Permission denied" in str(exc):
            raise EngineError(
                f"permission denied on the Docker engine at {address}: run the worker as a "
                "user of the engine's group (root-equivalent), or set DOCKER_HOST") from None
        raise EngineError(f"the Docker engine at {address} does not answer (DOCKER_HOST): "
                          f"{exc}") from None


def check_engine(settings: Settings) -> None:
    """At worker start: the engine answers and has each image, pulled as the policy says."""
    api = engine(settings)
    try:
        api.ping()
    except (APIError, RequestException) as exc:
        raise EngineError(f"the Docker engine at {settings.docker_host or DEFAULT_ENGINE} "
                          f"failed: {_engine_message(exc)}") from None
    for image in settings.sandbox_images():
        _check_image(api, image, settings.sandbox_pull)
        _pin(api, image)


def _check_image(api: docker.APIClient, image: str, policy: PullPolicy) -> None:
    try:
        present = _has_image(api, image)
    except (APIError, RequestException) as exc:
        raise EngineError(f"image {image!r} (DISPATCHER_SANDBOX_IMAGE) cannot be inspected: "
                          f"{_engine_message(exc)}") from None
    if not present and policy == PullPolicy.NEVER:
        raise EngineError(f"image {image!r} (DISPATCHER_SANDBOX_IMAGE) is not on the engine "
                          "and DISPATCHER_SANDBOX_PULL=never: load or build it first")
    if policy == PullPolicy.ALWAYS or not present:
        try:
            _pull(api, image)
        except (APIError, RequestException) as exc:
            raise EngineError(f"image {image!r} (DISPATCHER_SANDBOX_IMAGE) could not be pulled "
                              f"(DISPATCHER_SANDBOX_PULL={policy.value}): "
                              f"{_engine_message(exc)}") from None


def _pin(api: docker.APIClient, image: str) -> None:
    """Resolve the image to its id once, and run that id from now on: a tag moved while the
    worker runs changes nothing until it restarts."""
    try:
        found = api.inspect_image(image)
    except (APIError, RequestException) as exc:
        raise EngineError(f"image {image!r} (DISPATCHER_SANDBOX_IMAGE) cannot be inspected: "
                          f"{_engine_message(exc)}") from None
    _pinned[image] = (str(found["Id"]), ",".join(found.get("RepoDigests") or []))


def log_pinned_images() -> None:
    """Say which image each reference was resolved to; once logging is set up (the start-up
    check runs before Celery configures it, when an INFO line would be lost)."""
    for image, (image_id, digests) in _pinned.items():
        event("sandbox image resolved", image=image, id=image_id, digests=digests or None)


def pinned_image(image: str) -> str:
    """The id the image was resolved to at this worker's start (itself if it never was)."""
    return _pinned[image][0] if image in _pinned else image


def _pull(api: docker.APIClient, image: str) -> None:
    """Pull the image; the engine reports some failures inside a successful answer's stream,
    so the image must be there afterwards."""
    errors = [str(line["error"]) for line in api.pull(image, stream=True, decode=True)
              if isinstance(line, dict) and line.get("error")]
    if errors or not _has_image(api, image):
        raise APIError(errors[-1] if errors else "the pull ended without the image")


def sandbox_texts(settings: Settings) -> list[tuple[str, str]]:
    """What a container runs, as text: the configured command and each image's own."""
    texts = [("DISPATCHER_SANDBOX_COMMAND", settings.sandbox_command or "")]
    for image in settings.sandbox_images():
        try:
            config = engine(settings).inspect_image(image).get("Config") or {}
        except (APIError, RequestException):
            continue
        own = [*(config.get("Entrypoint") or []), *(config.get("Cmd") or [])]
        texts.append((f"image {image}", " ".join(str(part) for part in own)))
    return texts


def _has_image(api: docker.APIClient, image: str) -> bool:
    try:
        api.inspect_image(image)
    except ImageNotFound:
        return False
    return True


def _start_error(what: str, exc: APIError | RequestException) -> SandboxStartError:
    """A failed engine call of a start, as the infrastructure's failure or the session's."""
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None) if response is not None else None
    blame = engine_blame(status, _engine_message(exc), answered=status is not None)
    error = SandboxInfraError if blame == Blame.INFRASTRUCTURE else SandboxStartError
    return error(f"{what}: {_engine_message(exc)}")


def _engine_message(exc: Exception) -> str:
    explanation = getattr(exc, "explanation", None)
    return str(explanation or exc)


# --- what a container is made of (pure) ------------------------------------------------------


def container_labels(settings: Settings, spec: SandboxSpec) -> dict[str, str]:
    """Who the container belongs to, for the reaper and for operators; never a secret."""
    labels = dict(label.split("=", 1) for label in settings.sandbox_labels)
    labels.update({
        LABEL_FLEET: settings.key_prefix,
        LABEL_FLEET_ID: settings.fleet_id or "",
        LABEL_ENVIRONMENT: spec.environment_id or settings.environment_id or "",
        LABEL_WORK_ID: spec.work_id,
        LABEL_SESSION_ID: spec.session_id,
        LABEL_ATTEMPT: str(spec.attempt),
    })
    return labels


def container_name(settings: Settings, spec: SandboxSpec) -> str:
    """One name per attempt: the engine refuses a second container of the same attempt."""
    raw = f"{settings.key_prefix}-{spec.work_id}-{spec.attempt}"
    return re.sub(r"[^a-zA-Z0-9_.-]", "-", raw).lstrip("-._") or "dispatcher"


def _mount(text: str) -> tuple[str, dict[str, str]]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
        raise SandboxStartError(f"DISPATCHER_SANDBOX_VOLUMES: {text!r} is not source:target[:ro]")
    mode = parts[2] if len(parts) == 3 else "rw"
    return parts[0], {"bind": parts[1], "mode": mode}


def _tmpfs(text: str) -> tuple[str, str]:
    target, _, options = text.partition(":")
    return target, options


def host_config_arguments(settings: Settings) -> dict[str, Any]:
    """Confinement, limits, network and mounts of every container.

    Confined unless the operator loosens a setting: no capability but those given back, no
    privilege gained through setuid, a bounded number of processes, memory and CPUs, and a
    root file system that only the work directory and tmpfs mounts make writable."""
    workdir_owner = _owner_options(settings.sandbox_user)
    tmpfs = {settings.sandbox_workdir: f"size={settings.sandbox_workdir_size},{workdir_owner}"}
    tmpfs.update(_tmpfs(t) for t in settings.sandbox_tmpfs)
    return {
        "network_mode": settings.sandbox_network,
        "init": settings.sandbox_init,
        "binds": dict(_mount(v) for v in settings.sandbox_volumes),
        "tmpfs": tmpfs,
        "cap_drop": ["ALL"],
        "cap_add": list(settings.sandbox_cap_add),
        "security_opt": ["no-new-privileges"],
        "pids_limit": settings.sandbox_pids_limit,
        "nano_cpus": int(settings.sandbox_cpus * 1_000_000_000),
        "mem_limit": settings.sandbox_memory,
        # Swap as large as the memory limit would double it: none beyond it.
        "memswap_limit": settings.sandbox_memory,
        "read_only": settings.sandbox_read_only,
    }


def _owner_options(user: str) -> str:
    uid, _, gid = user.partition(":")
    return f"uid={uid},gid={gid or uid}"


def create_arguments(settings: Settings, spec: SandboxSpec, *,
                     image: str | None = None) -> dict[str, Any]:
    """`create_container` arguments but the host config: image, command, environment, labels."""
    env = {k: v for k, v in spec.env.items() if k not in HOST_ONLY}
    if spec.secret_file is not None:
        env["ANTHROPIC_WORK_SECRET_FILE"] = CONTAINER_SECRET_PATH
    return {
        "image": image or settings.sandbox_image,
        "command": shlex.split(settings.sandbox_command) if settings.sandbox_command else None,
        "user": settings.sandbox_user,
        "working_dir": settings.sandbox_workdir,
        # A volume of the container's own (removed with it): the one place the secret file can
        # be copied to before the start under a read-only root file system.
        "volumes": [SECRET_DIRECTORY] if spec.secret_file is not None else None,
        "environment": env,
        "labels": container_labels(settings, spec),
        "name": container_name(settings, spec),
        # Stdin stays open until the worker's attached stream closes (stdin once).
        "stdin_open": True,
        "detach": False,
    }


def secret_archive(secret: str, user: str | None) -> bytes:
    """A tar of the secret file, 0600 and owned by the container's user, for `put_archive`
    into SECRET_DIRECTORY."""
    uid, _, gid = (user or "0").partition(":")
    data = secret.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        entry = tarfile.TarInfo(os.path.basename(CONTAINER_SECRET_PATH))
        entry.size, entry.mode = len(data), 0o600
        entry.uid, entry.gid, entry.mtime = int(uid), int(gid or uid), int(time.time())
        tar.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


# --- a running container ---------------------------------------------------------------------


class ContainerSandbox:
    """A session's container: signalled and waited on through the engine, removed at the end."""

    def __init__(self, api: docker.APIClient, container_id: str, *,
                 settings: Settings | None = None, spec: SandboxSpec | None = None) -> None:
        self._api = api
        self.id = container_id
        self._settings = settings
        self._spec = spec
        self.started_at = time.time()
        self._exit_code: int | None = None
        self._exited = threading.Event()
        self._removed = False

    @classmethod
    def start(cls, settings: Settings, spec: SandboxSpec) -> ContainerSandbox:
        """Create, feed and start the container; a failure is a SandboxStartError with the
        engine's message, and leaves no container behind."""
        settings = settings.sandbox_for(spec.environment_id or settings.environment_id)
        try:
            api = engine(settings)
        except EngineError as exc:
            raise SandboxInfraError(str(exc)) from None
        try:
            created = api.create_container(
                host_config=api.create_host_config(**host_config_arguments(settings)),
                **create_arguments(settings, spec,
                                   image=pinned_image(settings.sandbox_image or "")))
        except (APIError, RequestException) as exc:
            raise _start_error("container not created", exc) from None
        sandbox = cls(api, created["Id"], settings=settings, spec=spec)
        try:
            if spec.secret_file is not None:
                api.put_archive(sandbox.id, SECRET_DIRECTORY,
                                secret_archive(spec.secret_file, settings.sandbox_user))
            stdin = api.attach_socket(sandbox.id, params={"stdin": 1, "stream": 1})
            api.start(sandbox.id)
        except (APIError, RequestException) as exc:
            sandbox.kill_group()
            raise _start_error("container not started", exc) from None
        threading.Thread(target=feed_stdin, args=(stdin, spec.stdin), daemon=True).start()
        threading.Thread(target=sandbox._wait_exit, daemon=True).start()
        return sandbox

    def describe(self) -> dict[str, str | int]:
        return {"container": self.id[:12]}

    def _wait_exit(self) -> None:
        while True:
            try:
                self._exit_code = int(self._api.wait(self.id, timeout=None)["StatusCode"])
                break
            except NotFound:
                self._exit_code = EXIT_VANISHED
                break
            except (APIError, RequestException):
                if self._removed:
                    break  # we removed it ourselves: nobody waits for its code any more
                time.sleep(WAIT_RETRY_SECONDS)  # the engine restarting: ask again
        self._exited.set()

    def wait(self, timeout: float) -> int | None:
        """The container's exit code, as the engine reports it, or None while it runs."""
        self._exited.wait(timeout)
        return self._exit_code

    def signal_group(self, signum: int) -> None:
        if self._removed:
            return
        try:
            self._api.kill(self.id, signal=int(signum))
        except NotFound:
            pass
        except (APIError, RequestException) as exc:
            # 409: it is not running any more; else the engine failed us: the reaper follows up.
            if getattr(getattr(exc, "response", None), "status_code", None) != 409:
                event("container not signalled", level=logging.WARNING, container=self.id[:12],
                      signal=int(signum), error=_engine_message(exc))

    def kill_group(self) -> None:
        """Kill the container at once if it still runs, and remove it."""
        if self._removed:
            return
        self._keep_output()
        try:
            self._api.remove_container(self.id, force=True, v=True)
            self._removed = True
        except NotFound:
            self._removed = True
        except (APIError, RequestException) as exc:
            event("container not removed", level=logging.WARNING, container=self.id[:12],
                  error=_engine_message(exc), action_taken="left to the reaper")


    def _keep_output(self) -> None:
        """Copy the container's output to its attempt's file before the engine forgets it;
        killed first, so the file holds everything it wrote."""
        if self._settings is None or self._spec is None:
            return
        settings, spec = self._settings, self._spec
        try:
            with contextlib.suppress(NotFound, APIError):
                self._api.kill(self.id)  # 409 when it exited already: nothing to stop
            chunks = self._api.logs(self.id, stdout=True, stderr=True, stream=True,
                                    follow=False)
            write_output(settings.output_directory, spec.work_id, spec.attempt, chunks,
                         max_bytes=settings.sandbox_output_max_bytes,
                         keep=settings.sandbox_output_keep)
        except (APIError, RequestException, OSError) as exc:
            event("output not kept", level=logging.WARNING, work_id=spec.work_id,
                  attempt=spec.attempt, container=self.id[:12], error=str(exc))


def feed_stdin(stream: Any, data: bytes) -> None:
    """Write the work JSON to the container's stdin and close it, so the command reads EOF."""
    raw = getattr(stream, "_sock", stream)
    try:
        raw.sendall(data)
        raw.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the container exited or closed stdin without reading: its choice
    finally:
        with contextlib.suppress(OSError):
            stream.close()
