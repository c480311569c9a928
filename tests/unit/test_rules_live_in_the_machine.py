"""Every lease rule lives in the lease machine (`dispatcher/lease/machine`): the check that
docs/architecture.md describes, as a test. Outside the machine, code gathers facts, turns them
into events and performs effects; it never writes a lease record itself, never judges a lease's
state, and no Lua script compares a record's field with a value of its own choosing.

Text is read, not run: each check is a pattern for one kind of rule, so a new rule written in
the wrong place fails here, and the place to move it to is the machine.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MACHINE = ROOT / "dispatcher" / "lease" / "machine"

# Registry writes: only the executor (and the registry itself) makes them.
REGISTRY_WRITE = re.compile(
    r"registry\.(update|create|delete|set_stop|schedule_heartbeat|unschedule_heartbeat"
    r"|record_history|record_heartbeats|update_if_attempt)\(")
# A lease's state judged: a field of the lease's life compared, outside the machine.
LEASE_STATE = re.compile(
    r"\b(lease|before|after|held|current)\.(phase|stop|ended|lost|attempt|heartbeats_by"
    r"|server_stopped|uncertain|token|failures|release_attempts)\s*(==|!=|<|>|\bin\b|\bis\b)")
# A Lua comparison with a literal: a value the script chose (a rule), unless it compares an
# argument (is it given?) or reads a flag the registry stores as "1".
LUA_SCRIPT = re.compile(r'_Script\("""(.*?)"""\)', re.S)
LUA_LITERAL_COMPARE = re.compile(r"(ARGV\[[^\]]*\]|\S+)\s*(==|~=)\s*'([^']*)'")

# What still holds a rule outside the machine, each by name, until it moves: the test fails both
# on a new one and on one of these that is gone (then strike it here).
KNOWN: set[str] = set()


def _sources(*parts: str) -> list[Path]:
    return sorted(p for part in parts for p in (ROOT / part).rglob("*.py"))


def _outside_the_machine(paths: list[Path]) -> list[Path]:
    return [p for p in paths if MACHINE not in p.parents]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_no_lease_record_is_written_outside_the_lease_package() -> None:
    found = [f"{_rel(p)}:{n}" for p in _sources("dispatcher", "tasks")
             if ROOT / "dispatcher" / "lease" not in p.parents
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if REGISTRY_WRITE.search(line)]
    assert not found, f"registry writes outside the executor: {found}"


def test_no_lease_state_is_judged_outside_the_machine() -> None:
    paths = _outside_the_machine(_sources("dispatcher/session", "dispatcher/lease"))
    found = [f"{_rel(p)}:{n}: {line.strip()}" for p in paths
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if LEASE_STATE.search(line)]
    assert not found, f"lease rules outside the machine: {found}"


def _lua_scripts() -> list[tuple[Path, str, str]]:
    """Each Lua script of the package: its module, its name, its source."""
    scripts = []
    for path in _sources("dispatcher"):
        text = path.read_text()
        for match in LUA_SCRIPT.finditer(text):
            name = re.findall(r"(\w+)\s*=\s*$", text[:match.start()])[-1]
            scripts.append((path, name, match.group(1)))
    return scripts


def _lua_rules() -> set[str]:
    return {f"{_rel(path)}: {name}: {left} {op} '{literal}'"
            for path, name, source in _lua_scripts()
            for left, op, literal in LUA_LITERAL_COMPARE.findall(source)
            if not left.startswith("ARGV[") and literal != "1"}


def test_lua_scripts_only_guard_and_apply_what_the_machine_decided() -> None:
    rules = _lua_rules()
    assert rules - KNOWN == set(), f"a Lua script with a rule of its own: {rules - KNOWN}"
    assert KNOWN - rules == set(), f"moved to the machine: strike from KNOWN {KNOWN - rules}"


def test_the_checks_see_what_they_look_for() -> None:
    """Each pattern finds the rule it is for, so a check that silently matches nothing fails."""
    assert REGISTRY_WRITE.search("runtime.registry.update(work_id, lost=True)")
    assert LEASE_STATE.search("if lease.phase == Phase.RUNNING:")
    assert LEASE_STATE.search("    if before.attempt != attempt.attempt:")
    script = "if redis.call('HGET', KEYS[1], 'heartbeats_by') == 'sandbox' then return 0 end"
    assert [found[2] for found in LUA_LITERAL_COMPARE.findall(script)] == ["sandbox"]
    assert LUA_LITERAL_COMPARE.findall("if ARGV[i + 5] == '' then")[0][0] == "ARGV[i + 5]"
    names = {name for _, name, _ in _lua_scripts()}
    assert {"_SET_IF_ATTEMPT", "_SET_STOP", "_SCHEDULE", "_RECORD_HEARTBEATS"} <= names
