"""A cgroup per process sandbox: finding a delegated parent, the limits it gets, the gate that
puts a sandbox in it before it runs. Over a directory laid out like cgroupfs (its files are
plain files: the kernel's enforcement is what `test_cgroups_on_a_v2_host` checks, where the
host has cgroup v2 controllers to delegate)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dispatcher.session import cgroups
from dispatcher.session.cgroups import (
    CgroupError,
    Limits,
    Parent,
    SessionCgroup,
    find_parent,
    limits_of,
    remove_left_behind,
)
from dispatcher.session.output import LiveOutput
from dispatcher.session.sandbox import Sandbox, SandboxSpec


def _tree(root: Path, own: str = "/system.slice/dispatcher.service",
          delegated: str = "cpu memory pids") -> Path:
    """A cgroup v2 root with this process in `own`, which hands `delegated` to its children."""
    (root / "cgroup.controllers").parent.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    path = root / own.lstrip("/")
    path.mkdir(parents=True, exist_ok=True)
    for name, text in (("cgroup.controllers", "cpu memory pids\n"),
                       ("cgroup.subtree_control", delegated + "\n"), ("cgroup.procs", "")):
        (path / name).write_text(text)
    (root / "proc-cgroup").write_text(f"0::{own}\n")
    return path


def test_auto_uses_the_workers_own_cgroup_when_it_is_delegated(tmp_path: Path) -> None:
    own = _tree(tmp_path)
    parent, why = find_parent("auto", root=tmp_path, proc_cgroup=str(tmp_path / "proc-cgroup"))
    assert parent == Parent(own) and why == f"cgroup v2 at {own}"


@pytest.mark.parametrize(("layout", "reason"), [
    ("v1", "no cgroup v2 hierarchy"),
    ("undelegated", "does not hand memory, pids to its children"),
    ("v1-only process", "in no cgroup v2"),
])
def test_auto_runs_without_and_says_why(tmp_path: Path, layout: str, reason: str) -> None:
    if layout != "v1":
        _tree(tmp_path, delegated="cpu" if layout == "undelegated" else "cpu memory pids")
    if layout == "v1-only process":
        (tmp_path / "proc-cgroup").write_text("4:memory:/x\n")
    parent, why = find_parent("auto", root=tmp_path, proc_cgroup=str(tmp_path / "proc-cgroup"))
    assert parent is None and reason in why


def test_a_named_cgroup_that_cannot_be_used_refuses_the_start_naming_the_setting(
        tmp_path: Path) -> None:
    with pytest.raises(CgroupError, match=r"^DISPATCHER_PROCESS_CGROUP=/nowhere: /nowhere is "
                                          "not a cgroup v2 directory"):
        find_parent("/nowhere", root=tmp_path)
    assert find_parent("off", root=tmp_path) == (None, "DISPATCHER_PROCESS_CGROUP=off")


def test_empty_cgroups_a_dead_worker_left_are_removed_at_start(tmp_path: Path) -> None:
    own = _tree(tmp_path)
    for name in ("dispatcher-left-1-abc", "dispatcher-new-1-def", "someone-else"):
        (own / name).mkdir()
    os.utime(own / "dispatcher-left-1-abc", (1000, 1000))
    os.utime(own / "someone-else", (1000, 1000))
    remove_left_behind(Parent(own))
    assert not (own / "dispatcher-left-1-abc").exists()
    assert (own / "dispatcher-new-1-def").exists(), "maybe a sandbox about to enter it"
    assert (own / "someone-else").exists(), "not ours"


def test_the_docker_runtimes_limits_as_a_cgroups_files() -> None:
    assert limits_of("512m", 64, 1.5).files() == {
        "memory.max": str(512 * 1024**2), "pids.max": "64", "cpu.max": "150000 100000"}
    assert limits_of("2g", 1, 0.001).files()["cpu.max"] == "1000 100000", "the kernel's least"
    assert limits_of("4096", 1, 1).memory_bytes == 4096


def test_a_sandbox_is_in_its_cgroup_before_it_runs(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate stops the command before its first instruction; the worker writes its pid into
    `cgroup.procs` (here a plain file) and only then lets it on."""
    monkeypatch.setattr(cgroups, "REMOVE_WAIT_SECONDS", 0.0)  # a plain directory stays
    own = _tree(tmp_path)
    cgroup = SessionCgroup(Parent(own), "work/1", 2, Limits(64 * 1024**2, 32, 0.5))
    assert cgroup.path.parent == own and cgroup.path.name.startswith("dispatcher-work_1-2-")
    assert (cgroup.path / "memory.max").read_text() == str(64 * 1024**2)
    assert (cgroup.path / "pids.max").read_text() == "32"
    assert (cgroup.path / "cpu.max").read_text() == "50000 100000"
    spec = SandboxSpec(argv=["/bin/sh", "-c", f"cat {cgroup.path}/cgroup.procs; echo; echo $$"],
                       env={"PATH": os.environ["PATH"]}, stdin=b"", work_id="w", attempt=1)
    live = LiveOutput(tmp_path / "out", "w", 1, max_bytes=1024, keep=10)
    sandbox = Sandbox.start(spec, output=live, cgroup=cgroup)
    assert sandbox.wait(10) == 0
    sandbox.kill_group()
    moved, own_pid = live.path.read_text().split()
    assert moved == own_pid == str(sandbox.pid), "in its cgroup when its command began"
    assert (cgroup.path / "cgroup.kill").read_text() == "1", "everything in it killed at the end"
