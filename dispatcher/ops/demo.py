"""`dispatcher demo`: the whole system on 127.0.0.1 in about 35 seconds.

It starts Redis (the one at DISPATCHER_REDIS_URL if it answers, else a private one), the
emulator, a control worker with beat, two session workers and Flower; creates a batch of
sessions (short ones, one stopped gracefully, one stopped by force, one whose worker is killed
mid-session); shows live progress; prints a summary table; and stops everything it started,
also on Ctrl-C. Then, with the SDK installed (the dev extra), a few sessions run real tool calls
through the official runner (`demo_official`), and a second table shows each call and its
result. Exit code 0 when every session ended as it should.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dispatcher.ops.demo_official import OfficialSession, run_official, summary_lines

__all__ = ["register", "run"]

SHORT_SESSIONS = 8
STOP_AFTER_SECONDS = 2.0
FINISH_TIMEOUT_SECONDS = 90.0
REFRESH_SECONDS = 0.5


@dataclass
class DemoSession:
    label: str
    expect: str  # completed | graceful | forced | recovered
    metadata: dict[str, str]
    work_id: str = ""
    state: str = "queued"
    workers: list[str] = field(default_factory=list)
    attempts: int = 0
    sigterm: bool = False
    exit_reason: str = ""
    ok: bool = False


def register(subcommands: Any) -> None:
    parser = subcommands.add_parser(
        "demo", help="run the whole system locally and watch sessions flow through it",
        description=__doc__)
    parser.add_argument("--json", action="store_true",
                        help="print the summary as JSON (no live progress)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep logs and records here (default: a temporary directory)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        code = _run(args.workdir, as_json=args.json)
        if not args.json:
            print(f"logs and sandbox records: {args.workdir}")
        return code
    with tempfile.TemporaryDirectory(prefix="dispatcher-demo-") as tmp:
        return _run(Path(tmp), as_json=args.json)


def _plan() -> list[DemoSession]:
    short = [DemoSession(f"short-{i + 1}", "completed", {"fake.duration": str(2 + i % 4)})
             for i in range(SHORT_SESSIONS)]
    return [*short,
            DemoSession("graceful-stop", "graceful", {"fake.duration": "60"}),
            DemoSession("forced-stop", "forced", {"fake.duration": "60"}),
            DemoSession("worker-killed", "recovered", {"fake.duration": "12"})]


def _run(workdir: Path, *, as_json: bool) -> int:
    from dispatcher.ops.stack import LocalStack

    out = _Screen(live=not as_json and sys.stdout.isatty(), quiet=as_json)
    stack = LocalStack(workdir=workdir,
                       redis_url=os.environ.get("DISPATCHER_REDIS_URL",
                                                "redis://127.0.0.1:6379/0"))
    sessions = _plan()
    official: list[OfficialSession] | None = None
    try:
        _start(stack, workdir, out)
        _drive(stack, workdir, sessions, out)
        if not as_json:
            _summary(sessions, out)
            out.say("")
        official = run_official(stack.redis_url, workdir / "official", out.say)
    except KeyboardInterrupt:
        out.say("\ninterrupted: stopping everything the demo started")
        return 130
    finally:
        stack.stop_all()
    ok = all(s.ok for s in sessions) and all(s.ok for s in official or [])
    if as_json:
        print(json.dumps({"ok": ok, "sessions": [asdict(s) for s in sessions],
                          "official": [asdict(s) for s in official or []]}, indent=2))
    elif official is not None:
        out.say("")
        for line in summary_lines(official):
            out.say(line)
    return 0 if ok else 1


def _start(stack: Any, workdir: Path, out: _Screen) -> None:
    from dispatcher.ops.stack import free_port

    (workdir / "records").mkdir(exist_ok=True)
    out.say(f"redis     {stack.ensure_redis()}")
    out.say(f"emulator  {stack.start_emulator()}  environment {stack.environment_id}")
    env = stack.fleet_env(
        DISPATCHER_FAKE_RECORD_DIR=str(workdir / "records"),
        DISPATCHER_SANDBOX_ENV_ALLOW="PATH,HOME,DISPATCHER_FAKE_RECORD_DIR",
        DISPATCHER_STOP_GRACE_SECONDS="3", DISPATCHER_DESIRED_TTL_SECONDS="30")
    stack.worker("control", env, concurrency=4, queues="dispatcher.control", beat=True)
    for name in ("alpha", "beta"):
        stack.worker(name, env, concurrency=6, queues="dispatcher.sessions")
    port = free_port()
    stack.celery("flower", ["flower", f"--port={port}", "--address=127.0.0.1"], env)
    out.say(f"workers   control (beat), alpha, beta   flower http://127.0.0.1:{port}")
    _wait_for_slots(stack, 12)


def _wait_for_slots(stack: Any, slots: int) -> None:
    import redis

    from dispatcher.control.capacity import Capacity

    with redis.Redis.from_url(stack.redis_url, decode_responses=True) as r:
        capacity = Capacity(r, prefix=stack.key_prefix)
        deadline = time.monotonic() + 60
        while capacity.total_slots() < slots:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not advertise their slots within 60 s")
            time.sleep(0.2)


def _drive(stack: Any, workdir: Path, sessions: list[DemoSession], out: _Screen) -> None:
    import redis

    from dispatcher.workapi import WorkClient

    client = WorkClient(base_url=stack.base_url, environment_id=stack.environment_id,
                        environment_key=stack.environment_key, api_key=stack.api_key)
    with client, redis.Redis.from_url(stack.redis_url, decode_responses=True) as r:
        for session in sessions:
            session.work_id = stack.create_session(session.metadata)[1]
        watch = _Watch(stack, client, r, workdir / "records", sessions, out)
        watch.until_done()


class _Watch:
    """Refreshes every session's state, and does the demo's three interventions on cue."""

    def __init__(self, stack: Any, client: Any, r: Any, records: Path,
                 sessions: list[DemoSession], out: _Screen) -> None:
        self.stack, self.client, self.redis, self.records = stack, client, r, records
        self.sessions = sessions
        self.out = out
        self.done: set[str] = set()

    def until_done(self) -> None:
        deadline = time.monotonic() + FINISH_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            self._refresh()
            self._intervene()
            self.out.progress(self.sessions)
            if all(s.state == "stopped" for s in self.sessions):
                break
            time.sleep(REFRESH_SECONDS)
        self.out.progress(self.sessions, final=True)
        for session in self.sessions:
            session.ok = _as_expected(session)

    def _refresh(self) -> None:
        from dispatcher.lease.keys import Keys

        for session in self.sessions:
            session.state = self.client.get(session.work_id).state
            worker = self.redis.hget(Keys(self.stack.key_prefix).lease(session.work_id),
                                     "worker")
            if worker and (not session.workers or session.workers[-1] != worker):
                session.workers.append(worker)
            records = _records(self.records, session.work_id)
            session.attempts = sum(1 for r in records if r["event"] == "started")
            session.sigterm = any(r["event"] == "sigterm" for r in records)
            exits = [r for r in records if r["event"] == "exited"]
            session.exit_reason = exits[-1]["reason"] if exits else ""

    def _intervene(self) -> None:
        for session in self.sessions:
            if session.label in self.done or session.attempts == 0:
                continue
            started = _records(self.records, session.work_id)[0]["time"]
            if time.time() - started < STOP_AFTER_SECONDS:
                continue
            if session.expect == "graceful":
                self.client.stop(session.work_id)
                self.out.announce(f"stop requested (graceful) for {session.label}")
            elif session.expect == "forced":
                self.client.stop(session.work_id, force=True)
                self.out.announce(f"stop requested (force) for {session.label}")
            elif session.expect == "recovered" and session.workers and self._others_done(session):
                # Only now, so the kill shows one session moving on, not a crowd.
                victim = session.workers[-1].split("@")[0]
                self.stack.kill(victim)
                self.out.announce(f"killed worker {victim} (SIGKILL) while it ran {session.label}")
            else:
                continue
            self.done.add(session.label)

    def _others_done(self, session: DemoSession) -> bool:
        return all(s.state == "stopped" for s in self.sessions if s is not session)


def _records(directory: Path, work_id: str) -> list[dict[str, Any]]:
    path = directory / f"{work_id}.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _as_expected(session: DemoSession) -> bool:
    if session.state != "stopped":
        return False
    if session.expect == "completed":
        return session.attempts == 1 and session.exit_reason == "completed"
    if session.expect == "graceful":
        return session.sigterm and session.exit_reason == "sigterm"
    if session.expect == "forced":
        return not session.sigterm and session.exit_reason == ""
    return session.attempts == 2 and session.exit_reason == "completed"


class _Screen:
    """Live progress on a terminal; plain lines elsewhere; nothing but JSON with --json."""

    def __init__(self, *, live: bool, quiet: bool) -> None:
        self.live, self.quiet = live, quiet
        self.last = ""

    def say(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def announce(self, text: str) -> None:
        self.say(("\n" if self.live else "") + f"  -> {text}")

    def progress(self, sessions: list[DemoSession], *, final: bool = False) -> None:
        if self.quiet:
            return
        counts = {state: sum(1 for s in sessions if s.state == state)
                  for state in ("queued", "starting", "active", "stopping", "stopped")}
        running: dict[str, int] = {}
        for s in sessions:
            if s.state in ("starting", "active", "stopping") and s.workers:
                name = s.workers[-1].split("@")[0]
                running[name] = running.get(name, 0) + 1
        per_worker = " ".join(f"{k}:{v}" for k, v in sorted(running.items())) or "-"
        line = (f"queued {counts['queued']:2}  running {counts['starting'] + counts['active']:2}"
                f"  stopping {counts['stopping']:2}  done {counts['stopped']:2}"
                f"  | running per worker: {per_worker}")
        if self.live:
            print("\r\033[K" + line, end="\n" if final else "", flush=True)
        elif line != self.last:
            print(line, flush=True)
        self.last = line


def _summary(sessions: list[DemoSession], out: _Screen) -> None:
    out.say("")
    out.say(f"{'session':15} {'expected':10} {'attempts':>8}  {'workers':24} {'sandbox exit':13} "
            f"result")
    for s in sessions:
        workers = ", ".join(w.split("@")[0] for w in s.workers) or "-"
        out.say(f"{s.label:15} {s.expect:10} {s.attempts:>8}  {workers:24} "
                f"{s.exit_reason or 'killed':13} {'ok' if s.ok else 'UNEXPECTED'}")
    good = sum(s.ok for s in sessions)
    out.say(f"\n{good}/{len(sessions)} sessions ended as expected")
