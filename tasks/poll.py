"""The poller's tasks (control queue): the continuous poller, started and watched by beat, each
run handing over to the next; or, with webhooks, the wake-ups and beat's slow sweep.

Each task works for one environment. Beat's ticks name none (beat never reads the
environments): with one environment a tick runs for it; with several it starts one task per
environment that needs one, so each environment has its own poller and one environment's long
poll or drain never delays another's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from dispatcher.celery import names
from dispatcher.celery.application import app
from dispatcher.control.poll_keys import PollKeys
from dispatcher.control.poller import POLL_LOCK_SECONDS, drain, run_poller
from dispatcher.runtime import Runtime, get_runtime

# As the SDK's webhook recipe polls: an item polled but never acked (a poller that died between
# the two) is offered again after 2 s, not the server's default 5 s.
RECLAIM_OLDER_THAN_MS = 2000


def _for_each(runtime: Runtime, task: Any, environment_id: str | None,
              run: Callable[[str], int], *, needs: Callable[[str], bool]) -> int:
    """Run for the environment named, or the only one; with several and none named, publish
    the task once for each environment that `needs` it (and run nothing here)."""
    if environment_id is not None or len(runtime.environments) == 1:
        return run(runtime.environment(environment_id).id)
    for environment in runtime.environments:
        if needs(environment.id):
            # Dropped if nobody takes it within a lock's life: the next tick sends another.
            task.apply_async(kwargs={"environment_id": environment.id},
                             queue=names.CONTROL_QUEUE, expires=POLL_LOCK_SECONDS)
    return 0


@app.task(name=names.POLL, ignore_result=True, bind=True, send_events=False)
def claim_work(self: Any, handover: str | None = None, environment_id: str | None = None) -> int:
    """Claim work of one environment for the fleet's free session slots; at most one runs per
    environment. The lock token in `handover` is no secret: it only lets the successor keep
    the lock."""
    runtime = get_runtime()
    hostname = self.request.hostname or ""

    def poll(environment: str) -> int:
        def hand_over(token: str) -> None:
            # A successor nobody takes within the lock's life is dropped: beat starts a new one.
            claim_work.apply_async(kwargs={"handover": token, "environment_id": environment},
                                   queue=names.CONTROL_QUEUE, expires=POLL_LOCK_SECONDS)

        return run_poller(runtime, environment_id=environment, handover=handover,
                          hand_over=hand_over,
                          stopping=lambda: runtime.capacity.is_draining(hostname))

    keys = PollKeys(runtime.settings.key_prefix)
    return _for_each(runtime, claim_work, environment_id, poll,
                     needs=lambda e: not runtime.redis.exists(keys.lock(e)))


@app.task(name=names.CLAIM_NOW, ignore_result=True, send_events=False)
def claim_now(environment_id: str | None = None, wakeup: bool = False) -> int:
    """A webhook delivery (`wakeup`), or the sweep: claim until the queue is empty (or the
    fleet full). A delivery names no environment: every environment's queue is drained."""
    runtime = get_runtime()
    if wakeup:
        # Cleared before any poll: a delivery from now on publishes the next wake-up, and one
        # that came before is seen by the polls below.
        runtime.redis.delete(PollKeys(runtime.settings.key_prefix).wake_pending)
    return _for_each(runtime, claim_now, environment_id, lambda e: drain(
        runtime, environment_id=e, reclaim_older_than_ms=RECLAIM_OLDER_THAN_MS, wake=True),
        needs=lambda e: True)


@app.task(name=names.CLAIM_WOKEN, ignore_result=True, send_events=False)
def claim_woken(environment_id: str | None = None) -> int:
    """Carry on a drain the full fleet cut short, once a slot is free (Redis only otherwise)."""
    runtime = get_runtime()
    keys = PollKeys(runtime.settings.key_prefix)
    return _for_each(runtime, claim_woken, environment_id, lambda e: drain(
        runtime, environment_id=e, reclaim_older_than_ms=RECLAIM_OLDER_THAN_MS, wake=False),
        needs=lambda e: bool(runtime.redis.exists(keys.wanted(e))))
