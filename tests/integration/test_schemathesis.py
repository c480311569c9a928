"""Schemathesis against the emulator's own OpenAPI document: a few generated requests per
operation, with the environment key and with the organisation key. The emulator never answers
5xx (no faults are on) and every answer matches the document's declared statuses and shapes."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

pytestmark = pytest.mark.integration


def _check(case: Any, emulator: Any) -> None:
    for headers in (emulator.env_headers, emulator.org_headers):
        response = case.call(headers={**headers, "anthropic-version": "2023-06-01",
                                      "anthropic-beta": "managed-agents-2026-04-01"})
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")
        case.validate_response(response, checks=[content_type_conformance,
                                                 response_schema_conformance])


def test_the_emulator_keeps_its_own_document(emulator: Any) -> None:
    # Schemathesis' own pytest plugin does not run under this pytest (it reads a private
    # `_nodeid`), so each operation's strategy is driven by a plain hypothesis test.
    schema = schemathesis.openapi.from_url(f"{emulator.base_url}/openapi.json")
    schema.config.base_url = emulator.base_url
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, "every Work API endpoint is in the document"
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=4, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            _check(case, emulator)

        check()
