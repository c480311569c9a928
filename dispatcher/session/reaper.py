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

A warm container (`warm_pool.py`) wears no work id: while it idles it belongs to the worker
named by its `dispatcher.warm_owner` label, and is reaped once that owner's key in Redis expired
(the worker died) on two passes in a row; once bound, the binding in Redis names its work item
and attempt, and it is judged like any other.

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
from dispatcher.session.warm_book import WarmBook
from dispatcher.session.warm_pool import LABEL_WARM_OWNER
from dispatcher.settings import Settings

__all__ = ["REAP_INTERVAL_SECONDS", "Reaper", "Verdict", "judge", "judge_idle"]

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
    warm: bool = False  # a warm container: its binding goes with it


@dataclass(frozen=True)
class Idle:
    """A warm container bound to no attempt, and the worker whose pool holds it."""

    container_id: str
    owner: str


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


def judge_idle(idle: Iterable[Idle], live_owners: set[str], suspects: set[str]) -> Verdict:
    """Which idle warm containers no live worker owns (twice in a row: a Redis that restarted
    empty has the owner's key back within a pool tick)."""
    reap: list[Found] = []
    suspect: set[str] = set()
    for item in idle:
        if item.owner in live_owners:
            continue
        if item.container_id in suspects:
            reap.append(Found(item.container_id, "", 0, warm=True))
        else:
            suspect.add(item.container_id)
    return Verdict(reap=reap, suspect=suspect)


def _parse(container: Mapping[str, object]) -> Found | Idle | None:
    labels = container.get("Labels") or {}
    assert isinstance(labels, dict)
    if LABEL_WARM_OWNER in labels:
        return Idle(str(container["Id"]), str(labels[LABEL_WARM_OWNER]))
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
        self.book = WarmBook(registry.redis, prefix=settings.key_prefix)
        self.suspects: set[str] = set()

    def run_once(self) -> int:
        """One pass; returns how many containers it removed."""
        api = engine(self.settings)
        filters = {"label": [f"{LABEL_FLEET_ID}={self.settings.fleet_id}"]}
        parsed = [f for c in api.containers(all=True, filters=filters) if (f := _parse(c))]
        found, idle = self._bound([p for p in parsed if isinstance(p, Found)],
                                  [p for p in parsed if isinstance(p, Idle)])
        work_ids = sorted({f.work_id for f in found})
        leases = {lease.work_id: lease for lease in self.registry.get_many(work_ids)}
        verdict = judge(found, leases, self.suspects)
        idle_verdict = judge_idle(idle, self.book.live_owners(sorted({i.owner for i in idle})),
                                  self.suspects)
        self.suspects = verdict.suspect | idle_verdict.suspect
        removed = 0
        for item in [*verdict.reap, *idle_verdict.reap]:
            try:
                api.remove_container(item.container_id, force=True, v=True)
            except NotFound:
                continue
            except (APIError, RequestException) as exc:
                event("container not reaped", level=logging.WARNING, work_id=item.work_id,
                      attempt=item.attempt, container=item.container_id[:12], error=str(exc))
                continue
            removed += 1
            if item.warm:
                self.book.unbind(item.container_id)
            lease = leases.get(item.work_id)
            event("container reaped", work_id=item.work_id or None,
                  attempt=item.attempt or None,
                  container=item.container_id[:12], warm=item.warm or None,
                  current_attempt=lease.attempt if lease else None)
        return removed

    def _bound(self, found: list[Found], idle: list[Idle]) -> tuple[list[Found], list[Idle]]:
        """Warm containers bound to an attempt join the others, judged by their binding."""
        bindings = self.book.bindings([i.container_id for i in idle])
        for item in idle:
            if (binding := bindings.get(item.container_id)) is not None:
                found.append(Found(item.container_id, binding.work_id, binding.attempt,
                                   warm=True))
        return found, [i for i in idle if i.container_id not in bindings]
