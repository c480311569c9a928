"""What every operator command shares: its parser (`--json`, the Redis options), the exit
codes, one line on stderr per failure, and its output (tables, JSON, durations).

`dispatcher status` and the other operator commands (`dispatcher.ops.operator_cli`) both build
on it, so neither imports the other's helpers. Imports only the standard library at module
level, as `dispatcher.ops.cli` asks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis import Redis

    from dispatcher.settings import Settings

__all__ = ["EXIT_API_ERROR", "EXIT_CODES", "EXIT_NOT_FOUND", "EXIT_OK", "EXIT_UNHEALTHY",
           "EXIT_UNREACHABLE", "EXIT_USAGE", "Action", "UsageError", "command", "connect_redis",
           "duration", "print_json", "read_settings", "redis_options", "table"]

EXIT_OK = 0
EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4
EXIT_UNHEALTHY = 5
EXIT_CODES = """\
exit codes of the operator commands (status, stats, list, show, stop, update, metrics):
  0  ok (stopping an item that is already stopped is ok too)
  1  the API answered with an error (a bad key's 401/403, a refused request, 5xx)
  2  usage or configuration error; a missing key names its variable
  3  unreachable: no answer from the server (or from Redis, for status and metrics)
  4  the work item does not exist (404)
  5  status --check: the fleet cannot work (each problem on its own line)"""

Action = Callable[[argparse.Namespace], int]

# An operator's command fails in seconds when Redis hangs, not after the OS's TCP timeout.
REDIS_TIMEOUT_SECONDS = 5.0


class UsageError(Exception):
    """The command line cannot be acted on; the message says why."""


def command(subcommands: Any, name: str, action: Action, help: str, description: str,
            *, json_flag: bool = True) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subcommands.add_parser(
        name, help=help, description=description, epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(handler=partial(_guarded, name, action))
    return parser


def redis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="default: $DISPATCHER_REDIS_URL")
    parser.add_argument("--key-prefix", help="default: $DISPATCHER_KEY_PREFIX")


# --- errors -> exit codes ---------------------------------------------------------------------
def _guarded(name: str, action: Action, args: argparse.Namespace) -> int:
    """Run a command; turn what went wrong into one line on stderr and an exit code."""
    try:
        return action(args)
    except Exception as exc:  # sorted below; anything else is re-raised
        code = _failure(name, args, exc)
        if code is None:
            raise
        return code


def _failure(name: str, args: argparse.Namespace, exc: Exception) -> int | None:
    """The exit code of a known failure, None for a bug. The error types are imported only
    when something failed: the Work API client's imports (httpx) cost a quarter of a second,
    which `status --check`, a health probe that reads Redis alone, must not pay."""
    from redis.exceptions import RedisError

    from dispatcher.settings import SettingsError
    from dispatcher.workapi import MissingCredentialError, NotFoundError, WorkAPIError
    from dispatcher.workapi.models import InvalidId  # a WORK_ID like `..`, before any request

    if isinstance(exc, UsageError | SettingsError | MissingCredentialError | InvalidId):
        return _fail(name, args, EXIT_USAGE, "usage", str(exc))
    if isinstance(exc, NotFoundError):
        return _fail(name, args, EXIT_NOT_FOUND, "not_found", exc.message, exc.status)
    if isinstance(exc, WorkAPIError):
        if exc.status is None:
            return _fail(name, args, EXIT_UNREACHABLE, "unreachable", exc.message)
        return _fail(name, args, EXIT_API_ERROR, exc.error_type or "api_error", exc.message,
                     exc.status)
    if isinstance(exc, RedisError):  # refused, timed out, or not Redis at all: nothing to read
        return _fail(name, args, EXIT_UNREACHABLE, "unreachable", f"Redis: {exc}")
    return None


def _fail(name: str, args: argparse.Namespace, code: int, kind: str, message: str,
          status: int | None = None) -> int:
    print(f"dispatcher {name}: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        print_json({"error": {"type": kind, "message": message, "status": status,
                               "exit_code": code}})
    return code


# --- the edges: settings, Redis, the client ---------------------------------------------------
def read_settings() -> Settings:
    from dispatcher.settings import load_settings

    return load_settings()


def connect_redis(settings: Settings, args: argparse.Namespace,
                  timeout: float = REDIS_TIMEOUT_SECONDS) -> tuple[Redis, str]:
    """A Redis connection that is known to answer, and the key prefix."""
    from redis import Redis

    url = args.redis_url or settings.redis_url
    try:
        redis = Redis.from_url(url, decode_responses=True, socket_timeout=timeout,
                               socket_connect_timeout=timeout)
    except ValueError as exc:
        raise UsageError(f"DISPATCHER_REDIS_URL is invalid: {exc}") from None
    redis.ping()
    return redis, args.key_prefix or settings.key_prefix


# --- output -----------------------------------------------------------------------------------
def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[_cell(v) for v in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)


def _cell(value: object) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def duration(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    if seconds < 3600:
        return f"{sign}{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{sign}{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
