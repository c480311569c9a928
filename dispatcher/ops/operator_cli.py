"""Operator commands: `dispatcher status|stats|list|show|stop|update|metrics`.

    status    the fleet as the lease registry sees it (Redis only; no API key needed);
              --check for health checks, --watch to follow it (dispatcher.ops.status)
    stats     the server's queue stats                 ANTHROPIC_ENVIRONMENT_KEY or _API_KEY
    list      work items, page by page                 ANTHROPIC_ENVIRONMENT_KEY
    show      one work item                            ANTHROPIC_API_KEY
    stop      stop one work item (graceful or --force) ANTHROPIC_ENVIRONMENT_KEY or _API_KEY
    update    upsert (`key=value`, `key=` for "") or delete (`--delete key`) metadata
                                                       ANTHROPIC_API_KEY
    metrics   serve the fleet's Prometheus exporter until SIGTERM or Ctrl-C

Every command but `metrics` takes `--json` for scripts. The API commands also need
ANTHROPIC_ENVIRONMENT_ID (and ANTHROPIC_BASE_URL away from api.anthropic.com). Credentials are
those the official SDK 2.10.0 documents per endpoint. No key and no work `secret` is ever printed.

Exit codes (the same for every command; also in `dispatcher --help`):

    0  ok (stopping an item that is already stopped is ok too)
    1  the API answered with an error (a bad key's 401/403, a refused request, 5xx)
    2  usage or configuration error; a missing key names its variable
    3  unreachable: no answer from the server (or from Redis, for status and metrics)
    4  the work item does not exist (404)
    5  status --check: the fleet cannot work (each problem on its own line)

Imports only the standard library (and the commands' shared frame, `dispatcher.ops.output`,
and `dispatcher.ops.status`, which import nothing else) at module level, as
`dispatcher.ops.cli` asks.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

from dispatcher.ops import status
from dispatcher.ops.output import (
    EXIT_CODES,
    EXIT_OK,
    UsageError,
    command,
    connect_redis,
    print_json,
    read_settings,
    redis_options,
    table,
)

if TYPE_CHECKING:
    from dispatcher.settings import Settings
    from dispatcher.workapi import Work, WorkClient

__all__ = ["EXIT_CODES", "register"]

# An operator waits for one retry, not for the fleet's patient policy.
CLI_RETRIES = 1
# Not celery-exporter's 9808 (a Celery host often runs it), nor redis_exporter's 9121,
# node_exporter's 9100 or statsd_exporter's 9102, which may share the host. Prometheus' list of
# exporter ports (9100-9999) is full, so no port there is free of every exporter.
DEFAULT_METRICS_PORT = 9818


# --- registration -----------------------------------------------------------------------------
def register(subcommands: Any) -> None:
    status.register(subcommands)
    _stats_parser(subcommands)
    _list_parser(subcommands)
    _show_parser(subcommands)
    _stop_parser(subcommands)
    _update_parser(subcommands)
    _metrics_parser(subcommands)


def _stats_parser(subcommands: Any) -> None:
    command(subcommands, "stats", _stats, "the server's work queue stats",
            "Queue depth, pending items, the oldest queued item and polling workers of "
            "$ANTHROPIC_ENVIRONMENT_ID. Takes ANTHROPIC_ENVIRONMENT_KEY or ANTHROPIC_API_KEY.")


def _list_parser(subcommands: Any) -> None:
    parser = command(subcommands, "list", _list, "list work items",
                     "Work items of $ANTHROPIC_ENVIRONMENT_ID, newest first. Takes "
                     "ANTHROPIC_ENVIRONMENT_KEY (the server refuses an organisation key).")
    parser.add_argument("--limit", type=int, help="page size (the server's default if unset)")
    parser.add_argument("--page", help="the page token a previous list printed")
    parser.add_argument("--all", action="store_true", help="follow next_page to the end")
    parser.add_argument("--state", action="append", default=[], metavar="STATE",
                        help="keep only items in this state (repeatable; filtered here, "
                             "after the server answers)")


def _show_parser(subcommands: Any) -> None:
    parser = command(subcommands, "show", _show, "show one work item",
                     "One work item of $ANTHROPIC_ENVIRONMENT_ID. Takes ANTHROPIC_API_KEY "
                     "(the server refuses the environment key).")
    parser.add_argument("work_id", metavar="WORK_ID")


def _stop_parser(subcommands: Any) -> None:
    parser = command(subcommands, "stop", _stop, "stop one work item",
                     "Ask the server to stop a work item: graceful (the fleet sends SIGTERM, "
                     "waits the grace period, then SIGKILL) or --force (SIGKILL now). Takes "
                     "ANTHROPIC_ENVIRONMENT_KEY or ANTHROPIC_API_KEY.")
    parser.add_argument("work_id", metavar="WORK_ID")
    parser.add_argument("--force", action="store_true", help="stop at once, no grace period")


def _update_parser(subcommands: Any) -> None:
    parser = command(subcommands, "update", _update, "change a work item's metadata",
                     "Upsert metadata: `key=value` sets a value, `key=` sets the empty string, "
                     "`--delete key` removes the key. Takes ANTHROPIC_API_KEY.")
    parser.add_argument("work_id", metavar="WORK_ID")
    parser.add_argument("changes", nargs="*", metavar="KEY=VALUE")
    parser.add_argument("--delete", action="append", default=[], metavar="KEY",
                        help="delete this key (repeatable)")


def _metrics_parser(subcommands: Any) -> None:
    parser = command(subcommands, "metrics", _metrics, "serve the fleet's Prometheus metrics",
                     "Serve /metrics (the same exporter as a worker started with "
                     "DISPATCHER_METRICS_PORT) until SIGTERM or Ctrl-C. Server gauges need "
                     "ANTHROPIC_ENVIRONMENT_ID and a key, or DISPATCHER_ENVIRONMENTS_FILE (one "
                     "set per environment); without them they are left out.",
                     json_flag=False)
    parser.add_argument("--port", type=int, default=None,
                        help=f"default: $DISPATCHER_METRICS_PORT or {DEFAULT_METRICS_PORT}; "
                             "0 picks a free port")
    parser.add_argument("--host", default=None,
                        help="default: $DISPATCHER_METRICS_HOST or 127.0.0.1; 0.0.0.0 for a "
                             "scraper on another host")
    redis_options(parser)


# --- the edges: the Work API client ---------------------------------------------------------
def _client(settings: Settings, **overrides: Any) -> WorkClient:
    from dispatcher.settings import SettingsError
    from dispatcher.workapi import WorkClient

    try:
        return WorkClient.from_settings(settings, **{"max_retries": CLI_RETRIES, **overrides})
    except ValueError as exc:  # a base URL that is not http(s)
        raise SettingsError(f"ANTHROPIC_BASE_URL is invalid: {exc}") from None


def _work_dict(work: Work) -> dict[str, Any]:
    """A work item for printing: never its `secret` (null on these paths anyway)."""
    return work.model_dump(mode="json", exclude={"secret"})


# --- the operator endpoints -------------------------------------------------------------------
def _stats(args: argparse.Namespace) -> int:
    with _client(read_settings()) as client:
        stats = client.stats()
    body = stats.model_dump(mode="json")
    if args.json:
        print_json(body)
    else:
        print(table(["FIELD", "VALUE"], [[k, body.get(k)] for k in
                                          ("depth", "pending", "oldest_queued_at",
                                           "workers_polling")]))
    return EXIT_OK


def _list(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be at least 1")
    with _client(read_settings()) as client:
        items, next_page = _list_items(client, limit=args.limit, page=args.page, every=args.all)
    if args.state:
        items = [work for work in items if work.state in set(args.state)]
    if args.json:
        print_json({"data": [_work_dict(w) for w in items], "next_page": next_page})
        return EXIT_OK
    print(table(["WORK ID", "STATE", "TYPE", "SESSION ID", "CREATED", "STOP REQUESTED"],
                [[w.id, w.state, w.data.type, w.data.id, w.created_at, w.stop_requested_at]
                  for w in items]))
    if next_page:
        print(f"more: --page {next_page}")
    return EXIT_OK


def _list_items(client: WorkClient, *, limit: int | None, page: str | None,
                every: bool) -> tuple[list[Work], str | None]:
    items: list[Work] = []
    while True:
        result = client.list(limit=limit, page=page)
        items.extend(result.data)
        page = result.next_page
        if not page or not every:
            return items, page


def _show(args: argparse.Namespace) -> int:
    with _client(read_settings()) as client:
        work = client.get(args.work_id)
    _print_work(work, as_json=args.json)
    return EXIT_OK


def _print_work(work: Work, *, as_json: bool) -> None:
    body = _work_dict(work)
    if as_json:
        print_json(body)
        return
    fields = ["id", "state", "environment_id", "created_at", "acknowledged_at", "started_at",
              "latest_heartbeat_at", "stop_requested_at", "stopped_at"]
    rows: list[list[object]] = [[f, body.get(f)] for f in fields]
    rows.insert(2, ["data", f"{work.data.type} {work.data.id}"])
    rows += [[f"metadata.{k}", repr(v)] for k, v in sorted(work.metadata.items())]
    print(table(["FIELD", "VALUE"], rows))


def _stop(args: argparse.Namespace) -> int:
    from dispatcher.workapi import ConflictError

    work: Work | None = None
    with _client(read_settings()) as client:
        already = _stopped_already(client, args.work_id)
        try:
            if not already:
                work = client.stop(args.work_id, force=args.force)
        except ConflictError:
            already = True  # 409: the item is stopped already, which is what was asked
    if args.json:
        print_json({"work_id": args.work_id, "force": args.force, "already_stopped": already,
                     "work": _work_dict(work) if work is not None else None})
    elif already:
        print(f"{args.work_id} was already stopped")
    else:
        print(f"stop requested: {args.work_id} ({'force' if args.force else 'graceful'})")
    return EXIT_OK


def _stopped_already(client: WorkClient, work_id: str) -> bool:
    """Whether the item is stopped, read first when the organisation key allows it: a server may
    answer a stop of a stopped item as any other (SDK 2.17's model), or with a 409."""
    from dispatcher.workapi import MissingCredentialError

    try:
        return client.get(work_id).state == "stopped"
    except MissingCredentialError:
        return False  # only the environment key: the stop's 409, if any, tells


def _update(args: argparse.Namespace) -> int:
    changes = _metadata_changes(args.changes, args.delete)
    with _client(read_settings()) as client:
        work = client.update(args.work_id, changes)
    _print_work(work, as_json=args.json)
    return EXIT_OK


def _metadata_changes(pairs: list[str], deletions: list[str]) -> dict[str, str | None]:
    """`key=value` upserts, `key=` sets "", `--delete key` deletes (sent as null)."""
    if not pairs and not deletions:
        raise UsageError("nothing to change: give KEY=VALUE or --delete KEY")
    changes: dict[str, str | None] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"not KEY=VALUE: {pair!r} (use --delete KEY to delete a key)")
        changes[key] = value
    for key in deletions:
        if not key or key in changes:
            raise UsageError(f"--delete {key!r}: empty, or also set in the same command")
        changes[key] = None
    return changes


