"""Request bodies of the OpenAI API as pydantic models, and the records the handlers use.

The models keep OpenAI's rules: fields they do not name are ignored (clients send `user`,
`logit_bias`, vendor extensions), `null` means the default, and numbers are JSON numbers (never
strings or booleans; an integer field takes 2.0 but not 2.5). `parse_chat`, `parse_completion`
and `parse_embedding` validate a decoded JSON body and then apply the rules that need the
server's limits or several fields at once; every failure is an `APIError` (400) naming the field
in `param`. The models' JSON Schemas are the request bodies of the OpenAPI document.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    StrictBool,
    StrictInt,
    ValidationError,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from hanlm.serve.errors import APIError, invalid_body
from hanlm.serve.sampling import Sampling

MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy decoding
MAX_STOP = 16  # stop strings per request
Role = Literal["system", "user", "assistant", "developer", "tool"]
ROLES: tuple[str, ...] = get_args(Role)

# --------------------------------------------------------------------------- field types


def _number(kind: type) -> Callable[[Any], Any]:
    """A JSON number as `kind`: no strings or booleans, and an integer only if whole."""
    name = "an integer" if kind is int else "a number"

    def check(value: Any) -> Any:
        if value is None:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and ok and isinstance(value, float) and not value.is_integer():
            ok = False
        if not ok:
            raise PydanticCustomError("number_type", f"Input should be {name}")
        return kind(value)

    return check


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise PydanticCustomError("stop_type", "Input should be a string or a list of strings")
    if len(value) > MAX_STOP:
        raise PydanticCustomError("too_long", f"Input should have at most {MAX_STOP} strings")
    return [s for s in value if s]


def _text(value: Any) -> str:
    """A message's content: a string, or a list of text parts (`[{"type": "text", ...}]`)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" for p in value):
            raise PydanticCustomError("content_type", "only text parts are supported")
        return "".join(str(p.get("text", "")) for p in value)
    raise PydanticCustomError("content_type", "Input should be a string or a list of text parts")


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _inputs(value: Any) -> list[list[int] | str]:
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
    raise PydanticCustomError(
        "input_type",
        "Input should be a string, a list of strings, a list of token ids or a list of lists"
        " of token ids (none empty)",
    )


_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_TEXT_PART = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}

Float = Annotated[float | None, BeforeValidator(_number(float))]
Int = Annotated[int | None, BeforeValidator(_number(int))]
Bool = StrictBool | None
Stop = Annotated[
    list[str],
    BeforeValidator(_stop),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP},
                {"type": "null"},
            ]
        }
    ),
]
Content = Annotated[
    str,
    BeforeValidator(_text),
    WithJsonSchema(
        {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]}
    ),
]
Inputs = Annotated[
    list[list[int] | str],
    PlainValidator(_inputs),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
                _IDS,
                {"type": "array", "items": _IDS, "minItems": 1},
            ]
        }
    ),
]
# null and "" mean the default, as OpenAI's clients send them
NegativePrompt = Annotated[str, BeforeValidator(lambda v: v or "")]
EncodingFormat = Annotated[Literal["float", "base64"], BeforeValidator(lambda v: v or "float")]
MAX_COUNT = 1 << 31

# --------------------------------------------------------------------------- bodies


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown fields are ignored, as OpenAI does

    model: str | None = None  # one model is served: any name will do


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Role
    content: Content = ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: Bool = None


class SampledBody(Body):
    """Decoding fields of chat and text completions: OpenAI's, vLLM's `top_k` and
    `repetition_penalty`, and `guidance_scale` (classifier-free guidance)."""

    temperature: Float = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: Float = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_k: Int = Field(None, ge=-1, le=MAX_COUNT, description="-1 or 0: off")
    seed: Int = Field(None, ge=-(1 << 63), le=(1 << 63) - 1)
    presence_penalty: Float = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: Float = Field(None, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: Float = Field(None, ge=0.01, le=10, allow_inf_nan=False)
    guidance_scale: Float = Field(None, ge=0, le=20, allow_inf_nan=False)
    n: Int = Field(None, ge=1, description="at most the server's max_n")
    stop: Stop = Field(default_factory=list)
    stream: Bool = None
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options is not None and self.stream_options.include_usage)

    def sampling(self, max_tokens: int, max_n: int) -> Sampling:
        n = 1 if self.n is None else self.n
        if n > max_n:
            raise APIError(f"'n' must be between 1 and {max_n}, got {n}", param="n")
        temperature = 1.0 if self.temperature is None else self.temperature
        if temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow to inf and NaN: greedy
            temperature = 0.0
        return Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=self.top_p or 1.0,
            top_k=max(self.top_k or 0, 0),  # -1 (vLLM's "off") and 0 both mean off
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=_default(self.repetition_penalty, 1.0),
            guidance_scale=_default(self.guidance_scale, 1.0),
            n=n,
            stop=self.stop,
        )


