"""Webhook verification and the answer to each delivery, by tables (no network, no Redis).

Deliveries are signed by the `standardwebhooks` package (the SDK's verifier) and, once, checked
against the SDK's own `client.beta.webhooks.unwrap`, so `check` accepts what the SDK accepts.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from anthropic import Anthropic
from standardwebhooks import Webhook

from dispatcher.control.webhooks import RUN_STARTED, Checked, Decision, check, decide
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


BODY, HEADERS = signed()
CHECK_TABLE = [
    # (case, body, headers, refused status, reason contains)
    ("authentic", BODY, HEADERS, 0, ""),
    ("headers in any case", BODY, {k.title(): v for k, v in HEADERS.items()}, 0, ""),
    ("other key", *signed(key=OTHER_KEY), 401, "No matching signature"),
    ("body changed", BODY.replace(b"abc", b"abd"), HEADERS, 401, "No matching signature"),
    ("id changed", BODY, replaced(HEADERS, webhook_id="wevt_2"), 401, "No matching"),
    ("six minutes old", *signed(age=timedelta(minutes=6)), 401, "too old"),
    ("six minutes ahead", *signed(age=timedelta(minutes=-6)), 401, "too new"),
    ("four minutes old", *signed(age=timedelta(minutes=4)), 0, ""),
    ("no id", BODY, without(HEADERS, "webhook-id"), 400, "missing webhook-id"),
    ("no timestamp", BODY, without(HEADERS, "webhook-timestamp"), 400, "webhook-timestamp"),
    ("no signature", BODY, without(HEADERS, "webhook-signature"), 400, "webhook-signature"),
    ("timestamp not a number", BODY, replaced(HEADERS, webhook_timestamp="soon"), 400,
     "Unix time"),
    ("signature not v1,b64", BODY, replaced(HEADERS, webhook_signature="garbage"), 401,
     "malformed"),
    ("signature bad base64", BODY, replaced(HEADERS, webhook_signature="v1,@@@"), 401, ""),
    ("only other versions", BODY, replaced(HEADERS, webhook_signature="v2,AAAA"), 401,
     "No matching"),
    ("body not UTF-8", b"\xff\xfe", HEADERS, 400, "UTF-8"),
    ("signed, not JSON", *signed(body="not json"), 400, "not JSON"),
    ("signed, no data", *signed({"id": "wevt_1", "type": "event"}), 400, "no event data"),
    ("signed, a list", *signed([1, 2]), 400, "no event data"),
]


@pytest.mark.parametrize(("case", "body", "headers", "refused", "reason"), CHECK_TABLE,
                         ids=[row[0] for row in CHECK_TABLE])
def test_check(case: str, body: bytes, headers: dict[str, str], refused: int,
               reason: str) -> None:
    checked = check(body, headers, Webhook(KEY))
    assert checked.refused == refused, checked.reason
    assert reason in checked.reason
    if not refused:
        assert (checked.webhook_id, checked.event_type, checked.session_id) == (
            "wevt_1", RUN_STARTED, "session_abc")


def test_check_accepts_what_the_sdk_unwraps_and_reads_the_same_event() -> None:
    event = Anthropic(api_key="unused", webhook_key=KEY).beta.webhooks.unwrap(
        BODY.decode(), headers=HEADERS)
    assert event.data.type == RUN_STARTED and event.data.id == "session_abc"
    assert check(BODY, HEADERS, Webhook(KEY)).session_id == event.data.id


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
