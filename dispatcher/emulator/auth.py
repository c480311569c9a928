"""Which credential each endpoint takes, told apart by the key's value.

The current official SDK sends an organisation key as `Authorization: Bearer` too, and the docs'
curl examples send it as `x-api-key`; so either header may carry either key, and the emulator
knows which kind it is only by comparing it with the two keys it was started with.

A missing or unknown key is 401 `authentication_error`. A valid key of the wrong kind for the
endpoint (say the environment key on `get`) is 403 `permission_error`: the caller is known, it
is just not allowed there. The real service's choice between 401 and 403 here is unknown.

One environment key serves every environment of an emulator (the real one is per environment).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from enum import StrEnum

from .endpoints import Endpoint
from .errors import Forbidden, Unauthenticated

__all__ = ["ADMIN", "ENDPOINT_CREDENTIALS", "Credential", "authorize", "identify"]


class Credential(StrEnum):
    ENVIRONMENT = "environment"
    ORGANISATION = "organisation"


_EITHER = frozenset(Credential)
_ENVIRONMENT = frozenset({Credential.ENVIRONMENT})
_ORGANISATION = frozenset({Credential.ORGANISATION})

# From the docstrings of the official Python SDK 2.10.0.
ENDPOINT_CREDENTIALS: Mapping[Endpoint, frozenset[Credential]] = {
    Endpoint.GET: _ORGANISATION,
    Endpoint.UPDATE: _ORGANISATION,
    Endpoint.LIST: _ENVIRONMENT,
    Endpoint.POLL: _ENVIRONMENT,
    Endpoint.ACK: _ENVIRONMENT,
    Endpoint.HEARTBEAT: _ENVIRONMENT,
    Endpoint.STOP: _EITHER,
    Endpoint.STATS: _EITHER,
}
# Creating environments and sessions, and the /_emulator/* admin routes.
ADMIN = _ORGANISATION


def _presented(headers: Mapping[str, str]) -> list[str]:
    keys = []
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        keys.append(token.strip())
    api_key = headers.get("x-api-key", "").strip()
    if api_key:
        keys.append(api_key)
    return keys


def identify(headers: Mapping[str, str], *, environment_key: str,
             api_key: str) -> Credential | None:
    """The kind of the first known key presented, or None if none is known."""
    for key in _presented(headers):
        # Constant-time compares: the emulator may listen where others can reach it.
        if hmac.compare_digest(key, environment_key):
            return Credential.ENVIRONMENT
        if hmac.compare_digest(key, api_key):
            return Credential.ORGANISATION
    return None


def authorize(headers: Mapping[str, str], allowed: frozenset[Credential], *,
              environment_key: str, api_key: str, what: str) -> Credential:
    credential = identify(headers, environment_key=environment_key, api_key=api_key)
    if credential is None:
        if _presented(headers):
            raise Unauthenticated("invalid x-api-key or bearer token")
        raise Unauthenticated("missing credentials: send Authorization: Bearer or x-api-key")
    if credential not in allowed:
        wanted = " or ".join(sorted(c.value for c in allowed))
        raise Forbidden(f"{what} takes the {wanted} key, not the {credential.value} key")
    return credential
