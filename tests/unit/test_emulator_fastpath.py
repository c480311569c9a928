"""Which requests the emulator's fast path reads itself, and which it hands on to FastAPI: the
rules, as tables (the answers of both are compared over HTTP in
`tests/integration/test_emulator_fast_path.py`)."""

from __future__ import annotations

from typing import Any

import pytest

from dispatcher.emulator.fastpath import _HandOn, _number, _plain_query, _session_fields

_BEAT = frozenset({"expected_last_heartbeat", "desired_ttl_seconds"})


@pytest.mark.parametrize(("query", "names", "expected"), [
    (b"", frozenset(), {}),
    (b"expected_last_heartbeat=t&desired_ttl_seconds=30", _BEAT,
     {"expected_last_heartbeat": "t", "desired_ttl_seconds": "30"}),
    (b"expected_last_heartbeat=a%2Bb", _BEAT, {"expected_last_heartbeat": "a+b"}),
    (b"expected_last_heartbeat=", _BEAT, {"expected_last_heartbeat": ""}),
    (b"expected_last_heartbeat=t&expected_last_heartbeat=t", _BEAT, None),  # repeated
    (b"routed=1", _BEAT, None),  # a parameter the route does not name
    (b"x=1", frozenset(), None),
])
def test_a_query_is_read_only_when_the_route_names_each_parameter_once(
        query: bytes, names: frozenset[str], expected: dict[str, str] | None) -> None:
    assert _plain_query({"query_string": query}, names) == expected


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("0", 0), ("30", 30), ("007", 7), ("99999999999999999999", 10**20 - 1),
    ("-1", _HandOn), ("+1", _HandOn), (" 5", _HandOn), ("5.0", _HandOn), ("", _HandOn),
    ("٣", _HandOn),  # a digit, but not an ASCII one
])
def test_a_number_is_plain_digits_or_fastapis_to_judge(value: str | None, expected: Any) -> None:
    query = {} if value is None else {"n": value}
    if expected is _HandOn:
        with pytest.raises(_HandOn):
            _number(query, "n")
    else:
        assert _number(query, "n") == expected


_JSON = [(b"content-type", b"application/json")]


@pytest.mark.parametrize(("headers", "body", "expected"), [
    (_JSON, b'{"environment_id": "e"}', ("e", None, None)),
    ([], b'{"environment_id": "e", "agent": "a", "metadata": {"k": "v"}, "x": 1}',
     ("e", "a", {"k": "v"})),
    (_JSON, b'{"environment_id": "e", "emulator_script": null}', ("e", None, None)),
    (_JSON, b'{"environment_id": "e", "metadata": null}', ("e", None, None)),
    ([(b"content-type", b"application/json; charset=utf-8")], b'{"environment_id": "e"}',
     None),
    ([(b"content-type", b"text/plain")], b'{"environment_id": "e"}', None),
    (_JSON, b"", None), (_JSON, b"{", None), (_JSON, b"[]", None), (_JSON, b"{}", None),
    (_JSON, b'{"environment_id": 1}', None),
    (_JSON, b'{"environment_id": "e", "metadata": {"k": null}}', None),
    (_JSON, b'{"environment_id": "e", "metadata": {"k": 1}}', None),
    (_JSON, b'{"environment_id": "e", "metadata": ["k"]}', None),
    (_JSON, b'{"environment_id": "e", "emulator_script": []}', None),
])
def test_a_creation_body_is_read_only_when_plain(
        headers: list[tuple[bytes, bytes]], body: bytes, expected: Any) -> None:
    assert _session_fields({"headers": headers}, body) == expected