# --- metrics ----------------------------------------------------------------------------------
def _metrics(args: argparse.Namespace) -> int:
    from dispatcher.control.capacity import Capacity
    from dispatcher.lease.registry import LeaseRegistry
    from dispatcher.metrics import FleetCollector, Metrics, ServerStats, serve

    settings = read_settings()
    redis, prefix = connect_redis(settings, args)
    port = args.port if args.port is not None else (settings.metrics_port or DEFAULT_METRICS_PORT)
    host = args.host or settings.metrics_host
    servers = {c.environment_id: ServerStats(c) for c in _exporter_clients(settings)}
    collector = FleetCollector(Metrics(redis, prefix=prefix), LeaseRegistry(redis, prefix=prefix),
                               Capacity(redis, prefix=prefix), servers or None,
                               environments=list(servers))
    try:
        server = serve(host=host, port=port, collector=collector)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    print(f"serving metrics on http://{host}:{server.server_port}/metrics "
          f"(prefix {prefix}); SIGTERM or Ctrl-C stops", flush=True)
    try:
        _wait_for_stop()
    finally:
        server.shutdown()
        server.server_close()
    return EXIT_OK


def _exporter_clients(settings: Settings) -> list[WorkClient]:
    """Clients for the server gauges, one per environment (each with its key, from the
    environments file when one is set), or none (with a note) when they cannot be made."""
    from dispatcher.metrics import EXPORTER_HTTP_TIMEOUT_SECONDS

    timeout = min(settings.http_timeout_seconds, EXPORTER_HTTP_TIMEOUT_SECONDS)
    if settings.environments_file is not None:
        return [_client(settings, max_retries=0, timeout=timeout, environment_id=e.id,
                        environment_key=e.key.get_secret_value())
                for e in settings.require_environments()]
    if not settings.environment_id or not (settings.environment_key or settings.api_key):
        print("dispatcher metrics: no server gauges: ANTHROPIC_ENVIRONMENT_ID and "
              "ANTHROPIC_ENVIRONMENT_KEY (or ANTHROPIC_API_KEY) are needed for them",
              file=sys.stderr)
        return []
    return [_client(settings, max_retries=0, timeout=timeout)]


def _wait_for_stop() -> None:
    """Block until SIGTERM or Ctrl-C."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
