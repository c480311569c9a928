"""Confined process sandboxes: another user before exec, rlimits through prlimit, the checks."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import textwrap

import pytest

from dispatcher.session.confine import (
    Confinement,
    ConfinementError,
    can_switch_to,
    confined_argv,
    confinement_of,
    parse_rlimits,
    parse_user,
    popen_options,
)
from dispatcher.session.runtimes import _check_confinement
from dispatcher.session.sandbox import Sandbox, SandboxSpec
from dispatcher.settings import Settings, SettingsError

# A uid with no passwd entry: the kernel needs none, and no test host has one of its own.
SANDBOX_UID = 54321
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")


@pytest.mark.parametrize(("text", "limits"), [
    ("", ()),
    ("core=0", (("core", "0"),)),
    (" nofile=1024:4096 , as=unlimited", (("nofile", "1024:4096"), ("as", "unlimited"))),
])
def test_rlimits_are_prlimits_names_and_values(text: str, limits: tuple[object, ...]) -> None:
    assert parse_rlimits(text) == limits


@pytest.mark.parametrize(("text", "message"), [
    ("cores=0", "'cores' is not one of"),
    ("nofile=many", "is not name=soft\\[:hard\\]"),
    ("nofile", "is not name=soft\\[:hard\\]"),
])
def test_a_bad_rlimit_names_the_setting(text: str, message: str) -> None:
    with pytest.raises(ConfinementError, match="DISPATCHER_PROCESS_RLIMITS: .*" + message):
        parse_rlimits(text)


@pytest.mark.parametrize(("text", "ids"), [
    ("0", (0, 0)), ("root", (0, 0)), ("54321", (54321, 54321)), ("54321:100", (54321, 100)),
])
def test_a_user_is_a_name_a_uid_or_uid_and_gid(text: str, ids: tuple[int, int]) -> None:
    assert parse_user(text) == ids


@pytest.mark.parametrize("text", ["no-such-user-here", "root:0", "54321:staff"])
def test_a_bad_user_names_the_setting(text: str) -> None:
    with pytest.raises(ConfinementError, match="DISPATCHER_PROCESS_USER"):
        parse_user(text)


def test_limits_put_prlimit_before_the_command_and_no_limits_put_nothing() -> None:
    # Limits no test process holds itself (1 byte of core, 64 descriptors, soft and hard).
    limited = Confinement(rlimits=(("core", "1"), ("nofile", "64")), prlimit="/usr/bin/prlimit")
    assert confined_argv(["/bin/run", "-x"], limited) == [
        "/usr/bin/prlimit", "--core=1", "--nofile=64", "--", "/bin/run", "-x"]
    assert confined_argv(["/bin/run"], Confinement()) == ["/bin/run"]


def _as_prlimit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def test_a_limit_the_worker_holds_itself_is_inherited_not_set_again() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = f"{_as_prlimit(soft)}:{_as_prlimit(hard)}"
    both = Confinement(rlimits=(("nofile", held), ("core", "1")), prlimit="/usr/bin/prlimit")
    assert confined_argv(["/bin/run"], both) == [
        "/usr/bin/prlimit", "--core=1", "--", "/bin/run"], "only the limit not held"
    only_held = Confinement(rlimits=(("nofile", held),), prlimit="/usr/bin/prlimit")
    assert confined_argv(["/bin/run"], only_held) == ["/bin/run"], "no prlimit at all"


def test_a_worker_takes_its_sandboxes_core_limit_which_they_inherit() -> None:
    """In a process of its own: a lowered hard limit cannot be raised again."""
    script = textwrap.dedent("""
        import resource, subprocess
        from dispatcher.session.confine import adopt_core_limit, confined_argv, confinement_of
        confinement = confinement_of(None, "core=0,nofile=123")
        adopt_core_limit(confinement)
        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0), "soft and hard, as prlimit"
        argv = confined_argv(["sh", "-c", "ulimit -Hc; ulimit -n"], confinement)
        assert argv[1:] == ["--nofile=123", "--", "sh", "-c", "ulimit -Hc; ulimit -n"], argv
        print(subprocess.run(argv, capture_output=True, text=True).stdout.split())
    """)
    # Limits other than the core's need prlimit (util-linux, on every Debian): a machine
    # without it fails here, as its workers would at start with such limits set.
    assert shutil.which("prlimit") is not None, "util-linux prlimit is not installed"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['0', '123']", "core inherited, nofile set by prlimit"


def test_the_default_core_limit_confines_sandboxes_on_a_host_without_prlimit() -> None:
    """In a process of its own, with no prlimit on its PATH: the default (`core=0`) is taken
    by the worker and inherited by its sandbox."""
    script = textwrap.dedent("""
        import resource, subprocess
        from dispatcher.session.confine import adopt_core_limit, confined_argv, confinement_of
        confinement = confinement_of(None, "core=0")
        adopt_core_limit(confinement)
        argv = confined_argv(["/bin/sh", "-c", "ulimit -Hc"], confinement)
        assert argv[0] == "/bin/sh", argv
        print(subprocess.run(argv, capture_output=True, text=True).stdout.strip())
    """)
    env = {**os.environ, "PATH": "/nonexistent"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "0"


def test_a_switch_drops_the_workers_supplementary_groups() -> None:
    assert popen_options(Confinement(uid=5, gid=6)) == {
        "user": 5, "group": 6, "extra_groups": []}
    assert popen_options(Confinement()) == {}


@pytest.mark.parametrize(("cap_eff", "allowed"), [
    ("0000000000000000", False),   # an ordinary user
    ("0000000000000040", False),   # CAP_SETGID alone
    ("00000000000000c0", False),   # CAP_SETGID and CAP_SETUID, but the secret file stays ours
    ("00000000000000c1", True),    # and CAP_CHOWN
    ("000001ffffffffff", True),    # root's full set
])
def test_switching_needs_the_three_capabilities(cap_eff: str, allowed: bool) -> None:
    assert can_switch_to(SANDBOX_UID, SANDBOX_UID, status={"CapEff": cap_eff}) is allowed
    assert can_switch_to(os.geteuid(), os.getegid(), status={"CapEff": "0"}), "already them"


def test_a_worker_that_cannot_switch_is_refused_at_start_naming_the_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dispatcher.session.runtimes.can_switch_to", lambda uid, gid: False)
    settings = Settings(DISPATCHER_PROCESS_USER=str(SANDBOX_UID))  # type: ignore[call-arg]
    with pytest.raises(SettingsError, match="DISPATCHER_PROCESS_USER=54321: this worker cannot"):
        _check_confinement(settings)


def test_limits_without_prlimit_are_refused_naming_the_setting(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    confinement_of.cache_clear()
    try:
        with pytest.raises(ConfinementError, match="DISPATCHER_PROCESS_RLIMITS needs"):
            confinement_of(None, "core=0,nofile=123")
        assert confinement_of(None, "") == Confinement(), "no limits: prlimit not needed"
        # The default needs none: a session worker takes it itself (`adopt_core_limit`), and
        # its sandboxes inherit it (in a worker's own process: the test below).
        assert confinement_of(None, "core=0").rlimits == (("core", "0"),)
    finally:
        confinement_of.cache_clear()


def _run(script: str, confinement: Confinement, secret: str | None = None) -> int:
    spec = SandboxSpec(argv=["/bin/sh", "-c", script], env={"PATH": os.environ["PATH"]},
                       stdin=b"", secret_file=secret)
    sandbox = Sandbox.start(spec, confinement)
    try:
        code = sandbox.wait(20)
    finally:
        sandbox.kill_group()
    assert code is not None
    return code


@ROOT_ONLY
def test_a_sandbox_under_another_user_cannot_read_the_workers_environment() -> None:
    """The worker (this test process, root) holds the Redis URL and keys in its environment; a
    sandbox switched to another uid before exec is refused `/proc/<worker>/environ`, while the
    same command as the worker's own user reads it."""
    read = f"cat /proc/{os.getpid()}/environ > /dev/null 2>&1 || exit 13"
    other = Confinement(uid=SANDBOX_UID, gid=SANDBOX_UID)
    assert _run(f'[ "$(id -u):$(id -g)" = "{SANDBOX_UID}:{SANDBOX_UID}" ] || exit 2', other) == 0
    assert _run('[ -z "$(id -G | tr -d 0-9)" ] || exit 3', other) == 0, "one group, no others"
    assert _run(read, other) == 13, "permission denied"
    assert _run(read, Confinement()) == 0, "the worker's own user reads it: the test can fail"


@ROOT_ONLY
def test_the_work_secret_file_belongs_to_the_sandboxes_user() -> None:
    other = Confinement(uid=SANDBOX_UID, gid=SANDBOX_UID)
    script = '[ "$(cat "$ANTHROPIC_WORK_SECRET_FILE")" = s3cr3t ] || exit 4'
    assert _run(script, other, secret="s3cr3t") == 0


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="util-linux prlimit not installed")
def test_rlimits_bind_the_command_which_still_leads_its_group() -> None:
    limited = confinement_of(None, "core=0,nofile=123")
    script = ('[ "$(ulimit -c)" = 0 ] && [ "$(ulimit -n)" = 123 ] || exit 5; '
              '[ "$(ps -o pgid= -p $$ | tr -d " ")" = $$ ] || exit 6; exit 7')
    assert _run(script, limited) == 7, "limits set, prlimit exec'd into the group's leader"
