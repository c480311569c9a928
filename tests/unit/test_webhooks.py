"""Webhook verification and the answer to each delivery, by tables (no network, no Redis).

Deliveries are signed by the `standardwebhooks` package (the SDK's verifier) and, once, checked
against the SDK's own `client.beta.webhooks.unwrap`, so `check` accepts what the SDK accepts.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from anthropic import Anthropic
from standardwebhooks import Webhook

from dispatcher.control.webhooks import (
    RUN_STARTED,
    Checked,
    Decision,
    RefusalSampler,
    check,
    decide,
)
from dispatcher.emulator.webhooks import run_started_event

KEY = "whsec_" + base64.b64encode(b"a signing key of the tests, 32 b").decode()
OTHER_KEY = "whsec_" + base64.b64encode(b"somebody else's key, also 32 byt").decode()
EVENT = run_started_event("session_abc")


def signed(event: object = EVENT, *, key: str = KEY, age: timedelta = timedelta(0),
           webhook_id: str = "wevt_1", body: str | None = None) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(event) if body is None else body
    moment = datetime.now(tz=UTC) - age
    headers = {"webhook-id": webhook_id, "webhook-timestamp": str(int(moment.timestamp())),
               "webhook-signature": Webhook(key).sign(webhook_id, moment, text)}
    return text.encode(), headers


def without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


def replaced(headers: dict[str, str], **changes: str) -> dict[str, str]:
    return {**headers, **{k.replace("_", "-"): v for k, v in changes.items()}}


Delivery = tuple[bytes, dict[str, str]]


def _with_headers(change: Callable[[dict[str, str]], dict[str, str]]) -> Callable[[], Delivery]:
    def make() -> Delivery:
        body, headers = signed()
        return body, change(headers)
    return make


def _with_body(body: bytes) -> Callable[[], Delivery]:
    return lambda: (body, signed()[1])


# Each delivery is signed when its case runs, not when the module is collected: a suite that
# reaches these tests minutes later must not find its "fresh" deliveries stale.
CHECK_TABLE: list[tuple[str, Callable[[], Delivery], int, str]] = [
    # (case, make the delivery, refused status, reason contains)
    ("authentic", signed, 0, ""),
    ("headers in any case", _with_headers(lambda h: {k.title(): v for k, v in h.items()}), 0, ""),
    ("other key", lambda: signed(key=OTHER_KEY), 401, "No matching signature"),
    ("body changed", lambda: (signed()[0].replace(b"abc", b"abd"), signed()[1]), 401,
     "No matching signature"),
    ("id changed", _with_headers(lambda h: replaced(h, webhook_id="wevt_2")), 401, "No matching"),
    ("six minutes old", lambda: signed(age=timedelta(minutes=6)), 401, "too old"),
    ("six minutes ahead", lambda: signed(age=timedelta(minutes=-6)), 401, "too new"),
    ("four minutes old", lambda: signed(age=timedelta(minutes=4)), 0, ""),
    ("no id", _with_headers(lambda h: without(h, "webhook-id")), 400, "missing webhook-id"),
    ("no timestamp", _with_headers(lambda h: without(h, "webhook-timestamp")), 400,
     "webhook-timestamp"),
    ("no signature", _with_headers(lambda h: without(h, "webhook-signature")), 400,
     "webhook-signature"),
    ("timestamp not a number", _with_headers(lambda h: replaced(h, webhook_timestamp="soon")),
     400, "Unix time"),
    ("signature not v1,b64", _with_headers(lambda h: replaced(h, webhook_signature="garbage")),
     401, "malformed"),
    ("signature bad base64", _with_headers(lambda h: replaced(h, webhook_signature="v1,@@@")),
     401, ""),
    ("only other versions", _with_headers(lambda h: replaced(h, webhook_signature="v2,AAAA")),
     401, "No matching"),
    ("body not UTF-8", _with_body(b"\xff\xfe"), 400, "UTF-8"),
    ("signed, not JSON", lambda: signed(body="not json"), 400, "not JSON"),
    ("signed, no data", lambda: signed({"id": "wevt_1", "type": "event"}), 400, "no event data"),
    ("signed, a list", lambda: signed([1, 2]), 400, "no event data"),
]


@pytest.mark.parametrize(("case", "make", "refused", "reason"), CHECK_TABLE,
                         ids=[row[0] for row in CHECK_TABLE])
def test_check(case: str, make: Callable[[], Delivery], refused: int, reason: str) -> None:
    body, headers = make()
    checked = check(body, headers, Webhook(KEY))
    assert checked.refused == refused, checked.reason
    assert reason in checked.reason
    if not refused:
        assert (checked.webhook_id, checked.event_type, checked.session_id) == (
            "wevt_1", RUN_STARTED, "session_abc")


def test_check_accepts_what_the_sdk_unwraps_and_reads_the_same_event() -> None:
    body, headers = signed()
    event = Anthropic(api_key="unused", webhook_key=KEY).beta.webhooks.unwrap(
        body.decode(), headers=headers)
    assert event.data.type == RUN_STARTED and event.data.id == "session_abc"
    assert check(body, headers, Webhook(KEY)).session_id == event.data.id


AUTHENTIC = Checked(webhook_id="wevt_1", event_type=RUN_STARTED, session_id="session_abc")
DECIDE_TABLE = [
    # (case, checked, draining, first delivery, expected)
    ("wake-up", AUTHENTIC, False, True, Decision(202, "claim requested", wake=True)),
    ("replayed id", AUTHENTIC, False, False, Decision(400, "replayed webhook-id")),
    ("draining", AUTHENTIC, True, None, Decision(503, "fleet draining")),
    ("other event", Checked(webhook_id="w", event_type="session.status_idled"), False, True,
     Decision(200, "ignored session.status_idled")),
    ("refused", Checked(refused=401, reason="No matching signature found"), True, None,
     Decision(401, "No matching signature found")),
    ("refused, draining too", Checked(refused=400, reason="missing webhook-id"), True, None,
     Decision(400, "missing webhook-id")),
]


@pytest.mark.parametrize(("case", "checked", "draining", "first", "expected"), DECIDE_TABLE,
                         ids=[row[0] for row in DECIDE_TABLE])
def test_decide(case: str, checked: Checked, draining: bool, first: bool | None,
                expected: Decision) -> None:
    assert decide(checked, draining=draining, first_delivery=first) == expected


def test_an_authentic_delivery_is_decided_only_once_its_id_is_recorded() -> None:
    with pytest.raises(ValueError, match="recorded"):
        decide(AUTHENTIC, draining=False, first_delivery=None)


def test_the_emulators_event_has_the_sdk_shape() -> None:
    assert set(EVENT) == {"id", "type", "created_at", "data"} and EVENT["type"] == "event"
    assert set(EVENT["data"]) == {"type", "id", "organization_id", "workspace_id"}
    datetime.fromisoformat(EVENT["created_at"])


def test_refusals_are_sampled_per_kind_with_the_count_left_out() -> None:
    sampler = RefusalSampler(window_seconds=10)
    seen = [sampler.note(401, "No matching signature found", now=t) for t in (0, 1, 2, 9.9)]
    assert seen == [0, None, None, None], "the first at once, the rest left out"
    assert sampler.note(400, "replayed webhook-id", now=3) == 0, "another kind has its own"
    assert sampler.note(401, "No matching signature found", now=10) == 3, "three left out"
    assert sampler.note(401, "No matching signature found", now=11) is None
    assert sampler.note(401, "No matching signature found", now=25) == 1
