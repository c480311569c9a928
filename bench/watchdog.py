"""Memory of the process runtime's watchdog per session: N sleeping sandboxes, then /proc.

    python -m bench.watchdog [--sessions 50]

Starts N process sandboxes (`sleep`) from this process, as a session worker on the threads pool
would, and sums RSS and PSS of every process this one started that is not a sandbox's own
command: whatever keeps watch over the sandboxes (per-session launchers, or one guardian).
Run it from another checkout (`PYTHONPATH=/other/checkout`) to measure that code the same way.
"""

from __future__ import annotations

import argparse
import os
import time

from bench import proc
from dispatcher.session.sandbox import Sandbox, SandboxSpec

SANDBOX_COMMAND = ["sleep", "300"]
# Long enough for every watchdog interpreter to finish starting and touch its pages.
SETTLE_SECONDS = 2.0


def measure(sessions: int) -> dict[str, float]:
    spec = SandboxSpec(argv=SANDBOX_COMMAND, env={"PATH": os.environ["PATH"]}, stdin=b"")
    sandboxes = [Sandbox.start(spec) for _ in range(sessions)]
    try:
        time.sleep(SETTLE_SECONDS)
        ours = [p for p in proc.tree(os.getpid()) if p.pid != os.getpid()]
        watchdogs = [p for p in ours if not p.cmdline.startswith(" ".join(SANDBOX_COMMAND))]
        rss = sum(p.rss_kb for p in watchdogs)
        pss = sum(p.pss_kb for p in watchdogs)
        return {"sessions": sessions, "watchdog_processes": len(watchdogs),
                "rss_kb": rss, "pss_kb": pss,
                "rss_kb_per_session": rss / sessions, "pss_kb_per_session": pss / sessions}
    finally:
        for sandbox in sandboxes:
            sandbox.kill_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50)
    figures = measure(parser.parse_args().sessions)
    print(f"{figures['sessions']} sleeping sessions: {figures['watchdog_processes']} watchdog "
          f"processes, RSS {figures['rss_kb'] / 1024:.1f} MB in all, "
          f"{figures['rss_kb_per_session'] / 1024:.2f} MB per session; PSS "
          f"{figures['pss_kb'] / 1024:.1f} MB in all, "
          f"{figures['pss_kb_per_session'] / 1024:.2f} MB per session")


if __name__ == "__main__":
    main()
