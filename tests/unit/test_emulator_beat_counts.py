"""The emulator's beat statistics (`requestlog.EnvironmentBeats`), pure: requests folded in,
as tables of cases."""

from __future__ import annotations

import pytest

from dispatcher.emulator.requestlog import BeatStats, EnvironmentBeats

T0 = 1_800_000_000.0

# (requests as (endpoint, work id, status, arrived s after T0)), then what the window shows:
# beats, refused, failed, largest gap, the lease it was of, each lease's last beat.
CASES = [
    ([], 0, 0, 0, 0.0, None, {}),
    ([("heartbeat", "a", 200, 1.0)], 1, 0, 0, 0.0, None, {"a": 1.0}),
    ([("heartbeat", "a", 200, 1.0), ("heartbeat", "a", 200, 11.0),
      ("heartbeat", "b", 200, 2.0), ("heartbeat", "b", 200, 14.5)],
     4, 0, 0, 12.5, "b", {"a": 11.0, "b": 14.5}),
    # Answered out of order: the gap counts from the later arrival only, never negative.
    ([("heartbeat", "a", 200, 1.0), ("heartbeat", "a", 200, 11.0),
      ("heartbeat", "a", 200, 10.0)], 3, 0, 0, 10.0, "a", {"a": 11.0}),
    # A refusal (412 after a lapse) or a failure (503, dropped) is no beat: the gap runs on.
    ([("heartbeat", "a", 200, 1.0), ("heartbeat", "a", 412, 5.0),
      ("heartbeat", "a", 503, 6.0), ("heartbeat", "a", 0, 7.0),
      ("heartbeat", "a", 200, 21.0)], 2, 1, 2, 20.0, "a", {"a": 21.0}),
    # Other endpoints are counted by name only.
    ([("list", None, 200, 1.0), ("ack", "a", 200, 1.0), ("poll", None, 200, 2.0)],
     0, 0, 0, 0.0, None, {}),
]


@pytest.mark.parametrize(("requests", "beats", "refused", "failed", "gap", "gap_of", "last"),
                         CASES)
def test_requests_fold_into_the_window(requests: list[tuple[str, str | None, int, float]],
                                       beats: int, refused: int, failed: int, gap: float,
                                       gap_of: str | None, last: dict[str, float]) -> None:
    counted = EnvironmentBeats(T0)
    for endpoint, work_id, status, at in requests:
        counted.count(endpoint, work_id, status, T0 + at)
    report = counted.report(T0 + 30)
    assert (report["beats"], report["refused"], report["failed"]) == (beats, refused, failed)
    assert report["max_gap_s"] == pytest.approx(gap)
    assert report["max_gap_work_id"] == gap_of
    assert report["last_beat"] == {w: T0 + at for w, at in last.items()}
    assert sum(report["endpoints"].values()) == len(requests)
    assert sum(report["per_100ms"].values()) == beats


def test_a_new_window_counts_afresh_and_keeps_the_last_beats() -> None:
    counted = EnvironmentBeats(T0)
    counted.count("heartbeat", "a", 200, T0 + 1)
    counted.count("heartbeat", "a", 200, T0 + 20)
    counted.count("heartbeat", "a", 412, T0 + 21)
    counted.count("list", None, 200, T0 + 21)
    counted.new_window(T0 + 25)
    assert counted.report(T0 + 26) == {
        "since": T0 + 25, "until": T0 + 26, "log_heartbeats": True, "beats": 0,
        "refused": 0, "failed": 0, "max_gap_s": 0.0, "max_gap_work_id": None,
        "endpoints": {}, "per_100ms": {}, "last_beat": {"a": T0 + 20}}
    counted.count("heartbeat", "a", 200, T0 + 32)  # a gap that spans the window's start
    assert counted.report(T0 + 33)["max_gap_s"] == pytest.approx(12.0)


def test_beats_per_100ms_are_counted_by_arrival() -> None:
    counted = EnvironmentBeats(T0)
    for at in (0.01, 0.05, 0.09, 0.15):
        counted.count("heartbeat", f"w{at}", 200, T0 + at)
    tenth = int(T0 * 10)
    assert counted.report(T0 + 1)["per_100ms"] == {str(tenth): 3, str(tenth + 1): 1}


def test_only_the_environments_that_asked_are_counted_until_they_stop() -> None:
    stats = BeatStats()
    assert stats.of("env_a") is None
    stats.start("env_a", log_heartbeats=False, now=T0)
    found = stats.of("env_a")
    assert found is not None and not found.log_heartbeats
    found.count("heartbeat", "a", 200, T0 + 1)
    stats.start("env_a", log_heartbeats=True, now=T0 + 5)  # a new window, the same leases
    again = stats.of("env_a")
    assert again is found and again.log_heartbeats and again.beats == 0
    assert again.last_beat == {"a": T0 + 1}
    assert stats.stop("env_a") and stats.of("env_a") is None
    assert not stats.stop("env_a")
