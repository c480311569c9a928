"""Webhook wake-up: what to answer a delivery, and whether it wakes the poller. Pure.

A `session.status_run_started` webhook says a session wants a runner; it names no environment
and no work item, so a delivery only wakes the fleet's poller, which drains the queue (see
`control.poller.drain`). Verification is the SDK's `client.beta.webhooks.unwrap`: the Standard
Webhooks signature over `{webhook-id}.{webhook-timestamp}.{body}` with the `whsec_...` key, by
the `standardwebhooks` package (which also refuses a timestamp more than 5 minutes off), never a
hand-written HMAC. Two steps, both decisions without effects:

* `check(body, headers, webhook)`: is the delivery authentic and well formed, and what does it ask?
* `decide(checked, draining=..., first_delivery=...)`: the answer, once the server (`ops/webhooks`)
  has looked up what only it can see: is the fleet draining, was this `webhook-id` seen before.

Statuses: 400 for a malformed or replayed delivery, 401 for a signature or timestamp that does not
verify (the sender must not retry either), 503 while the fleet is draining (the sender retries),
202 for a wake-up, 200 for an authentic event that wakes nothing.
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass

from standardwebhooks import Webhook, WebhookVerificationError

__all__ = ["REFUSAL_LOG_SECONDS", "RUN_STARTED", "Checked", "Decision",
           "RefusalSampler", "check", "decide"]

# The one event that asks for a runner (SDK 2.10.0 `BetaWebhookSessionStatusRunStartedEventData`).
RUN_STARTED = "session.status_run_started"
_REQUIRED_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")
# Refused deliveries are logged one line per this many seconds per kind, counting the ones left
# out: a flood of forged requests (a thousand a second fit) must not become a flood of lines.
REFUSAL_LOG_SECONDS = 10.0


@dataclass(frozen=True)
class Checked:
    """A delivery looked at: `refused` with a status, or authentic with its id and event."""

    webhook_id: str = ""
    event_type: str = ""  # `data.type` of the event
    session_id: str = ""
    refused: int = 0  # the status to answer at once; 0 when authentic
    reason: str = ""


@dataclass(frozen=True)
class Decision:
    status: int
    reason: str
    wake: bool = False  # publish a claim: the delivery asks for a runner


def check(body: bytes, headers: Mapping[str, str], webhook: Webhook) -> Checked:
    """Verify the delivery as `unwrap` does, then read its event."""
    lowered = {name.lower(): value for name, value in headers.items()}
    missing = [name for name in _REQUIRED_HEADERS if not lowered.get(name)]
    if missing:
        return Checked(refused=400, reason=f"missing {', '.join(missing)}")
    if not lowered["webhook-timestamp"].isdigit():
        return Checked(refused=400, reason="webhook-timestamp is not a Unix time")
    try:
        text = body.decode()
    except UnicodeDecodeError:
        return Checked(refused=400, reason="body is not UTF-8")
    try:
        webhook.verify(text, {name: lowered[name] for name in _REQUIRED_HEADERS},
                       json_parse=False)
    except WebhookVerificationError as exc:
        return Checked(refused=401, reason=str(exc))
    except (ValueError, binascii.Error):
        # A signature that is not `v1,<base64>` makes the library fail before comparing.
        return Checked(refused=401, reason="malformed webhook-signature")
    return _read_event(text, webhook_id=lowered["webhook-id"])


def _read_event(text: str, *, webhook_id: str) -> Checked:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return Checked(webhook_id=webhook_id, refused=400, reason="body is not JSON")
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return Checked(webhook_id=webhook_id, refused=400, reason="no event data type")
    session_id = data.get("id")
    return Checked(webhook_id=webhook_id, event_type=data["type"],
                   session_id=session_id if isinstance(session_id, str) else "")


def decide(checked: Checked, *, draining: bool, first_delivery: bool | None) -> Decision:
    """The answer to a checked delivery.

    `draining`: the fleet cannot claim now (no live session slots, or this server is stopping);
    answered before the id is recorded, so the sender's retry is not taken for a replay.
    `first_delivery`: whether the id was new when recorded; None when not recorded yet.
    """
    if checked.refused:
        return Decision(checked.refused, checked.reason)
    if draining:
        return Decision(503, "fleet draining")
    if first_delivery is None:
        raise ValueError("an authentic delivery is decided after its id is recorded")
    if not first_delivery:
        return Decision(400, "replayed webhook-id")
    if checked.event_type != RUN_STARTED:
        return Decision(200, f"ignored {checked.event_type}")
    return Decision(202, "claim requested", wake=True)


class RefusalSampler:
    """Which refusals to log: the first of each kind (status and reason), then one line per
    REFUSAL_LOG_SECONDS per kind, carrying how many were left out since the last line."""

    def __init__(self, *, window_seconds: float = REFUSAL_LOG_SECONDS) -> None:
        self.window_seconds = window_seconds
        self._last: dict[tuple[int, str], float] = {}
        self._left_out: dict[tuple[int, str], int] = {}

    def note(self, status: int, reason: str, *, now: float) -> int | None:
        """None: leave this one out; else log it, with the count left out before it."""
        kind = (status, reason)
        last = self._last.get(kind)
        if last is not None and now - last < self.window_seconds:
            self._left_out[kind] = self._left_out.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._left_out.pop(kind, 0)
