"""What a sandbox's start costs a session: process, container cold, container warm, and the
peer's `docker run` recipe, in one run.

    python -m bench.containers [--sessions 40] [--image runner|busybox] [--out BENCHMARKS.md]
                               [--json FILE] [--redis-url URL] [--engine-timeout SECONDS]

Starts the same sandbox program through each path, one session at a time: a shell that writes a
marker file and sleeps. Start latency is the time from the start call (`start_sandbox`, as an
attempt makes it; for the recipe, the spawn of `docker run -i --rm`) to the marker's appearance,
the program's first instruction; teardown is `kill_group` (the process group's SIGKILL and reap;
the container's forced removal). The warm path claims from a warm pool (`warm_pool.py`) filled
by its own thread, as a session worker's is; between two sessions the bench waits for the pool
to be full again, so each start is a hit, and the refill is not counted. The image is the
Debian-built runner image of the tests (`bench/runner_image.py`: python3 and the SDK, 147 MB),
or `busybox` (the static busybox imported alone, 2 MB). Containers run with `--network none`
on the engine this machine has (the vfs storage driver copies an image's whole root per
container; overlayfs creates containers faster). Writes its image's part of the section of
BENCHMARKS.md between markers, leaving the other image's part and the rest of the file as they
are.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import redis

from dispatcher.session import container as container_module
from dispatcher.session.runtimes import start_sandbox
from dispatcher.session.sandbox import SandboxSpec
from dispatcher.session.warm_book import WarmBook
from dispatcher.session.warm_pool import WarmPool, claim_warm
from dispatcher.settings import Settings

BEGIN = "<!-- BEGIN containers (python -m bench.containers) -->"
END = "<!-- END containers -->"
IMAGES = ("runner", "busybox")  # the section's parts, in this order
BUSYBOX_IMAGE = "dispatcher-bench-sandbox:1"
PROGRAM = 'echo up > "/records/$ANTHROPIC_WORK_ID"; exec sleep 60'
# How often the marker is looked for: well below the figures measured.
POLL_SECONDS = 0.001
# A cold start's bound: on vfs a create copies the image's whole root (147 MB for the runner),
# which takes minutes when the machine's disk and CPUs are shared with test suites.
RUNNING_TIMEOUT_SECONDS = 300.0
# The warm pool's refill between two sessions (a cold create, off the session's path).
REFILL_TIMEOUT_SECONDS = 300.0
# The engine client's timeout in this bench only: the runtime's (container.py, 30 s) fails a
# create that an engine copying a root on a loaded machine finishes after it.
BENCH_ENGINE_TIMEOUT_SECONDS = 300
PATHS = ("process", "container cold", "container warm", "docker run (peer recipe)")


@dataclass
class Figures:
    start: list[float]
    teardown: list[float]


class _DockerRun:
    """The peer's recipe: `--on-work 'docker run -i --rm IMAGE ...'`, the work JSON on the
    client's stdin. Torn down as its removal (killing the client would leave the container)."""

    def __init__(self, argv: list[str], name: str, stdin: bytes) -> None:
        self.name = name
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        assert self.process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.process.stdin.write(stdin)
            self.process.stdin.close()

    def kill_group(self) -> None:
        subprocess.run(["docker", "rm", "-f", self.name], capture_output=True, check=False)
        self.process.wait()


