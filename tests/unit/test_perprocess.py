"""A value per process: a forked child never uses its parent's."""

from __future__ import annotations

import os

from dispatcher.perprocess import PerProcess


def test_a_value_is_made_once_per_process_and_again_in_a_forked_child() -> None:
    made: list[int] = []
    value = PerProcess(lambda: made.append(os.getpid()) or object())
    first = value.get()
    assert value.get() is first and made == [os.getpid()]
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: its own value, not the parent's
        os.write(write, b"1" if value.get() is not first and len(made) == 2 else b"0")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 1)
    os.close(read)
    os.waitpid(child, 0)
    assert answer == b"1", "the child made its own"
    assert value.get() is first, "the parent keeps its own"


def test_a_popped_value_is_made_again() -> None:
    value = PerProcess(object)
    first = value.get()
    assert value.pop() is first
    assert value.pop() is None
    assert value.get() is not first
