"""Signed webhook deliveries: `session.status_run_started` for each session created.

The service tells a self-hosted fleet that a session wants a runner with a Standard Webhooks
delivery (headers `webhook-id`, `webhook-timestamp`, `webhook-signature`, an HMAC-SHA256 with
the `whsec_...` key; the SDK's `webhooks.unwrap` verifies it). The emulator sends the same, signed
by the `standardwebhooks` package the SDK verifies with. A delivery is retried with backoff on
5xx or no answer, never on 2xx or 4xx, and each retry carries the same id and a fresh timestamp
and signature, as Standard Webhooks senders do. Every attempt is an entry of the request log
(`endpoint: "webhook"`, `status` 0 when nothing answered), so tests see what was delivered.

Deliveries run as background tasks: creating a session never waits on the receiver.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from . import clock
from .faults import Faults
from .records import new_id
from .requestlog import RequestLog

__all__ = ["RUN_STARTED", "WebhookSender", "run_started_event"]

RUN_STARTED = "session.status_run_started"
# Attempts of one delivery, and the backoff between them: 0.5 s doubling to 16 s, under a
# minute in all (the service's own schedule is unknown), long enough for a receiver that
# restarts or a fleet that drains for a deploy, short enough for tests that watch it.
MAX_ATTEMPTS = 8
FIRST_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 16.0
# A receiver that has not answered in this long counts as no answer.
DELIVERY_TIMEOUT_SECONDS = 5.0
# The emulator has one organisation and one workspace; the ids are what the event carries.
ORGANIZATION_ID = "org_emulator"
WORKSPACE_ID = "wrkspc_emulator"


def run_started_event(session_id: str) -> dict[str, Any]:
    """The event as SDK 2.10.0's `BetaWebhookEvent` reads it."""
    return {"id": new_id("wevt"), "type": "event", "created_at": clock.rfc3339(),
            "data": {"type": RUN_STARTED, "id": session_id, "organization_id": ORGANIZATION_ID,
                     "workspace_id": WORKSPACE_ID}}


class WebhookSender:
    def __init__(self, *, url: str, signing_key: str, log: RequestLog, faults: Faults,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.url = url
        self.webhook = Webhook(signing_key)
        self.log = log
        self.faults = faults
        self.http = httpx.AsyncClient(timeout=DELIVERY_TIMEOUT_SECONDS, transport=transport)
        self._pending: set[asyncio.Task[None]] = set()

    def session_created(self, session: dict[str, Any]) -> None:
        """Deliver `session.status_run_started` in the background (unless a fault drops it)."""
        event = run_started_event(str(session["id"]))
        if self.faults.draw(self.faults.settings.webhook_drop_rate):
            self._spawn(self._record(event, session, attempt=0, status=0,
                                     fault="webhook_dropped"))
        else:
            self._spawn(self.deliver(event, session))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._pending.add(task)  # held, or the loop may collect a running task
        task.add_done_callback(self._pending.discard)

    async def deliver(self, event: dict[str, Any], session: dict[str, Any]) -> None:
        body = json.dumps(event)
        delay = FIRST_BACKOFF_SECONDS
        for attempt in range(1, MAX_ATTEMPTS + 1):
            status = await self._post(event["id"], body)
            await self._record(event, session, attempt=attempt, status=status)
            if 200 <= status < 500:
                return  # delivered, or refused for good (a 4xx is not retried)
            if attempt < MAX_ATTEMPTS:
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_SECONDS)

    async def _post(self, webhook_id: str, body: str) -> int:
        timestamp = datetime.now(tz=UTC)
        headers = {"content-type": "application/json", "webhook-id": webhook_id,
                   "webhook-timestamp": str(int(timestamp.timestamp())),
                   "webhook-signature": self.webhook.sign(webhook_id, timestamp, body)}
        try:
            response = await self.http.post(self.url, content=body, headers=headers)
        except httpx.HTTPError:
            return 0
        return response.status_code

    async def _record(self, event: dict[str, Any], session: dict[str, Any], *, attempt: int,
                      status: int, fault: str | None = None) -> None:
        await self.log.append({
            "time": time.time(), "method": "POST", "endpoint": "webhook",
            "environment_id": session.get("environment_id"), "work_id": session.get("work_id"),
            "session_id": session["id"], "event_id": event["id"], "event": RUN_STARTED,
            "attempt": attempt, "status": status, "fault": fault})

    async def aclose(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        await self.http.aclose()
