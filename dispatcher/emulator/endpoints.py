"""Names of the Work API's endpoints, and naming a request from its method and path.

The fault middleware and the request log run outside the router (a fault may answer before any
route does), so they name requests here, from the raw ASGI scope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

__all__ = ["Endpoint", "EndpointMatch", "classify"]


class Endpoint(StrEnum):
    GET = "get"
    UPDATE = "update"
    LIST = "list"
    ACK = "ack"
    HEARTBEAT = "heartbeat"
    POLL = "poll"
    STOP = "stop"
    STATS = "stats"


@dataclass(frozen=True)
class EndpointMatch:
    endpoint: Endpoint
    environment_id: str
    work_id: str | None


_WORK = r"^/v1/environments/(?P<env>[^/]+)/work"
# Order matters: `poll` and `stats` are fixed segments that would also match `{work_id}`.
_ROUTES: tuple[tuple[str, re.Pattern[str], Endpoint], ...] = (
    ("GET", re.compile(_WORK + r"/poll/?$"), Endpoint.POLL),
    ("GET", re.compile(_WORK + r"/stats/?$"), Endpoint.STATS),
    ("GET", re.compile(_WORK + r"/?$"), Endpoint.LIST),
    ("GET", re.compile(_WORK + r"/(?P<work>[^/]+)/?$"), Endpoint.GET),
    ("POST", re.compile(_WORK + r"/(?P<work>[^/]+)/?$"), Endpoint.UPDATE),
    ("POST", re.compile(_WORK + r"/(?P<work>[^/]+)/ack/?$"), Endpoint.ACK),
    ("POST", re.compile(_WORK + r"/(?P<work>[^/]+)/heartbeat/?$"), Endpoint.HEARTBEAT),
    ("POST", re.compile(_WORK + r"/(?P<work>[^/]+)/stop/?$"), Endpoint.STOP),
)


# Requests named at once: the guard, the request log and the faults each name every request, so
# the second and third naming of a request is a lookup (a twentieth of a heartbeat's CPU).
CLASSIFIED_CACHE = 1024


@lru_cache(maxsize=CLASSIFIED_CACHE)
def classify(method: str, path: str) -> EndpointMatch | None:
    """The Work API endpoint a request is for, or None for anything else."""
    for route_method, pattern, endpoint in _ROUTES:
        if method != route_method:
            continue
        found = pattern.match(path)
        if found:
            groups = found.groupdict()
            return EndpointMatch(endpoint, groups["env"], groups.get("work"))
    return None
