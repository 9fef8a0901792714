"""What every route shares: `ServeState` (the engine, the served name, the API key, the limits,
the optional retriever) and the checks that use it, free of any web framework."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field
from typing import Any

from hanlm.data.templates import prompt_ids
from hanlm.serve.engine import Engine
from hanlm.serve.errors import APIError
from hanlm.serve.sampling import Sampling

MAX_PROMPTS = 64  # prompts (or embedding inputs) in one request


@dataclass
class Limits:
    max_tokens: int = 2048  # cap on (and default of) max_tokens
    max_body_bytes: int = 1 << 20
    max_n: int = 8


@dataclass
class ServeState:
    """The served model and the server's settings; `create_app` keeps one in `app.state`.

    With a `retriever` (hanlm.rag.answer.Retriever), a chat request's last user turn is answered
    from retrieved passages."""

    engine: Engine
    model_name: str = "hanlm"
    api_key: str = ""  # empty: no key needed
    limits: Limits = field(default_factory=Limits)
    retriever: Any = None
    aliases: tuple[str, ...] = ()  # more names requests may use ("*": any name)
    demo_tools: bool = False  # the chat page offers the embedded demo tools (routes/toolbox.py)
    created: int = field(default_factory=lambda: int(time.time()))
    vocab: int = field(init=False)  # valid token ids: [0, vocab)

    def __post_init__(self) -> None:
        embeddings = self.engine.model.get_input_embeddings().weight.shape[0]
        self.vocab = min(len(self.engine.tok), embeddings)

    @property
    def tok(self) -> Any:
        return self.engine.tok

    @property
    def names(self) -> list[str]:
        """The model ids this server answers to, the served name first."""
        return [self.model_name, *(a for a in self.aliases if a not in ("*", self.model_name))]

    def model_id(self, name: str | None) -> str:
        """The id a request's `model` names (None: the served model), or OpenAI's 404."""
        if name is None or name in self.names or "*" in self.aliases:
            return name or self.model_name
        raise APIError(
            f"The model '{name}' does not exist: this server serves"
            f" {', '.join(repr(n) for n in self.names)} (add names with serve's aliases=...)",
            status=404,
            param="model",
            code="model_not_found",
        )

    def check_bias(self, bias: dict[int, float]) -> None:
        """A 400 for `logit_bias` token ids that the model has no logit for."""
        width = self.engine.logits_width
        bad = [t for t in bias if t >= width]
        if bad:
            raise APIError(
                f"'logit_bias' has token ids outside the vocabulary [0, {width}): {bad[:5]}",
                param="logit_bias",
            )

    async def constraint(self, response_format: Any) -> Any:
        """The compiled grammar of a chat request's `response_format` (json_object or
        json_schema); compiled off the event loop (a new schema over a large vocabulary takes
        a while)."""
        if response_format is None:
            return None
        spec = response_format.json_schema
        schema = spec.schema_ if spec is not None else None
        strict = bool(spec is not None and spec.strict)
        param = "response_format.json_schema.schema" if spec is not None else "response_format"
        if schema is not None:
            check_schema(schema, param)
        grammars = self.engine.grammars
        return await asyncio.to_thread(grammars.constraint, schema, strict, param=param)

    def check_auth(self, headers: Any) -> None:
        """401 unless the request carries `Authorization: Bearer KEY` (when a key is set)."""
        if not self.api_key:
            return
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), self.api_key):
            raise APIError(
                "invalid or missing API key: send 'Authorization: Bearer KEY'",
                status=401,
                code="invalid_api_key",
            )

    async def read_json(self, request: Any) -> Any:
        """The request's body as decoded JSON, whatever its content type; 413 past the limit
        (before reading, when the declared length says so)."""
        cap = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cap:
            raise APIError(
                f"request body of {declared} bytes exceeds the limit of {cap} (max_body_bytes)",
                status=413,
            )
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > cap:
                raise APIError(f"request body exceeds {cap} bytes", status=413)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None

    def encode(self, prompt: list[int] | str, key: str) -> list[int]:
        """A prompt as token ids: a string tokenized, a list of ids checked against the vocab."""
        if isinstance(prompt, str):
            return list(self.tok(prompt)["input_ids"])
        bad = [t for t in prompt if not 0 <= t < self.vocab]
        if bad:
            raise APIError(
                f"'{key}' has token ids outside the vocabulary [0, {self.vocab}): {bad[:5]}",
                param=key,
            )
        return prompt

    def chat_ids(
        self,
        messages: list[dict[str, Any]],
        generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """The chat template's token ids of `messages` (and `tools`), by default ending in the
        assistant turn's prompt (400 when the template refuses them: a role order it does not
        take, say)."""
        try:
            if generation_prompt:
                return prompt_ids(self.tok, messages, tools=tools)
            out = self.tok.apply_chat_template(
                messages, tools=tools, tokenize=True, return_dict=True
            )
            return list(out["input_ids"])
        except Exception as e:
            raise APIError(
                f"the chat template cannot render these messages: {e}", param="messages"
            ) from None

    def fit(self, s: Sampling, prompt_len: int, key: str, generate: bool = True) -> Sampling:
        """Bound max_tokens by the cap and by the room the context leaves after the prompt
        (a prompt that leaves no room for the answer it asks for is an error)."""
        context = self.engine.context
        if prompt_len == 0:
            raise APIError(f"'{key}' is empty", param=key)
        if prompt_len > context or (generate and prompt_len == context):
            raise APIError(
                f"the prompt is {prompt_len} tokens, longer than the model's context of"
                f" {context} tokens",
                param=key,
                code="context_length_exceeded",
            )
        s.max_tokens = min(s.max_tokens, self.limits.max_tokens, context - prompt_len)
        return s

    def check_count(self, items: list[Any], key: str) -> None:
        if len(items) > MAX_PROMPTS:
            what = "prompts" if key == "prompt" else "inputs"
            raise APIError(f"at most {MAX_PROMPTS} {what} per request", param=key)


def check_schema(schema: dict[str, Any], param: str) -> None:
    """A 400 naming `param` for a JSON schema that its own metaschema rejects."""
    try:
        from jsonschema import SchemaError, validators
    except ImportError:  # xgrammar still refuses what it cannot compile
        return
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as e:
        raise APIError(f"'{param}' is not a valid JSON schema: {e.message}", param=param) from None


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
