"""Whose failure a sandbox's start is (`session/infra.py`), by tables: the infrastructure's
restarts the attempt without counting it; the session's is a failed attempt."""

from __future__ import annotations

import errno

import pytest

from dispatcher.session.infra import Blame, engine_blame, spawn_blame

INFRA, SESSION = Blame.INFRASTRUCTURE, Blame.SESSION

# (HTTP status or None, the engine's message, whether the engine answered, whose failure).
ENGINE = [
    (None, "Connection refused", False, INFRA),  # the engine is down
    (None, "Read timed out. (read timeout=30)", False, INFRA),  # slower than the bound
    (None, "Connection aborted: RemoteDisconnected", False, INFRA),  # it died mid-call
    (500, "Internal Server Error", True, INFRA),
    (503, "the daemon is shutting down", True, INFRA),
    (500, "failed to create shim task: context deadline exceeded", True, INFRA),
    (404, "No such image: sha256:0123abcd", True, INFRA),  # the engine lost the image
    (404, "No such container: 0123abcd", True, INFRA),  # removed between create and start
    # What the settings name and the engine has not: the attempt's, as it asked for it.
    (404, "network no-such-network not found", True, SESSION),
    (409, "Conflict. The container name \"/d-w-1\" is already in use", True, INFRA),
    # The container's own command cannot run: the session's, from old (500) or new (400)
    # engines alike.
    (400, 'failed to create task for container: exec: "nope": executable file not found in '
          "$PATH: unknown", True, SESSION),
    (500, 'OCI runtime create failed: exec: "/bin/nope": no such file or directory', True,
     SESSION),
    (500, "OCI runtime create failed: exec /app/run: permission denied", True, SESSION),
    (400, "invalid reference format", True, SESSION),
    (400, "invalid mount config for type \"bind\": bind source path does not exist", True,
     SESSION),
    (400, "bad parameter", True, SESSION),
]


@pytest.mark.parametrize("status,message,answered,blame", ENGINE)
def test_an_engine_failure_is_blamed_on_whose_it_is(status: int | None, message: str,
                                                    answered: bool, blame: Blame) -> None:
    assert engine_blame(status, message, answered=answered) == blame


@pytest.mark.parametrize("code,blame", [
    (errno.EAGAIN, INFRA), (errno.ENOMEM, INFRA), (errno.EMFILE, INFRA), (errno.ENFILE, INFRA),
    (errno.ENOSPC, INFRA), (errno.ENOENT, SESSION), (errno.EACCES, SESSION),
    (errno.ENOEXEC, SESSION), (None, SESSION),
])
def test_a_spawn_failure_is_blamed_on_whose_it_is(code: int | None, blame: Blame) -> None:
    assert spawn_blame(code) == blame
