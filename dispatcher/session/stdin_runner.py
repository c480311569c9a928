"""The official runner on the work item a dispatcher hands over: `handle_item` with the secret.

    python stdin_runner.py [--workdir DIR] [--max-idle SECONDS] < work.json

The on-work program of runner mode for sandboxes that must not hold the work secret in their
environment (containers: `docker inspect` shows a container's environment to anyone who may
inspect it). It reads the work item JSON on stdin, as every sandbox gets it, and passes its
`secret` to the SDK's `EnvironmentWorker.handle_item(work_secret=...)`, which claims the lease,
runs the session's tool calls and stops the item; the work, environment and session ids and the
environment key come from the `ANTHROPIC_*` variables, as `handle_item` reads them itself.
Where stdin carries no secret (a caller that sends none), the file named by
ANTHROPIC_WORK_SECRET_FILE is read, then `handle_item` falls back to ANTHROPIC_WORK_SECRET.

Nothing is written outside the work directory (default: the current one), so it runs on a
read-only root file system with a writable work directory. SIGTERM cancels the session as the
SDK's own shutdown does (the lease's stop is still sent); a second SIGTERM exits at once.

Standard library and the SDK only, no `dispatcher` import: the file is copied alone into
sandbox images (`bench/runner_image.py` installs it as /opt/dispatcher/stdin_runner.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from typing import Any

__all__ = ["main", "work_secret"]

# Exit status after a SIGTERM ended the session: a clean shutdown, as the fleet asked for it.
EXIT_TERMINATED = 0


def work_secret(stdin_text: str, environ: dict[str, str]) -> str | None:
    """The work secret: the work JSON's `secret`, else ANTHROPIC_WORK_SECRET_FILE's content;
    None leaves `handle_item` to read ANTHROPIC_WORK_SECRET."""
    try:
        work: Any = json.loads(stdin_text) if stdin_text.strip() else {}
    except ValueError:
        work = {}
    secret = work.get("secret") if isinstance(work, dict) else None
    if isinstance(secret, str) and secret:
        return secret
    path = environ.get("ANTHROPIC_WORK_SECRET_FILE")
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or None
    return None


async def _serve(secret: str | None, options: dict[str, Any]) -> None:
    from anthropic import AsyncAnthropic  # the SDK's import takes a while: after argument errors

    worker = AsyncAnthropic().beta.environments.work.worker(**options)
    await worker.handle_item(work_secret=secret)


async def _run_until_terminated(secret: str | None, options: dict[str, Any]) -> int:
    task = asyncio.ensure_future(_serve(secret, options))
    loop = asyncio.get_running_loop()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        if terminated:
            os._exit(EXIT_TERMINATED)  # the second signal: no more waiting for the stop call
        terminated = True
        task.cancel()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    try:
        await task
    except asyncio.CancelledError:
        if not terminated:
            raise
    return EXIT_TERMINATED if terminated else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.getcwd(),
                        help="where the session's tools work (default: the current directory)")
    parser.add_argument("--max-idle", type=float, metavar="SECONDS",
                        help="how long the runner waits for more after the session went idle "
                             "(default: the SDK's, 60 s)")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {"workdir": args.workdir}
    if args.max_idle is not None:
        options["max_idle"] = args.max_idle
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    secret = work_secret(sys.stdin.read(), dict(os.environ))
    return asyncio.run(_run_until_terminated(secret, options))


if __name__ == "__main__":
    sys.exit(main())
