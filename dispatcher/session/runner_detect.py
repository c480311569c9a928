"""Refuse the configurations that fail every session of the official runner: the `dispatcher`
lease mode, and a work secret the runner does not read.

The official runner (`ant beta:worker run`, SDK 2.10.0's `handle_item`) claims the lease itself
with a first heartbeat of `NO_HEARTBEAT`. The server accepts that only while nobody has
heartbeated the item; in the default `dispatcher` mode the fleet already has, so the runner is
refused with 412 and exits, and every session fails. A new user following the official docs
points DISPATCHER_ON_WORK at their `docker run ... ant beta:worker run` script and meets exactly
that. So a session worker looks at what its sandbox runs (the on-work command and the scripts it
names, or the container's command and the image's) and, when it finds the runner while the lease
mode was left at its default, refuses to start with one line naming the setting to change.

The runner also needs the work item's secret, whose sessions token authorises its session
calls: the SDK's `handle_item` reads it from ANTHROPIC_WORK_SECRET and nowhere else. So a
process sandbox that runs `handle_item` directly with another DISPATCHER_WORK_SECRET_DELIVERY,
and a container that runs it directly (a container's environment is never given the secret),
are refused too, naming the setting and the entry point that reads the secret from stdin
(`stdin_runner.py`, which works with every delivery).

Why refuse rather than switch: the lease mode is read when work is claimed, on control workers
that may not see the sandbox program at all, so a session worker's guess must not change it;
and a runner hidden deeper than we look would still fail. An operator who sets
DISPATCHER_LEASE_MODE explicitly is trusted either way.
"""

from __future__ import annotations

import io
import re
import tokenize
from collections.abc import Iterable
from pathlib import Path

from dispatcher.settings import SandboxRuntimeKind, SecretDelivery, Settings

__all__ = ["RUNNER_PATTERNS", "find_runner", "lease_mode_problem", "program_texts",
           "secret_delivery_problem"]

# Invocations of programs that claim the lease with NO_HEARTBEAT. The entry point comes first:
# its own code calls handle_item, but it reads the secret from stdin, whatever the delivery.
STDIN_RUNNER = re.compile(r"\bstdin_runner\b")  # dispatcher/session/stdin_runner.py
SDK_RUNNER = re.compile(r"\bhandle_item\b")  # the Python SDK's per-item worker
RUNNER_PATTERNS = (
    STDIN_RUNNER,
    re.compile(r"\bbeta:worker\s+run\b"),  # the official CLI's per-item runner
    SDK_RUNNER,
)
# A comment: `#` at a line's start or after whitespace, to the end of the line.
COMMENT = re.compile(r"(^|\s)#.*$", re.MULTILINE)
# Scripts larger than this are programs, not spawn scripts: not read.
MAX_SCRIPT_BYTES = 256 * 1024


def find_runner(texts: Iterable[tuple[str, str]]) -> tuple[str, str] | None:
    """(where, what) of the first runner invocation outside comments, or None."""
    for where, text in texts:
        code = COMMENT.sub(r"\1", text)
        for pattern in RUNNER_PATTERNS:
            match = pattern.search(code)
            if match:
                return where, " ".join(match.group(0).split())
    return None


def lease_mode_problem(settings: Settings, texts: Iterable[tuple[str, str]]) -> str | None:
    """The refusal's message, or None when the lease mode and the secret's delivery suit what
    the sandbox runs."""
    found = find_runner(texts)
    if found is None:
        return None
    if "lease_mode" in settings.model_fields_set:
        return secret_delivery_problem(settings, found)
    where, what = found
    return (f"the sandbox runs the official runner (`{what}` in {where}), which claims its own "
            "lease; set DISPATCHER_LEASE_MODE=runner (in the default `dispatcher` mode the "
            "fleet heartbeats the lease and the runner's first heartbeat is refused with 412)")


def secret_delivery_problem(settings: Settings, found: tuple[str, str]) -> str | None:
    """The refusal's message when the SDK's runner, called directly, cannot read the secret."""
    where, what = found
    if not SDK_RUNNER.fullmatch(what):
        return None  # the entry point reads stdin; the CLI's own reading is its business
    runner = f"the sandbox runs `{what}` in {where}, which reads the work secret only from " \
             "ANTHROPIC_WORK_SECRET"
    if settings.sandbox_runtime == SandboxRuntimeKind.DOCKER:
        return (f"{runner}, and a container never gets the secret in its environment "
                "(`docker inspect` shows it): run dispatcher/session/stdin_runner.py as the "
                "container's command (DISPATCHER_SANDBOX_COMMAND), which reads it from stdin")
    delivery = settings.secret_delivery
    if delivery == SecretDelivery.ENV:
        return None
    return (f"{runner}: DISPATCHER_WORK_SECRET_DELIVERY={delivery.value} does not reach it; "
            "set env (the process runtime's default), or run dispatcher/session/stdin_runner.py")


def python_code(source: str) -> str:
    """A Python program's names and operators, without its strings and comments: a docstring
    that mentions the runner is no call of it."""
    kept = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type in (tokenize.NAME, tokenize.OP):
                kept.append(token.string)
    except (tokenize.TokenError, SyntaxError):
        pass  # judge what was read
    return " ".join(kept)


def _is_python(path: Path, text: str) -> bool:
    return path.suffix == ".py" or (text.startswith("#!") and "python" in text.split("\n", 1)[0])


def program_texts(argv: list[str]) -> list[tuple[str, str]]:
    """The command line itself, and the code of every argument that is a readable script."""
    texts = [("DISPATCHER_ON_WORK", " ".join(argv))]
    for arg in argv:
        path = Path(arg)
        try:
            if not path.is_file() or path.stat().st_size > MAX_SCRIPT_BYTES:
                continue
            data = path.read_bytes()
        except OSError:
            continue
        if b"\0" in data:
            continue  # a binary is no script
        text = data.decode(errors="replace")
        texts.append((str(path), python_code(text) if _is_python(path, text) else text))
    return texts
