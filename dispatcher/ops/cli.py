"""The `dispatcher` command: one argparse subcommand per module.

Each module in `SUBCOMMANDS` has `register(subcommands)`, which adds its parser and sets
`handler=<function(args) -> int>` as a default. Registration must stay cheap (standard library
only at import); a handler imports what it needs when it runs. To add a command, write its
module and append its name here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

SUBCOMMANDS: list[str] = [
    "dispatcher.emulator.cli",
    "dispatcher.ops.demo",
    "dispatcher.ops.operator_cli",
    "dispatcher.ops.output_cli",
    "dispatcher.ops.webhooks",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dispatcher",
        description="A Celery fleet that acts as one environment worker for self-hosted\n"
                    "sandboxes of Claude Managed Agents. The fleet itself runs as\n"
                    "`celery -A dispatcher worker -B` (see docs/operations.md); this command\n"
                    "runs the emulator and the demo, the webhook receiver, and the\n"
                    "operators' commands.",
        epilog=importlib.import_module("dispatcher.ops.operator_cli").EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).register(subcommands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
