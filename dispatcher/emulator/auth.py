"""Who may make a request: the decisions, apart from the lookups (`guard` does those).

Three kinds of credential, told apart by value (the SDK sends every key as `Authorization:
Bearer`; the docs' curl examples use `x-api-key`; either header may carry any of them):

* the organisation key (`--api-key`): making work, `get`, `update`, `stop`, `stats`, admin;
* an environment key: the worker calls of *its own* environment only. An environment created
  with an `environment_key` of its own is opened by that key alone; every other environment by
  the emulator's `--environment-key`;
* a work item's `sessions_token` (inside the `secret` of one of its deliveries, until it
  expires): `heartbeat` and `stop` of that item, and its session (read, events), as SDK 2.17's
  `handle_item` uses it. A session is also open to the organisation key and to the key of the
  session's environment (the runner's fallback when the secret yields no token).

A missing or unknown credential is 401 `authentication_error`; a known one of the wrong kind, or
the environment key of another environment, is 403 `permission_error`. The real service's
choice between 401 and 403 here is unknown. Keys are compared as bytes, in constant time: a
non-ASCII key is just an unknown key (401), never a server error.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from dispatcher.workapi.models import sessions_token as secret_token

from .endpoints import Endpoint, classify
from .errors import Forbidden, InvalidRequest, Unauthenticated

__all__ = ["ADMIN", "BETA", "ENDPOINT_CREDENTIALS", "SESSION_ACCESS", "Credential", "Presented",
           "Requirement",
           "check_api_headers", "decide", "key_digest", "presented", "requirement_for",
           "sessions_token"]

BETA = b"managed-agents-2026-04-01"


class Credential(StrEnum):
    ENVIRONMENT = "environment"
    ORGANISATION = "organisation"
    SESSION = "sessions_token"


_EITHER = frozenset({Credential.ENVIRONMENT, Credential.ORGANISATION})
_ENVIRONMENT = frozenset({Credential.ENVIRONMENT})
_ORGANISATION = frozenset({Credential.ORGANISATION})

# From the docstrings of the official Python SDK, and its `handle_item`, which heartbeats and
# stops an item with the item's sessions token.
ENDPOINT_CREDENTIALS: Mapping[Endpoint, frozenset[Credential]] = {
    Endpoint.GET: _ORGANISATION,
    Endpoint.UPDATE: _ORGANISATION,
    Endpoint.LIST: _ENVIRONMENT,
    Endpoint.POLL: _ENVIRONMENT,
    Endpoint.ACK: _ENVIRONMENT,
    Endpoint.HEARTBEAT: _ENVIRONMENT | {Credential.SESSION},
    Endpoint.STOP: _EITHER | {Credential.SESSION},
    Endpoint.STATS: _EITHER,
}
# Creating environments and sessions, and the /_emulator/* admin routes.
ADMIN = _ORGANISATION
# Reading a session and its events, and sending events: the runner's calls.
SESSION_ACCESS = _EITHER | {Credential.SESSION}
# A session, its event list, its event stream (`GET`), and the events sent to it (`POST`).
_SESSION_PATH = re.compile(r"^/v1/sessions/(?P<session>[^/]+)(?P<events>/events(/stream)?)?/?$")


@dataclass(frozen=True)
class Requirement:
    """What a request needs: the kinds of credential, and for the Work API its environment
    (whose key opens it) and work item (whose sessions token opens its heartbeat and stop)."""

    allowed: frozenset[Credential]
    what: str
    environment_id: str | None = None
    work_id: str | None = None
    # A session call: its environment and work item are the session's (looked up by `guard`).
    session_id: str | None = None


def requirement_for(method: str, path: str) -> Requirement:
    match = classify(method, path)
    if match is None:
        session = _SESSION_PATH.match(path)
        if session and (method == "GET" or (method == "POST" and session["events"] == "/events")):
            return Requirement(SESSION_ACCESS, "a session", session_id=session["session"])
        return Requirement(ADMIN, "this endpoint")
    return Requirement(ENDPOINT_CREDENTIALS[match.endpoint], f"work {match.endpoint.value}",
                       match.environment_id, match.work_id)


Presented = Sequence[bytes]


def presented(headers: Mapping[bytes, bytes]) -> list[bytes]:
    """The credentials a request carries (Bearer first), as raw bytes."""
    keys = []
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer" and token.strip():
        keys.append(token.strip())
    api_key = headers.get(b"x-api-key", b"").strip()
    if api_key:
        keys.append(api_key)
    return keys


def key_digest(key: bytes) -> str:
    """How an environment's own key is stored and looked up: never the key itself."""
    return hashlib.sha256(key).hexdigest()


def sessions_token(secret: str | None) -> bytes | None:
    """The `sessions_token` inside a work secret, as bytes to compare: read as the fleet's
    client and SDK 2.17 read it."""
    token = secret_token(secret)
    return None if token is None else token.encode()


def _same(a: bytes, b: bytes | None) -> bool:
    return b is not None and hmac.compare_digest(a, b)


def _among(key: bytes, tokens: Collection[bytes]) -> bool:
    """Compared with each (no early exit on a match), so the time says nothing of which."""
    found = False
    for token in tokens:
        found |= hmac.compare_digest(key, token)
    return found


def decide(keys: Presented, need: Requirement, *, api_key: bytes,
           environment_of: Mapping[bytes, str | None], opens: str | None,
           item_tokens: Collection[bytes] = ()) -> Credential:
    """The credential a request is made with, or the 401/403 it gets.

    ``environment_of`` maps each presented key that is an environment key to the environment
    it opens (None: the environments without a key of their own); ``opens`` is that binding
    for the request's environment; ``item_tokens`` the valid sessions tokens of its work item.
    """
    foreign = False
    for key in keys:
        if _same(key, api_key):
            kind = Credential.ORGANISATION
        elif key in environment_of:
            if need.environment_id is not None and environment_of[key] != opens:
                foreign = True
                continue
            kind = Credential.ENVIRONMENT
        elif _among(key, item_tokens):
            kind = Credential.SESSION
        else:
            continue
        if kind not in need.allowed:
            wanted = " or ".join(sorted(c.value for c in need.allowed))
            raise Forbidden(f"{need.what} takes the {wanted} key, not the {kind.value} key")
        return kind
    if foreign:
        raise Forbidden(f"this environment key does not open environment {need.environment_id}")
    if keys:
        raise Unauthenticated("invalid x-api-key or bearer token")
    raise Unauthenticated("missing credentials: send Authorization: Bearer or x-api-key")


def check_api_headers(headers: Mapping[bytes, bytes]) -> None:
    """The service refuses an API request without a version, or without the beta that the
    Managed Agents endpoints are in."""
    if not headers.get(b"anthropic-version", b"").strip():
        raise InvalidRequest("anthropic-version: header is required")
    betas = {part.strip() for part in headers.get(b"anthropic-beta", b"").split(b",")}
    if BETA not in betas:
        raise InvalidRequest(f"anthropic-beta: this endpoint requires the beta "
                             f"{BETA.decode()}")
