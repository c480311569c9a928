"""A real Docker engine for the container tests, and their image.

The engine is the machine's (`/var/run/docker.sock`); when none answers and `dockerd` is
installed, it is started here as `./dev test` starts it (no registry on test machines: the vfs
storage driver, no iptables, no bridge; containers run with `--network none`). The test image
is made with `docker import` from a directory holding the static busybox, its applet links and
the test sandbox script, and is tagged by the hash of what it holds, so a changed script makes
a new image. No mock stands in for the engine: without one the tests fail, saying why.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import docker
from docker.errors import DockerException, ImageNotFound

SCRIPT = Path(__file__).with_name("sandbox_image") / "session.sh"
IMAGE_REPOSITORY = "dispatcher-test-sandbox"
DOCKERD_ARGS = ["--storage-driver=vfs", "--iptables=false", "--bridge=none"]
DOCKERD_LOG = Path("/tmp/dispatcher-dockerd.log")
ENGINE_START_SECONDS = 60.0


def _client() -> docker.APIClient | None:
    try:
        client = docker.APIClient(version="auto", timeout=30)
        client.ping()
    except DockerException:
        return None
    return client


def ensure_engine() -> docker.APIClient:
    """The engine's client; starts `dockerd` when none answers. Fails (never skips) without."""
    client = _client()
    if client is not None:
        return client
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise RuntimeError("no Docker engine answers and dockerd is not installed: run "
                           "./dev test (it installs docker.io), or start an engine")
    with DOCKERD_LOG.open("ab") as log:
        subprocess.Popen([dockerd, *DOCKERD_ARGS], stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    deadline = time.monotonic() + ENGINE_START_SECONDS
    while time.monotonic() < deadline:
        client = _client()
        if client is not None:
            return client
        time.sleep(0.5)
    raise RuntimeError(f"the Docker engine did not start within {ENGINE_START_SECONDS:.0f}s; "
                       f"see {DOCKERD_LOG}")


def ensure_image(client: docker.APIClient, workdir: Path, *, docker_host: str | None = None) -> str:
    """The test image's id (`sha256:...`: a reference no tag can move, as the runtime asks by
    default), imported under its tag when the engine lacks it. `docker_host`: the engine of
    `client` when it is not the machine's (a test's private engine)."""
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox is not installed: run ./dev test (it installs "
                           "busybox-static)")
    digest = hashlib.sha256(SCRIPT.read_bytes() + Path(busybox).read_bytes()).hexdigest()[:12]
    tag = f"{IMAGE_REPOSITORY}:{digest}"
    try:
        return str(client.inspect_image(tag)["Id"])
    except ImageNotFound:
        pass
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True,
                             check=True).stdout.split()
    tarball = workdir / "image.tar"
    with tarfile.open(tarball, "w") as tar:
        for name in ("bin", "tmp", "records"):
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in sorted(set(applets) - {"busybox"}):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(link)
        tar.add(SCRIPT, arcname="session.sh")
    subprocess.run(["docker", "import", "-c", "ENV PATH=/bin", "-c",
                    'CMD ["sh", "/session.sh"]', str(tarball), tag],
                   check=True, capture_output=True,
                   env={**os.environ, "DOCKER_HOST": docker_host} if docker_host else None)
    return str(client.inspect_image(tag)["Id"])
