"""The environments a fleet serves: the TOML file, the two variables, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from dispatcher.settings import Settings, SettingsError, load_settings

KEY_A = "sk-ant-oat01-aaaaaaaaaaaaaaaa"
KEY_B = "sk-ant-oat01-bbbbbbbbbbbbbbbb"


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ANTHROPIC_ENVIRONMENT_ID", "ANTHROPIC_ENVIRONMENT_KEY",
                 "DISPATCHER_ENVIRONMENTS_FILE", "DISPATCHER_SESSION_QUEUES"):
        monkeypatch.delenv(name, raising=False)


def _file(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "environments.toml"
    path.write_text(text)
    return load_settings(DISPATCHER_ENVIRONMENTS_FILE=str(path),
                         DISPATCHER_SESSION_QUEUES="dispatcher.sessions,dispatcher.gpu")


def test_the_two_variables_still_name_one_environment() -> None:
    settings = load_settings(ANTHROPIC_ENVIRONMENT_ID="env_1", ANTHROPIC_ENVIRONMENT_KEY=KEY_A)
    (only,) = settings.require_environments()
    assert (only.id, only.key.get_secret_value(), only.max_sessions, only.queue) == (
        "env_1", KEY_A, None, None)
    environment_id, key = settings.require_worker()
    assert (environment_id, key.get_secret_value()) == ("env_1", KEY_A)


def test_a_file_lists_environments_with_keys_inline_or_in_files(tmp_path: Path) -> None:
    (tmp_path / "b.key").write_text(KEY_B + "\n")  # as `echo` and editors leave it
    (tmp_path / "b.key").chmod(0o600)
    settings = _file(tmp_path, f"""
[[environment]]
id = "env_a"
key = "{KEY_A}"
max_sessions = 3

