"""`dispatcher emulator`: its options, read at the edge, and the command that starts it.

Imports only the standard library at module level: registering the subcommand must not load
FastAPI, uvicorn or Redis for every other `dispatcher` command.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
from typing import Any

__all__ = ["register", "run"]

ENV_ENVIRONMENT_KEY = "DISPATCHER_EMULATOR_ENVIRONMENT_KEY"
ENV_API_KEY = "DISPATCHER_EMULATOR_API_KEY"
ENV_WEBHOOK_URL = "DISPATCHER_EMULATOR_WEBHOOK_URL"
ENV_WEBHOOK_SIGNING_KEY = "DISPATCHER_EMULATOR_WEBHOOK_SIGNING_KEY"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "emulator", help="run the local Work API emulator",
        description="A faithful local Work API server on Redis (see docs/emulator.md). "
                    "Prints where it listens; runs until SIGTERM or Ctrl-C.")
    _server_options(parser)
    _lease_options(parser)
    _webhook_options(parser)
    _fault_options(parser)
    parser.set_defaults(handler=run)


def _server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--redis-url",
                        default=os.environ.get("DISPATCHER_REDIS_URL", DEFAULT_REDIS_URL),
                        help="default: $DISPATCHER_REDIS_URL or %(default)s")
    parser.add_argument("--key-prefix", default="emulator",
                        help="every Redis key of the emulator starts with this (default: "
                             "%(default)s)")
    parser.add_argument("--environment-key", default=os.environ.get(ENV_ENVIRONMENT_KEY),
                        help=f"the environment key (or ${ENV_ENVIRONMENT_KEY}) of every "
                             "environment created without an environment_key of its own; "
                             "generated and printed if not given")
    parser.add_argument("--api-key", default=os.environ.get(ENV_API_KEY),
                        help=f"the organisation API key (or ${ENV_API_KEY}); generated and "
                             "printed if not given")
    parser.add_argument("--create-environment", action="append", default=[], metavar="NAME",
                        help="create an environment at start and print its id (repeatable)")
    parser.add_argument("--environment-id", action="append", default=[], metavar="ID",
                        help="create an environment with this fixed id at start unless it "
                             "exists (repeatable; for a fleet whose ANTHROPIC_ENVIRONMENT_ID "
                             "is set in advance)")
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"])


def _lease_options(parser: argparse.ArgumentParser) -> None:
    from .config import (
        DEFAULT_TTL_SECONDS,
        MAX_DELIVERIES,
        MAX_LIST_LIMIT,
        MAX_TTL_SECONDS,
        MIN_TTL_SECONDS,
        SESSIONS_TOKEN_LIFE_SECONDS,
        UNCLAIMED_LIMIT_SECONDS,
        LeaseExpiry,
        ServerModel,
        SessionsToken,
        StoppingHeartbeat,
        StopResponse,
    )

    group = parser.add_argument_group(
        "the server model", "defaults follow SDK 2.17's model of the service; each switch "
                            "reaches the other behaviour (docs/emulator.md)")
    group.add_argument("--server-model", choices=[m.value for m in ServerModel],
                       default=ServerModel.SDK_217.value,
                       help="every switch below at once: sdk-2.17 (default) or earlier (the "
                            "emulator's model before SDK 2.17); a switch given on its own wins")
    # The switches default to None: unset, the server model decides.
    group.add_argument("--lease-expiry", choices=[m.value for m in LeaseExpiry],
                       help="a lapsed lease: stop (the item ends; default) or requeue "
                            "(delivered again)")
    group.add_argument("--unclaimed-limit", type=int,
                       help="an acked item never heartbeated lapses this long after its ack "
                            f"(s, default {UNCLAIMED_LIMIT_SECONDS}; 0: never, it stays "
                            "starting)")
    group.add_argument("--max-deliveries", type=int,
                       help="an unacked item is delivered at most this often (default "
                            f"{MAX_DELIVERIES}; 0: no limit)")
    group.add_argument("--stopping-heartbeat", choices=[m.value for m in StoppingHeartbeat],
                       help="a heartbeat on a stopping item: refuse (lease_extended false, no "
                            "new token; default) or extend")
    group.add_argument("--sessions-token", choices=[m.value for m in SessionsToken],
                       help="a new sessions token in the secret of every delivery (default), "
                            "or one per item")
    group.add_argument("--sessions-token-life", type=int,
                       help="a sessions token expires this long after its delivery (s, default "
                            f"{SESSIONS_TOKEN_LIFE_SECONDS}; 0: never)")
    group.add_argument("--no-claim-unacked", dest="claim_unacked", action="store_const",
                       const=False, help="a first heartbeat on a polled, unacked item is a 409 "
                                         "(default: it claims the item)")
    group.add_argument("--stop-stopped", choices=["noop", "conflict"],
                       help="a stop of a stopped item: answered as any stop, changing nothing "
                            "(default), or 409")
    group.add_argument("--no-should-retry-header", dest="should_retry_header",
                       action="store_const", const=False,
                       help="send no x-should-retry: false on refusals a retry cannot change")
    group.add_argument("--default-ttl", type=int,
                       help=f"lease TTL when a heartbeat asks for none (s, default "
                            f"{DEFAULT_TTL_SECONDS})")
    group.add_argument("--min-ttl", type=int, default=MIN_TTL_SECONDS,
                       help="desired_ttl_seconds is clamped to [min, max] (default %(default)s)")
    group.add_argument("--max-ttl", type=int, default=MAX_TTL_SECONDS,
                       help="(default %(default)s)")
    group.add_argument("--max-list-limit", type=int, default=MAX_LIST_LIMIT,
                       help="the largest limit a list takes; above it, a 400 (default "
                            "%(default)s; the service documents none)")
    group.add_argument("--stop-response", choices=[s.value for s in StopResponse],
                       default=StopResponse.NO_CONTENT.value,
                       help="stop answers 204 with no body (as observed) or the work object")


def _webhook_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "webhooks", "on each session created, deliver a signed session.status_run_started")
    group.add_argument("--webhook-url", default=os.environ.get(ENV_WEBHOOK_URL) or None,
                       help=f"where to deliver, e.g. http://127.0.0.1:8790/webhooks (or "
                            f"${ENV_WEBHOOK_URL}); none: no deliveries")
    group.add_argument("--webhook-signing-key", default=os.environ.get(ENV_WEBHOOK_SIGNING_KEY),
                       help=f"the whsec_... key to sign with (or ${ENV_WEBHOOK_SIGNING_KEY}, "
                            "which keeps it out of the process list); generated and printed "
                            "if --webhook-url is given without one")


def _fault_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("faults", "also settable at run time: POST /_emulator/faults")
    group.add_argument("--latency-ms", type=int, default=0)
    group.add_argument("--fault-endpoints", default="",
                       help="comma-separated endpoints faults apply to (default: all), of "
                            "get,update,list,ack,heartbeat,poll,stop,stats")
    group.add_argument("--error-rate", type=float, default=0.0, help="share of 5xx answers")
    group.add_argument("--error-status", type=int, default=500)
    group.add_argument("--rate-limit-rate", type=float, default=0.0,
                       help="share of 429 answers with retry-after")
    group.add_argument("--retry-after", type=float, default=1.0, help="seconds, on each 429")
    group.add_argument("--drop-rate", type=float, default=0.0,
                       help="share of connections closed without an answer")
    group.add_argument("--heartbeat-412-rate", type=float, default=0.0)
    group.add_argument("--malformed-rate", type=float, default=0.0,
                       help="share of 2xx answers whose JSON body is cut short")
    group.add_argument("--lost-reply-rate", type=float, default=0.0,
                       help="share of requests applied, then closed without the answer")
    group.add_argument("--webhook-drop-rate", type=float, default=0.0,
                       help="share of session webhooks never sent (lost deliveries)")


def run(args: argparse.Namespace) -> int:
    from .config import EmulatorConfig
    from .faults import FaultSettings
    from .server import serve

    config = EmulatorConfig(
        environment_key=args.environment_key or _generated("environment key", "sk-ant-oat01"),
        api_key=args.api_key or _generated("api key", "sk-ant-api03"),
        redis_url=args.redis_url, key_prefix=args.key_prefix, host=args.host, port=args.port,
        min_ttl_seconds=args.min_ttl, max_ttl_seconds=args.max_ttl,
        max_list_limit=args.max_list_limit,
        create_environments=tuple(args.create_environment),
        environment_ids=tuple(args.environment_id), webhook_url=args.webhook_url,
        webhook_signing_key=_signing_key(args), **_server_model(args))
    if not 1 <= config.min_ttl_seconds <= config.default_ttl_seconds <= config.max_ttl_seconds:
        raise SystemExit("dispatcher emulator: need 1 <= --min-ttl <= --default-ttl <= --max-ttl")
    if config.max_list_limit < 1:
        raise SystemExit("dispatcher emulator: --max-list-limit takes 1 or more")
    if min(config.unclaimed_limit_seconds, config.max_deliveries,
           config.sessions_token_life_seconds) < 0:
        raise SystemExit("dispatcher emulator: --unclaimed-limit, --max-deliveries and "
                         "--sessions-token-life take 0 (off) or more")
    faults = FaultSettings(
        latency_ms=args.latency_ms,
        endpoints=[e.strip() for e in args.fault_endpoints.split(",") if e.strip()] or None,
        error_rate=args.error_rate, error_status=args.error_status,
        rate_limit_rate=args.rate_limit_rate, retry_after_seconds=args.retry_after,
        drop_rate=args.drop_rate, heartbeat_412_rate=args.heartbeat_412_rate,
        malformed_rate=args.malformed_rate, lost_reply_rate=args.lost_reply_rate,
        webhook_drop_rate=args.webhook_drop_rate, stop_response=args.stop_response)
    return serve(config, faults, log_level=args.log_level)


def _server_model(args: argparse.Namespace) -> dict[str, Any]:
    """The `EmulatorConfig` fields of `--server-model`, then each switch given on its own."""
    from .config import MODELS, LeaseExpiry, ServerModel, SessionsToken, StoppingHeartbeat

    given = {
        "lease_expiry": args.lease_expiry and LeaseExpiry(args.lease_expiry),
        "unclaimed_limit_seconds": args.unclaimed_limit,
        "max_deliveries": args.max_deliveries,
        "stopping_heartbeat": args.stopping_heartbeat
        and StoppingHeartbeat(args.stopping_heartbeat),
        "sessions_token": args.sessions_token and SessionsToken(args.sessions_token),
        "sessions_token_life_seconds": args.sessions_token_life,
        "claim_unacked": args.claim_unacked,
        "stop_stopped_noop": None if args.stop_stopped is None else args.stop_stopped == "noop",
        "should_retry_header": args.should_retry_header,
        "default_ttl_seconds": args.default_ttl,
    }
    chosen = {name: value for name, value in given.items() if value is not None}
    return {**MODELS[ServerModel(args.server_model)], **chosen}


def _signing_key(args: argparse.Namespace) -> str | None:
    if not args.webhook_url:
        return None
    if args.webhook_signing_key:
        return str(args.webhook_signing_key)
    # A Standard Webhooks key is `whsec_` and the base64 of random bytes.
    key = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    print(f"webhook signing key: {key}", flush=True)
    return key


def _generated(what: str, kind: str) -> str:
    """A key for a local emulator nobody configured: printed, since the user needs it."""
    key = f"{kind}-emulator-{secrets.token_urlsafe(24)}"
    print(f"{what}: {key}", flush=True)
    return key
