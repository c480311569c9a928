"""A fake session program: the on-work command of test and demo fleets.

    python -m dispatcher.emulator.fake_session < work.json

Standard library only, so a fleet can start hundreds quickly (and it runs as a lone file). It
reads the work item JSON on stdin (as the official CLI hands it over) and behaves as the item's
metadata says:

    fake.duration        seconds to run (default 1)
    fake.exit_code       exit status when it runs to the end (default 0)
    fake.ignore_sigterm  "1": record SIGTERM but keep running (children ignore it too)
    fake.children        N child processes, forked, in the same process group, sleeping as long
    fake.heartbeat       "1": runner mode, like the SDK's `handle_item`: heartbeat the lease
                         itself at ANTHROPIC_BASE_URL, starting from ANTHROPIC_WORK_LAST_HEARTBEAT
                         (or NO_HEARTBEAT), and force-stop the item at the end unless the lease
                         was lost
    fake.lease           whose lease the runner keeps (default "2.17"):
                         "2.17" as SDK 2.17's `Lease`: 300 s assumed TTL before the first reply,
                           a heartbeat every min(ttl/2, 30) s, the work secret's sessions token as
                           the credential (the environment key without one); ends only on
                           `lease_extended: false`; a 412, another permanent 4xx, or no success
                           within the TTL loses the lease, and a lost lease is never stopped;
                         "2.10" as SDK 2.10's worker: 90 s assumed TTL, the environment key;
                           ends on `state: stopping|stopped` too
                         The fleet meets both: a runner that stops on `stopping` and one that
                         waits for `lease_extended: false` (or for the fleet's SIGTERM).

Exit status: `fake.exit_code` when it ran to the end; 0 after a SIGTERM or a server stop (a clean
shutdown, as the official runner's); 1 when the lease was lost.

If DISPATCHER_FAKE_RECORD_DIR is set it appends JSON lines to `<dir>/<work_id>.jsonl`, one whole
line per O_APPEND write (attempts of one item may share the file). Every line has `event`,
`time` (epoch s), `pid`, `pgid`, `ppid`, `work_id`. Events: `started` (with `env`, `env_names`,
`environment_key_sha256`, `stdin_work_id`, `stdin_session_id`, `stdin_secret_sha256`, `attempt`,
`metadata`), `child_started`, `sigterm`, `runner` (lease, credential), `heartbeat` (status,
state, lease_extended), `lease_lost` (status), `stop_sent` (status), `exited` (exit_code,
reason). Keys and secrets are only ever hashed.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import quote

# The values (not just names) worth checking in the `started` event; none of them is a secret.
RECORDED_ENV = ("ANTHROPIC_SESSION_ID", "ANTHROPIC_WORK_ID", "ANTHROPIC_ENVIRONMENT_ID",
                "ANTHROPIC_BASE_URL", "ANTHROPIC_WORK_LAST_HEARTBEAT")
# How often the main loop looks at its stop flag: SIGTERM is seen within this.
TICK_S = 0.02
# Heartbeat interval floor: a 1 s test TTL still leaves time between beats.
MIN_BEAT_INTERVAL_S = 0.25
# The SDK's ceiling on the interval, whatever the TTL (2.10 and 2.17 alike).
MAX_BEAT_INTERVAL_S = 30.0
# First retry of a failed heartbeat (2.17 retries with backoff inside the lease), doubling.
RETRY_FIRST_S = 0.5
# 408, 409 and 429 are worth retrying; every other 4xx is permanent (the SDK's classifier).
RETRYABLE_4XX = frozenset({408, 409, 429})
API_HEADERS = {"anthropic-version": "2026-10-21", "anthropic-beta": "managed-agents-2026-04-01",
               "content-type": "application/json"}


@dataclass(frozen=True)
class Plan:
    duration: float
    exit_code: int
    ignore_sigterm: bool
    children: int
    heartbeat: bool
    lease: str

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Plan:
        return cls(duration=float(meta.get("fake.duration", 1)),
                   exit_code=int(meta.get("fake.exit_code", 0)),
                   ignore_sigterm=str(meta.get("fake.ignore_sigterm", "")) == "1",
                   children=int(meta.get("fake.children", 0)),
                   heartbeat=str(meta.get("fake.heartbeat", "")) == "1",
                   lease=str(meta.get("fake.lease", "2.17")))


@dataclass(frozen=True)
class LeaseShape:
    """How one SDK version's runner keeps its lease."""

    assumed_ttl_s: float  # before the first reply
    stops_on_state: bool  # a reply of `state: stopping|stopped` ends the run, even if extended
    sessions_token: bool  # the secret's sessions token is the credential, when there is one


