"""Generated documentation: the settings table of docs/configuration.md, from the model, the
lease rule table of docs/architecture.md, from the lease machine, and the counter and histogram
table of docs/operations.md, from `dispatcher.metrics`.

`python -m dispatcher.ops.docsgen > docs/configuration.md` writes the whole page: the prose below
with the table of `dispatcher.settings.Settings` between the marker comments. The prose lives
here, not in the Markdown file, because the shell truncates the file before this runs; edit it
here and regenerate. `python -m dispatcher.ops.docsgen --rules` rewrites the rule table between
its markers in docs/architecture.md, in place; `--metrics` the metrics table in
docs/operations.md. `tests/unit/test_docs.py` fails when a page and
the code disagree.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import AliasChoices
from pydantic.fields import FieldInfo

from dispatcher.settings import Settings

__all__ = ["BEGIN_MARKER", "END_MARKER", "METRICS_BEGIN", "METRICS_END", "RULES_BEGIN",
           "RULES_END", "main", "render_configuration", "render_metrics", "render_page",
           "with_metrics", "with_rules"]

BEGIN_MARKER = "<!-- BEGIN GENERATED: settings table (python -m dispatcher.ops.docsgen) -->"
END_MARKER = "<!-- END GENERATED: settings table -->"
RULES_BEGIN = "<!-- BEGIN GENERATED: lease rules (python -m dispatcher.ops.docsgen --rules) -->"
RULES_END = "<!-- END GENERATED: lease rules -->"
METRICS_BEGIN = ("<!-- BEGIN GENERATED: counters and histograms "
                 "(python -m dispatcher.ops.docsgen --metrics) -->")
METRICS_END = "<!-- END GENERATED: counters and histograms -->"
ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
OPERATIONS = ARCHITECTURE.with_name("operations.md")
UNSET = "unset"


def env_name(name: str, field: FieldInfo) -> str:
    """The environment variable a field is read from: its (first) validation alias."""
    alias = field.validation_alias
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        if isinstance(first, str):
            return first
    elif isinstance(alias, str):
        return alias
    return name.upper()


def _default(value: Any) -> str:
    if value is None:
        return UNSET
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, list | tuple):
        text = ",".join(str(v) for v in value)
    else:
        text = str(value)
    return f"`{text}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def render_configuration() -> str:
    """The settings table, one row per field of `Settings`, in declaration order."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, field in Settings.model_fields.items():
        rows.append(
            f"| `{env_name(name, field)}` | {_cell(_default(field.default))} "
            f"| {_cell(field.description or '')} |"
        )
    return "\n".join(rows) + "\n"