def _busybox_image(api: docker.APIClient, busybox: str) -> str:
    with contextlib.suppress(docker.errors.ImageNotFound):  # made by an earlier run
        return str(api.inspect_image(BUSYBOX_IMAGE)["Id"])
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("bin", "records"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in ("sh", "echo", "sleep", "kill", "cat"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
    repository, tag = BUSYBOX_IMAGE.split(":")
    api.import_image_from_data(buffer.getvalue(), repository=repository, tag=tag,
                               changes=["ENV PATH=/bin"])
    return str(api.inspect_image(BUSYBOX_IMAGE)["Id"])


def _runner_image(api: docker.APIClient) -> str:
    from bench.runner_image import ensure_image

    return str(api.inspect_image(ensure_image())["Id"])


def _spec(n: int, records: Path) -> SandboxSpec:
    work_id = f"work_bench{n}"
    return SandboxSpec(argv=[], env={"PATH": "/usr/bin:/bin", "ANTHROPIC_WORK_ID": work_id,
                                     "RECORDS": str(records)},
                       stdin=b"{}", work_id=work_id, session_id=f"sesn_bench{n}", attempt=1,
                       environment_id="env_bench")


def _measure(start: Callable[[SandboxSpec], Any], records: Path, sessions: int, *,
             before: Callable[[], None] = lambda: None) -> Figures:
    figures = Figures([], [])
    for n in range(sessions):
        spec = _spec(n, records)
        marker = records / spec.work_id
        marker.unlink(missing_ok=True)
        before()
        began = time.perf_counter()
        sandbox = start(spec)
        deadline = began + RUNNING_TIMEOUT_SECONDS
        while not marker.exists():
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{spec.work_id} did not start within "
                                   f"{RUNNING_TIMEOUT_SECONDS}s")
            time.sleep(POLL_SECONDS)
        figures.start.append(time.perf_counter() - began)
        began = time.perf_counter()
        sandbox.kill_group()
        figures.teardown.append(time.perf_counter() - began)
    return figures


def _warm(settings: Settings, records: Path, sessions: int, redis_url: str) -> Figures:
    """Sessions claimed from a pool of one, refilled (and waited for) between them."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = f"bench-{uuid.uuid4().hex[:6]}"
    book = WarmBook(client, prefix=prefix)
    settings = settings.model_copy(update={"key_prefix": prefix})
    pool = WarmPool(settings, book, worker="bench", slots=1, environments=["env_bench"],
                    busy=lambda: 0)
    thread = threading.Thread(target=pool.run, daemon=True)
    thread.start()

    def full() -> None:
        deadline = time.monotonic() + REFILL_TIMEOUT_SECONDS
        while not book.ready("bench", "env_bench"):
            if time.monotonic() > deadline:
                raise RuntimeError("the warm pool did not refill")
            time.sleep(0.01)

    claim = functools.partial(claim_warm, book=book, worker="bench")
    try:
        return _measure(lambda spec: start_sandbox(settings, spec, warm=claim), records,
                        sessions, before=full)
    finally:
        pool.stop()
        thread.join(30)
        client.close()


def _docker_run(image: str, records: Path, sessions: int) -> Figures:
    def start(spec: SandboxSpec) -> _DockerRun:
        name = f"bench-run-{uuid.uuid4().hex[:8]}"
        return _DockerRun(["docker", "run", "-i", "--rm", "--name", name, "--network", "none",
                           "-v", f"{records}:/records", "-e",
                           f"ANTHROPIC_WORK_ID={spec.work_id}", image, "sh", "-c", PROGRAM],
                          name, spec.stdin)

    return _measure(start, records, sessions)


def _at(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _ms(value: float) -> str:
    return f"{value * 1000:.0f} ms"


def part_markers(key: str) -> tuple[str, str]:
    return f"<!-- BEGIN containers image={key} -->", f"<!-- END containers image={key} -->"


def render(figures: dict[str, Figures], *, key: str, sessions: int, engine: str, image: str,
           load: tuple[float, float]) -> str:
    """One image's part of the section: its run, its table and the verdict on the targets."""
    rows = ["| start path | start p50 | start p99 | teardown p50 |", "|---|---|---|---|"]
    for name in PATHS:
        f = figures[name]
        rows.append(f"| {name} | {_ms(_at(f.start, 0.5))} | {_ms(_at(f.start, 0.99))} | "
                    f"{_ms(_at(f.teardown, 0.5))} |")
    process, cold, warm = (figures[n] for n in PATHS[:3])
    over = _at(warm.start, 0.5) - _at(process.start, 0.5)
    faster = _at(cold.start, 0.99) / _at(warm.start, 0.99)
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    begin, end = part_markers(key)
    return "\n".join([
        begin,
        f"### Image: {image}",
        "",
        f"Generated by `python -m bench.containers --image {key} --sessions {sessions}` on "
        f"{when}: {sessions} sessions one at a time per start path, Docker engine {engine}, "
        f"{os.cpu_count()} CPUs, {platform.release()}; load average (1 min) {load[0]:.0f} at "
        f"the start and {load[1]:.0f} at the end, on a machine shared with other work.",
        "",
        *rows,
        "",
        f"**A warm container starts a session {_ms(over)} after the process runtime would** "
        f"(p50; the target, within 20 ms: {'met' if over <= 0.020 else 'missed'}), **and "
        f"{faster:.1f}x faster than a cold one at p99** (the target, at least 5x: "
        f"{'met' if faster >= 5 else 'missed'}). The p99 of {sessions} sessions is their "
        "slowest.",
        end,
    ])


def section(parts: dict[str, str]) -> str:
    """The whole section: what is measured, then each image's part."""
    return "\n".join([
        BEGIN,
        "## Sandbox start latency: process, container cold and warm, `docker run`",
        "",
        "Start latency is the start call (`start_sandbox`, as an attempt makes it; for the "
        "recipe, the spawn of its `docker run -i --rm` client) -> the sandbox program's first "
        "instruction (a marker file on a bind mount). The process runtime forks and execs the "
        "program. Cold is create, attach stdin, start, the engine's init and the program's "
        "exec; on this machine's engine (vfs storage driver) the create copies the image's "
        "whole root (and the removal deletes it), so the cold start grows with the image and "
        "with the disk's and CPUs' load: that copy is most of the cold and the recipe's "
        "figures with the runner image, and it is what the warm pool takes off the session's "
        "path (overlayfs would create faster; a runtime such as gVisor would start slower). "
        "Warm is one Redis call to claim a container of the pool and one write to its stdin "
        "(attached by the pool when it made the container), then the waiting shell's exec of "
        "the program: neither the image's size nor an engine round trip is on its path. The "
        "recipe adds the CLI's own start and its API round trips to a cold start, and is not "
        "confined. Teardown is `kill_group`: SIGKILL and reap of the process group, or the "
        "output copied and the container removed (the recipe: `docker rm -f`, as killing its "
        "client would leave the container running). The warm pool's refill after each session "
        "(a cold create, off the session's path) is not counted. Containers run with "
        "`--network none`.",
        "",
        *[parts[key] + "\n" for key in IMAGES if key in parts],
        END,
        "",
    ])


def parts_of(document: str) -> dict[str, str]:
    """Each image's part in the document's section, as written."""
    found = {}
    for key in IMAGES:
        begin, end = part_markers(key)
        if begin in document and end in document:
            found[key] = begin + document.split(begin, 1)[1].split(end, 1)[0] + end
    return found


def splice(document: str, section: str) -> str:
    """The document with its container section replaced (or appended)."""
    if BEGIN in document and END in document:
        head, rest = document.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        return head + section + tail
    return document.rstrip("\n") + "\n\n" + section


def carry_over(old: Path, report: str) -> str:
    """A regenerated BENCHMARKS.md keeps the container section the old one had."""
    try:
        text = old.read_text()
    except FileNotFoundError:
        return report
    if BEGIN not in text or END not in text:
        return report
    section = BEGIN + text.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
    return splice(report, section)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--image", choices=["runner", "busybox"], default="runner")
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--json", help="also write the figures, in seconds, to this file")
    parser.add_argument("--redis-url", default=os.environ.get(
        "DISPATCHER_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="the warm pool's book (keys under a prefix of its own, left to expire)")
    parser.add_argument("--engine-timeout", type=int, default=BENCH_ENGINE_TIMEOUT_SECONDS,
                        help="seconds an engine call may take (a cold create on a loaded "
                        "machine's vfs engine takes minutes)")
    args = parser.parse_args()
    container_module.ENGINE_TIMEOUT_SECONDS = args.engine_timeout  # before the first client
    load_before = os.getloadavg()[0]
    busybox = shutil.which("busybox")
    if busybox is None:
        raise SystemExit("bench.containers: busybox is not installed (apt-get install "
                         "busybox-static)")
    api = docker.APIClient(version="auto")
    image = _runner_image(api) if args.image == "runner" else _busybox_image(api, busybox)
    figures: dict[str, Figures] = {}
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp)
        records.chmod(0o777)
        # Each attempt's output file in the run's own directory: the default, shared with the
        # machine's other runs, holds a thousand files that every start's rotation looks at.
        base = {"ANTHROPIC_ENVIRONMENT_ID": "env_bench", "DISPATCHER_KEY_PREFIX": "bench",
                "DISPATCHER_SANDBOX_OUTPUT_DIR": f"{records}/output"}
        process = Settings(**base)
        figures[PATHS[0]] = _measure(
            lambda spec: start_sandbox(process, replace_argv(
                spec, [busybox, "sh", "-c", PROGRAM.replace("/records", "$RECORDS")])),
            records, args.sessions)
        containers = Settings(**base, DISPATCHER_SANDBOX_RUNTIME="docker",
                              DISPATCHER_SANDBOX_IMAGE=image,
                              DISPATCHER_SANDBOX_NETWORK="none",
                              DISPATCHER_SANDBOX_COMMAND=f"sh -c '{PROGRAM}'",
                              DISPATCHER_SANDBOX_VOLUMES=f"{records}:/records",
                              DISPATCHER_FLEET_ID="bench", DISPATCHER_WARM_CONTAINERS=1)
        figures[PATHS[1]] = _measure(lambda spec: start_sandbox(containers, spec), records,
                                     args.sessions)
        figures[PATHS[2]] = _warm(containers, records, args.sessions, args.redis_url)
        figures[PATHS[3]] = _docker_run(image, records, args.sessions)
    engine = str(api.version().get("Version"))
    label = ("the tests' Debian-built runner image (python3 and the SDK, "
             f"{api.inspect_image(image)['Size'] / 1e6:.0f} MB)" if args.image == "runner"
             else "static busybox alone (2 MB)")
    part = render(figures, key=args.image, sessions=args.sessions, engine=engine, image=label,
                  load=(load_before, os.getloadavg()[0]))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(
            {"sessions": args.sessions, "image": image, "engine": engine,
             "paths": {name: asdict(f) for name, f in figures.items()}}, indent=1))
    out = Path(args.out)
    document = out.read_text() if out.exists() else ""
    out.write_text(splice(document, section({**parts_of(document), args.image: part})))
    print(part)


def replace_argv(spec: SandboxSpec, argv: list[str]) -> SandboxSpec:
    from dataclasses import replace

    return replace(spec, argv=argv)


if __name__ == "__main__":
    main()