LEASE_SHAPES = {
    # lib/environments/_lease.py: CLAIM_TIMEOUT, "The API's default lease TTL".
    "2.17": LeaseShape(assumed_ttl_s=300.0, stops_on_state=False, sessions_token=True),
    "2.10": LeaseShape(assumed_ttl_s=90.0, stops_on_state=True, sessions_token=False),
}


class Recorder:
    def __init__(self, directory: str | None, work_id: str) -> None:
        self.path = os.path.join(directory, f"{work_id}.jsonl") if directory else None
        self.work_id = work_id

    def write(self, event: str, **fields: Any) -> None:
        if self.path is None:
            return
        line = {"event": event, "time": time.time(), "pid": os.getpid(),
                "pgid": os.getpgid(0), "ppid": os.getppid(), "work_id": self.work_id, **fields}
        data = (json.dumps(line) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)  # one write of a whole line: lines never interleave
        finally:
            os.close(fd)


class Outcome:
    """Why the run ends; set by the signal handler, the heartbeat thread or the clock."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def end(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason


def _sha256(value: str | None) -> str | None:
    return hashlib.sha256(value.encode()).hexdigest() if value else None


def _read_work() -> dict[str, Any]:
    try:
        work = json.loads(sys.stdin.read() or "{}")
    except ValueError:
        return {}
    return work if isinstance(work, dict) else {}


def _started_fields(work: dict[str, Any]) -> dict[str, Any]:
    data = work.get("data") or {}
    return {
        "env": {name: os.environ.get(name) for name in RECORDED_ENV},
        "env_names": sorted(os.environ),
        "environment_key_sha256": _sha256(os.environ.get("ANTHROPIC_ENVIRONMENT_KEY")),
        "stdin_work_id": work.get("id"),
        "stdin_session_id": data.get("id") if isinstance(data, dict) else None,
        "stdin_secret_sha256": _sha256(work.get("secret")),
        "attempt": os.environ.get("DISPATCHER_ATTEMPT"),
        "metadata": work.get("metadata") or {},
    }


def _on_sigterm(plan: Plan, recorder: Recorder, outcome: Outcome) -> None:
    def handle(signum: int, frame: Any) -> None:
        recorder.write("sigterm")
        if not plan.ignore_sigterm:
            outcome.end("sigterm")

    signal.signal(signal.SIGTERM, handle)


def _fork_children(plan: Plan, recorder: Recorder, deadline: float) -> list[int]:
    pids = []
    for index in range(plan.children):
        pid = os.fork()
        if pid == 0:  # the child: same process group, sleeps as long as its parent
            signal.signal(signal.SIGTERM,
                          signal.SIG_IGN if plan.ignore_sigterm else signal.SIG_DFL)
            recorder.write("child_started", index=index)
            while time.time() < deadline:
                time.sleep(min(0.1, max(0.0, deadline - time.time())))
            os._exit(0)
        pids.append(pid)
    return pids


def _end_children(pids: list[int], *, terminate: bool) -> None:
    for pid in pids:
        if terminate:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


class Runner:
    """Runner mode: this program holds the lease, as the SDK's `handle_item` does."""

    def __init__(self, work: dict[str, Any], plan: Plan, recorder: Recorder,
                 outcome: Outcome) -> None:
        self.base = os.environ.get("ANTHROPIC_BASE_URL", "https://api.anthropic.com").rstrip("/")
        environment = os.environ.get("ANTHROPIC_ENVIRONMENT_ID") or work.get("environment_id")
        work_id = os.environ.get("ANTHROPIC_WORK_ID") or work.get("id")
        self.url = f"{self.base}/v1/environments/{environment}/work/{work_id}"
        self.shape = LEASE_SHAPES.get(plan.lease, LEASE_SHAPES["2.17"])
        token = _sessions_token(work.get("secret")) if self.shape.sessions_token else None
        self.key = token or os.environ.get("ANTHROPIC_ENVIRONMENT_KEY", "")
        self.credential = "sessions_token" if token else "environment_key"
        self.lease_name = plan.lease if plan.lease in LEASE_SHAPES else "2.17"
        self.token = os.environ.get("ANTHROPIC_WORK_LAST_HEARTBEAT") or "NO_HEARTBEAT"
        self.recorder = recorder
        self.outcome = outcome
        self.finished = threading.Event()
        self.lease_lost = False

    def start(self) -> None:
        self.recorder.write("runner", lease=self.lease_name, credential=self.credential)
        threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True).start()

    def finish(self) -> None:
        self.finished.set()
        if not self.lease_lost:
            status, _ = self._call("/stop", {"force": True}, timeout=10)
            self.recorder.write("stop_sent", status=status)

    def _beat_loop(self) -> None:
        ttl, failures = self.shape.assumed_ttl_s, 0
        expires_at = time.monotonic() + ttl
        while not self.finished.is_set():
            interval = beat_interval(ttl)
            sent_at = time.monotonic()
            query = "expected_last_heartbeat=" + quote(self.token, safe="")
            status, body = self._call("/heartbeat?" + query, None, timeout=interval)
            self.recorder.write("heartbeat", status=status, state=body.get("state"),
                                lease_extended=body.get("lease_extended"))
            verdict = judge(self.shape, status, body, expired=time.monotonic() >= expires_at)
            if verdict == Verdict.LOST:
                self.lease_lost = True
                self.recorder.write("lease_lost", status=status)
                self.outcome.end("lease_lost")
                return
            if verdict == Verdict.RETRY:
                failures += 1
                wait = min(interval, RETRY_FIRST_S * 2 ** (failures - 1))
            else:
                ttl = float(body.get("ttl_seconds") or ttl)
                expires_at, failures = sent_at + ttl, 0
                self.token = body.get("last_heartbeat") or self.token
                wait = beat_interval(ttl)  # the TTL just granted, not the one assumed before
                if verdict == Verdict.END:
                    self.outcome.end("server_stop")
            self.finished.wait(max(0.0, sent_at + wait - time.monotonic()))

    def _call(self, path: str, body: dict[str, Any] | None,
              timeout: float) -> tuple[int, dict[str, Any]]:
        # Imported here: urllib.request costs ~30 ms of start-up, and only runner mode needs it.
        import urllib.error
        import urllib.request

        request = urllib.request.Request(
            self.url + path, method="POST", data=json.dumps(body or {}).encode(),
            headers={**API_HEADERS, "authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, _json(response.read())
        except urllib.error.HTTPError as error:
            return error.code, _json(error.read())
        except (urllib.error.URLError, OSError):
            return 0, {}


class Verdict(StrEnum):
    """What one heartbeat's answer means to the runner."""

    HELD = "held"  # extended: beat again after the interval
    END = "end"  # the server asks the runner to end (it still stops the item)
    RETRY = "retry"  # a transient failure: try again soon, while the lease lasts
    LOST = "lost"  # another holder may have the item: end, and never stop it


def judge(shape: LeaseShape, status: int, body: dict[str, Any], *, expired: bool) -> Verdict:
    """The runner's reading of one heartbeat answer (2.17: `Lease._extend`, `_record_response`)."""
    if status == 200:
        stopping = body.get("state") in ("stopping", "stopped") and shape.stops_on_state
        return Verdict.END if stopping or not body.get("lease_extended") else Verdict.HELD
    if _permanent(status) or expired:
        return Verdict.LOST
    return Verdict.RETRY


def beat_interval(ttl: float) -> float:
    return max(MIN_BEAT_INTERVAL_S, min(ttl / 2, MAX_BEAT_INTERVAL_S))


def _permanent(status: int) -> bool:
    """A refusal retrying will not fix: 412 (another holder) or another 4xx but 408/409/429."""
    return 400 <= status < 500 and status not in RETRYABLE_4XX


def _sessions_token(secret: object) -> str | None:
    """The secret's sessions token (base64url JSON, padding perhaps missing). The emulator's
    `auth` reads it too, but this program runs as a lone file, outside the package."""
    if not isinstance(secret, str) or not secret:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4)))
    except (binascii.Error, ValueError):
        return None
    token = data.get("sessions_token") if isinstance(data, dict) else None
    return token if isinstance(token, str) and token else None