PAGE = """\
# Configuration

Every process of the fleet (`celery -A dispatcher worker`, `beat`, `flower`, and the operator
commands) reads one settings model, `dispatcher.settings.Settings`, from its environment when it
starts. Names the official CLI (`ant beta:worker poll`) already uses keep their `ANTHROPIC_*`
spelling; the dispatcher's own knobs are `DISPATCHER_*`. A missing or malformed value stops the
process with one line naming the variable, e.g.
`dispatcher: DISPATCHER_STOP_GRACE_SECONDS is invalid: Input should be greater than or equal to 0`
(see [troubleshooting](troubleshooting.md)). List values are comma-separated.

## Settings

The table is generated from the model; do not edit it by hand. To change a default or a
meaning, edit `dispatcher/settings.py`; to change the prose, edit `dispatcher/ops/docsgen.py`; then
run `python -m dispatcher.ops.docsgen > docs/configuration.md`.

@TABLE@
## Who needs what

| process | needs | notes |
|---|---|---|
| session worker (`worker -Q dispatcher.sessions`) | `ANTHROPIC_ENVIRONMENT_ID`, `ANTHROPIC_ENVIRONMENT_KEY` (or `DISPATCHER_ENVIRONMENTS_FILE`), `DISPATCHER_REDIS_URL`, `DISPATCHER_ON_WORK` (or, with `DISPATCHER_SANDBOX_RUNTIME=docker`, `DISPATCHER_SANDBOX_IMAGE`, `DISPATCHER_FLEET_ID` and a Docker engine) | refuses to start without them, if the on-work program is not on `PATH`, if the engine does not answer or lacks the image, if the sandbox runs the official runner while `DISPATCHER_LEASE_MODE` is unset or calls `handle_item` where the work secret cannot reach it, or if Redis does not answer. Also reads `DISPATCHER_LEASE_MODE` (hand-off), `DISPATCHER_STOP_GRACE_SECONDS`, `DISPATCHER_SESSION_SLOTS`, `DISPATCHER_SANDBOX_ENV_ALLOW`, `DISPATCHER_WORK_SECRET_DELIVERY` and the `DISPATCHER_SANDBOX_*` options of the docker runtime |
| control worker (`worker -Q dispatcher.control`) | the same, less `DISPATCHER_ON_WORK` | runs the poller, heartbeats, stop bridge and recovery. A control-only worker runs no sandbox, so it does not need the on-work program; if `DISPATCHER_ON_WORK` is set there, `healthcheck` items also check that it exists |
| beat (`celery -A dispatcher beat`) | `DISPATCHER_REDIS_URL` | never an environment key nor the environments file: its ticks name no environment. The schedule comes from `DISPATCHER_POLL_INTERVAL_SECONDS`, `DISPATCHER_HEARTBEAT_TICK_SECONDS`, `DISPATCHER_BRIDGE_INTERVAL_SECONDS`, and with `DISPATCHER_WEBHOOKS=true` `DISPATCHER_WEBHOOK_SWEEP_SECONDS`; the redbeat lock lives under `DISPATCHER_KEY_PREFIX` |
| `dispatcher webhooks` | `ANTHROPIC_WEBHOOK_SIGNING_KEY`, `DISPATCHER_REDIS_URL` | refuses to start without the key; listens on `DISPATCHER_WEBHOOKS_HOST`:`DISPATCHER_WEBHOOKS_PORT` (127.0.0.1:8790). Never give it the environment key, nor the signing key to anything else |
| Flower (`celery -A dispatcher flower`) | `DISPATCHER_REDIS_URL` | plus `FLOWER_*` (below) |
| operator commands | `ANTHROPIC_API_KEY` (organisation key), `ANTHROPIC_ENVIRONMENT_ID` | only reading or updating a single work item needs the organisation key; workers never use it and sandboxes never receive it, so keep it off worker hosts |
| `dispatcher emulator` | its flags (`dispatcher emulator --help`) | `--redis-url` defaults to `DISPATCHER_REDIS_URL`; `DISPATCHER_EMULATOR_ENVIRONMENT_KEY` and `DISPATCHER_EMULATOR_API_KEY` set its keys (see [emulator](emulator.md)) |

Keep these equal on every process of one fleet: `ANTHROPIC_ENVIRONMENT_ID` (or the
environments file's contents), `ANTHROPIC_BASE_URL`, `DISPATCHER_REDIS_URL`, `DISPATCHER_KEY_PREFIX`,
`DISPATCHER_SESSION_QUEUES` (the first is the default route; a queue no worker consumes holds
its sessions), `DISPATCHER_LEASE_MODE` (recorded per lease by the poller on a control worker)
and `DISPATCHER_MAX_ATTEMPTS`. Fleets may share one Redis under different prefixes:
`DISPATCHER_KEY_PREFIX` separates the lease registry, Celery's queues, results and broadcast
channels (kombu's `global_keyprefix`) and beat's lock and schedule.

With RabbitMQ as the broker, `DISPATCHER_BROKER_URL` joins that list: every process above that
reads `DISPATCHER_REDIS_URL` publishes or consumes Celery messages (`dispatcher webhooks` and
`dispatcher stop` too) and needs both. Give each fleet its own vhost (see
[operations](operations.md#choosing-the-broker)).

`DISPATCHER_SESSION_SLOTS` unset: a worker that consumes a session queue advertises its
concurrency, minus 2 when it also consumes `dispatcher.control` (kept for control tasks; one
more for each environment past the first, whose poller holds a slot of its own); a worker that
consumes no session queue advertises 0.

## Several environments, one fleet

One fleet can serve several self-hosted environments and share its session slots between them.
Instead of `ANTHROPIC_ENVIRONMENT_ID` and `ANTHROPIC_ENVIRONMENT_KEY` (which stay the way to
say one environment, and may not be set beside the file), give workers a TOML file in
`DISPATCHER_ENVIRONMENTS_FILE`:

```toml
[[environment]]
id = "env_01AAA"
key_file = "/run/secrets/env_a_key"    # the key alone; one trailing newline is dropped

[[environment]]
id = "env_01BBB"
key = "sk-ant-oat01-..."               # or inline, when the file itself is a secret
max_sessions = 8                       # optional: never more leases held at once
queue = "dispatcher.sessions.gpu"      # optional: its sessions' queue (one of DISPATCHER_SESSION_QUEUES)
```

| field | meaning |
|---|---|
| `id` | the environment (`env_...`), required |
| `key` or `key_file` | its environment key, exactly one of the two; a relative `key_file` is read from the file's folder. Refused at start-up, never shown, unless it is printable ASCII without spaces; a `key_file` open to its group or others (any of mode `077`) is refused too: make it `0600` or `0400` |
| `max_sessions` | optional, at least 1: leases of this environment held at once, at most |
| `queue` | optional: the session queue its items go to unless their `queue` metadata names another declared one; it must be one of `DISPATCHER_SESSION_QUEUES`, and some worker must consume it |
| `image`, `cpus`, `memory`, `pids_limit`, `network` | optional, docker runtime: this environment's containers get these instead of `DISPATCHER_SANDBOX_IMAGE`, `_CPUS`, `_MEMORY`, `_PIDS_LIMIT` and `_NETWORK`, checked as those are (an image by digest unless tags are allowed; `network = "host"` refused); every other confinement setting stays the fleet's |

Each environment gets its own poller (its own lock, backoff and wake-up), its own heartbeats,
stop scans and releases with its own key, and its sessions get its id and key, never another's.
Slots are shared fairly: each environment is entitled to an equal part of the fleet's live
slots (none above its `max_sessions`; what one cannot use is shared by the others), and may
claim beyond that only what leaves every other busy environment its unused part. An
environment whose last poll found nothing (within 5 s: it has no backlog) keeps free, out of
its unused part, only a slot for each session that arrived in it within the last
`DISPATCHER_IDLE_HEADROOM_SECONDS` (0, off, by default), and the idle ones together at least one slot (in a
fleet of ten slots or more): a session arriving in a quiet environment finds a slot at once
while another environment's burst holds the rest, and environments with no arrivals lately
leave all but that one slot to a lone busy one. The trade is the burst's: it drains on the
slots the quiet environments' recent sessions keep free (0: only the shared slot). Beat, Flower and `dispatcher webhooks` need neither the file nor any key: a
webhook delivery wakes every environment's poller.

## Celery's own flags

The app sets `-P threads -c 10` as defaults; the command line overrides them.

| flag | what it changes here |
|---|---|
| `-Q dispatcher.sessions` / `-Q dispatcher.control` | the role of a worker; without `-Q` it consumes both (and reserves 2 slots for control tasks) |
| `-c N` | pool size, hence session slots (see above). Slots are read once at start: prefer a fixed `-c` to `--autoscale` |
| `-P threads` / `-P prefork` | threads by default (a session only waits on a subprocess); prefork is supported. The default comes from `CELERY_WORKER_POOL`, which Celery's CLI reads as the default of `-P` and which the app sets to `threads` when it is unset (not the `worker_pool` setting, which would silently replace an explicit `-P prefork`); `-P` wins over it, and the `worker ready` line names the pool that runs. An operator stops a running session with a revoke, with or without `--terminate` (Flower's Revoke or Terminate), on either pool |
| `-n NAME@%h` | node name; unique per worker process on a host. Slots and the drain flag are kept per node name |
| `-B` | embedded beat, for a one-host fleet; lock-protected (celery-redbeat), so `-B` on several hosts never doubles ticks |
| `-l INFO` | lifecycle lines (see [troubleshooting](troubleshooting.md)) are logged at INFO and above |

Do not pass `-S` or `--max-interval` to beat: the app configures celery-redbeat with a 1 s loop
and a 10 s lock, which is how fast a standby takes over.

## Flower

Flower reads its options from `FLOWER_*` variables as well as flags.

| variable | meaning |
|---|---|
| `FLOWER_BASIC_AUTH` | `user:password` (comma-separated for several users). Without it (or another auth option) the REST API answers 401 and the UI is open |
| `FLOWER_PORT` | listening port, default 5555 (`FLOWER_ADDRESS` for the interface) |
| `FLOWER_URL_PREFIX` | path prefix when served behind a reverse proxy, e.g. `flower` for `/flower/` |
| `FLOWER_PERSISTENT` | `true` keeps task history across restarts in the file named by `FLOWER_DB` (default `flower`) |

Flower's `/metrics` (Prometheus) and `/healthcheck` answer without authentication whatever the
auth settings: restrict the port by network (a private network, a firewall rule, a Kubernetes
NetworkPolicy), not by password. Session task arguments are ids only; no key or work secret
ever appears in Flower.
"""  # noqa: E501  (Markdown table rows are one line each)


