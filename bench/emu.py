"""Talking to the emulator from the benchmark: sessions, stops, the request log, raw leases."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx

from dispatcher.ops.stack import API_HEADERS, LocalStack

__all__ = ["Created", "Emulator", "RequestTail"]



@dataclass(frozen=True)
class Created:
    time: float  # epoch s, taken just before the create request was sent
    session_id: str
    work_id: str


class Emulator:
    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.base_url = stack.base_url
        self.org = {**API_HEADERS, "x-api-key": stack.api_key}
        self.env = {**API_HEADERS, "authorization": f"Bearer {stack.environment_key}"}
        self.http = httpx.Client(base_url=self.base_url, timeout=30)

    def new_environment(self, name: str) -> str:
        return self.stack.create_environment(name)

    def create_session(self, environment_id: str, metadata: dict[str, str]) -> Created:
        now = time.time()
        body = {"environment_id": environment_id, "agent": "bench", "metadata": metadata}
        session = self.http.post("/v1/sessions", headers=self.org, json=body)
        session.raise_for_status()
        data = session.json()
        return Created(now, data["id"], data["work_id"])

    def create_sessions(self, environment_id: str, n: int, metadata: dict[str, str],
                        *, concurrency: int = 16) -> list[Created]:
        """N sessions as fast as the emulator takes them (a backlog)."""

        async def go() -> list[Created]:
            limit = asyncio.Semaphore(concurrency)
            body = {"environment_id": environment_id, "agent": "bench", "metadata": metadata}
            async with httpx.AsyncClient(base_url=self.base_url, timeout=60) as client:

                async def one() -> Created:
                    async with limit:
                        now = time.time()
                        reply = await _retry(lambda: client.post("/v1/sessions",
                                                                 headers=self.org, json=body))
                        data = reply.json()
                        return Created(now, data["id"], data["work_id"])

                return list(await asyncio.gather(*(one() for _ in range(n))))

        return asyncio.run(go())

    def stop(self, environment_id: str, work_id: str, *, force: bool = False) -> float:
        now = time.time()
        self.http.post(f"/v1/environments/{environment_id}/work/{work_id}/stop",
                       headers=self.org, json={"force": force})
        return now

    def requests(self, environment_id: str | None = None) -> list[dict[str, Any]]:
        """The request log (oldest first), optionally of one environment."""
        reply = self.http.get("/_emulator/requests", headers=self.org)
        reply.raise_for_status()
        entries: list[dict[str, Any]] = reply.json()["data"]
        if environment_id is None:
            return entries
        return [e for e in entries if e.get("environment_id") == environment_id]

    def tail(self) -> RequestTail:
        """A reader of the request log from its end now on."""
        return RequestTail(self)


    def count_beats(self, environment_id: str, *, log_heartbeats: bool = True) -> float:
        """The emulator counts the environment's beats from now (a new window each call;
        `requestlog.BeatStats`): when the window started, on the emulator's clock."""
        reply = self.http.post(f"/_emulator/environments/{environment_id}/heartbeats",
                               headers=self.org, json={"log_heartbeats": log_heartbeats})
        reply.raise_for_status()
        return float(reply.json()["since"])

    def beats(self, environment_id: str) -> dict[str, Any]:
        """The environment's beat counts over the window (`count_beats`)."""
        reply = self.http.get(f"/_emulator/environments/{environment_id}/heartbeats",
                              headers=self.org)
        reply.raise_for_status()
        counted: dict[str, Any] = reply.json()
        return counted

    def stop_counting_beats(self, environment_id: str) -> None:
        self.http.delete(f"/_emulator/environments/{environment_id}/heartbeats",
                         headers=self.org).raise_for_status()

    def set_faults(self, **changes: Any) -> None:
        self.http.post("/_emulator/faults", headers=self.org, json=changes).raise_for_status()

    def reset_faults(self) -> None:
        self.http.delete("/_emulator/faults", headers=self.org).raise_for_status()

    def clear_requests(self) -> None:
        self.http.delete("/_emulator/requests", headers=self.org).raise_for_status()

    def claim_leases(self, environment_id: str, work_ids: list[str], *, ttl: int,
                     concurrency: int = 16) -> dict[str, tuple[str, float, str]]:
        """Ack each item and send its first heartbeat (NO_HEARTBEAT) with `ttl`, as the
        dispatcher's poller would: {work_id: (token, time of the beat, created_at)}."""

        async def go() -> dict[str, tuple[str, float, str]]:
            limit = asyncio.Semaphore(concurrency)
            base = f"/v1/environments/{environment_id}/work"
            async with httpx.AsyncClient(base_url=self.base_url, timeout=60) as client:

                async def one(work_id: str) -> tuple[str, tuple[str, float, str]]:
                    async with limit:
                        acked = await _retry(lambda: client.post(f"{base}/{work_id}/ack",
                                                                 headers=self.env), ok=(409,))
                        beat = await _retry(lambda: client.post(
                            f"{base}/{work_id}/heartbeat", headers=self.env,
                            params={"expected_last_heartbeat": "NO_HEARTBEAT",
                                    "desired_ttl_seconds": ttl}), ok=(412,))
                        body = beat.json()
                        if beat.status_code == 412:
                            # A retry after a dropped answer: the first beat landed, and the
                            # 412 carries the token it set.
                            body = body["error"]["details"]["current_state"]
                        return work_id, (body["last_heartbeat"], time.time(),
                                         acked.json().get("created_at", ""))

                return dict(await asyncio.gather(*(one(w) for w in work_ids)))

        return asyncio.run(go())

    def close(self) -> None:
        self.http.close()


async def _retry(send: Any, *, ok: tuple[int, ...] = (), attempts: int = 5) -> httpx.Response:
    """The emulator drops connections when its Redis pool (100) is exhausted: retry those."""
    for attempt in range(attempts):
        try:
            reply: httpx.Response = await send()
        except httpx.TransportError:
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        if reply.status_code >= 500 and attempt < attempts - 1:
            await asyncio.sleep(0.2 * (attempt + 1))
            continue
        if reply.status_code not in ok:
            reply.raise_for_status()
        return reply
    raise AssertionError("unreachable")


class RequestTail:
    """Reads only the request log's new entries each time (`?after=`): a busy log (thousands of
    heartbeats a second) is read a page at a time, as it grows, never whole."""

    PAGE = 5000

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        reply = emu.http.get("/_emulator/requests", headers=emu.org, params={"limit": 1})
        reply.raise_for_status()
        self.cursor: str = reply.json()["next"] or "0-0"  # empty: from the first

    def read(self) -> list[dict[str, Any]]:
        """Every entry written since the last read, oldest first."""
        found: list[dict[str, Any]] = []
        while True:
            params = {"limit": self.PAGE, "after": self.cursor}
            reply = self.emu.http.get("/_emulator/requests", headers=self.emu.org,
                                      params=params)
            reply.raise_for_status()
            body = reply.json()
            found += body["data"]
            self.cursor = body["next"] or self.cursor
            if len(body["data"]) < self.PAGE:
                return found
