"""The operator docs stay true to the code: the settings table is the model's, every
lifecycle log line the code can write is explained in docs/troubleshooting.md, the counter and
histogram table is the metrics module's, and every metric and task name is documented."""

from __future__ import annotations

import re
from pathlib import Path

from dispatcher.celery import names
from dispatcher.ops.docsgen import (
    BEGIN_MARKER,
    END_MARKER,
    render_configuration,
    render_page,
    with_metrics,
    with_rules,
)

ROOT = Path(__file__).resolve().parents[2]
CONFIGURATION = ROOT / "docs" / "configuration.md"
TROUBLESHOOTING = ROOT / "docs" / "troubleshooting.md"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
OPERATIONS = ROOT / "docs" / "operations.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
SOURCES = sorted(p for p in (ROOT / "dispatcher").rglob("*.py") if "emulator" not in p.parts)
REGENERATE = "regenerate it: python -m dispatcher.ops.docsgen > docs/configuration.md"

# `event("action", ...)` (the lease machine's `log("action", ...)` and `fx.Log("action", ...)`
# become such lines), and both branches of `event("a" if ... else "b", ...)`.
EVENT_LITERAL = re.compile(r'\b(?:event|log_event|log|Log)\(\s*"([^"]+)"')
EVENT_CONDITIONAL = re.compile(
    r'\b(?:event|log_event|log|Log)\(\s*"[^"]+"\s+if\s[^,]*?\selse\s+"([^"]+)"')
EVENT_ANY = re.compile(r"\bevent\(\s*([^\s,)]+)")
# Actions passed through a variable: where the name is set, and the actions it can hold.
DYNAMIC_ACTIONS = {("poller.py", "what"): ["poll failed"],
                   ("signals.py", "action"): ["sandbox cgroups"],
                   ("warm_pool.py", "what"): ["warm container not created",
                                              "warm pool book unreachable",
                                              "warm pool cannot list its containers"]}


def _generated_table(text: str) -> str:
    start = text.index(BEGIN_MARKER) + len(BEGIN_MARKER) + 1
    return text[start:text.index(END_MARKER)]


def test_configuration_table_matches_the_settings_model() -> None:
    text = CONFIGURATION.read_text()
    assert BEGIN_MARKER in text and END_MARKER in text, f"markers missing; {REGENERATE}"
    assert _generated_table(text) == render_configuration(), (
        f"docs/configuration.md's settings table differs from dispatcher.settings; {REGENERATE}"
    )


def test_configuration_page_is_the_generated_one() -> None:
    assert CONFIGURATION.read_text() == render_page(), (
        "docs/configuration.md was edited by hand or is stale: edit the prose in "
        f"dispatcher/ops/docsgen.py, then {REGENERATE}"
    )


def test_table_has_one_row_per_setting() -> None:
    from dispatcher.settings import Settings

    rows = [line for line in render_configuration().splitlines() if line.startswith("| `")]
    assert len(rows) == len(Settings.model_fields)
    assert "| `DISPATCHER_STOP_GRACE_SECONDS` | `30` |" in render_configuration()


def logged_actions() -> set[str]:
    actions: set[str] = set()
    for path in SOURCES:
        source = path.read_text()
        actions.update(EVENT_LITERAL.findall(source))
        actions.update(EVENT_CONDITIONAL.findall(source))
        for argument in EVENT_ANY.findall(source):
            if argument.startswith('"') or path.name == "logs.py":
                continue
            known = DYNAMIC_ACTIONS.get((path.name, argument))
            assert known is not None, (
                f"{path.name}: event({argument}, ...) logs an action this test cannot read; "
                "add its possible values to DYNAMIC_ACTIONS and to docs/troubleshooting.md"
            )
            actions.update(known)
    return actions


def test_every_logged_action_is_explained() -> None:
    doc = TROUBLESHOOTING.read_text()
    actions = logged_actions()
    assert {"claimed", "released", "killed", "terminated", "poll failed"} <= actions
    missing = sorted(a for a in actions if f"`{a}`" not in doc)
    assert not missing, f"docs/troubleshooting.md does not explain: {missing}"


def test_start_up_errors_are_explained() -> None:
    doc = TROUBLESHOOTING.read_text()
    for line in ("ANTHROPIC_ENVIRONMENT_ID is not set", "ANTHROPIC_ENVIRONMENT_KEY is not set",
                 "DISPATCHER_ON_WORK is not set", "on-work command not found",
                 "does not answer", "DISPATCHER_SANDBOX_IMAGE is not set",
                 "permission denied on the Docker engine", "is not on the engine",
                 "could not be pulled", "the sandbox runs the official runner",
                 "DISPATCHER_WORK_SECRET_DELIVERY=env is refused",
                 "which reads the work secret only from ANTHROPIC_WORK_SECRET"):
        assert line in doc


def test_the_lease_rule_table_is_the_machines() -> None:
    page = ARCHITECTURE.read_text()
    assert with_rules(page) == page, (
        "docs/architecture.md's lease rules differ from dispatcher/lease/machine; regenerate "
        "them: python -m dispatcher.ops.docsgen --rules")


def test_the_module_map_names_every_module() -> None:
    page = ARCHITECTURE.read_text()
    modules = sorted(str(p.relative_to(ROOT)) for p in
                     [*(ROOT / "dispatcher").rglob("*.py"), *(ROOT / "tasks").rglob("*.py")]
                     if p.name != "__init__.py" and "emulator" not in p.parts)
    missing = [m for m in modules if f"`{m}`" not in page]
    assert not missing, f"docs/architecture.md's module map does not name {missing}"


def test_the_metrics_table_is_the_metrics_modules() -> None:
    page = OPERATIONS.read_text()
    assert with_metrics(page) == page, (
        "docs/operations.md's counters and histograms differ from dispatcher/metrics.py; "
        "regenerate them: python -m dispatcher.ops.docsgen --metrics")


def exported_metrics() -> set[str]:
    """Every metric family the exporter can serve: the counters and histograms by their
    tables, the gauges by the names written beside `NAMESPACE` in the module's source."""
    from dispatcher.metrics import COUNTERS, HISTOGRAMS, NAMESPACE

    source = (ROOT / "dispatcher" / "metrics.py").read_text()
    gauges = re.findall(r'f"\{NAMESPACE\}_([a-z_]+)"', source)
    gauges += re.findall(r'\bgauge\(\s*"([a-z_]+)"', source)
    return ({f"{NAMESPACE}_{name}" for name in gauges}
            | {f"{NAMESPACE}_{name}_total" for name in COUNTERS}
            | {f"{NAMESPACE}_{name}" for name in HISTOGRAMS})


def test_every_metric_is_documented() -> None:
    metrics = exported_metrics()
    assert {"dispatcher_leases_held", "dispatcher_server_up", "dispatcher_build_info",
            "dispatcher_heartbeats_total"} <= metrics, "the metric names were not all found"
    docs = "\n".join(path.read_text() for path in DOCS)
    missing = sorted(m for m in metrics if f"`{m}" not in docs)
    assert not missing, f"metrics served but not documented in docs/: {missing}"


def test_every_task_name_is_documented() -> None:
    tasks = {value for key, value in vars(names).items()
             if key.isupper() and isinstance(value, str) and value.startswith("tasks.")}
    tasks |= set(names.RENAMED)
    assert {names.SESSION_RUN, names.HEARTBEAT} <= tasks
    docs = "\n".join(path.read_text() for path in DOCS)
    missing = sorted(t for t in tasks if f"`{t}`" not in docs)
    assert not missing, f"task names not documented in docs/: {missing}"
