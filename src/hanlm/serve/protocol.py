"""Request bodies of the OpenAI API read into typed records, and OpenAI-shaped errors.

Bodies are read by hand rather than by pydantic models: OpenAI ignores fields it does not know
(clients send `user`, `logit_bias`, vendor extensions), and a type error must come back as
OpenAI's `{"error": {...}}` with status 400 naming the field, never a framework's 422.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy decoding
ROLES = ("system", "user", "assistant", "developer", "tool")


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


@dataclass
class Sampling:
    """How one request is decoded; `route()` says which engine path can honour it."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    guidance_scale: float = 1.0
    negative_ids: list[int] | None = None  # CFG's unconditional prompt (None = last prompt token)
    n: int = 1
    logprobs: int | None = None  # None = off; k = how many alternatives per token
    stop: list[str] = field(default_factory=list)

    def route(self, truncation: bool = False) -> str:
        """'batch' (continuous batching) or 'generate' (`model.generate` on the worker).

        The continuous-batching manager takes the temperature per request (and top-k/top-p
        when its warpers are on: `truncation`); it has no per-request seed, penalties, guidance
        (it refuses negative prompts), log-probs of the unprocessed distribution, or several
        answers per prompt.
        """
        truncated = self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)
        plain = (
            self.seed is None
            and self.presence_penalty == 0
            and self.frequency_penalty == 0
            and self.repetition_penalty == 1
            and self.guidance_scale == 1
            and self.n == 1
            and self.logprobs is None
            and (truncation or not truncated)
        )
        return "batch" if plain else "generate"


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    negative_prompt: str = ""
    max_tokens_given: bool = False


@dataclass
class CompletionRequest:
    prompts: list[list[int] | str]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    max_tokens_given: bool = False


@dataclass
class EmbeddingRequest:
    inputs: list[list[int] | str]
    encoding_format: str = "float"
    dimensions: int | None = None


# --------------------------------------------------------------------------- field readers

_MISSING = object()


def _num(body: dict[str, Any], key: str, kind: type, lo: float, hi: float, default: Any) -> Any:
    value = body.get(key, _MISSING)
    if value is _MISSING or value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and ok and isinstance(value, float) and not value.is_integer():
        ok = False
    if not ok:
        raise APIError(f"'{key}' must be a {kind.__name__}, got {value!r}", param=key)
    if not lo <= value <= hi:
        raise APIError(f"'{key}' must be between {lo} and {hi}, got {value!r}", param=key)
    return kind(value)


def _bool(body: dict[str, Any], key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(f"'{key}' must be true or false, got {value!r}", param=key)
    return value


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError("'stop' must be a string or a list of strings", param="stop")
    if len(stop) > 16:
        raise APIError("'stop' takes at most 16 strings", param="stop")
    return [s for s in stop if s]


def _include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise APIError("'stream_options' must be an object", param="stream_options")
    return _bool(opts, "include_usage")


def _max_tokens(body: dict[str, Any], keys: tuple[str, ...], lo: int, cap: int) -> tuple[int, bool]:
    for key in keys:
        if body.get(key) is not None:
            return _num(body, key, int, lo, 1 << 31, 0), True
    return cap, False


def _sampling(body: dict[str, Any], max_tokens: int, max_n: int) -> Sampling:
    top_k = _num(body, "top_k", int, -1, 1 << 31, 0)
    temperature = _num(body, "temperature", float, 0.0, 2.0, 1.0)
    if temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow to inf and NaN: greedy
        temperature = 0.0
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=_num(body, "top_p", float, 0.0, 1.0, 1.0) or 1.0,
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 both mean off
        seed=_num(body, "seed", int, -(1 << 63), (1 << 63) - 1, None),
        presence_penalty=_num(body, "presence_penalty", float, -2.0, 2.0, 0.0),
        frequency_penalty=_num(body, "frequency_penalty", float, -2.0, 2.0, 0.0),
        repetition_penalty=_num(body, "repetition_penalty", float, 0.01, 10.0, 1.0),
        guidance_scale=_num(body, "guidance_scale", float, 0.0, 20.0, 1.0),
        n=_num(body, "n", int, 1, max_n, 1),
        stop=_stop(body),
    )


