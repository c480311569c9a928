"""Keys and secrets stay where they belong, also when the API misbehaves.

* The environment key, the organisation key and every work item's secret never appear in task
  arguments (a message waiting in a queue), results (`celery-task-meta-*`), the metrics hash,
  any other key the fleet wrote, or any worker's log.
* The organisation key never reaches a sandbox, even allow-listed; a sandbox gets the CLI's
  contract variables plus the allow-list, nothing else.

That the emulator refuses a missing or wrong key on every endpoint is
tests/integration/test_emulator_auth.py (not repeated here).
"""

from __future__ import annotations

import base64
import json
import secrets
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from dispatcher.emulator.records import secret_for
from tests.support.chaos import ChaosFleet, Figures
from tests.support.waiting import wait_for

pytestmark = pytest.mark.chaos

CONTRACT = {"ANTHROPIC_SESSION_ID", "ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID",
            "ANTHROPIC_ENVIRONMENT_KEY", "ANTHROPIC_BASE_URL", "DISPATCHER_ATTEMPT"}
ALLOW = {"PATH", "HOME", "DISPATCHER_FAKE_RECORD_DIR"}
# Python itself coerces a C locale by setting LC_CTYPE (PEP 538) in the sandbox's interpreter.
INTERPRETER_ADDED = {"LC_CTYPE"}
PARKED = "dispatcher.parked"


def _work_secrets(emulator: Any, work_ids: list[str]) -> dict[str, str]:
    """Every secret each item was delivered with: the emulator mints one per delivery (SDK
    2.17's model), each from a sessions token it keeps; read once every item has ended."""
    r = redis.Redis.from_url(emulator.redis_url, decode_responses=True)
    found: dict[str, str] = {}
    for work_id in work_ids:
        raw = r.get(f"{emulator.prefix}:work:{work_id}")
        assert raw, f"the emulator's record of {work_id}"
        record = json.loads(raw)
        tokens = list(record.get("tokens") or {})
        assert tokens, f"{work_id} was delivered with a secret"
        for i, token in enumerate(tokens):
            found[f"secret of {work_id} (delivery {i + 1})"] = secret_for(token)
    r.close()
    return found


def _dump_keys(r: redis.Redis, pattern: str) -> dict[str, str]:
    """Every value under `pattern`, whatever its type, as text."""
    dump = {}
    for key in r.scan_iter(pattern, count=1000):
        kind = r.type(key)
        if kind == "string":
            value: Any = r.get(key)
        elif kind == "hash":
            value = r.hgetall(key)
        elif kind == "list":
            value = r.lrange(key, 0, -1)
        elif kind == "set":
            value = sorted(r.smembers(key))
        elif kind == "zset":
            value = r.zrange(key, 0, -1, withscores=True)
        else:
            value = kind
        dump[key] = json.dumps(value, default=str)
    return dump


def _decoded_messages(raw_messages: list[str]) -> list[str]:
    """Kombu's Redis messages are JSON envelopes with a base64 body: decode both."""
    out = []
    for raw in raw_messages:
        envelope = json.loads(raw)
        body = envelope.get("body", "")
        if envelope.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body).decode()
        out.append(raw + "\n" + body)
    return out


def test_no_key_or_secret_leaks(chaos: Callable[..., ChaosFleet],
                                report: Callable[[Figures], None]) -> None:
    cf = chaos("secrets under API errors", ttl=6)
    org_key = f"sk-ant-api03-orgkey-{secrets.token_hex(12)}"
    cf.fleet.overrides.update({
        "ANTHROPIC_API_KEY": org_key,
        # Allow-listed by mistake: still never passed.
        "DISPATCHER_SANDBOX_ENV_ALLOW": "PATH,HOME,DISPATCHER_FAKE_RECORD_DIR,ANTHROPIC_API_KEY",
        "DISPATCHER_SESSION_QUEUES": f"dispatcher.sessions,{PARKED}",
    })
    cf.control()
    cf.sessions_worker("s1")
    cf.fleet.wait_slots(4)
    emulator = cf.fleet.emulator
    # A session routed to a queue nobody consumes: its task message waits where we can read it.
    parked = cf.create(1, queue=PARKED)
    r = cf.fleet.redis
    queue_key = f"{cf.fleet.prefix}:celery:{PARKED}"
    messages = wait_for(lambda: r.lrange(queue_key, 0, -1), timeout=30,
                        what="the parked session's task message")
    decoded = _decoded_messages(messages)
    assert parked[0] in decoded[0], "the message names the work item by id"
    # Errors on every endpoint, so failure paths log too.
    emulator.set_faults(error_rate=0.3, drop_rate=0.1, malformed_rate=0.1)
    cf.fault("5xx, drops and malformed bodies at 30/10/10%")
    cf.create(6, fake_duration=1)
    cf.create(2, fake_duration=1, fake_exit_code=3)
    time.sleep(6)
    emulator.reset_faults()
    cf.stop(parked[0])
    figures = cf.finish(timeout=90)

    needles = {"environment key": emulator.environment_key, "organisation key": org_key,
               **_work_secrets(emulator, cf.work_ids)}
    haystacks: dict[str, str] = {f"task message {i}": m for i, m in enumerate(decoded)}
    haystacks.update({f"log {name}": cf.fleet.log(name) for name in cf.specs})
    fleet_keys = _dump_keys(r, f"{cf.fleet.prefix}:*")
    assert any("celery-task-meta-" in k for k in fleet_keys), "results were stored"
    assert f"{cf.fleet.prefix}:metrics" in fleet_keys, "metrics were recorded"
    haystacks.update({f"redis {k}": v for k, v in fleet_keys.items()})
    leaks = [f"{what} in {where}" for where, text in haystacks.items()
             for what, needle in needles.items() if needle in text]
    assert not leaks, "\n".join(leaks)

    for work_id in cf.work_ids:
        for started in cf.fleet.events(work_id, "started"):
            names = set(started["env_names"])
            assert "ANTHROPIC_API_KEY" not in names, f"{work_id}: organisation key passed"
            extra = names - CONTRACT - ALLOW - INTERPRETER_ADDED
            assert not extra, f"{work_id}: the sandbox got {sorted(extra)}"
    report(figures)
