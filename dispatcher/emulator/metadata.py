"""Work item metadata: merge semantics (`null` deletes) and the emulator's limits."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .config import MAX_METADATA_KEY_CHARS, MAX_METADATA_KEYS, MAX_METADATA_VALUE_CHARS
from .errors import InvalidRequest

__all__ = ["merge"]


def merge(current: Mapping[str, str], patch: Any) -> dict[str, str]:
    """`current` with `patch` applied: a string upserts its key, `None` deletes it."""
    if not isinstance(patch, dict):
        raise InvalidRequest("metadata: expected an object of string or null values")
    merged = dict(current)
    for key, value in patch.items():
        _check_key(key)
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, str):
            _check_value(key, value)
            merged[key] = value
        else:
            raise InvalidRequest(f"metadata.{key}: expected a string or null")
    if len(merged) > MAX_METADATA_KEYS:
        raise InvalidRequest(
            f"metadata: at most {MAX_METADATA_KEYS} keys (this update would make {len(merged)})")
    return merged


def _check_key(key: str) -> None:
    if not key:
        raise InvalidRequest("metadata: keys must not be empty")
    if len(key) > MAX_METADATA_KEY_CHARS:
        raise InvalidRequest(
            f"metadata: key {key[:16]!r}... is longer than {MAX_METADATA_KEY_CHARS} characters")


def _check_value(key: str, value: str) -> None:
    if len(value) > MAX_METADATA_VALUE_CHARS:
        raise InvalidRequest(
            f"metadata.{key}: value is longer than {MAX_METADATA_VALUE_CHARS} characters")