class ChatCompletionBody(SampledBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int = Field(None, ge=1, le=MAX_COUNT)
    max_tokens: Int = Field(None, ge=1, le=MAX_COUNT, description="max_completion_tokens' old name")
    logprobs: Bool = None
    top_logprobs: Int = Field(None, ge=0, le=20, description="needs logprobs: true")
    negative_prompt: NegativePrompt = Field("", description="guidance's unconditional prompt")


class CompletionBody(SampledBody):
    prompt: Inputs
    max_tokens: Int = Field(None, ge=0, le=MAX_COUNT, description="0 only with echo: true")
    echo: Bool = None
    logprobs: Int = Field(None, ge=0, le=20)


class EmbeddingBody(Body):
    input: Inputs
    encoding_format: EncodingFormat = "float"
    dimensions: Int = Field(None, ge=1, le=1 << 20, description="the model's hidden size")


class TokenizeBody(Body):
    """`prompt` (or its alias `text`) as a string, or chat `messages` through the template."""

    prompt: str | None = None
    text: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: Bool = None
    add_generation_prompt: Bool = None


class DetokenizeBody(Body):
    tokens: list[StrictInt]


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


# --------------------------------------------------------------------------- records


@dataclass
class ChatRequest:
    messages: list[dict[str, str]]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    negative_prompt: str = ""


@dataclass
class CompletionRequest:
    prompts: list[list[int] | str]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    echo: bool = False


@dataclass
class EmbeddingRequest:
    inputs: list[list[int] | str]
    encoding_format: str = "float"
    dimensions: int | None = None


B = TypeVar("B", bound=BaseModel)


def validate(model: type[B], body: Any) -> B:
    """`body` (decoded JSON) as `model`, or the 400 naming the first field that failed."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise invalid_body(e.errors(include_url=False)) from None


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """Messages as the chat template takes them (`developer` is OpenAI's newer `system`)."""
    return [
        {"role": "system" if m.role == "developer" else m.role, "content": m.content}
        for m in messages
    ]


def parse_chat(body: Any, max_tokens: int, max_n: int) -> ChatRequest:
    b = validate(ChatCompletionBody, body)
    given = b.max_completion_tokens if b.max_completion_tokens is not None else b.max_tokens
    sampling = b.sampling(max_tokens if given is None else given, max_n)
    if b.logprobs:
        sampling.logprobs = b.top_logprobs or 0
    elif b.top_logprobs is not None:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return ChatRequest(
        messages=chat_messages(b.messages),
        sampling=sampling,
        stream=bool(b.stream),
        include_usage=b.include_usage,
        negative_prompt=b.negative_prompt,
    )


def parse_completion(body: Any, max_tokens: int, max_n: int) -> CompletionRequest:
    b = validate(CompletionBody, body)
    tokens = min(max_tokens, 16) if b.max_tokens is None else b.max_tokens
    sampling = b.sampling(tokens, max_n)
    sampling.logprobs = b.logprobs
    if tokens == 0 and not b.echo:
        raise APIError("'max_tokens' may be 0 only with 'echo': true", param="max_tokens")
    return CompletionRequest(
        prompts=b.prompt,
        sampling=sampling,
        stream=bool(b.stream),
        include_usage=b.include_usage,
        echo=bool(b.echo),
    )


def parse_embedding(body: Any) -> EmbeddingRequest:
    b = validate(EmbeddingBody, body)
    return EmbeddingRequest(b.input, b.encoding_format, b.dimensions)


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """An OpenAPI `requestBody` for `model` (its JSON Schema, nested models inlined), for routes
    that read the body themselves."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    content = {"application/json": {"schema": inline(schema)}}
    return {"requestBody": {"required": True, "content": content}}
