"""`dispatcher output WORK_ID`: what each attempt of a work item wrote, as its worker kept it.

A session worker keeps each attempt's stdout and stderr in
`$DISPATCHER_SANDBOX_OUTPUT_DIR/<work id>/<attempt>.log` (dispatcher/session/output.py): a
process sandbox's as it runs, a container's copied before the container is removed. The files
are on the worker's host: run this there, or where the directory is shared. Exit codes: 0
printed, 2 a bad WORK_ID or setting, 4 nothing kept for that item here.

Imports only the standard library at module level, as `dispatcher.ops.cli` asks.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register"]

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_FOUND = 4


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "output", help="print each attempt's output of one work item",
        description="Print the output (stdout and stderr) each attempt of WORK_ID wrote, as "
                    "its session worker kept it (a running process sandbox's so far); read "
                    "from $DISPATCHER_SANDBOX_OUTPUT_DIR on this host.")
    parser.add_argument("work_id", metavar="WORK_ID")
    parser.add_argument("--attempt", type=int, help="only this attempt")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(handler=_output)


def _output(args: argparse.Namespace) -> int:
    from dispatcher.session.output import read_outputs
    from dispatcher.settings import SettingsError, load_settings
    from dispatcher.workapi.models import InvalidId, check_id

    try:
        check_id(args.work_id, "WORK_ID")
        directory = load_settings().output_directory
    except (SettingsError, InvalidId) as exc:
        print(f"dispatcher output: {exc}", file=sys.stderr)
        return EXIT_USAGE
    found = [(n, p) for n, p in read_outputs(directory, args.work_id)
             if args.attempt in (None, n)]
    if not found:
        print(f"dispatcher output: no output of {args.work_id} kept in {directory}",
              file=sys.stderr)
        return EXIT_NOT_FOUND
    texts = [(n, p, p.read_bytes().decode("utf-8", "replace")) for n, p in found]
    if args.json:
        print(json.dumps([{"attempt": n, "path": str(p), "output": t} for n, p, t in texts],
                         indent=2))
        return EXIT_OK
    for number, path, text in texts:
        print(f"== attempt {number} ({path}) ==")
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
    return EXIT_OK
