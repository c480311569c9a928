"""The container reaper: no session container outlives the attempt that owns it.

A worker killed with SIGKILL leaves its containers running (no supervisor removes them, and
unlike a process group nothing dies with the worker); so does a host that comes back after a
crash. Every session worker of the docker runtime runs the reaper at start and then every
second: each container labelled with this fleet's id (`DISPATCHER_FLEET_ID`) whose attempt is
not its lease's current, running attempt is killed and removed.

Only the fleet id says whose a container is. The key prefix and the environment do not: two
fleets on one engine (blue/green, two compose projects) may share both, and each would read the
other's containers as leaseless in its own registry and remove them. The id is configuration,
not Redis data, so a Redis that lost its data changes nothing about which containers are ours.

The decision is a pure function of the containers' labels and the leases (read only). A lease
with a newer attempt is final (attempts only grow): reaped at once. A lease that is missing or
not running may be a moment's view (a registry that restarted empty is rewritten by the running
supervisor within a fraction of a second): reaped only when seen so on two passes in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from docker.errors import APIError, NotFound
from requests.exceptions import RequestException

from dispatcher.lease.machine import Claim, claim_of
from dispatcher.lease.model import Lease
from dispatcher.lease.registry import LeaseRegistry
from dispatcher.logs import event
from dispatcher.session.container import LABEL_ATTEMPT, LABEL_FLEET_ID, LABEL_WORK_ID, engine
from dispatcher.settings import Settings

__all__ = ["REAP_INTERVAL_SECONDS", "Reaper", "Verdict", "judge"]

# Between two passes. A session worker killed with SIGKILL: recovery moves its sessions to a new
# attempt after 5 s without pulses, and the next pass (at most this later) removes the old
# containers, well inside 10 s.
REAP_INTERVAL_SECONDS = 1.0


@dataclass(frozen=True)
class Found:
    """A container of the fleet as the engine lists it."""

    container_id: str
    work_id: str
    attempt: int


@dataclass(frozen=True)
class Verdict:
    reap: list[Found]  # kill and remove now
    suspect: set[str]  # container ids to reap if still unowned on the next pass


def judge(found: Iterable[Found], leases: Mapping[str, Lease],
          suspects: set[str]) -> Verdict:
    """Which containers no current, running attempt owns."""
    reap: list[Found] = []
    suspect: set[str] = set()
    for item in found:
        claim = claim_of(leases.get(item.work_id), item.attempt)
        if claim == Claim.SUPERSEDED:
            reap.append(item)
        elif claim == Claim.UNCLAIMED:
            if item.container_id in suspects:
                reap.append(item)
            else:
                suspect.add(item.container_id)
    return Verdict(reap=reap, suspect=suspect)


def _parse(container: Mapping[str, object]) -> Found | None:
    labels = container.get("Labels") or {}
    assert isinstance(labels, dict)
    try:
        return Found(str(container["Id"]), str(labels[LABEL_WORK_ID]),
                     int(labels[LABEL_ATTEMPT]))
    except (KeyError, ValueError):
        return None  # not a session container, though it wears the fleet's id


class Reaper:
    """One pass at a time; remembers the containers it suspected on the previous pass."""

    def __init__(self, settings: Settings, registry: LeaseRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.suspects: set[str] = set()

    def run_once(self) -> int:
        """One pass; returns how many containers it removed."""
        api = engine(self.settings)
        filters = {"label": [f"{LABEL_FLEET_ID}={self.settings.fleet_id}"]}
        found = [f for c in api.containers(all=True, filters=filters) if (f := _parse(c))]
        work_ids = sorted({f.work_id for f in found})
        leases = {lease.work_id: lease for lease in self.registry.get_many(work_ids)}
        verdict = judge(found, leases, self.suspects)
        self.suspects = verdict.suspect
        removed = 0
        for item in verdict.reap:
            try:
                api.remove_container(item.container_id, force=True, v=True)
            except NotFound:
                continue
            except (APIError, RequestException) as exc:
                event("container not reaped", level=logging.WARNING, work_id=item.work_id,
                      attempt=item.attempt, container=item.container_id[:12], error=str(exc))
                continue
            removed += 1
            lease = leases.get(item.work_id)
            event("container reaped", work_id=item.work_id, attempt=item.attempt,
                  container=item.container_id[:12],
                  current_attempt=lease.attempt if lease else None)
        return removed