def render_page() -> str:
    """The whole of docs/configuration.md."""
    table = f"{BEGIN_MARKER}\n{render_configuration()}{END_MARKER}\n"
    return PAGE.replace("@TABLE@\n", table + "\n")


def with_rules(page: str) -> str:
    """`page` with the lease rule table between its markers made anew from the machine."""
    from dispatcher.lease.table import render

    start = page.index(RULES_BEGIN) + len(RULES_BEGIN)
    return f"{page[:start]}\n{render()}{page[page.index(RULES_END):]}"


def render_metrics() -> str:
    """Every counter (with its label's values) and histogram (with its buckets)."""
    from dispatcher.metrics import COUNTERS, HISTOGRAMS, NAMESPACE, OTHER

    rows = ["| metric | label: values | meaning |", "|---|---|---|"]
    for name, counter in COUNTERS.items():
        values = ", ".join(f"`{v}`" for v in (*counter.values, OTHER))
        rows.append(f"| `{NAMESPACE}_{name}_total` | `{counter.label}`: {values} | "
                    f"{_cell(counter.doc)} |")
    for name, (doc, buckets) in HISTOGRAMS.items():
        bounds = ", ".join(f"{b:g}" for b in buckets)
        rows.append(f"| `{NAMESPACE}_{name}` | buckets (s): {bounds} | {_cell(doc)} |")
    return "\n".join(rows) + "\n"


def with_metrics(page: str) -> str:
    """`page` with the counter and histogram table between its markers made anew."""
    start = page.index(METRICS_BEGIN) + len(METRICS_BEGIN)
    return f"{page[:start]}\n{render_metrics()}{page[page.index(METRICS_END):]}"


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if args == ["--rules"]:
        ARCHITECTURE.write_text(with_rules(ARCHITECTURE.read_text()))
        return 0
    if args == ["--metrics"]:
        OPERATIONS.write_text(with_metrics(OPERATIONS.read_text()))
        return 0
    sys.stdout.write(render_page())
    return 0


if __name__ == "__main__":
    sys.exit(main())
