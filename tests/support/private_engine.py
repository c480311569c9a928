"""A Docker engine of one test's own, which the test may stop and start again.

The machine's engine is shared by every test running in parallel: a test that restarted it would
fail theirs. A `PrivateEngine` is a second `dockerd` beside it, with everything of its own under
one short directory in /tmp: its socket (`-H unix://...`), `--data-root`, `--exec-root` (where
the containerd it manages keeps its socket and state), `--pidfile`. Same flags as the shared
engine (tests/support/engine.py: vfs, no iptables, no bridge), and `--live-restore`: stopped with
SIGTERM, its containers keep running (their shims outlive dockerd and its containerd), and a
restarted dockerd takes them back. The test image is imported into it as into the shared one.

`close()` removes what it made: its containers, dockerd, any process left under its directory
(a shim of a container that outlived dockerd), the bind mount dockerd makes of its data root,
and the directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import docker
from docker.errors import DockerException

from tests.support.engine import DOCKERD_ARGS, ensure_image

__all__ = ["PrivateEngine"]

# A dockerd on vfs starts in about a second; a loaded machine may take many.
START_SECONDS = 60.0
# dockerd stops in well under a second; a shutdown longer than this is a hang.
STOP_SECONDS = 30.0
POLL_SECONDS = 0.1
PING_TIMEOUT_SECONDS = 2.0


class PrivateEngine:
    def __init__(self, name: str) -> None:
        dockerd = shutil.which("dockerd")
        if dockerd is None:
            raise RuntimeError("dockerd is not installed: run ./dev test (it installs docker.io)")
        self._dockerd = dockerd
        # Short: a unix socket's path is limited to 108 bytes, and containerd's sockets live
        # under the exec root.
        self.directory = Path(tempfile.mkdtemp(prefix=f"eng-{name}-", dir="/tmp"))
        self.socket = self.directory / "docker.sock"
        self.log_path = self.directory / "dockerd.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def client(self, timeout: float = 30) -> docker.APIClient:
        return docker.APIClient(base_url=self.docker_host, version="auto", timeout=timeout)

    def start(self) -> None:
        """Start dockerd, and wait until it answers."""
        args = [self._dockerd, *DOCKERD_ARGS, "--live-restore",
                "-H", self.docker_host,
                "--data-root", str(self.directory / "data"),
                "--exec-root", str(self.directory / "exec"),
                "--pidfile", str(self.directory / "dockerd.pid")]
        with self.log_path.open("ab") as log:
            self._process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"the private dockerd exited; see {self.log_path}")
            if self.answers():
                return
            time.sleep(POLL_SECONDS)
        raise RuntimeError(f"the private dockerd did not answer within {START_SECONDS:.0f}s; "
                           f"see {self.log_path}")

    def stop(self) -> None:
        """Stop dockerd as an operator does (SIGTERM); with live-restore its containers run on.
        Returns once it has exited."""
        process, self._process = self._process, None
        if process is None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise RuntimeError(f"the private dockerd did not stop; see {self.log_path}") from None

    def answers(self) -> bool:
        """A `/_ping` on a socket of its own (a client that negotiates its version leaves its
        socket open when the engine does not answer)."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(PING_TIMEOUT_SECONDS)
                conn.connect(str(self.socket))
                conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: engine\r\n\r\n")
                return conn.recv(64).startswith(b"HTTP/1.0 200") or False
        except OSError:
            return False

    def load_test_image(self, workdir: Path) -> str:
        """The test image (tests/support/engine.py), imported into this engine; its id."""
        client = self.client()
        try:
            return ensure_image(client, workdir, docker_host=self.docker_host)
        finally:
            client.close()

    def close(self) -> None:
        if self._process is not None:
            with contextlib.suppress(DockerException, OSError):
                client = self.client(timeout=10)
                for container in client.containers(all=True):
                    client.remove_container(container["Id"], force=True, v=True)
                client.close()
            with contextlib.suppress(RuntimeError):
                self.stop()
        for pid in self._processes_under_directory():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._unmount()
        shutil.rmtree(self.directory, ignore_errors=True)

    def mounts(self) -> list[str]:
        """Mount points under this engine's directory (dockerd bind-mounts its data root)."""
        prefix = str(self.directory)
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f]
        return [p for p in points if p == prefix or p.startswith(prefix + "/")]

    def _unmount(self) -> None:
        for point in sorted(self.mounts(), key=len, reverse=True):
            subprocess.run(["umount", "-l", point], check=False, capture_output=True)

    def _processes_under_directory(self) -> list[int]:
        """Processes whose command line names this engine's directory: its containerd, and
        the shims of containers that outlived dockerd."""
        needle = str(self.directory).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
        return found
