"""Render the chaos figures as the Markdown table of docs/reliability.md.

    python tests/support/report.py [FILE]     # FILE: $DISPATCHER_CHAOS_FIGURES or the path the
                                            # chaos run printed at its end
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

COLUMNS = ["scenario", "sessions", "attempts", "faults injected", "fenced after",
           "moved after", "lost", "duplicated", "stops", "max stop latency", "seconds",
           "result"]


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def row(f: dict[str, Any]) -> list[str]:
    faults = f"{f['faults']}" + (f" ({f['fault_kinds']})" if f.get("fault_kinds") else "")
    return [f["scenario"], str(f["sessions"]), str(f["attempts"]), faults,
            _seconds(f.get("fenced_after_s")), _seconds(f.get("moved_after_s")),
            str(f["lost"]), str(f["duplicated"]), str(f["stops"]),
            _seconds(f.get("stop_latency_max_s")), f"{f['seconds']:.0f}",
            "pass" if not f.get("violations") else f"FAIL ({len(f['violations'])})"]


def render(figures: dict[str, dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name in sorted(figures):
        lines.append("| " + " | ".join(row(figures[name])) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else os.environ.get("DISPATCHER_CHAOS_FIGURES")
    if not path:
        print(__doc__, file=sys.stderr)
        return 2
    print(render(json.loads(Path(path).read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