[[environment]]
id = "env_b"
key_file = "b.key"
queue = "dispatcher.gpu"
""")
    a, b = settings.require_environments()
    assert (a.id, a.key.get_secret_value(), a.max_sessions, a.queue) == (
        "env_a", KEY_A, 3, None)
    assert (b.id, b.key.get_secret_value(), b.max_sessions, b.queue) == (
        "env_b", KEY_B, None, "dispatcher.gpu")
    assert settings.environment("env_b") is b
    with pytest.raises(SettingsError, match="env_c is not one this fleet serves"):
        settings.environment("env_c")
    with pytest.raises(SettingsError, match="several environments"):
        settings.require_worker()
    assert KEY_A not in repr(a) and KEY_B not in repr(settings.environments())


@pytest.mark.parametrize(("body", "message"), [
    ('id = "env_a"', "exactly one of key and key_file"),
    (f'id = "env_a"\nkey = "{KEY_A}"\nkey_file = "x"', "exactly one of key and key_file"),
    (f'id = "env_a"\nkey = "{KEY_A} "', "the key contains whitespace"),
    ('id = "env_a"\nkey_file = "missing.key"', "cannot be read"),
    (f'id = "../x"\nkey = "{KEY_A}"', "entry 1: id"),
    (f'id = "env_a"\nkey = "{KEY_A}"\nmax_sessions = 0', "entry 1: max_sessions"),
    (f'id = "env_a"\nkey = "{KEY_A}"\nqueue = "nobody.consumes"', "not one of DISPATCHER_"),
    (f'id = "env_a"\nkey = "{KEY_A}"\nslots = 3', "entry 1: slots"),
    (f'id = "env_a"\nkey = "{KEY_A}"\nmax_session_seconds = -1', "entry 1: max_session_seconds"),
    (f'id = "env_a"\nkey = "{KEY_A}"\nmax_session_seconds = "1h"',
     "entry 1: max_session_seconds"),
])
def test_a_wrong_entry_is_refused_naming_it_never_the_key(tmp_path: Path, body: str,
                                                          message: str) -> None:
    settings = _file(tmp_path, f"[[environment]]\n{body}\n")
    with pytest.raises(SettingsError, match=r"^DISPATCHER_ENVIRONMENTS_FILE is invalid") as caught:
        settings.require_environments()
    assert message in str(caught.value)
    assert KEY_A not in str(caught.value) and "\n" not in str(caught.value)


def test_a_key_file_with_more_than_one_line_ending_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.key").write_text(KEY_A + "\n\n")
    (tmp_path / "a.key").chmod(0o400)
    settings = _file(tmp_path, '[[environment]]\nid = "env_a"\nkey_file = "a.key"\n')
    with pytest.raises(SettingsError, match="the key contains whitespace"):
        settings.require_environments()


@pytest.mark.parametrize("text", ["", "environment = 1", "[other]\nx = 1", "not toml ["])
def test_a_file_without_environments_is_refused(tmp_path: Path, text: str) -> None:
    with pytest.raises(SettingsError, match=r"^DISPATCHER_ENVIRONMENTS_FILE is invalid"):
        _file(tmp_path, text).require_environments()


def test_an_id_listed_twice_is_refused(tmp_path: Path) -> None:
    entry = f'[[environment]]\nid = "env_a"\nkey = "{KEY_A}"\n'
    with pytest.raises(SettingsError, match="env_a is listed twice"):
        _file(tmp_path, entry + entry).require_environments()


def test_the_file_and_the_variables_are_never_both_used(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_ENVIRONMENT_ID", "env_1")
    settings = _file(tmp_path, f'[[environment]]\nid = "env_a"\nkey = "{KEY_A}"\n')
    with pytest.raises(SettingsError, match="both set"):
        settings.require_environments()


def test_processes_that_need_no_environment_never_read_the_file(tmp_path: Path) -> None:
    """Beat and Flower load the settings too; a file they cannot read must not stop them."""
    settings = load_settings(DISPATCHER_ENVIRONMENTS_FILE=str(tmp_path / "absent.toml"))
    assert settings.environments_file is not None
    with pytest.raises(SettingsError, match="cannot be read"):
        settings.require_environments()


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o444])
def test_a_key_file_open_to_its_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    (tmp_path / "a.key").write_text(KEY_A + "\n")
    (tmp_path / "a.key").chmod(mode)
    settings = _file(tmp_path, '[[environment]]\nid = "env_a"\nkey_file = "a.key"\n')
    with pytest.raises(SettingsError) as caught:
        settings.require_environments()
    message = str(caught.value)
    assert message == (f"DISPATCHER_ENVIRONMENTS_FILE is invalid: environment env_a: key_file "
                       f"{str(tmp_path / 'a.key')!r} is open to its group or others "
                       f"(mode {mode:04o}): make it 0600 or 0400")
    assert KEY_A not in message


@pytest.mark.parametrize("key", ["sk-ant-oat01-caf\u00e9", "sk-ant-oat01-\u2013dash",
                                 "sk-ant-oat01-\u00a0nbsp"])
def test_a_key_outside_printable_ascii_is_refused_in_the_file(tmp_path: Path, key: str) -> None:
    (tmp_path / "a.key").write_text(key, encoding="utf-8")
    (tmp_path / "a.key").chmod(0o600)
    for body in (f'id = "env_a"\nkey = "{key}"', 'id = "env_a"\nkey_file = "a.key"'):
        settings = _file(tmp_path, f"[[environment]]\n{body}\n")
        with pytest.raises(SettingsError, match="a non-ASCII character") as caught:
            settings.require_environments()
        assert key not in str(caught.value)


def test_an_environment_may_have_its_own_maximum_session_duration(tmp_path: Path) -> None:
    """Its own (0: none for it), or the fleet's when it names none."""
    from dispatcher.session.attempt import _max_duration

    settings = _file(tmp_path, f"""
[[environment]]
id = "env_a"
key = "{KEY_A}"
max_session_seconds = 3600

[[environment]]
id = "env_b"
key = "{KEY_B}"
max_session_seconds = 0

[[environment]]
id = "env_c"
key = "{KEY_B}"
""")
    fleet = settings.model_copy(update={"max_session_seconds": 600.0})
    assert [_max_duration(fleet, e) for e in ("env_a", "env_b", "env_c")] == [3600, 0, 600]
    assert _max_duration(settings, "env_c") == 0, "no limit by default"
