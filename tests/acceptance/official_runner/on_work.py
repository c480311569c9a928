"""The on-work program of the process runtime's official-runner tests: the SDK's documented
recipe for an already-claimed item, `handle_item()` with no arguments (it reads the
`ANTHROPIC_*` variables, the work secret from ANTHROPIC_WORK_SECRET), unmodified.

    python on_work.py WORKDIR MAX_IDLE_SECONDS

Each session works in WORKDIR/<session id>, so sessions of one fleet never share files.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from anthropic import AsyncAnthropic


async def main(workdir: Path, max_idle: float) -> None:
    workdir.mkdir(parents=True, exist_ok=True)
    worker = AsyncAnthropic().beta.environments.work.worker(workdir=str(workdir),
                                                            max_idle=max_idle)
    await worker.handle_item()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    asyncio.run(main(Path(sys.argv[1]) / os.environ["ANTHROPIC_SESSION_ID"], float(sys.argv[2])))
