"""The environments one fleet serves: each one's id, key, optional session limit, queue,
maximum session duration, and sandbox image, limits and network.

Two ways to say them, never both:

* one environment, the official CLI's variables: `ANTHROPIC_ENVIRONMENT_ID` and
  `ANTHROPIC_ENVIRONMENT_KEY` (unchanged);
* any number, a TOML file named by `DISPATCHER_ENVIRONMENTS_FILE`::

      [[environment]]
      id = "env_01..."
      key_file = "/run/secrets/env_a_key"   # or `key = "sk-ant-oat01-..."`
      max_sessions = 20                     # optional: at most this many held at once
      queue = "dispatcher.sessions.gpu"     # optional: its sessions' default queue
      max_session_seconds = 3600            # optional: instead of DISPATCHER_MAX_SESSION_SECONDS
                                            # (0: no limit for this environment)
      # optional, docker runtime: its containers' own image, limits and network, instead of
      # the DISPATCHER_SANDBOX_* settings of the same meaning
      image = "registry.example.com/gpu-sandbox@sha256:..."
      cpus = 4
      memory = "8g"
      pids_limit = 1024
      network = "egress-only"

A key is refused (at start-up, never shown) unless it is printable ASCII without spaces: sent as
is, whitespace or a control character would fail every request (retried as a transient error),
and a non-ASCII character could not be put in the `Authorization` header at all. A key file's
one trailing line ending is not part of the key (editors and `echo` add it); anything else is.
A key file that its group or others may read (or write) is refused too: the key would be
everyone's on that host.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

__all__ = ["Environment", "EnvironmentsError", "check_key", "load_environments_file"]

# Anything but printable ASCII (0x21-0x7e): whitespace, controls, DEL and every non-ASCII
# character. httpx encodes header values as ASCII, so a key with `é` would raise
# UnicodeEncodeError at every request while start-up checks pass.
_NOT_PRINTABLE_ASCII = re.compile(r"[^\x21-\x7e]")
FILE_VARIABLE = "DISPATCHER_ENVIRONMENTS_FILE"
# Permission bits of a key file that let its group or others at it.
_SHARED_BITS = 0o077


class EnvironmentsError(ValueError):
    """The environments file cannot be used; the message names the entry, never a key."""


def check_key(value: SecretStr) -> SecretStr:
    if _NOT_PRINTABLE_ASCII.search(value.get_secret_value()):
        raise ValueError("contains whitespace, a control character or a non-ASCII character "
                         "(a trailing newline from a mounted secret file?); the value is not "
                         "shown")
    return value


@dataclass(frozen=True)
class Environment:
    """One environment the fleet works for. `repr` never shows the key."""

    id: str
    key: SecretStr
    max_sessions: int | None = None
    queue: str | None = None
    # Its own maximum session duration (0: none), instead of the fleet's; None: the fleet's.
    max_session_seconds: float | None = None
    # The docker runtime's settings this environment's containers get instead of the fleet's:
    # Settings field name -> value (sandbox_image, sandbox_cpus, ...).
    sandbox: tuple[tuple[str, Any], ...] = ()


class _Entry(BaseModel):
    """One `[[environment]]` table as written: exactly one of `key` and `key_file`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    key: SecretStr | None = None
    key_file: Path | None = None
    max_sessions: int | None = Field(None, ge=1)
    queue: str | None = Field(None, min_length=1)
    max_session_seconds: float | None = Field(None, ge=0)
    image: str | None = Field(None, min_length=1)
    cpus: float | None = Field(None, gt=0)
    memory: str | None = Field(None, pattern=r"^\d+[bkmg]?$")
    pids_limit: int | None = Field(None, ge=1)
    network: str | None = Field(None, min_length=1)

    def sandbox(self) -> tuple[tuple[str, Any], ...]:
        given = {"sandbox_image": self.image, "sandbox_cpus": self.cpus,
                 "sandbox_memory": self.memory, "sandbox_pids_limit": self.pids_limit,
                 "sandbox_network": self.network}
        return tuple((name, value) for name, value in given.items() if value is not None)

    @field_validator("id")
    @classmethod
    def _plain_id(cls, value: str) -> str:
        from dispatcher.workapi.models import check_id  # the client package, only when used

        return check_id(value, "the environment id")


def _read_key(entry: _Entry, base: Path) -> SecretStr:
    if (entry.key is None) == (entry.key_file is None):
        raise EnvironmentsError(f"environment {entry.id}: give exactly one of key and key_file")
    if entry.key is not None:
        raw = entry.key
    else:
        assert entry.key_file is not None
        path = entry.key_file if entry.key_file.is_absolute() else base / entry.key_file
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise EnvironmentsError(
                f"environment {entry.id}: key_file {str(path)!r} cannot be read "
                f"({type(exc).__name__})") from None
        if mode & _SHARED_BITS:
            raise EnvironmentsError(
                f"environment {entry.id}: key_file {str(path)!r} is open to its group or "
                f"others (mode {mode & 0o777:04o}): make it 0600 or 0400")
        raw = SecretStr(text.removesuffix("\n").removesuffix("\r"))
    try:
        return check_key(raw)
    except ValueError as exc:
        raise EnvironmentsError(f"environment {entry.id}: the key {exc}") from None


def load_environments_file(path: Path, *, session_queues: list[str]) -> tuple[Environment, ...]:
    """The environments a file lists, checked; EnvironmentsError names what is wrong.

    A queue must be one the fleet declares (`DISPATCHER_SESSION_QUEUES`): a queue no worker
    consumes would hold its sessions, and their leases, forever."""
    try:
        document: dict[str, Any] = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EnvironmentsError(f"{str(path)!r} cannot be read as TOML: {exc}") from None
    unknown = set(document) - {"environment"}
    if unknown:
        raise EnvironmentsError(f"unknown table(s) {sorted(unknown)}: only [[environment]]")
    tables = document.get("environment", [])
    if not isinstance(tables, list) or not tables:
        raise EnvironmentsError("no [[environment]] entry")
    found: list[Environment] = []
    for number, table in enumerate(tables, start=1):
        try:
            entry = _Entry.model_validate(table)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise EnvironmentsError(f"entry {number}: {where}: {first['msg']}") from None
        if entry.queue is not None and entry.queue not in session_queues:
            raise EnvironmentsError(f"environment {entry.id}: queue {entry.queue!r} is not one "
                                    "of DISPATCHER_SESSION_QUEUES")
        if any(e.id == entry.id for e in found):
            raise EnvironmentsError(f"environment {entry.id} is listed twice")
        found.append(Environment(id=entry.id, key=_read_key(entry, path.parent),
                                 max_sessions=entry.max_sessions, queue=entry.queue,
                                 max_session_seconds=entry.max_session_seconds,
                                 sandbox=entry.sandbox()))
    return tuple(found)
