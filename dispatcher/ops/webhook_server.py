"""The webhook receiver: `POST /webhooks` takes a Standard Webhooks delivery, `GET /health`
answers 200 for probes.

The answer is decided by `dispatcher.control.webhooks` (pure); this module performs what it
needs: the fleet's live slots and the replay record in Redis, and the `claim_now` task it
publishes on the control queue. The answer goes back as soon as the task is published, never
after the claim, so a slow Work API cannot make the sender time out and deliver again.

Wake-ups are coalesced: a delivery publishes one only if none is pending (a Redis flag that
the wake-up clears as it starts, `PollKeys.wake_pending`), so a burst of ten thousand
deliveries puts one task on the control queue, not ten thousand ahead of the heartbeat ticks.
Refusals are logged one line per kind per REFUSAL_LOG_SECONDS, with the count left out.

The process holds the signing key and the broker's URL, never the environment key: it cannot
call the Work API, only ask the fleet to.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

import uvicorn
from kombu.exceptions import OperationalError
from redis import Redis, RedisError
from standardwebhooks import Webhook
from standardwebhooks.webhooks import EmptyWebhookSecretError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from dispatcher.control.capacity import Capacity
from dispatcher.control.poll_keys import PollKeys
from dispatcher.control.webhooks import (
    Decision,
    RefusalSampler,
    check,
    decide,
)
from dispatcher.logs import event, logger
from dispatcher.settings import Settings, SettingsError

__all__ = ["Receiver", "create_app", "serve", "verifier_of"]

# A replayed delivery must be refused while its timestamp still verifies, which the library
# allows 5 minutes either side of now: remember each id for both sides.
REPLAY_WINDOW_SECONDS = 600
# A claim nobody took in this long is dropped; by then the sweep has polled or soon will.
CLAIM_EXPIRES_SECONDS = 60
# Deliveries are a few hundred bytes; anything much larger is not one (and is not read in full).
MAX_BODY_BYTES = 64 * 1024
# Requests in flight answer within a second (a Redis read and a publish); give them that.
GRACEFUL_SHUTDOWN_SECONDS = 3


class Receiver:
    """Performs what `decide` needs, and what it decides."""

    def __init__(self, *, webhook: Webhook, redis: Redis, prefix: str,
                 publish: Callable[[], object]) -> None:
        self.webhook = webhook
        self.redis = redis
        self.prefix = prefix
        self.capacity = Capacity(redis, prefix=prefix)
        self.publish = publish
        self.stopping = False  # set at SIGTERM: answer 503 so the sender delivers again later
        self._pending_key = PollKeys(prefix).wake_pending
        self._refusals = RefusalSampler()
        self._refusals_lock = threading.Lock()  # answers run on the thread pool

    def answer(self, body: bytes, headers: Mapping[str, str]) -> Decision:
        checked = check(body, headers, self.webhook)
        try:
            if checked.refused:
                decision = decide(checked, draining=False, first_delivery=None)
            elif self.stopping or self.capacity.total_slots() <= 0:
                decision = decide(checked, draining=True, first_delivery=None)
            else:
                decision = decide(checked, draining=False,
                                  first_delivery=self._record(checked.webhook_id))
            if decision.wake:
                self._wake(checked.webhook_id)
        except (RedisError, OperationalError) as exc:
            # The broker is this Redis too. The sender retries a 503, and the id was forgotten,
            # so the retry is not taken for a replay.
            decision = Decision(503, f"redis unreachable: {exc}")
        self._log(decision, checked.webhook_id, checked.session_id)
        return decision

    def wake_on_start(self) -> None:
        """Claim once as the receiver starts: deliveries sent while it was down were lost, and
        the sweep would find their sessions only a sweep later."""
        try:
            self._publish_once()
        except (RedisError, OperationalError) as exc:
            event("webhook wake-up failed", level=logging.WARNING, error=str(exc))

    def _seen_key(self, webhook_id: str) -> str:
        """String: a delivery's id, kept for the replay window so a replay is refused."""
        return f"{self.prefix}:webhook-seen:{webhook_id}"

    def _record(self, webhook_id: str) -> bool:
        """True if this id is new; it is remembered for the replay window."""
        return bool(self.redis.set(self._seen_key(webhook_id), 1, nx=True,
                                   ex=REPLAY_WINDOW_SECONDS))

    def _wake(self, webhook_id: str) -> None:
        try:
            self._publish_once()
        except OperationalError:
            # Not published: forget the id, so the sender's retry is a first delivery again.
            self.redis.delete(self._seen_key(webhook_id))
            raise

    def _publish_once(self) -> None:
        """Publish a wake-up unless one is pending: the pending one has not started yet, so
        its drain will see whatever this delivery announced. The flag lapses with the task's
        own expiry: a wake-up nobody took leaves no flag behind to swallow the next."""
        if not self.redis.set(self._pending_key, 1, nx=True, ex=CLAIM_EXPIRES_SECONDS):
            return
        try:
            self.publish()
        except OperationalError:
            self.redis.delete(self._pending_key)
            raise

    def _log(self, decision: Decision, webhook_id: str, session_id: str) -> None:
        if decision.wake:
            event("webhook accepted", webhook_id=webhook_id, session_id=session_id)
        elif decision.status < 300:
            event("webhook ignored", webhook_id=webhook_id or None, reason=decision.reason)
        else:
            with self._refusals_lock:
                left_out = self._refusals.note(decision.status, decision.reason,
                                               now=time.monotonic())
            if left_out is not None:
                event("webhook refused", level=logging.WARNING, status=decision.status,
                      webhook_id=webhook_id or None, reason=decision.reason,
                      left_out=left_out or None)


