"""An image with the official runner (the pinned SDK's `handle_item`), built with no registry.

    python -m bench.runner_image          # prints the image's tag, building it when missing

The container tests and the benchmark run the SDK unmodified inside a sandbox container. No
registry is reachable on the test machines, so the image is made from Debian's own packages:

1. `debootstrap --variant=minbase --include=python3,python3-venv bookworm ROOT` (about 40 s
   on an idle machine, minutes on a busy one), kept as a tarball in the user's cache directory
   so that a changed entry point or SDK does not fetch Debian again;
2. `pip download` of the pinned SDK's wheels on the host, for the root's Python (3.11, glibc
   manylinux), because pip inside the chroot cannot reach the package index;
3. in the chroot, a venv at /opt/sdk with the SDK installed offline from those wheels, and the
   dispatcher's stdin entry point (`dispatcher/session/stdin_runner.py`, standard library and
   SDK only) copied to /opt/dispatcher;
4. pip itself, documentation, locales and apt's caches removed: the test engine's vfs storage
   driver copies the whole root for every container, so every megabyte is paid per session;
5. `docker import` with the entry point as the command.

The tag is a content key (SDK version, this recipe, the entry point), so an image already on
the engine is reused and a changed recipe builds a new one. Builds of concurrent test processes
are serialised by a file lock. A build that cannot finish raises `RunnerImageError` with one line
naming the step (the tests fail with it; they do not skip).

This module imports nothing of `dispatcher`: a benchmark or a CI step may run it alone.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["ENTRY_POINT", "IMAGE_REPOSITORY", "SDK_VERSION", "RunnerImageError", "ensure_image",
           "image_tag"]

# The SDK the official runner comes from: the project's pinned peer.
SDK_VERSION = "2.17.0"
IMAGE_REPOSITORY = "dispatcher-runner"
ENTRY_POINT = Path(__file__).resolve().parents[1] / "dispatcher" / "session" / "stdin_runner.py"
# Where the entry point lives in the image; the runner detector knows its name.
IMAGE_ENTRY_POINT = "/opt/dispatcher/stdin_runner.py"
VENV = "/opt/sdk"
SUITE, MIRROR = "bookworm", "http://deb.debian.org/debian"
DEBOOTSTRAP = ["debootstrap", "--variant=minbase", "--include=python3,python3-venv", SUITE]
# Debian's root before anything of ours, reused by every build of the same debootstrap call.
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dispatcher"
# bookworm's interpreter: the wheels must be built for it, not for the host's.
ROOT_PYTHON = ("3.11", "cp311")
WHEEL_PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
# Never used at run time, and copied per container by the vfs driver.
PRUNED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
          "var/cache/apt", "var/lib/apt/lists", "var/cache/debconf",
          "usr/lib/x86_64-linux-gnu/gconv")
# One build at a time on a machine; others wait for it and reuse its image.
LOCK_PATH = Path(tempfile.gettempdir()) / "dispatcher-runner-image.lock"
# A whole build: debootstrap's downloads dominate; a hung mirror must not hang a test run.
STEP_TIMEOUT_SECONDS = 900


class RunnerImageError(Exception):
    """The runner image cannot be built; the message is one line naming the failed step."""


def image_tag() -> str:
    """The image's name: its content key, so a changed recipe or entry point builds anew."""
    recipe = Path(__file__).read_bytes()
    key = hashlib.sha256(SDK_VERSION.encode() + recipe + ENTRY_POINT.read_bytes()).hexdigest()
    return f"{IMAGE_REPOSITORY}:{key[:12]}"


def ensure_image() -> str:
    """The runner image's tag, built first when the engine lacks it."""
    tag = image_tag()
    if _present(tag):
        return tag
    with _locked():
        if not _present(tag):  # another process may have built it while we waited
            with tempfile.TemporaryDirectory(prefix="dispatcher-runner-image-") as workdir:
                _build(Path(workdir), tag)
    return tag


def _present(tag: str) -> bool:
    result = subprocess.run(["docker", "image", "inspect", tag], capture_output=True,
                            check=False)
    return result.returncode == 0


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with LOCK_PATH.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(workdir: Path, tag: str) -> None:
    root, wheels = workdir / "root", workdir / "root" / "tmp" / "wheels"
    _debian_root(root)
    _step("pip download", [sys.executable, "-m", "pip", "download", "--quiet",
                           "--only-binary=:all:", *_platform_options(), "-d", str(wheels),
                           f"anthropic=={SDK_VERSION}"])
    install = (f"python3 -m venv {VENV} && {VENV}/bin/pip install --quiet --no-index "
               f"--find-links /tmp/wheels anthropic=={SDK_VERSION} && "
               f"{VENV}/bin/pip uninstall --quiet --yes pip setuptools")
    _step("pip install in the chroot", ["chroot", str(root), "/bin/sh", "-c", install])
    entry = root / IMAGE_ENTRY_POINT.lstrip("/")
    entry.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ENTRY_POINT, entry)
    shutil.rmtree(wheels)
    for path in PRUNED:
        shutil.rmtree(root / path, ignore_errors=True)
    _import(root, tag)


def _debian_root(root: Path) -> None:
    """Debian's root at `root`: from the cache, else made by debootstrap and cached."""
    key = hashlib.sha256(" ".join([*DEBOOTSTRAP, MIRROR]).encode()).hexdigest()[:12]
    cached = CACHE_DIR / f"debootstrap-{SUITE}-{key}.tar"
    if cached.exists():
        root.mkdir(parents=True)
        _step("unpack the cached Debian root", ["tar", "-C", str(root), "-xf", str(cached)])
        return
    if shutil.which("debootstrap") is None:
        raise RunnerImageError("cannot build the runner image: debootstrap is not installed "
                               "(apt-get install debootstrap; ./dev test installs it)")
    _step("debootstrap", [*DEBOOTSTRAP, str(root), MIRROR])
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    partial = cached.with_suffix(".partial")
    _step("cache the Debian root", ["tar", "-C", str(root), "-cf", str(partial), "."])
    partial.rename(cached)  # whole or absent: a build cut off leaves no half root behind


def _platform_options() -> list[str]:
    version, abi = ROOT_PYTHON
    options = ["--python-version", version, "--implementation", "cp", "--abi", abi]
    for platform in WHEEL_PLATFORMS:
        options += ["--platform", platform]
    return options


def _import(root: Path, tag: str) -> None:
    changes = [f"ENV PATH={VENV}/bin:/usr/local/bin:/usr/bin:/bin", "WORKDIR /tmp",
               f'CMD ["{VENV}/bin/python", "{IMAGE_ENTRY_POINT}"]']
    options = [arg for change in changes for arg in ("-c", change)]
    tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
    try:
        _step("docker import", ["docker", "import", *options, "-", tag], stdin=tar.stdout)
    finally:
        if tar.stdout is not None:
            tar.stdout.close()
        tar.wait()


def _step(name: str, argv: list[str], stdin: IO[bytes] | None = None) -> None:
    try:
        result = subprocess.run(argv, stdin=stdin, capture_output=True, check=False,
                                timeout=STEP_TIMEOUT_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RunnerImageError(f"cannot build the runner image: {name} failed: {exc}") from None
    if result.returncode != 0:
        output = (result.stderr or result.stdout).decode(errors="replace")
        lines = output.strip().splitlines() or ["(no output)"]
        raise RunnerImageError(f"cannot build the runner image: {name} exited "
                               f"{result.returncode}: {lines[-1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    try:
        print(ensure_image())
    except RunnerImageError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
