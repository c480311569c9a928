"""The README's first command, run non-interactively end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.isolation import DEMO_DB, redis_url

pytestmark = pytest.mark.acceptance

DISPATCHER = str(Path(sys.executable).with_name("dispatcher"))


def test_the_demo_runs_every_kind_of_session_and_cleans_up(tmp_path: Path) -> None:
    env = {**os.environ, "DISPATCHER_REDIS_URL": redis_url(DEMO_DB)}  # the tests' Redis
    done = subprocess.run([DISPATCHER, "demo", "--json", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout)
    assert summary["ok"]
    by_label = {s["label"]: s for s in summary["sessions"]}
    assert len(by_label) == 11 and all(s["state"] == "stopped" for s in by_label.values())
    assert by_label["graceful-stop"]["sigterm"]
    assert not by_label["forced-stop"]["sigterm"]
    killed = by_label["worker-killed"]
    assert killed["attempts"] == 2 and len(set(killed["workers"])) == 2
    # The official runner's part: every scripted call ran once and its result is recorded.
    official = summary["official"]
    assert len(official) == 3 and all(s["ok"] and s["state"] == "stopped" for s in official)
    for session in official:
        assert [c["tool"] for c in session["calls"]] == [c["name"] for c in session["script"]]
        assert session["calls"][-1]["is_error"], "the failing command's result is an error"
    # Everything the demo started is gone: no celery process of its fleet, no sandbox.
    fleet = subprocess.run(["pgrep", "-f", "celery -A dispatcher"], capture_output=True,
                           text=True).stdout.split()
    own = [pid for pid in fleet if _cwd(pid) == tmp_path]
    assert own == []
    for record in (tmp_path / "records").glob("*.jsonl"):
        for line in record.read_text().splitlines():
            assert not Path(f"/proc/{json.loads(line)['pid']}").exists()
    for log in ("control.log", "alpha.log", "beta.log", "flower.log", "emulator.log",
                "official/runner.log", "official/emulator.log"):
        assert (tmp_path / log).exists()


def _cwd(pid: str) -> Path | None:
    try:
        return Path(f"/proc/{pid}/cwd").resolve()
    except OSError:
        return None
