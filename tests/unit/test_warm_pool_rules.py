"""The warm pool's pure parts: the reaper's verdict on idle warm containers, the pool's targets,
the command a warm container runs, and the contract as its launcher reads it."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from dispatcher.session import reaper as reaper_module
from dispatcher.session import warm_pool
from dispatcher.session.reaper import Found, Idle, judge_idle
from dispatcher.session.warm_pool import WarmPool, contract_header, session_command
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


@pytest.mark.parametrize(("env", "expected"), [
    ({"A": "1", "B": "x y=z"}, b"A=1\nB=x y=z\n\n"),
    ({}, b"\n"),
    ({"A": "two\nlines"}, None),  # no line can carry it: that session starts cold
])
def test_the_contract_reaches_the_launcher_as_lines_up_to_an_empty_one(
        env: dict[str, str], expected: bytes | None) -> None:
    assert contract_header(env) == expected


class _Book:
    """What a tick asks of the book, in order; an empty pool."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            return []
        return call


def test_the_pool_creates_nothing_while_the_engine_cannot_start_a_sandbox() -> None:
    book = _Book()
    pool = WarmPool(_settings(DISPATCHER_WARM_CONTAINERS=2), book=book,  # type: ignore[arg-type]
                    worker="w1", slots=4, environments=["e"], busy=lambda: 0,
                    engine_usable=lambda: False)
    pool.tick()
    assert book.calls == ["alive"], "only its owner's key kept, no engine call"


class _Ready:
    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def take_ready(self, worker: str, environment: str) -> str | None:
        return self.ids.pop() if self.ids else None


def test_the_pool_drops_its_idle_containers_and_refills_at_once_when_the_engine_is_back(
        ) -> None:
    book = _Ready(["c1", "c2"])
    pool = WarmPool(_settings(DISPATCHER_WARM_CONTAINERS=1), book=book,  # type: ignore[arg-type]
                    worker="w1", slots=4, environments=["e"], busy=lambda: 0)
    pool._failed("warm container not created", OSError("engine gone"))
    pool._failed("warm container not created", OSError("engine gone"))
    pool.engine_back()
    assert pool._retry_at == 0.0 and pool._reconciled_at == 0.0
    assert pool._backoff == warm_pool.BACKOFF_SECONDS[0]
    assert pool.wake.is_set()
    assert book.ids == [], "none left to bind: the next reconcile removes them"


def _launch(stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    """The launcher as a warm container runs it, with a command that shows what it got."""
    return subprocess.run(["sh", "-c", warm_pool.LAUNCHER, "warm", "sh", "-c",
                           'echo "A=$A"; cat'], input=stdin, capture_output=True, timeout=10,
                          check=False)


def test_the_launcher_exports_the_contract_and_hands_the_rest_of_stdin_to_the_command() -> None:
    done = _launch(b"A=1 2\n\n{\"work\": 1}")
    assert (done.returncode, done.stdout) == (0, b"A=1 2\n{\"work\": 1}")


@pytest.mark.parametrize("cut", [b"", b"A=1\n", b"A=1"])
def test_a_launcher_whose_stdin_ends_before_the_contract_never_runs_the_command(
        cut: bytes) -> None:
    done = _launch(cut)
    assert (done.returncode, done.stdout) == (warm_pool.LAUNCHER_CUT_EXIT, b"")


@pytest.fixture
def attached(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A stdin the pool attached: our end registered, the engine's end beside it."""
    ours, engines = socket.socketpair()
    monkeypatch.setattr(warm_pool, "_attached", {"c1": ours})
    try:
        yield ours, engines
    finally:
        ours.close()
        engines.close()


def test_a_claim_writes_to_the_stdin_the_pool_attached(
        attached: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = attached
    assert warm_pool.take_attached("c1") is ours
    assert warm_pool.take_attached("c1") is None, "one container, one session"


def test_a_stdin_the_engine_closed_is_not_used(
        attached: tuple[socket.socket, socket.socket]) -> None:
    _, engines = attached
    engines.close()  # the engine restarted
    assert warm_pool.take_attached("c1") is None


def test_a_forked_child_never_writes_to_its_parents_attachment(
        attached: tuple[socket.socket, socket.socket], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(warm_pool, "_attached_pid", -1)
    assert warm_pool.take_attached("c1") is None


def test_an_attachment_with_a_timeout_is_judged_without_waiting_for_it(
        attached: tuple[socket.socket, socket.socket]) -> None:
    ours, _ = attached
    ours.settimeout(30)  # as an engine client's socket may be
    assert warm_pool.take_attached("c1") is ours
    assert ours.gettimeout() == 30, "its mode given back"
