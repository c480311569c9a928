"""How a fleet's session slots are shared between the environments it serves: a table."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.celery.bootsteps import session_slots
from dispatcher.control.capacity import (
    IDLE_HEADROOM_SLOTS,
    claim_allowance,
    fair_shares,
    free_slots,
    idle_headroom,
)


@pytest.mark.parametrize(("total", "maxima", "shares"), [
    (8, {"a": None}, {"a": 8}),
    (8, {"a": None, "b": None}, {"a": 4, "b": 4}),
    (7, {"a": None, "b": None}, {"a": 4, "b": 3}),  # the remainder: first listed first
    (8, {"a": 2, "b": None}, {"a": 2, "b": 6}),  # a capped one's part goes to the others
    (8, {"a": 2, "b": 3}, {"a": 2, "b": 3}),  # both capped: slots left over
    (9, {"a": None, "b": 1, "c": None}, {"a": 4, "b": 1, "c": 4}),
    (2, {"a": None, "b": None, "c": None}, {"a": 1, "b": 1, "c": 0}),
    (0, {"a": None, "b": 5}, {"a": 0, "b": 0}),
])
def test_fair_shares(total: int, maxima: dict[str, int | None], shares: dict[str, int]) -> None:
    assert fair_shares(total, maxima) == shares
    assert sum(shares.values()) <= total


TWO = {"a": None, "b": None}

# environment, total, held, maxima, idle, held elsewhere, allowance
ROWS = [
    # One environment, no maximum: exactly the fleet's free slots, as before.
    ("a", 8, {"a": 3}, {"a": None}, set(), 0, 5),
    ("a", 8, {"a": 8}, {"a": None}, set(), 0, 0),
    ("a", 8, {"a": 3}, {"a": 4}, set(), 0, 1),  # its maximum
    # Two busy environments: each claims up to its half, never into the other's unused half.
    ("a", 8, {"a": 0, "b": 0}, TWO, set(), 0, 4),
    ("a", 8, {"a": 4, "b": 0}, TWO, set(), 0, 0),
    ("b", 8, {"a": 4, "b": 0}, TWO, set(), 0, 4),
    # A session of the one over its share ends: the slot is the other's.
    ("a", 8, {"a": 7, "b": 0}, TWO, set(), 0, 0),
    ("b", 8, {"a": 7, "b": 0}, TWO, set(), 0, 1),
    # An idle environment reserves nothing: the busy one may fill the fleet.
    ("a", 8, {"a": 4, "b": 0}, TWO, {"b"}, 0, 4),
    ("a", 8, {"a": 6, "b": 1}, TWO, {"b"}, 0, 1),
    # A reservation is only the unused share: b holds 3 of its 4, so one slot stays b's.
    ("a", 8, {"a": 4, "b": 3}, TWO, set(), 0, 0),
    ("a", 8, {"a": 3, "b": 3}, TWO, set(), 0, 1),
    # A maximum caps the one and frees the rest of the fleet for the others.
    ("a", 8, {"a": 2, "b": 0}, {"a": 2, "b": None}, set(), 0, 0),
    ("b", 8, {"a": 2, "b": 5}, {"a": 2, "b": None}, set(), 0, 1),
    # Leases of an environment no longer served still take their slots.
    ("a", 8, {"a": 0}, {"a": None}, set(), 2, 6),
    # Fewer slots than environments: the first listed gets the odd one, the other waits.
    ("a", 1, {"a": 0, "b": 0}, TWO, set(), 0, 1),
    ("b", 1, {"a": 0, "b": 0}, TWO, set(), 0, 0),
    ("b", 1, {"a": 0, "b": 0}, TWO, {"a"}, 0, 1),
    # Over-committed (workers died): nothing for anyone.
    ("b", 4, {"a": 5, "b": 0}, TWO, set(), 0, 0),
    # A fleet of ten slots or more: the idle environments keep one slot free together, so a
    # session arriving in one finds it at once; the busy one may take all the rest.
    ("a", 20, {"a": 10, "b": 0}, TWO, {"b"}, 0, 9),
    ("a", 20, {"a": 19, "b": 0}, TWO, {"b"}, 0, 0),
    ("b", 20, {"a": 19, "b": 0}, TWO, {"b"}, 0, 1),  # the idle one's session takes it
    ("a", 20, {"a": 15, "b": 4}, TWO, {"b"}, 0, 0),
    ("a", 20, {"a": 10, "b": 10}, TWO, {"b"}, 0, 0),  # nothing unused: no headroom, no room
    # ...but never in a smaller fleet, where a slot is more than a tenth of it.
    ("a", 9, {"a": 8, "b": 0}, TWO, {"b"}, 0, 1),
]

TEN = {e: None for e in "abcdefghij"}
QUIET = set("bcdefghij")
BURST = {"a": 10, **dict.fromkeys("bcd", 1)}  # a: the burst; b, c, d run a session each

# environment, total, held, maxima, idle, arrived lately, allowance
DEMAND_ROWS = [
    # No arrivals lately: the idle ones keep only the shared slot, as without demand.
    ("a", 20, BURST, TEN, QUIET, {}, 6),
    # Each session that arrived lately in an idle environment keeps a slot of its share free.
    ("a", 20, BURST, TEN, QUIET, {"b": 1, "c": 1}, 5),
    ("a", 20, BURST, TEN, QUIET, {"b": 1, "c": 1, "d": 1, "e": 1}, 3),
    # ...never more than its unused share (b's share is 2, it holds 1).
    ("a", 20, BURST, TEN, QUIET, {"b": 5}, 6),
    # The burst's own arrivals keep nothing free for it: it is not idle.
    ("a", 20, BURST, TEN, QUIET, {"a": 50}, 6),
    # The slots kept free are the idle ones' together: any of them may take one, within its
    # own unused share.
    ("e", 20, {"a": 18, "b": 1}, TEN, QUIET, {"b": 1}, 1),
    ("b", 20, {"a": 16, "b": 1}, TEN, QUIET, {"b": 1, "c": 1}, 2),
    # A backlogged environment below its share claims up to it, whatever the demand elsewhere.
    ("a", 20, {"a": 0}, TEN, QUIET, dict.fromkeys(QUIET, 2), 2),
    # In a small fleet the demand counts (the floor does not): b's session arrived lately.
    ("a", 4, {"a": 2, "b": 1}, TWO, {"b"}, {"b": 1}, 0),
    ("a", 4, {"a": 2, "b": 1}, TWO, {"b"}, {}, 1),
]


@pytest.mark.parametrize(("environment", "total", "held", "maxima", "idle", "elsewhere",
                          "allowance"), ROWS)
def test_claim_allowance(environment: str, total: int, held: dict[str, int],
                         maxima: dict[str, int | None], idle: set[str], elsewhere: int,
                         allowance: int) -> None:
    got = claim_allowance(environment, total=total, held=held, maxima=maxima, idle=idle,
                          held_elsewhere=elsewhere)
    assert got == allowance
    assert got <= free_slots(total=total, held=sum(held.values()) + elsewhere)


@pytest.mark.parametrize(("environment", "total", "held", "maxima", "idle", "arrived",
                          "allowance"), DEMAND_ROWS)
def test_idle_environments_keep_slots_for_their_recent_demand(
        environment: str, total: int, held: dict[str, int], maxima: dict[str, int | None],
        idle: set[str], arrived: dict[str, int], allowance: int) -> None:
    assert claim_allowance(environment, total=total, held=held, maxima=maxima, idle=idle,
                           arrived=arrived) == allowance


@st.composite
def fleets(draw: st.DrawFn) -> tuple[int, dict[str, int | None], dict[str, int], set[str],
                                     dict[str, int]]:
    names = draw(st.lists(st.sampled_from("abcdefghij"), min_size=1, max_size=10,
                          unique=True))
    maxima = {e: draw(st.none() | st.integers(1, 8)) for e in names}
    total = draw(st.integers(0, 40))
    held = {e: draw(st.integers(0, 12)) for e in names}
    idle = {e for e in names if draw(st.booleans())}
    arrived = {e: draw(st.integers(0, 6)) for e in names}
    return total, maxima, held, idle, arrived


@given(fleets())
def test_demand_never_overclaims_nor_takes_a_backlog_below_its_share(
        fleet: tuple[int, dict[str, int | None], dict[str, int], set[str], dict[str, int]],
) -> None:
    total, maxima, held, idle, arrived = fleet
    free = free_slots(total=total, held=sum(held.values()))
    shares = fair_shares(total, maxima)
    for environment in maxima:
        got = claim_allowance(environment, total=total, held=held, maxima=maxima, idle=idle,
                              arrived=arrived)
        without = claim_allowance(environment, total=total, held=held, maxima=maxima,
                                  idle=idle)
        assert 0 <= got <= free
        # Its own unused share is always within reach, while the fleet has the slots.
        assert got >= min(free, max(0, shares[environment] - held[environment]))
        # Demand only ever keeps slots free for the others: it never adds to a claim, and it
        # keeps at most the idle environments' unused shares.
        assert got <= without
        idle_unused = sum(max(0, shares[e] - held[e]) for e in idle if e != environment)
        assert without - got <= idle_unused


def test_environments_with_no_arrivals_leave_the_fleet_to_the_burst() -> None:
    """Work-conserving: once the quiet environments' sessions have not arrived for the window,
    the burst may fill all but the shared slot; while they arrive, it leaves them theirs."""
    held = dict.fromkeys(TEN, 0)
    while claim_allowance("a", total=20, held=held, maxima=TEN, idle=QUIET, arrived={}) > 0:
        held["a"] += 1
    assert held["a"] == 20 - IDLE_HEADROOM_SLOTS
    busy = dict.fromkeys(TEN, 0)
    arrived = {"b": 1, "c": 1, "d": 1}
    while claim_allowance("a", total=20, held=busy, maxima=TEN, idle=QUIET,
                          arrived=arrived) > 0:
        busy["a"] += 1
    assert busy["a"] == 20 - 3


def test_both_busy_environments_end_with_their_halves() -> None:
    """Claiming one item at a time in turn, as two pollers do, fills the fleet half and half
    whoever starts; and with one idle, the other fills it alone."""
    for first in ("a", "b"):
        held = {"a": 0, "b": 0}
        for _ in range(20):
            for environment in (first, "b" if first == "a" else "a"):
                if claim_allowance(environment, total=9, held=held, maxima=TWO) > 0:
                    held[environment] += 1
        assert held == {"a": 5, "b": 4}
    alone = {"a": 0, "b": 0}
    while claim_allowance("a", total=9, held=alone, maxima=TWO, idle={"b"}) > 0:
        alone["a"] += 1
    assert alone == {"a": 9, "b": 0}
    big = {"a": 0, "b": 0}
    while claim_allowance("a", total=20, held=big, maxima=TWO, idle={"b"}) > 0:
        big["a"] += 1
    assert big == {"a": 20 - IDLE_HEADROOM_SLOTS, "b": 0}, "the headroom stays free"


@pytest.mark.parametrize(("total", "unused", "arrived", "headroom"), [
    (20, {"b": 10}, {}, 1),
    (20, {"b": 0}, {}, 0),  # the idle environments use their whole shares: nothing to keep
    (10, {"b": 5}, {}, 1),
    (9, {"b": 5}, {}, 0),  # a slot would be over a tenth of the fleet
    (1, {"b": 1}, {}, 0),
    (20, {"b": 2, "c": 2}, {"b": 1, "c": 1}, 2),  # a slot for each recent arrival
    (20, {"b": 2, "c": 2}, {"b": 1}, 1),  # ...which the shared slot covers
    (20, {"b": 1, "c": 2}, {"b": 4, "c": 1}, 2),  # at most each one's unused share
    (9, {"b": 2}, {"b": 1}, 1),  # demand counts in a small fleet too
    (20, {"b": 0}, {"b": 3}, 0),
])
def test_idle_headroom(total: int, unused: dict[str, int], arrived: dict[str, int],
                       headroom: int) -> None:
    assert idle_headroom(total, unused, arrived) == headroom


@pytest.mark.parametrize(("environments", "slots"), [(1, 8), (2, 7), (3, 6)])
def test_a_combined_worker_keeps_a_pool_slot_for_each_environments_poller(
        environments: int, slots: int) -> None:
    assert session_slots(concurrency=10, queues=["dispatcher.control", "dispatcher.sessions"],
                         configured=None, control_queue="dispatcher.control",
                         session_queues=["dispatcher.sessions"],
                         environments=environments) == slots
    assert session_slots(concurrency=10, queues=["dispatcher.sessions"], configured=None,
                         control_queue="dispatcher.control",
                         session_queues=["dispatcher.sessions"],
                         environments=environments) == 10
