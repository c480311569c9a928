"""What every route needs (`Emulator`, on `app.state.emulator`) and the credential dependency."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer

from .auth import Credential
from .config import EmulatorConfig
from .errors import Forbidden, Unauthenticated, error_body, new_request_id, retry_hint
from .faults import Faults
from .guard import credential_of
from .requestlog import RequestLog, request_id_of
from .sessions import SessionStore
from .store import Store
from .webhooks import WebhookSender

__all__ = ["Ctx", "Emulator", "admitted", "emulator_of", "error_response", "requires"]

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


def error_response(scope: Mapping[str, Any], emulator: Emulator, status: int, message: str, *,
                   details: dict[str, Any] | None = None,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    """An error in the Anthropic shape, under the request's id: the routes' exception handlers
    and the fast path (`fastpath`) answer with it alike."""
    request_id = request_id_of(scope) or new_request_id()
    body = error_body(status, message, request_id=request_id, details=details)
    hint = retry_hint(status, enabled=emulator.config.should_retry_header)
    return JSONResponse(body, status_code=status, headers={**hint, **(headers or {})})
