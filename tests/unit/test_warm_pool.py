"""The warm pool's pure parts: the reaper's verdict on idle warm containers, the pool's targets,
the command a warm container runs, and the exec stream's frames kept as output."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from dispatcher.session import reaper as reaper_module
from dispatcher.session import warm_pool
from dispatcher.session.reaper import Found, Idle, judge_idle
from dispatcher.session.sandbox import SandboxSpec
from dispatcher.session.warm_pool import WarmPool, WarmSandbox, session_command
from dispatcher.settings import Settings

IMAGE = "sha256:" + "ab" * 32


def _settings(**env: Any) -> Settings:
    return Settings(ANTHROPIC_ENVIRONMENT_ID="env_1", DISPATCHER_SANDBOX_RUNTIME="docker",
                    DISPATCHER_SANDBOX_IMAGE=IMAGE, DISPATCHER_FLEET_ID="f1", **env)


@pytest.mark.parametrize(("owner_live", "suspected", "reaped", "suspect"), [
    (True, False, False, False),  # its worker lives: kept
    (True, True, False, False),  # its worker's key is back (a Redis restart): forgiven
    (False, False, False, True),  # its worker's key expired: look again
    (False, True, True, False),  # still dead on the next pass: removed
])
def test_the_reaper_removes_idle_warm_containers_of_dead_workers_only(
        owner_live: bool, suspected: bool, reaped: bool, suspect: bool) -> None:
    idle = Idle("c1", "w1@host#1")
    verdict = judge_idle([idle], {"w1@host#1"} if owner_live else set(),
                         {"c1"} if suspected else set())
    assert (Found("c1", "", 0, warm=True) in verdict.reap, "c1" in verdict.suspect) == (
        reaped, suspect)


def test_the_reaper_tells_a_warm_container_by_its_owner_label() -> None:
    listed = {"Id": "c1", "Labels": {"dispatcher.warm_owner": "w1@host#1"}}
    assert reaper_module._parse(listed) == Idle("c1", "w1@host#1")


@pytest.mark.parametrize(("setting", "slots", "busy", "environments", "expected"), [
    (1, 4, 0, ["e"], {"e": 1}),
    (8, 4, 1, ["e"], {"e": 3}),  # never more than the free slots
    (2, 4, 4, ["e"], {"e": 0}),  # every slot busy: none
    (2, 4, 6, ["e"], {"e": 0}),
    (3, 8, 0, ["e", "f"], {"e": 2, "f": 1}),  # shared among environments
    (0, 8, 0, ["e"], {"e": 0}),
])
def test_the_pool_keeps_at_most_the_setting_and_the_free_slots(
        setting: int, slots: int, busy: int, environments: list[str],
        expected: dict[str, int]) -> None:
    pool = WarmPool(_settings(DISPATCHER_WARM_CONTAINERS=setting), book=None,  # type: ignore[arg-type]
                    worker="w1", slots=slots, environments=environments, busy=lambda: busy)
    assert pool.targets() == expected


class _Images:
    def __init__(self, entrypoint: list[str] | None, cmd: list[str] | None) -> None:
        self.config = {"Entrypoint": entrypoint, "Cmd": cmd}

    def inspect_image(self, image: str) -> dict[str, Any]:
        return {"Config": self.config}


@pytest.mark.parametrize(("entrypoint", "cmd", "command", "expected"), [
    (None, ["sh", "/session.sh"], None, ["sh", "/session.sh"]),
    (["/entry"], ["a"], None, ["/entry", "a"]),
    (["/entry"], ["a"], "run --x 'y z'", ["/entry", "run", "--x", "y z"]),
    (None, ["a"], "run", ["run"]),
])
def test_a_warm_container_runs_what_a_cold_one_would(
        entrypoint: list[str] | None, cmd: list[str] | None, command: str | None,
        expected: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm_pool, "_commands", {})
    settings = _settings(**({"DISPATCHER_SANDBOX_COMMAND": command} if command else {}))
    assert session_command(settings, _Images(entrypoint, cmd)) == expected  # type: ignore[arg-type]


def _frame(kind: int, data: bytes) -> bytes:
    return struct.pack(">BxxxL", kind, len(data)) + data


def test_the_exec_streams_frames_are_kept_to_the_last_max_bytes() -> None:
    settings = _settings(DISPATCHER_SANDBOX_OUTPUT_MAX_BYTES=1024)
    sandbox = WarmSandbox(None, "c1", settings=settings,  # type: ignore[arg-type]
                          spec=SandboxSpec(argv=[], env={}, stdin=b""), book=None)  # type: ignore[arg-type]
    stream = _frame(1, b"out\n") + _frame(2, b"err\n") + _frame(1, b"x" * 600)
    rest = sandbox._frames(stream[:5])
    assert rest == stream[:5], "half a header waits for the rest"
    rest = sandbox._frames(rest + stream[5:-10])
    assert b"".join(sandbox._tail) == b"out\nerr\n", "the last frame is not whole yet"
    assert sandbox._frames(rest + stream[-10:]) == b""
    assert b"".join(sandbox._tail) == b"out\nerr\n" + b"x" * 600
    sandbox._frames(_frame(1, b"y" * 600))
    assert b"".join(sandbox._tail) == b"x" * 600 + b"y" * 600, "the oldest dropped past 1 KiB"
