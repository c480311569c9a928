"""Redis commands of requests handled at about the same time, sent together in one pipeline.

redis-py's asyncio client spends more CPU on each command it sends alone (a pooled connection
taken and given back under a timeout, retries, observability hooks) than on the command's own
bytes: about 0.1 ms of the emulator's CPU a command, a fifth of a heartbeat. A request awaits
its command as usual; the commands of every request that arrive while the previous batch is
out go in the next one, one round trip and one connection for all. Only commands that answer at
once belong here (never a blocking read, which would hold the whole batch).
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError

__all__ = ["CommandBatch"]

_Pending = tuple[tuple[Any, ...], dict[str, Any], asyncio.Future[Any]]


class CommandBatch:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._pending: list[_Pending] = []
        self._sender: asyncio.Task[None] | None = None

    async def execute(self, *command: Any, **options: Any) -> Any:
        """The command's reply (parsed as redis-py parses it, with the parser's `options`), or
        its error raised: a command refused alone (a `ResponseError`) fails only its own
        request."""
        return await self.submit(*command, **options)

    def submit(self, *command: Any, **options: Any) -> asyncio.Future[Any]:
        """`execute`, the reply awaited later: commands submitted one after the other before
        the first is awaited go in one batch (one round trip), in their order."""
        answered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((command, options, answered))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_pending())
        return answered

    async def run_script(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        """A registered Lua script run by its sha in the batch; sent whole once if Redis does
        not have it (restarted, or its scripts flushed)."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await script(keys=keys, args=args)

    async def _send_pending(self) -> None:
        batch: list[_Pending] = []
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                replies: list[Any]
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for command, options, _ in batch:
                            pipe.execute_command(*command, **options)
                        replies = await pipe.execute(raise_on_error=False)
                except (RedisError, OSError, TimeoutError) as exc:
                    replies = [exc] * len(batch)  # each fails as it would have alone
                for (_, _, answered), reply in zip(batch, replies, strict=True):
                    if answered.done():
                        continue  # its request was cancelled meanwhile
                    if isinstance(reply, Exception):
                        answered.set_exception(reply)
                    else:
                        answered.set_result(reply)
        finally:
            self._sender = None
            for _, _, answered in [*batch, *self._pending]:  # cancelled: nobody waits for ever
                if not answered.done():
                    answered.cancel()
            self._pending = []
