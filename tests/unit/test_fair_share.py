"""How a fleet's session slots are shared between the environments it serves: a table."""

from __future__ import annotations

import pytest

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
    # ...but never in a smaller fleet, where a slot is a tenth or more of it.
    ("a", 9, {"a": 8, "b": 0}, TWO, {"b"}, 0, 1),
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


@pytest.mark.parametrize(("total", "idle_unused", "headroom"), [
    (20, 10, 1),
    (20, 0, 0),  # the idle environments use their whole shares: nothing to keep
    (10, 5, 1),
    (9, 5, 0),  # a slot would be over a tenth of the fleet
    (1, 1, 0),
])
def test_idle_headroom(total: int, idle_unused: int, headroom: int) -> None:
    assert idle_headroom(total, idle_unused) == headroom


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
