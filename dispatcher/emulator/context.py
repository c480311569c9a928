"""What every route needs (`Emulator`, on `app.state.emulator`) and the credential dependency."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPBearer

from .auth import Credential
from .config import EmulatorConfig
from .errors import Forbidden, Unauthenticated
from .faults import Faults
from .guard import credential_of
from .requestlog import RequestLog
from .sessions import SessionStore
from .store import Store
from .webhooks import WebhookSender

__all__ = ["Ctx", "Emulator", "admitted", "emulator_of", "requires"]

# Shown in the OpenAPI document as the two ways to send a key; `auth` does the checking.
_bearer = HTTPBearer(auto_error=False, description="The environment or organisation key.")
_api_key = APIKeyHeader(name="x-api-key", auto_error=False,
                        description="The organisation or environment key.")


@dataclass
class Emulator:
    config: EmulatorConfig
    store: Store
    sessions: SessionStore
    faults: Faults
    log: RequestLog
    # Run once Redis answers, before the server listens (e.g. `--create-environment`).
    on_startup: Callable[[Emulator], Awaitable[None]] | None = None
    # Signed `session.status_run_started` deliveries, when a webhook URL is configured.
    webhooks: WebhookSender | None = None


def emulator_of(request: Request) -> Emulator:
    found: Emulator = request.app.state.emulator
    return found


async def _emulator(request: Request) -> Emulator:
    # `async`: FastAPI runs a plain `def` dependency in a thread pool, a hand-off to another
    # thread and back on every request (a tenth of the emulator's time per heartbeat).
    return emulator_of(request)


Ctx = Annotated[Emulator, Depends(_emulator)]


def requires(allowed: frozenset[Credential],
             what: str) -> Callable[..., Awaitable[Credential]]:
    """The credential `guard` admitted the request with, checked again against `allowed` (and
    shown in the OpenAPI document); async, so it runs on the event loop, not in a thread."""

    async def check(request: Request, _b: Annotated[Any, Depends(_bearer)] = None,
                    _k: Annotated[Any, Depends(_api_key)] = None) -> Credential:
        return admitted(request.scope, allowed, what)

    return check


def admitted(scope: MutableMapping[str, Any], allowed: frozenset[Credential],
             what: str) -> Credential:
    """The credential `guard` admitted the request with, if `allowed` takes it."""
    credential = credential_of(scope)
    if credential is None:
        raise Unauthenticated("missing credentials: send Authorization: Bearer or x-api-key")
    if credential not in allowed:
        raise Forbidden(f"{what} does not take the {credential.value} key")
    return credential