def _json(raw: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(raw or b"{}")
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _exit_code(plan: Plan, reason: str) -> int:
    if reason == "completed":
        return plan.exit_code
    return 1 if reason == "lease_lost" else 0


def main() -> int:
    work = _read_work()
    plan = Plan.from_metadata(work.get("metadata") or {})
    work_id = str(work.get("id") or os.environ.get("ANTHROPIC_WORK_ID") or "unknown")
    recorder, outcome = Recorder(os.environ.get("DISPATCHER_FAKE_RECORD_DIR"), work_id), Outcome()
    _on_sigterm(plan, recorder, outcome)
    recorder.write("started", **_started_fields(work))
    deadline = time.time() + plan.duration
    children = _fork_children(plan, recorder, deadline)
    runner = Runner(work, plan, recorder, outcome) if plan.heartbeat else None
    if runner:
        runner.start()
    while outcome.reason is None and time.time() < deadline:
        time.sleep(min(TICK_S, max(0.0, deadline - time.time())))
    reason = outcome.reason or "completed"
    _end_children(children, terminate=reason != "completed")
    if runner:
        runner.finish()
    code = _exit_code(plan, reason)
    recorder.write("exited", exit_code=code, reason=reason)
    return code


if __name__ == "__main__":
    sys.exit(main())
