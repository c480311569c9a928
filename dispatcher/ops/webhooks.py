"""`dispatcher webhooks`: the endpoint signed webhook deliveries wake the fleet through.

Its options and the command; the server is `ops/webhook_server.py`. Imports only the standard
library at module level, as every `dispatcher` subcommand does.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["register", "run"]


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "webhooks", help="receive signed webhooks and wake the fleet's poller",
        description="Serve POST /webhooks: verify each delivery with "
                    "ANTHROPIC_WEBHOOK_SIGNING_KEY (Standard Webhooks, as the SDK's unwrap), "
                    "then ask the fleet to claim now. Needs Redis (DISPATCHER_REDIS_URL), not "
                    "the environment key. Run beat with DISPATCHER_WEBHOOKS=true so polling "
                    "drops to a slow sweep. See docs/operations.md.")
    parser.add_argument("--host", default=None,
                        help="default: $DISPATCHER_WEBHOOKS_HOST, else 127.0.0.1")
    parser.add_argument("--port", type=int, default=None,
                        help="default: $DISPATCHER_WEBHOOKS_PORT, else 8790")
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from dispatcher.ops.webhook_server import serve, verifier_of
    from dispatcher.settings import SettingsError, load_settings

    try:
        settings = load_settings()
        webhook = verifier_of(settings)
    except SettingsError as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return 2
    host = args.host or settings.webhooks_host
    port = settings.webhooks_port if args.port is None else args.port
    return serve(settings, webhook, host=host, port=port, log_level=args.log_level)
