"""What every route needs (`Emulator`, on `app.state.emulator`) and the credential dependency."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPBearer

from .auth import Credential, authorize
from .config import EmulatorConfig
from .faults import Faults
from .requestlog import RequestLog
from .store import Store
from .webhooks import WebhookSender

__all__ = ["Ctx", "Emulator", "emulator_of", "requires"]

# Shown in the OpenAPI document as the two ways to send a key; `auth` does the checking.
_bearer = HTTPBearer(auto_error=False, description="The environment or organisation key.")
_api_key = APIKeyHeader(name="x-api-key", auto_error=False,
                        description="The organisation or environment key.")


@dataclass
class Emulator:
    config: EmulatorConfig
    store: Store
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
    """A dependency that admits only the `allowed` kinds of key (see `auth`); async, so it
    runs on the event loop, not in FastAPI's thread pool."""

    async def check(request: Request, _b: Annotated[Any, Depends(_bearer)] = None,
                    _k: Annotated[Any, Depends(_api_key)] = None) -> Credential:
        config = emulator_of(request).config
        return authorize(request.headers, allowed, environment_key=config.environment_key,
                         api_key=config.api_key, what=what)

    return check