def _content(message: dict[str, Any], i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise APIError(
                    f"messages[{i}].content: only text parts are supported",
                    param=f"messages[{i}].content",
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    raise APIError(f"messages[{i}].content must be a string", param=f"messages[{i}].content")


def parse_chat(body: Any, max_tokens: int, max_n: int) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise APIError("'messages' must be a non-empty list", param="messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(
                f"messages[{i}] needs a 'role' of {', '.join(ROLES)}", param=f"messages[{i}].role"
            )
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": _content(m, i)})
    tokens, given = _max_tokens(body, ("max_completion_tokens", "max_tokens"), 1, max_tokens)
    sampling = _sampling(body, tokens, max_n)
    if _bool(body, "logprobs"):
        sampling.logprobs = _num(body, "top_logprobs", int, 0, 20, 0)
    elif body.get("top_logprobs") is not None:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    negative = body.get("negative_prompt") or ""
    if not isinstance(negative, str):
        raise APIError("'negative_prompt' must be a string", param="negative_prompt")
    return ChatRequest(
        messages=messages,
        sampling=sampling,
        stream=_bool(body, "stream"),
        include_usage=_include_usage(body),
        negative_prompt=negative,
        max_tokens_given=given,
    )


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _inputs(value: Any, key: str) -> list[list[int] | str]:
    """A string, a list of strings, a list of token ids or a list of such lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if _is_ids(value):
            return [value]
        if all(isinstance(v, str) for v in value):
            return list(value)
        if all(_is_ids(v) and v for v in value):
            return [list(v) for v in value]
    raise APIError(
        f"'{key}' must be a string, a list of strings, a list of token ids or a list of"
        " lists of token ids (none empty)",
        param=key,
    )


def parse_completion(body: Any, max_tokens: int, max_n: int) -> CompletionRequest:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    prompts = _inputs(body.get("prompt"), "prompt")
    tokens, given = _max_tokens(body, ("max_tokens",), 0, min(max_tokens, 16))
    sampling = _sampling(body, tokens, max_n)
    sampling.logprobs = _num(body, "logprobs", int, 0, 20, None)
    echo = _bool(body, "echo")
    if tokens == 0 and not echo:
        raise APIError("'max_tokens' may be 0 only with 'echo': true", param="max_tokens")
    return CompletionRequest(
        prompts=prompts,
        sampling=sampling,
        stream=_bool(body, "stream"),
        include_usage=_include_usage(body),
        echo=echo,
        max_tokens_given=given,
    )


def parse_embedding(body: Any) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise APIError("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    return EmbeddingRequest(
        inputs=_inputs(body.get("input"), "input"),
        encoding_format=fmt,
        dimensions=_num(body, "dimensions", int, 1, 1 << 20, None),
    )


# JSON Schemas of the bodies, for the OpenAPI document (clients and schemathesis read them).
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_INPUT = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        _IDS,
        {"type": "array", "items": _IDS, "minItems": 1},
    ]
}
_SAMPLING = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": -1},
    "n": {"type": "integer", "minimum": 1},
    "seed": {"type": "integer"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "repetition_penalty": {"type": "number", "minimum": 0.01, "maximum": 10},
    "guidance_scale": {"type": "number", "minimum": 0, "maximum": 20},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object", "properties": {"include_usage": {"type": "boolean"}}},
    "model": {"type": "string"},
}
SCHEMAS: dict[str, dict[str, Any]] = {
    "chat": {
        "type": "object",
        "required": ["messages"],
        "properties": {
            "messages": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["role", "content"],
                    "properties": {
                        "role": {"enum": list(ROLES)},
                        "content": {"type": "string"},
                    },
                },
            },
            "max_tokens": {"type": "integer", "minimum": 1},
            "max_completion_tokens": {"type": "integer", "minimum": 1},
            "logprobs": {"type": "boolean"},
            "top_logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
            "negative_prompt": {"type": "string"},
            **_SAMPLING,
        },
    },
    "completion": {
        "type": "object",
        "required": ["prompt"],
        "properties": {
            "prompt": _INPUT,
            "max_tokens": {"type": "integer", "minimum": 0},
            "echo": {"type": "boolean"},
            "logprobs": {"type": "integer", "minimum": 0, "maximum": 20},
            **_SAMPLING,
        },
    },
    "embedding": {
        "type": "object",
        "required": ["input"],
        "properties": {
            "input": _INPUT,
            "encoding_format": {"enum": ["float", "base64"]},
            "model": {"type": "string"},
        },
    },
    "tokenize": {
        "type": "object",
        "properties": {
            "prompt": {"type": "string"},
            "messages": {"type": "array", "items": {"type": "object"}},
            "add_special_tokens": {"type": "boolean"},
            "add_generation_prompt": {"type": "boolean"},
        },
    },
    "detokenize": {
        "type": "object",
        "required": ["tokens"],
        "properties": {"tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}}},
    },
}
