"""The peer: one official-SDK worker process, as `ant beta:worker poll --on-work CMD` runs.

    python -m bench.peer CMD [ARGS...]

It reads `ANTHROPIC_BASE_URL`, `ANTHROPIC_ENVIRONMENT_ID` and `ANTHROPIC_ENVIRONMENT_KEY`, and
loops over the official `anthropic` package's work poller (`client.beta.environments.work
.poller(...)`, used as published: default `block_ms`, jitter, backoff and `auto_stop`). For each
claimed item it does what the CLI's `--on-work` runner does (protocol facts, section 5):

* spawn CMD with the poller's whole environment plus `ANTHROPIC_WORK_ID`,
  `ANTHROPIC_ENVIRONMENT_ID`, `ANTHROPIC_SESSION_ID`, `ANTHROPIC_ENVIRONMENT_KEY`, and the work
  item JSON (secret included) on stdin;
* wait for it: one session at a time per process (the CLI has no concurrency flag, so a fleet of
  N slots is N processes);
* let the poller stop the item when the loop body returns (auto_stop: since SDK 2.16 a forced
  stop sent as the item's own sessions token, a graceful one on the environment key after a
  401; a 409 is ignored).

While the command runs the poller does not heartbeat: the command owns the lease, as
`ant beta:worker run` or the SDK's `handle_item` would (the fake session's `fake.heartbeat`).
On SIGTERM or SIGINT it forwards SIGTERM to the running command, waits for it (the CLI waits
30 s, then SIGKILLs), and exits after the poller posted the pending stop. (The CLI's poller
stops gracefully instead; the peer is the Python SDK's, pinned in the dev extra.)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncGenerator
from typing import cast

from anthropic import AsyncAnthropic
from anthropic.types.beta.environments import BetaSelfHostedWork

KILL_AFTER_SECONDS = 30.0  # the CLI's WaitDelay


async def serve(argv: list[str]) -> None:
    base_url = os.environ.get("ANTHROPIC_BASE_URL") or None
    environment_id = os.environ["ANTHROPIC_ENVIRONMENT_ID"]
    environment_key = os.environ["ANTHROPIC_ENVIRONMENT_KEY"]
    # The poller builds a Bearer-only sub-client from the environment key; no API key is needed.
    client = AsyncAnthropic(api_key=None, auth_token=environment_key, base_url=base_url)
    stopping = asyncio.Event()
    child: list[asyncio.subprocess.Process] = []
    main = asyncio.current_task()

    def on_signal() -> None:
        stopping.set()
        if not child and main is not None:
            main.cancel()  # idle, in a poll or its jitter sleep: nothing pending to stop
        for process in child:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)

    poller = client.beta.environments.work.poller(environment_id=environment_id,
                                                  environment_key=environment_key)
    # What `poller` returns is an async generator (`aiter_work`), closed below like the CLI's
    # Close(), which posts the pending stop.
    poller = cast("AsyncGenerator[BetaSelfHostedWork, None]", poller)
    async with contextlib.aclosing(poller) as items:
        async for item in items:
            session_id = getattr(item.data, "id", "") or ""
            env = {**os.environ, "ANTHROPIC_WORK_ID": item.id,
                   "ANTHROPIC_ENVIRONMENT_ID": environment_id,
                   "ANTHROPIC_SESSION_ID": session_id,
                   "ANTHROPIC_ENVIRONMENT_KEY": environment_key}
            process = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                           env=env)
            child[:] = [process]
            await _wait(process, item.to_json(indent=None).encode(), stopping)
            child.clear()
            if stopping.is_set():
                break  # aclosing posts the pending stop, as the CLI's Close() does


async def _wait(process: asyncio.subprocess.Process, stdin: bytes,
                stopping: asyncio.Event) -> None:
    communicate = asyncio.ensure_future(process.communicate(stdin))
    stop_seen = asyncio.ensure_future(stopping.wait())
    await asyncio.wait([communicate, stop_seen], return_when=asyncio.FIRST_COMPLETED)
    stop_seen.cancel()
    if not communicate.done():
        try:
            await asyncio.wait_for(asyncio.shield(communicate), KILL_AFTER_SECONDS)
        except TimeoutError:
            process.kill()
    await communicate


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m bench.peer CMD [ARGS...]")
    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        asyncio.run(serve(sys.argv[1:]))


if __name__ == "__main__":
    main()
