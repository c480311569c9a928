"""The runner's side of runner mode, as pure parts: where the stdin entry point finds the work
secret, how the fake session program reads a heartbeat's answer in each SDK's shape, and how the
demo judges and shows the official runner's sessions."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

from dispatcher.emulator.fake_session import (
    LEASE_SHAPES,
    Verdict,
    beat_interval,
    judge,
)
from dispatcher.ops.demo_official import OfficialSession, official_ok, script_for, summary_lines
from dispatcher.session import stdin_runner
from dispatcher.session.stdin_runner import work_secret

SECRET = "eyJzZXNzaW9uc190b2tlbiI6InNrLWFudC1yZXEtMSJ9"


def test_the_secret_comes_from_the_work_json_on_stdin_first(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("FROM-FILE\n")
    stdin = json.dumps({"id": "work_1", "secret": SECRET})
    assert work_secret(stdin, {"ANTHROPIC_WORK_SECRET_FILE": str(path)}) == SECRET
    assert work_secret(json.dumps({"id": "work_1", "secret": None}),
                       {"ANTHROPIC_WORK_SECRET_FILE": str(path)}) == "FROM-FILE"


@pytest.mark.parametrize("stdin", ["", "not json", "[1, 2]", '{"secret": 5}', '{"id": "w"}'])
def test_without_a_secret_on_stdin_or_a_file_handle_item_reads_its_variable(stdin: str) -> None:
    assert work_secret(stdin, {"ANTHROPIC_WORK_SECRET": SECRET}) is None


def test_the_entry_point_imports_nothing_of_dispatcher() -> None:
    """It is copied alone into sandbox images, beside the SDK."""
    tree = ast.parse(Path(stdin_runner.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith("dispatcher") for name in modules), modules


EXTENDED = {"lease_extended": True, "state": "active", "ttl_seconds": 60}


@pytest.mark.parametrize(("shape", "status", "body", "expired", "verdict"), [
    ("2.17", 200, EXTENDED, False, Verdict.HELD),
    # 2.17 ends only on `lease_extended: false`; a `stopping` state that extends is no stop.
    ("2.17", 200, {**EXTENDED, "state": "stopping"}, False, Verdict.HELD),
    ("2.17", 200, {**EXTENDED, "state": "stopping", "lease_extended": False}, False, Verdict.END),
    ("2.10", 200, {**EXTENDED, "state": "stopping"}, False, Verdict.END),
    ("2.10", 200, {**EXTENDED, "state": "stopped", "lease_extended": False}, False, Verdict.END),
    ("2.17", 412, {}, False, Verdict.LOST),  # another holder
    ("2.17", 401, {}, False, Verdict.LOST),  # a permanent refusal
    ("2.17", 409, {}, False, Verdict.RETRY),  # 408, 409, 429 are worth retrying
    ("2.17", 429, {}, False, Verdict.RETRY),
    ("2.17", 503, {}, False, Verdict.RETRY),
    ("2.17", 0, {}, False, Verdict.RETRY),  # no answer
    ("2.17", 503, {}, True, Verdict.LOST),  # nothing succeeded within the TTL
])
def test_a_heartbeats_answer_as_each_sdk_reads_it(shape: str, status: int, body: dict[str, Any],
                                                  expired: bool, verdict: Verdict) -> None:
    assert judge(LEASE_SHAPES[shape], status, body, expired=expired) == verdict


@pytest.mark.parametrize(("ttl", "interval"), [(300, 30), (120, 30), (40, 20), (1, 0.5),
                                               (0.1, 0.25)])
def test_the_runner_beats_every_half_ttl_at_most_30_seconds(ttl: float, interval: float) -> None:
    assert beat_interval(ttl) == interval


def test_2_17_assumes_the_apis_default_ttl_before_the_first_reply() -> None:
    assert LEASE_SHAPES["2.17"].assumed_ttl_s == 300


# --- the demo's official-runner part --------------------------------------------------------------
def _ran(index: int, **changes: Any) -> OfficialSession:
    session = OfficialSession(f"runner-{index}", script_for(index), state="stopped")
    results = ["wrote", f"1\thello from session {index}", "edited",
               f"goodbye from session {index}\n", "ls: cannot access"]
    session.calls = [{"tool": c["name"], "input": c["input"], "result": r,
                      "is_error": i == len(results) - 1}
                     for i, (c, r) in enumerate(zip(session.script, results, strict=True))]
    for name, value in changes.items():
        setattr(session, name, value)
    return session


@pytest.mark.parametrize(("session", "ok"), [
    (_ran(1), True),
    (_ran(2, state="active"), False),
    (_ran(1, calls=_ran(1).calls[:-1]), False),  # a call never answered
    (_ran(1, calls=[*_ran(1).calls, _ran(1).calls[-1]]), False),  # one answered twice
    (_ran(1, calls=[{**c, "is_error": False} for c in _ran(1).calls]), False),
    (_ran(1, calls=[*_ran(1).calls[:3], {**_ran(1).calls[3], "result": "hello"},
                    _ran(1).calls[4]]), False),  # the edit did not take
])
def test_the_demo_judges_an_official_session_by_every_result(session: OfficialSession,
                                                             ok: bool) -> None:
    assert official_ok(session) == ok


def test_the_demo_table_shows_each_call_and_its_result() -> None:
    session = _ran(1)
    session.ok = True
    lines = summary_lines([session])
    assert sum(line.startswith(("runner-1", " ")) for line in lines[1:6]) == 5
    assert "wrote" in lines[1] and "(error)" in lines[5] and "ok (stopped)" in lines[6]
    assert lines[-1].startswith("\n1/1 sessions")


def test_the_fake_session_program_imports_the_standard_library_only() -> None:
    """It runs as a lone file in sandboxes, outside the package."""
    from dispatcher.emulator import fake_session

    tree = ast.parse(Path(fake_session.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.startswith("dispatcher") for name in modules), modules
