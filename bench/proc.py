"""What /proc says about processes and the machine: trees, memory, CPU time."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ProcInfo", "busy_seconds", "cpu_seconds", "machine", "processes", "tree"]

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    cmdline: str
    rss_kb: int
    pss_kb: int


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    return raw[raw.rindex(")") + 2:].split()


def _kb(path: Path, field: str) -> int:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def info(pid: int) -> ProcInfo | None:
    stat = _stat(pid)
    if stat is None:
        return None
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        cmd = ""
    return ProcInfo(pid=pid, ppid=int(stat[1]), pgid=int(stat[2]), cmdline=cmd,
                    rss_kb=_kb(Path(f"/proc/{pid}/status"), "VmRSS"),
                    pss_kb=_kb(Path(f"/proc/{pid}/smaps_rollup"), "Pss"))


def processes() -> list[ProcInfo]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            proc = info(int(entry))
            if proc is not None:
                found.append(proc)
    return found


def tree(root: int, everything: list[ProcInfo] | None = None) -> list[ProcInfo]:
    """`root` and all its descendants."""
    everything = processes() if everything is None else everything
    children: dict[int, list[ProcInfo]] = {}
    for proc in everything:
        children.setdefault(proc.ppid, []).append(proc)
    top = next((p for p in everything if p.pid == root), None)
    if top is None:
        return []
    found, todo = [top], [top]
    while todo:
        for child in children.get(todo.pop().pid, []):
            found.append(child)
            todo.append(child)
    return found


def cpu_seconds(pid: int, *, with_children: bool = True) -> float:
    """User + system CPU time of a process (and its live threads), plus its reaped children."""
    stat = _stat(pid)
    if stat is None:
        return 0.0
    ticks = int(stat[11]) + int(stat[12])
    if with_children:
        ticks += int(stat[13]) + int(stat[14])
    return ticks / TICKS


def busy_seconds() -> float:
    """CPU time the whole machine has spent busy since boot, all cores (not idle, not waiting
    for I/O)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICKS


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kb = _kb(Path("/proc/meminfo"), "MemTotal")
    return {"nproc": str(os.cpu_count()), "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
            "cpu": model, "kernel": platform.release(),
            "python": platform.python_version()}
