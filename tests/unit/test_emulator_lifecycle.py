"""The emulator's work item rules (`lifecycle`), pure: tables of cases, under both settings of
each switch of the server model."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest

from dispatcher.emulator import lifecycle
from dispatcher.emulator.config import (
    DEFAULT_TTL_SECONDS,
    MAX_DELIVERIES,
    SESSIONS_TOKEN_LIFE_SECONDS,
    UNCLAIMED_LIMIT_SECONDS,
    EmulatorConfig,
    LeaseExpiry,
    SessionsToken,
    StoppingHeartbeat,
)
from dispatcher.emulator.errors import Conflict, PreconditionFailed
from dispatcher.emulator.records import WorkRecord, listed_page

CONFIG = EmulatorConfig(environment_key="env-key", api_key="api-key")
NOW = 1_800_000_000.0


def _record(state: str = "queued", **fields: Any) -> WorkRecord:
    return replace(WorkRecord(id="work_1", environment_id="env_1", data={}, created_at="t",
                              seq=1, secret="", entry_id="1-0"), state=state, **fields)


def _payload(secret: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    return loaded


def test_the_defaults_are_sdk_217s_model() -> None:
    assert (CONFIG.default_ttl_seconds, CONFIG.unclaimed_limit_seconds, CONFIG.max_deliveries,
            CONFIG.sessions_token_life_seconds) == (300, 600, 3, 3600)
    assert (DEFAULT_TTL_SECONDS, UNCLAIMED_LIMIT_SECONDS, MAX_DELIVERIES,
            SESSIONS_TOKEN_LIFE_SECONDS) == (300, 600, 3, 3600)
    assert CONFIG.lease_expiry is LeaseExpiry.STOP
    assert CONFIG.stopping_heartbeat is StoppingHeartbeat.REFUSE
    assert CONFIG.sessions_token is SessionsToken.PER_DELIVERY
    assert CONFIG.claim_unacked and CONFIG.stop_stopped_noop and CONFIG.should_retry_header


@pytest.mark.parametrize(("state", "heartbeated", "expires_in", "mode", "expected"), [
    ("starting", False, 1, LeaseExpiry.STOP, lifecycle.Lapse.NONE),
    ("starting", False, -1, LeaseExpiry.STOP, lifecycle.Lapse.STOP),
    ("starting", False, -1, LeaseExpiry.REQUEUE, lifecycle.Lapse.REQUEUE),
    ("starting", False, None, LeaseExpiry.STOP, lifecycle.Lapse.NONE),  # no unclaimed limit
    ("active", True, -1, LeaseExpiry.STOP, lifecycle.Lapse.STOP),
    ("active", True, -1, LeaseExpiry.REQUEUE, lifecycle.Lapse.REQUEUE),
    ("active", True, 5, LeaseExpiry.REQUEUE, lifecycle.Lapse.NONE),
    ("stopping", True, -1, LeaseExpiry.REQUEUE, lifecycle.Lapse.STOP),
    ("stopped", True, -1, LeaseExpiry.STOP, lifecycle.Lapse.NONE),
    ("queued", False, -1, LeaseExpiry.STOP, lifecycle.Lapse.NONE),
])
def test_lapse(state: str, heartbeated: bool, expires_in: float | None, mode: LeaseExpiry,
               expected: lifecycle.Lapse) -> None:
    record = _record(state, latest_heartbeat_at="t" if heartbeated else None,
                     lease_expires_at=None if expires_in is None else NOW + expires_in)
    assert lifecycle.lapse(record, mode, NOW) is expected


def test_a_requeue_starts_the_deliveries_over() -> None:
    record = _record("active", latest_heartbeat_at="t", deliveries=3, entry_id=None)
    assert lifecycle.apply_lapse(record, lifecycle.Lapse.REQUEUE).enqueue
    assert (record.state, record.deliveries, record.latest_heartbeat_at) == ("queued", 0, None)


@pytest.mark.parametrize(("limit", "expires"), [(600, NOW + 600), (0, None)])
def test_ack_starts_the_unclaimed_clock(limit: int, expires: float | None,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dispatcher.emulator.clock.now", lambda: NOW)
    record = _record(deliveries=1)
    transition = lifecycle.ack(record, replace(CONFIG, unclaimed_limit_seconds=limit))
    assert transition.drop_entry == "1-0" and record.state == "starting"
    assert record.lease_expires_at == expires


@pytest.mark.parametrize(("max_deliveries", "delivered_before", "delivered"), [
    (3, 0, True), (3, 2, True), (3, 3, False), (0, 50, True)])
def test_deliveries_are_limited(max_deliveries: int, delivered_before: int,
                                delivered: bool) -> None:
    record = _record(deliveries=delivered_before)
    config = replace(CONFIG, max_deliveries=max_deliveries)
    transition = lifecycle.deliver(record, "1-0", token="tok", config=config, now=NOW)
    assert (transition.body is not None) is delivered
    if not delivered:
        assert transition.drop_entry == "1-0" and record.state == "queued"
        with pytest.raises(Conflict):
            lifecycle.ack(record, config)


@pytest.mark.parametrize(("state", "entry"), [("active", "1-0"), ("queued", "2-0")])
def test_a_stale_entry_is_dropped_not_delivered(state: str, entry: str) -> None:
    record = _record(state)
    transition = lifecycle.deliver(record, entry, token="tok", config=CONFIG, now=NOW)
    assert transition.body is None and transition.drop_entry == entry


@pytest.mark.parametrize(("mode", "life", "tokens_after_two"), [
    (SessionsToken.PER_DELIVERY, 3600, {"a": NOW + 3600, "b": NOW + 3600}),
    (SessionsToken.PER_DELIVERY, 0, {"a": None, "b": None}),
    (SessionsToken.PER_ITEM, 0, {"a": None}),
])
def test_sessions_tokens(mode: SessionsToken, life: int,
                         tokens_after_two: dict[str, float | None]) -> None:
    record = _record()
    config = replace(CONFIG, sessions_token=mode, sessions_token_life_seconds=life)
    first = lifecycle.deliver(record, "1-0", token="a", config=config, now=NOW).body
    second = lifecycle.deliver(record, "1-0", token="b", config=config, now=NOW).body
    assert first and second and _payload(first["secret"]) == {"version": 1,
                                                              "sessions_token": "a"}
    assert record.tokens == tokens_after_two
    assert lifecycle.valid_tokens(record, NOW) == frozenset(tokens_after_two)
    if life:
        assert lifecycle.valid_tokens(record, NOW + life) == frozenset()


@pytest.mark.parametrize(("mode", "extended", "new_token"), [
    (StoppingHeartbeat.REFUSE, False, False), (StoppingHeartbeat.EXTEND, True, True)])
def test_a_heartbeat_on_a_stopping_item(mode: StoppingHeartbeat, extended: bool,
                                        new_token: bool) -> None:
    record = _record("stopping", latest_heartbeat_at="2026-12-06T10:00:00.000000Z",
                     lease_expires_at=NOW)
    body = lifecycle.heartbeat(record, expected="whatever", desired_ttl=None,
                               config=replace(CONFIG, stopping_heartbeat=mode)).body
    assert body is not None and (body["state"], body["lease_extended"]) == ("stopping", extended)
    assert (body["last_heartbeat"] != "2026-12-06T10:00:00.000000Z") is new_token


@pytest.mark.parametrize(("claim", "deliveries", "entry", "expected", "outcome"), [
    (True, 1, "1-0", "NO_HEARTBEAT", "active"),
    (True, 1, "1-0", None, "active"),
    (True, 0, "1-0", "NO_HEARTBEAT", Conflict),  # never delivered: nothing to claim
    (True, 3, None, "NO_HEARTBEAT", "active"),  # left the queue: still claimed
    (True, 1, "1-0", "2026-12-06T10:00:00.000000Z", PreconditionFailed),  # an old holder
    (False, 1, "1-0", "NO_HEARTBEAT", Conflict),
])
def test_a_claim_heartbeat_on_an_unacked_item(claim: bool, deliveries: int, entry: str | None,
                                              expected: str | None, outcome: Any) -> None:
    record = _record(deliveries=deliveries, entry_id=entry)
    config = replace(CONFIG, claim_unacked=claim)
    if isinstance(outcome, str):
        transition = lifecycle.heartbeat(record, expected=expected, desired_ttl=None,
                                         config=config)
        assert record.state == outcome and record.acknowledged_at
        assert transition.drop_entry == entry, "it leaves the queue (if still on it)"
    else:
        with pytest.raises(outcome):
            lifecycle.heartbeat(record, expected=expected, desired_ttl=None, config=config)


@pytest.mark.parametrize(("noop", "force"), [(True, True), (True, False), (False, True)])
def test_a_stop_of_a_stopped_item(noop: bool, force: bool) -> None:
    record = _record("stopped", stopped_at="t")
    config = replace(CONFIG, stop_stopped_noop=noop)
    if noop:
        lifecycle.stop(record, force=force, config=config)
        assert (record.state, record.stopped_at) == ("stopped", "t")
    else:
        with pytest.raises(Conflict):
            lifecycle.stop(record, force=force, config=config)


@pytest.mark.parametrize("stored", [
    json.loads(_record("active", metadata={"k": "v"}, stop_requested_at="t2",
                       tokens={"sk-ant-req-x": None}).dumps()),
    json.loads(_record().dumps()),
    {"id": "work_2", "environment_id": "env_1", "data": {"id": "s"}, "created_at": "t", "seq": 2,
     "secret": "s3cr3t"},  # a record stored before later fields existed: their defaults
], ids=["full", "queued", "older-record"])
def test_a_listed_record_shows_what_the_record_itself_shows(stored: dict[str, Any]) -> None:
    """The list page's projection of a stored record, without building it, is the record's
    own public view: the same fields, values, defaults and order, and never the secret."""
    page = json.loads(listed_page(json.dumps([stored, stored]), "cursor"))
    assert page == {"data": [WorkRecord(**stored).public()] * 2, "next_page": "cursor"}
    assert list(page["data"][0]) == list(WorkRecord(**stored).public())
    assert page["data"][0]["secret"] is None
    assert json.loads(listed_page("[]", None)) == {"data": [], "next_page": None}
