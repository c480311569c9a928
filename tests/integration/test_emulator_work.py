"""The emulator's Work API over real HTTP and real Redis: every endpoint and state transition."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from dispatcher.emulator.config import DEFAULT_TTL_SECONDS

if TYPE_CHECKING:
    from conftest import EmulatorProcess

pytestmark = pytest.mark.integration

Json = dict[str, Any]


def _claim(emu: EmulatorProcess, env: str, **meta: str) -> Json:
    """Create a session, poll it, ack it: an item in `starting`."""
    _, work_id = emu.create_session(env, metadata=meta or None)
    polled = emu.poll(env, block_ms=500, worker_id="w-claim")
    assert polled is not None and polled["id"] == work_id
    acked = emu.http.post(emu.work_url(env, f"/{work_id}/ack"), headers=emu.env_headers)
    assert acked.status_code == 200, acked.text
    return dict(acked.json())


def _beat(emu: EmulatorProcess, env: str, work_id: str, expected: str | None,
          **params: Any) -> httpx.Response:
    query = {**params, **({"expected_last_heartbeat": expected} if expected else {})}
    return emu.http.post(emu.work_url(env, f"/{work_id}/heartbeat"), params=query,
                         headers=emu.env_headers)


def _stop(emu: EmulatorProcess, env: str, work_id: str, force: bool | None = None,
          headers: dict[str, str] | None = None) -> httpx.Response:
    body = {} if force is None else {"force": force}
    return emu.http.post(emu.work_url(env, f"/{work_id}/stop"), json=body,
                         headers=headers or emu.org_headers)


def test_a_session_queues_a_work_item_with_its_metadata(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    session_id, work_id = emulator.create_session(env, metadata={"team": "a"})
    work = emulator.get(env, work_id)
    assert work["type"] == "work" and work["state"] == "queued"
    assert work["data"] == {"id": session_id, "type": "session"}
    assert work["metadata"] == {"team": "a"} and work["environment_id"] == env
    assert work["secret"] is None, "secret is set on the polled copy only"
    for field in ("acknowledged_at", "started_at", "latest_heartbeat_at", "stop_requested_at",
                  "stopped_at"):
        assert work[field] is None
    session = emulator.http.get(f"/v1/sessions/{session_id}", headers=emulator.org_headers)
    assert session.json()["work_id"] == work_id


def test_poll_delivers_with_a_secret_and_an_empty_poll_is_json_null(
        emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    polled = emulator.poll(env, worker_id="w1")
    assert polled is not None and polled["id"] == work_id and polled["state"] == "queued"
    padded = polled["secret"] + "=" * (-len(polled["secret"]) % 4)
    assert json.loads(base64.urlsafe_b64decode(padded))["sessions_token"].startswith(
        "sk-ant-req-")
    empty = emulator.http.get(emulator.work_url(env, "/poll"), headers=emulator.env_headers)
    assert empty.status_code == 200 and empty.text == "null"
    assert empty.headers["content-type"] == "application/json"


@pytest.mark.parametrize("block_ms", [0, 1000, -1])
def test_block_ms_out_of_range_is_a_400(emulator: EmulatorProcess, block_ms: int) -> None:
    env = emulator.create_environment()
    response = emulator.http.get(emulator.work_url(env, "/poll"), params={"block_ms": block_ms},
                                 headers=emulator.env_headers)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_a_long_poll_wakes_when_work_arrives(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    result: dict[str, Any] = {}
    block_ms = 999

    def poll() -> None:
        result["sent"] = time.monotonic()
        result["work"] = emulator.poll(env, block_ms=block_ms, worker_id="w-long")
        result["at"] = time.monotonic()

    poller = threading.Thread(target=poll)
    poller.start()
    time.sleep(0.3)  # the poll is blocked in XREADGROUP by now
    _, work_id = emulator.create_session(env)
    poller.join(timeout=5)
    assert result["work"]["id"] == work_id
    # A poll nobody wakes answers no sooner than block_ms after it was sent, whatever the load:
    # an answer before that is the wake-up.
    assert result["at"] - result["sent"] < block_ms / 1000, "the long poll was not woken"


def test_a_blocked_poll_with_no_work_waits_about_block_ms(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    started = time.monotonic()
    assert emulator.poll(env, block_ms=300) is None
    assert 0.25 < time.monotonic() - started < 1.5


def test_ack_moves_queued_to_starting_and_only_once(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    work = _claim(emulator, env)
    assert work["state"] == "starting" and work["acknowledged_at"]
    assert work["secret"] is None
    again = emulator.http.post(emulator.work_url(env, f"/{work['id']}/ack"),
                               headers=emulator.env_headers)
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict_error"
    unknown = emulator.http.post(emulator.work_url(env, "/work_nope/ack"),
                                 headers=emulator.env_headers)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    assert emulator.poll(env) is None, "an acked item left the queue"


def test_heartbeats_compare_tokens_exactly_and_activate(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    work_id = _claim(emulator, env)["id"]
    first = _beat(emulator, env, work_id, "NO_HEARTBEAT")
    assert first.status_code == 200, first.text
    beat = first.json()
    assert beat["type"] == "work_heartbeat" and beat["state"] == "active"
    assert beat["lease_extended"] is True and beat["ttl_seconds"] == DEFAULT_TTL_SECONDS
    token = beat["last_heartbeat"]
    assert token.endswith("Z") and "." in token, "RFC 3339 with microseconds"
    work = emulator.get(env, work_id)
    assert work["started_at"] == token and work["latest_heartbeat_at"] == token

    second = _beat(emulator, env, work_id, token).json()
    assert second["last_heartbeat"] != token, "successive tokens differ"
    stale = _beat(emulator, env, work_id, token)
    assert stale.status_code == 412
    error = stale.json()["error"]
    assert error["details"]["error_code"] == "heartbeat_precondition_failed"
    assert error["details"]["current_state"] == {
        "state": "active", "last_heartbeat": second["last_heartbeat"],
        "lease_updated_at": second["last_heartbeat"], "lease_extended": False,
        "ttl_seconds": DEFAULT_TTL_SECONDS}
    assert _beat(emulator, env, work_id, "NO_HEARTBEAT").status_code == 412


def test_desired_ttl_is_clamped(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    work_id = _claim(emulator, env)["id"]
    low = _beat(emulator, env, work_id, "NO_HEARTBEAT", desired_ttl_seconds=1).json()
    assert low["ttl_seconds"] == 10
    high = _beat(emulator, env, work_id, low["last_heartbeat"],
                 desired_ttl_seconds=100_000).json()
    assert high["ttl_seconds"] == 600
    assert _beat(emulator, env, work_id, high["last_heartbeat"],
                 desired_ttl_seconds=0).status_code == 400


def test_two_claimants_only_one_wins_the_first_heartbeat(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    for _ in range(5):
        work_id = _claim(emulator, env)["id"]
        barrier = threading.Barrier(2)
        statuses: list[httpx.Response] = []

        def claim(work_id: str = work_id, barrier: threading.Barrier = barrier,
                  statuses: list[httpx.Response] = statuses) -> None:
            with httpx.Client(base_url=emulator.base_url, timeout=10) as client:
                barrier.wait()
                statuses.append(client.post(
                    emulator.work_url(env, f"/{work_id}/heartbeat"),
                    params={"expected_last_heartbeat": "NO_HEARTBEAT"},
                    headers=emulator.env_headers))

        threads = [threading.Thread(target=claim) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        codes = sorted(r.status_code for r in statuses)
        assert codes == [200, 412]
        loser = next(r for r in statuses if r.status_code == 412).json()
        assert loser["error"]["details"]["current_state"]["state"] == "active"


def test_heartbeat_on_a_queued_item_is_a_conflict(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    assert _beat(emulator, env, work_id, "NO_HEARTBEAT").status_code == 409
    lost = _beat(emulator, env, work_id, "2026-01-01T00:00:00.000000Z")
    assert lost.status_code == 412, "a holder whose lease was re-queued learns it lost it"
    assert lost.json()["error"]["details"]["current_state"]["state"] == "queued"


def test_graceful_then_forced_stop(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    work_id = _claim(emulator, env)["id"]
    token = _beat(emulator, env, work_id, "NO_HEARTBEAT").json()["last_heartbeat"]

    graceful = _stop(emulator, env, work_id)
    assert graceful.status_code == 204 and graceful.content == b""
    work = emulator.get(env, work_id)
    assert work["state"] == "stopping" and work["stop_requested_at"]
    beat = _beat(emulator, env, work_id, "anything: not compared while stopping").json()
    assert beat["state"] == "stopping" and beat["lease_extended"] is False, "shut down"
    assert beat["last_heartbeat"] == token, "no new token for a lease that is not extended"
    assert _stop(emulator, env, work_id).status_code == 204, "graceful again: no change"
    assert emulator.get(env, work_id)["state"] == "stopping"

    forced = _stop(emulator, env, work_id, force=True, headers=emulator.env_headers)
    assert forced.status_code == 204
    work = emulator.get(env, work_id)
    assert work["state"] == "stopped" and work["stopped_at"]
    beat = _beat(emulator, env, work_id, beat["last_heartbeat"]).json()
    assert (beat["state"], beat["lease_extended"]) == ("stopped", False)
    again = _stop(emulator, env, work_id, force=True)
    assert again.status_code == 204, "a stop of a stopped item changes nothing"
    assert emulator.get(env, work_id)["stopped_at"] == work["stopped_at"]


def test_force_stop_of_an_active_item(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    work_id = _claim(emulator, env)["id"]
    assert _stop(emulator, env, work_id, force=True).status_code == 204
    work = emulator.get(env, work_id)
    assert work["state"] == "stopped" and work["stopped_at"] and work["stop_requested_at"]


def test_stopping_a_queued_item_means_it_is_never_delivered(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, queued = emulator.create_session(env)
    _, polled_unacked = emulator.create_session(env)
    assert emulator.poll(env, worker_id="w1")["id"] == queued  # type: ignore[index]
    # `queued` is now polled but not acked; `polled_unacked` was never polled.
    assert _stop(emulator, env, queued).status_code == 204
    assert _stop(emulator, env, polled_unacked).status_code == 204
    for work_id in (queued, polled_unacked):
        assert emulator.get(env, work_id)["state"] == "stopped"
    assert emulator.poll(env, reclaim_older_than_ms=1, worker_id="w2") is None
    stats = emulator.http.get(emulator.work_url(env, "/stats"), headers=emulator.org_headers)
    assert stats.json()["depth"] == 0 and stats.json()["pending"] == 0


# "Not yet" holds only while the second poll reaches the emulator within this of the first: on
# two cores at load 15-20 a process can wait longer than 300 ms for a CPU between two requests.
RECLAIM_MS = 2000


def test_unacked_items_are_reclaimed_after_the_timeout(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    assert emulator.poll(env, worker_id="w1")["id"] == work_id  # type: ignore[index]
    assert emulator.poll(env, worker_id="w2", reclaim_older_than_ms=RECLAIM_MS) is None, (
        "not yet")
    time.sleep(RECLAIM_MS / 1000 + 0.1)
    reclaimed = emulator.poll(env, worker_id="w2", reclaim_older_than_ms=RECLAIM_MS)
    assert reclaimed is not None and reclaimed["id"] == work_id and reclaimed["secret"]
    assert emulator.poll(env, worker_id="w3", reclaim_older_than_ms=RECLAIM_MS) is None, (
        "a reclaim resets the idle time")


def test_get_of_unknown_items_and_environments_is_404(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    other = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    for url in (emulator.work_url(env, "/work_missing"), emulator.work_url(other, f"/{work_id}"),
                emulator.work_url("env_missing", f"/{work_id}")):
        response = emulator.http.get(url, headers=emulator.org_headers)
        assert response.status_code == 404, url
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "not_found_error"
    missing = emulator.http.get(emulator.work_url("env_missing", "/poll"),
                                headers=emulator.env_headers)
    assert missing.status_code == 404


def test_update_merges_metadata_and_null_deletes(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env, metadata={"a": "1", "b": "2"})
    url = emulator.work_url(env, f"/{work_id}")
    response = emulator.http.post(url, headers=emulator.org_headers,
                                  json={"metadata": {"b": None, "c": "3"}})
    assert response.status_code == 200
    assert response.json()["metadata"] == {"a": "1", "c": "3"}
    assert emulator.get(env, work_id)["metadata"] == {"a": "1", "c": "3"}


@pytest.mark.parametrize(("patch", "limit"), [
    ({f"k{i}": "v" for i in range(17)}, "16 keys"),
    ({"k" * 65: "v"}, "64 characters"),
    ({"k": "v" * 513}, "512 characters"),
    ({"k": 5}, "string"),
])
def test_update_limits_say_which_limit(emulator: EmulatorProcess, patch: Json,
                                       limit: str) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    response = emulator.http.post(emulator.work_url(env, f"/{work_id}"),
                                  headers=emulator.org_headers, json={"metadata": patch})
    assert response.status_code == 400
    assert limit in response.json()["error"]["message"]
    missing = emulator.http.post(emulator.work_url(env, f"/{work_id}"),
                                 headers=emulator.org_headers, json={})
    assert missing.status_code == 400


def test_list_is_newest_first_with_stable_cursor_pages_under_inserts(
        emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    existing = [emulator.create_session(env)[1] for _ in range(25)]
    seen: list[str] = []
    page: str | None = None
    while True:
        params: Json = {"limit": 7, **({"page": page} if page else {})}
        response = emulator.http.get(emulator.work_url(env), params=params,
                                     headers=emulator.env_headers)
        assert response.status_code == 200
        body = response.json()
        seen += [w["id"] for w in body["data"]]
        emulator.create_session(env)  # concurrent inserts land before the cursor, unseen
        page = body["next_page"]
        if page is None:
            break
    assert seen == list(reversed(existing)), "each existing item exactly once, newest first"


def test_list_limits(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    for _ in range(22):
        emulator.create_session(env)
    default = emulator.http.get(emulator.work_url(env), headers=emulator.env_headers).json()
    assert len(default["data"]) == 20 and default["next_page"]
    for bad in ({"limit": 101}, {"limit": 0}, {"page": "garbage!"}):
        response = emulator.http.get(emulator.work_url(env), params=bad,
                                     headers=emulator.env_headers)
        assert response.status_code == 400, bad


def test_list_limit_raised(emulator_factory: Callable[..., EmulatorProcess]) -> None:
    """`--max-list-limit`: a page of more than 100 (a fleet sweeping many held leases asks
    1,000), and the 400 above the new limit names it."""
    emu = emulator_factory("--max-list-limit", "150")
    env = emu.create_environment()
    for _ in range(120):
        emu.create_session(env)
    page = emu.http.get(emu.work_url(env), params={"limit": 150}, headers=emu.env_headers)
    assert len(page.json()["data"]) == 120
    over = emu.http.get(emu.work_url(env), params={"limit": 151}, headers=emu.env_headers)
    assert over.status_code == 400
    assert over.json()["error"]["message"] == "limit must be 1-150"


def test_stats_count_queue_pending_and_workers(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()

    def stats() -> Json:
        return dict(emulator.http.get(emulator.work_url(env, "/stats"),
                                      headers=emulator.env_headers).json())

    empty = stats()
    assert empty == {"type": "work_queue_stats", "depth": 0, "pending": 0,
                     "oldest_queued_at": None, "workers_polling": 0}
    ids = [emulator.create_session(env)[1] for _ in range(4)]
    assert stats()["depth"] == 4 and stats()["oldest_queued_at"]
    polled = [emulator.poll(env, worker_id=f"w{i}") for i in range(2)]
    assert stats()["depth"] == 2 and stats()["pending"] == 2
    assert stats()["workers_polling"] == 2
    emulator.http.post(emulator.work_url(env, f"/{polled[0]['id']}/ack"),  # type: ignore[index]
                       headers=emulator.env_headers)
    after_ack = stats()
    assert (after_ack["depth"], after_ack["pending"]) == (2, 1)
    _stop(emulator, env, ids[3])
    assert stats()["depth"] == 1, "a stopped queued item leaves the queue"


def test_healthcheck_and_arbitrary_items_can_be_queued(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    check = emulator.healthcheck(env)
    other = emulator.enqueue(env, "mystery", metadata={"x": "y"})
    assert check["data"]["type"] == "healthcheck" and check["state"] == "queued"
    delivered = [emulator.poll(env) for _ in range(2)]
    assert [w["data"]["type"] for w in delivered if w] == ["healthcheck", "mystery"]
    assert delivered[1]["metadata"] == {"x": "y"}  # type: ignore[index]
    assert other["id"] == delivered[1]["id"]  # type: ignore[index]


def test_the_request_log_records_work_api_calls(emulator: EmulatorProcess) -> None:
    env = emulator.create_environment()
    _, work_id = emulator.create_session(env)
    emulator.poll(env, worker_id="w-log")
    emulator.http.post(emulator.work_url(env, f"/{work_id}/ack"), headers=emulator.env_headers)
    token = _beat(emulator, env, work_id, "NO_HEARTBEAT").json()["last_heartbeat"]
    _stop(emulator, env, work_id, force=True)
    entries = [e for e in emulator.requests_log() if e["environment_id"] == env]
    assert [e["endpoint"] for e in entries] == ["poll", "ack", "heartbeat", "stop"]
    poll, _, beat, stop = entries
    assert poll["work_id"] == work_id and poll["worker_id"] == "w-log"
    assert beat["expected_last_heartbeat"] == "NO_HEARTBEAT" and beat["last_heartbeat"] == token
    assert stop["force"] is True and stop["status"] == 204
    emulator.clear_requests()
    assert emulator.requests_log() == []


def test_openapi_document_lists_every_endpoint(emulator: EmulatorProcess) -> None:
    spec = emulator.http.get("/openapi.json").json()
    paths = spec["paths"]
    work = "/v1/environments/{environment_id}/work"
    for path in (work, work + "/poll", work + "/stats", work + "/{work_id}",
                 work + "/{work_id}/ack", work + "/{work_id}/heartbeat", work + "/{work_id}/stop",
                 "/v1/environments", "/v1/sessions"):
        assert path in paths, path
