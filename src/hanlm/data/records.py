"""The error a record that does not fit its format raises, and how a record's values are
described in it (shared by the format converters and the tool-call checks)."""

from __future__ import annotations

from typing import Any


class RecordError(ValueError):
    """One record does not fit its format."""


def describe(value: Any) -> str:
    if isinstance(value, str):
        return f"string {value[:40]!r}" if value else "an empty string"
    if value is None:
        return "null"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)[:8]}"
    return f"{type(value).__name__} {value!r}"
