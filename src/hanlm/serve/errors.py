"""OpenAI-shaped errors: `APIError`, and the 400 that a body failing validation gets.

Pure Python (no web framework): the engine raises `APIError` too (a full queue is a 429).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

# pydantic error types whose own message names a Python class instead of the JSON shape wanted
_OBJECT_TYPES = {"model_type", "model_attributes_type", "dict_type"}
_SOURCES = {"body", "query", "path", "header", "cookie"}  # where FastAPI found a parameter


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with `status`."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = (
            message,
            status,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def param_of(loc: Sequence[str | int]) -> str | None:
    """A validation error's location as OpenAI names a field: `messages[0].role`; None for the
    body itself. FastAPI's leading source (`"body"`, `"query"`, ...) is dropped."""
    if loc and loc[0] in _SOURCES:
        loc = loc[1:]
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f"{'.' if out else ''}{part}"
    return out or None


def invalid_body(errors: Sequence[dict[str, Any]]) -> APIError:
    """The 400 for a body that failed validation (pydantic's or FastAPI's error list): the first
    error, naming its field in `param` and in the message."""
    if not errors:
        return APIError("invalid request body")
    error = errors[0]
    kind, msg = error.get("type", ""), error.get("msg", "invalid value")
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", msg)
        return APIError(f"the request body is not valid JSON: {detail}")
    param = param_of(error.get("loc", ()))
    if kind == "extra_forbidden":
        return APIError(
            f"Unrecognized request argument supplied: '{param}' (this server does not know it)",
            param=param,
            code="unknown_parameter",
        )
    if kind in _OBJECT_TYPES:
        if param is None:
            return APIError("the request body must be a JSON object")
        msg = "Input should be a JSON object"
    if param is None:
        return APIError(f"invalid request body: {msg}")
    value = error.get("input")
    shown = json.dumps(value, ensure_ascii=False) if _scalar(value) else ""
    got = f" (got {shown})" if shown and len(shown) <= 60 and kind != "missing" else ""
    return APIError(f"'{param}': {msg}{got}", param=param)


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))
