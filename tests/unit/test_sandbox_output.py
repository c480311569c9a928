"""Each attempt's output kept in a file of its own: the tail of a long output, rotation by
count, reading back by work item, and the `dispatcher output` command over real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dispatcher.session.output import (
    TRUNCATED,
    LiveOutput,
    attempt_path,
    read_outputs,
    write_output,
)
from dispatcher.session.sandbox import Sandbox, SandboxSpec


def test_an_attempts_output_is_kept_whole_when_it_fits(tmp_path: Path) -> None:
    path = write_output(tmp_path, "work_1", 2, [b"a\n", b"b\n"], max_bytes=1024, keep=10)
    assert path == tmp_path / "work_1" / "2.log"
    assert path.read_bytes() == b"a\nb\n"
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("chunks", [[b"x" * 5000], [b"0123456789"] * 500, [b"y"] * 3000])
def test_a_long_output_keeps_its_end(tmp_path: Path, chunks: list[bytes]) -> None:
    path = write_output(tmp_path, "w", 1, [*chunks, b"END"], max_bytes=1024, keep=10)
    kept = path.read_bytes()
    header = TRUNCATED % 1024
    assert kept.startswith(header) and kept.endswith(b"END")
    assert len(kept) - len(header) == 1024
    assert kept[len(header):] == b"".join([*chunks, b"END"])[-1024:]


def test_the_oldest_files_go_beyond_the_count_kept(tmp_path: Path) -> None:
    for number in range(5):
        path = write_output(tmp_path, f"w{number}", 1, [b"x"], max_bytes=1024, keep=3)
        os.utime(path, (1000 + number, 1000 + number))
    write_output(tmp_path, "w5", 1, [b"x"], max_bytes=1024, keep=3)
    assert sorted(p.parent.name for p in tmp_path.glob("*/*.log")) == ["w3", "w4", "w5"]
    assert not (tmp_path / "w0").exists(), "an emptied work item's folder goes too"


def test_a_rotation_leaves_room_so_the_ends_after_it_read_no_file_times(tmp_path: Path) -> None:
    """Past `keep` folders, the oldest files go down to nine tenths of it; the ends that follow
    only count folders until there are more than `keep` again."""
    def end(number: int) -> None:
        path = write_output(tmp_path, f"w{number:02}", 1, [b"x"], max_bytes=1024, keep=20)
        os.utime(path, (1000 + number, 1000 + number))

    def kept() -> list[int]:
        return sorted(int(p.parent.name[1:]) for p in tmp_path.glob("*/*.log"))

    for number in range(20):
        end(number)
    assert kept() == list(range(20)), "nothing goes while the folders number `keep`"
    end(20)
    assert kept() == list(range(3, 21)), "the oldest go, down to 18"
    end(21)
    end(22)
    assert kept() == list(range(3, 23)), "the next two ends remove nothing"
    end(23)
    assert kept() == list(range(6, 24))


def test_a_rotation_counts_an_items_attempts_as_files(tmp_path: Path) -> None:
    for attempt in range(1, 4):
        path = write_output(tmp_path, "w0", attempt, [b"x"], max_bytes=1024, keep=2)
        os.utime(path, (1000 + attempt, 1000 + attempt))
    assert len(list(tmp_path.glob("*/*.log"))) == 3, "one item's folder: within `keep`"
    for number in (1, 2):
        path = write_output(tmp_path, f"w{number}", 1, [b"x"], max_bytes=1024, keep=2)
        os.utime(path, (2000 + number, 2000 + number))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.glob("*/*.log")) == [
        "w1/1.log", "w2/1.log"], "past `keep` folders, the oldest files go, the item's too"
    assert not (tmp_path / "w0").exists()


def test_a_work_id_cannot_walk_out_of_the_directory(tmp_path: Path) -> None:
    assert attempt_path(tmp_path, "../../etc", 1).parent.parent == tmp_path


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCHER_")}
    env["DISPATCHER_SANDBOX_OUTPUT_DIR"] = str(tmp_path)
    return subprocess.run([sys.executable, "-m", "dispatcher.ops.cli", "output", *args],
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_operator_command_prints_each_attempt(tmp_path: Path) -> None:
    write_output(tmp_path, "work_1", 1, [b"first try\n"], max_bytes=1024, keep=10)
    write_output(tmp_path, "work_1", 2, [b"second try"], max_bytes=1024, keep=10)
    done = _cli(tmp_path, "work_1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"== attempt 1 ({tmp_path}/work_1/1.log) ==", "first try",
                                        f"== attempt 2 ({tmp_path}/work_1/2.log) ==", "second try"]
    only = json.loads(_cli(tmp_path, "work_1", "--attempt", "2", "--json").stdout)
    assert [(o["attempt"], o["output"]) for o in only] == [(2, "second try")]
    assert [n for n, _ in read_outputs(tmp_path, "work_1")] == [1, 2]


@pytest.mark.parametrize(("work_id", "code", "message"), [
    ("work_none", 4, "no output of work_none kept in"),
    ("..", 2, "WORK_ID must be"),
])
def test_the_operator_command_says_what_it_cannot_show(tmp_path: Path, work_id: str, code: int,
                                                       message: str) -> None:
    done = _cli(tmp_path, work_id)
    assert done.returncode == code and message in done.stderr
    assert len(done.stderr.splitlines()) == 1


# --- a process sandbox's output, as it runs -----------------------------------------------------

def test_a_live_file_is_cut_back_to_its_end_as_it_grows(tmp_path: Path) -> None:
    live = LiveOutput(tmp_path, "w", 1, max_bytes=1024, keep=10)
    written = b"".join(b"%06d\n" % n for n in range(2000))  # 14,000 bytes in 7-byte lines
    for start in range(0, len(written), 700):
        live.write(written[start:start + 700])
        assert live.path.stat().st_size < 2 * 1024 + len(TRUNCATED % 1024), "cut as it grows"
    live.close()
    kept = live.path.read_bytes()
    assert kept.startswith(TRUNCATED % 1024)
    assert written.endswith(kept[len(TRUNCATED % 1024):]), "the end, in order, nothing lost"
    assert len(kept) - len(TRUNCATED % 1024) >= 1024


def test_a_process_sandboxs_stdout_and_stderr_reach_its_attempts_file(tmp_path: Path) -> None:
    script = ("echo one; echo two >&2; sleep 0.2; echo three; "
              "(sleep 0.1; echo from a child) & wait")
    spec = SandboxSpec(argv=["/bin/sh", "-c", script], env={"PATH": os.environ["PATH"]},
                       stdin=b"{}", work_id="work_9", attempt=2)
    live = LiveOutput(tmp_path, "work_9", 2, max_bytes=1024, keep=10)
    sandbox = Sandbox.start(spec, output=live)
    assert sandbox.wait(10) == 0
    sandbox.kill_group()
    assert read_outputs(tmp_path, "work_9") == [(2, tmp_path / "work_9" / "2.log")]
    assert live.path.read_bytes() == b"one\ntwo\nthree\nfrom a child\n"
    assert live.path.stat().st_mode & 0o777 == 0o600


def test_a_sandbox_that_never_stops_writing_is_bounded_and_never_blocked(tmp_path: Path) -> None:
    """`yes` writes as fast as the pipe takes: the copier keeps up, the file stays bounded."""
    spec = SandboxSpec(argv=["/usr/bin/yes", "a line"], env={}, stdin=b"", work_id="w",
                       attempt=1)
    live = LiveOutput(tmp_path, "w", 1, max_bytes=4096, keep=10)
    sandbox = Sandbox.start(spec, output=live)
    assert sandbox.wait(1.0) is None
    sandbox.kill_group()
    kept = live.path.read_bytes()
    assert kept.startswith(TRUNCATED % 4096) and len(kept) < 2 * 4096 + 100
    assert b"a line\n" in kept[-20:], "the end of what it wrote"


def test_a_live_attempt_rotates_the_directory_when_it_ends_not_as_it_starts(
        tmp_path: Path) -> None:
    """The rotation reads every kept file's time: off the session's start path, at its end."""
    for number in range(3):
        write_output(tmp_path, f"w{number}", 1, [b"x"], max_bytes=1024, keep=3)
        os.utime(attempt_path(tmp_path, f"w{number}", 1), (number, number))
    live = LiveOutput(tmp_path, "w9", 1, max_bytes=1024, keep=3)
    assert len(list(tmp_path.glob("*/*.log"))) == 4, "nothing removed as the attempt starts"
    live.write(b"done\n")
    live.close()
    kept = sorted(p.parent.name for p in tmp_path.glob("*/*.log"))
    assert kept == ["w1", "w2", "w9"], "the oldest went once the attempt ended"
    assert not (tmp_path / "w0").exists()