def create_app(receiver: Receiver) -> Starlette:
    async def deliver(request: Request) -> Response:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return JSONResponse({"error": "body too large"}, status_code=413)
        # Redis and the broker are spoken to synchronously: off the event loop.
        decision = await run_in_threadpool(receiver.answer, body, dict(request.headers))
        return JSONResponse({"status": decision.reason}, status_code=decision.status)

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/webhooks", deliver, methods=["POST"]),
                             Route("/health", health, methods=["GET"])])


def verifier_of(settings: Settings) -> Webhook:
    """The verifier for ANTHROPIC_WEBHOOK_SIGNING_KEY; raises naming the variable."""
    key = settings.webhook_signing_key
    if key is None or not key.get_secret_value():
        raise SettingsError("ANTHROPIC_WEBHOOK_SIGNING_KEY is not set: the webhook signing key")
    try:
        return Webhook(key.get_secret_value())
    except (ValueError, RuntimeError, EmptyWebhookSecretError) as exc:
        # The library's messages never echo the key.
        raise SettingsError(f"ANTHROPIC_WEBHOOK_SIGNING_KEY is invalid: {exc}") from None


def _receiver(settings: Settings, webhook: Webhook) -> Receiver:
    # The Celery app reads the same settings: the broker and key prefix are the fleet's.
    from dispatcher.celery import names
    from dispatcher.celery.application import app
    from dispatcher.runtime import REDIS_SOCKET_TIMEOUT_SECONDS

    def publish() -> object:
        return app.send_task(names.CLAIM_NOW, kwargs={"wakeup": True},
                             queue=names.CONTROL_QUEUE, expires=CLAIM_EXPIRES_SECONDS)

    redis = Redis.from_url(settings.redis_url, decode_responses=True,
                           socket_timeout=REDIS_SOCKET_TIMEOUT_SECONDS,
                           socket_connect_timeout=REDIS_SOCKET_TIMEOUT_SECONDS)
    return Receiver(webhook=webhook, redis=redis, prefix=settings.key_prefix, publish=publish)


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, receiver: Receiver) -> None:
        super().__init__(config)
        self.receiver = receiver

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.receiver.stopping = True
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a stop on request is a clean exit (status 0)

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets=sockets)
        if not self.should_exit:
            bound = [sock.getsockname() for server in getattr(self, "servers", [])
                     for sock in server.sockets]
            where = (f"{bound[0][0]}:{bound[0][1]}" if bound
                     else f"{self.config.host}:{self.config.port}")
            print(f"dispatcher webhooks listening on http://{where}/webhooks", flush=True)
            self.receiver.wake_on_start()


def serve(settings: Settings, webhook: Webhook, *, host: str, port: int, log_level: str) -> int:
    """Until SIGTERM or Ctrl-C; 0 after a clean stop."""
    receiver = _receiver(settings, webhook)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    server = _Server(uvicorn.Config(create_app(receiver), host=host, port=port, lifespan="off",
                                    log_level=log_level, access_log=False,
                                    timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS),
                     receiver)
    server.run()
    if not server.started:
        print("dispatcher webhooks: did not start (see the errors above)", file=sys.stderr)
        return 1
    return 0
