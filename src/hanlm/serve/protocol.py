"""Request bodies of the OpenAI API as pydantic models, and the records the handlers use.

The models keep OpenAI's rules: a field they do not name is a 400 naming it ("unrecognized
request argument", as OpenAI answers), `null` means the default, and numbers are JSON numbers
(never strings or booleans; an integer field takes 2.0 but not 2.5). Every field OpenAI defines
for chat and text completions is either honoured or, when set, refused with a 400 naming it
(`REFUSED_CHAT`, `REFUSED_COMPLETION`). `parse_chat`, `parse_completion`
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
from hanlm.serve.tool_choice import ToolRequest, parse_tools

MIN_TEMPERATURE = 1e-3  # below this, sampling is greedy decoding
MAX_STOP = 16  # stop strings per request
MAX_BIAS = 1024  # logit_bias entries per request
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


def _bias(value: Any) -> dict[int, float]:
    """OpenAI's `logit_bias`: token ids (as JSON object keys, so strings) -> -100..100."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PydanticCustomError("bias_type", "Input should be an object of token id -> bias")
    if len(value) > MAX_BIAS:
        raise PydanticCustomError("too_long", f"Input should have at most {MAX_BIAS} entries")
    out = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise PydanticCustomError("bias_key", f"keys should be token ids, got {key!r}")
        number = isinstance(bias, (int, float)) and not isinstance(bias, bool)
        if not number or not -100 <= bias <= 100:
            raise PydanticCustomError(
                "bias_value", f"token {key}: the bias should be a number from -100 to 100"
            )
        out[int(key)] = float(bias)
    return out


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
LogitBias = Annotated[
    dict[int, float],
    BeforeValidator(_bias),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "object",
                    "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
                },
                {"type": "null"},
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
    model_config = ConfigDict(extra="forbid")  # an unknown field is a 400, as OpenAI answers

    model: str | None = Field(None, description="the served name or an alias (else 404)")


class VendorBody(BaseModel):
    """vLLM's tokenizer routes: fields they do not name are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Role
    content: Content = ""
    # an assistant turn's calls and a tool turn's answer to one (checked by serve.tool_choice)
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: Bool = None
    include_obfuscation: Bool = Field(None, description="false only (no obfuscation padding)")


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: Bool = None


class ResponseFormat(BaseModel):
    """`text`, `json_object` (any JSON object) or `json_schema` (JSON following a schema)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


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
    logit_bias: LogitBias = Field(default_factory=dict, description="token id -> -100..100")
    user: str | None = Field(None, description="an end-user id, written in the request log")

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
            logit_bias=dict(self.logit_bias),
        )


class ChatCompletionBody(SampledBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Int = Field(None, ge=1, le=MAX_COUNT)
    max_tokens: Int = Field(None, ge=1, le=MAX_COUNT, description="max_completion_tokens' old name")
    logprobs: Bool = None
    top_logprobs: Int = Field(None, ge=0, le=20, description="needs logprobs: true")
    negative_prompt: NegativePrompt = Field("", description="guidance's unconditional prompt")
    response_format: ResponseFormat | None = None
    safety_identifier: str | None = Field(None, description="written in the request log")
    metadata: dict[str, str] | None = Field(None, description="written in the request log")
    # refused when set to anything but their default (REFUSED_CHAT says why)
    service_tier: Any = None
    store: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    moderation: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None


class CompletionBody(SampledBody):
    prompt: Inputs
    max_tokens: Int = Field(None, ge=0, le=MAX_COUNT, description="0 only with echo: true")
    echo: Bool = None
    logprobs: Int = Field(None, ge=0, le=20)
    best_of: Int = Field(None, ge=1, description="only equal to n (no reranking)")
    suffix: str | None = Field(None, description="refused unless empty (no insertion)")


class EmbeddingBody(Body):
    input: Inputs
    user: str | None = Field(None, description="an end-user id, written in the request log")
    encoding_format: EncodingFormat = "float"
    dimensions: Int = Field(None, ge=1, le=1 << 20, description="the model's hidden size")


class TokenizeBody(VendorBody):
    """`prompt` (or its alias `text`) as a string, or chat `messages` through the template."""

    prompt: str | None = None
    text: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: Bool = None
    add_generation_prompt: Bool = None


class DetokenizeBody(VendorBody):
    tokens: list[StrictInt]


# Fields OpenAI defines that this server does not do: set to anything but null or the value in
# `ACCEPTED`, each is a 400 naming it. (The deprecated `functions` / `function_call` are refused:
# `tools` and `tool_choice` do the same.)
REFUSED_CHAT = {
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "moderation": "moderation is not supported",
    "prompt_cache_key": "there is no prompt cache",
    "prompt_cache_options": "there is no prompt cache",
    "prompt_cache_retention": "there is no prompt cache",
    "reasoning_effort": "the model has no reasoning settings",
    "verbosity": "the model has no verbosity setting",
    "web_search_options": "web search is not supported",
    "service_tier": "there is one service tier ('auto' or 'default')",
    "store": "nothing is stored (false only)",
    "functions": "deprecated by OpenAI: send 'tools' instead",
    "function_call": "deprecated by OpenAI: send 'tool_choice' instead",
}
REFUSED_COMPLETION = {
    "suffix": "inserting text before a suffix is not supported",
    "best_of": "best_of must equal n (no reranking of candidates)",
}
ACCEPTED: dict[str, tuple[Any, ...]] = {
    "modalities": (["text"],),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "suffix": ("",),
}


def refuse(body: BaseModel, refused: dict[str, str]) -> None:
    """A 400 naming the first field of `refused` that `body` sets (beyond its accepted values),
    or `stream_options.include_obfuscation: true`."""
    options = getattr(body, "stream_options", None)
    if options is not None and options.include_obfuscation:
        raise APIError(
            "'stream_options.include_obfuscation': no obfuscation padding is sent (false only)",
            param="stream_options.include_obfuscation",
            code="unsupported_parameter",
        )
    for name, why in refused.items():
        value = getattr(body, name)
        if value is None or any(value == ok for ok in ACCEPTED.get(name, ())):
            continue
        if name == "best_of" and value == (getattr(body, "n", None) or 1):
            continue
        raise APIError(f"'{name}': {why}", param=name, code="unsupported_parameter")


def _default(value: float | None, default: float) -> float:
    return default if value is None else value


# --------------------------------------------------------------------------- records


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    negative_prompt: str = ""
    tools: ToolRequest | None = None
    response_format: ResponseFormat | None = None
    model: str | None = None
    user: str = ""  # user / safety_identifier / metadata, for the request log


@dataclass
class CompletionRequest:
    prompts: list[list[int] | str]
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    model: str | None = None
    user: str = ""


@dataclass
class EmbeddingRequest:
    inputs: list[list[int] | str]
    encoding_format: str = "float"
    dimensions: int | None = None
    model: str | None = None
    user: str = ""


B = TypeVar("B", bound=BaseModel)


def validate(model: type[B], body: Any) -> B:
    """`body` (decoded JSON) as `model`, or the 400 naming the first field that failed."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise invalid_body(e.errors(include_url=False)) from None


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the chat template takes them (`developer` is OpenAI's newer `system`), with
    their tool calls and tool-call ids."""
    out = []
    for m in messages:
        msg: dict[str, Any] = {
            "role": "system" if m.role == "developer" else m.role,
            "content": m.content,
        }
        if m.tool_calls:
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _who(user: str | None, *more: Any) -> str:
    """What the request log shows of who asked: `user`, `safety_identifier`, `metadata`."""
    parts = [str(x) for x in (user, *more) if x]
    return " ".join(parts)


def _response_format(rf: ResponseFormat | None) -> ResponseFormat | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_schema" and rf.json_schema is None:
        raise APIError(
            "'response_format.json_schema' is required with type 'json_schema'",
            param="response_format.json_schema",
        )
    if rf.type == "json_object" and rf.json_schema is not None:
        raise APIError(
            "'response_format.json_schema' goes with type 'json_schema', not 'json_object'",
            param="response_format.json_schema",
        )
    return rf


def parse_chat(body: Any, max_tokens: int, max_n: int) -> ChatRequest:
    b = validate(ChatCompletionBody, body)
    refuse(b, REFUSED_CHAT)
    given = b.max_completion_tokens if b.max_completion_tokens is not None else b.max_tokens
    sampling = b.sampling(max_tokens if given is None else given, max_n)
    if b.logprobs:
        sampling.logprobs = b.top_logprobs or 0
    elif b.top_logprobs is not None:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    tools = parse_tools(
        {
            "tools": b.tools,
            "tool_choice": b.tool_choice,
            "parallel_tool_calls": b.parallel_tool_calls,
        }
    )
    response_format = _response_format(b.response_format)
    if tools is not None and tools.forced and response_format is not None:
        raise APIError(
            "'tool_choice' forces a tool call, whose arguments follow the tool's schema: it cannot"
            " be combined with 'response_format'",
            param="tool_choice",
        )
    return ChatRequest(
        messages=chat_messages(b.messages),
        sampling=sampling,
        stream=bool(b.stream),
        include_usage=b.include_usage,
        negative_prompt=b.negative_prompt,
        tools=tools,
        response_format=response_format,
        model=b.model,
        user=_who(b.user, b.safety_identifier, b.metadata),
    )


def parse_completion(body: Any, max_tokens: int, max_n: int) -> CompletionRequest:
    b = validate(CompletionBody, body)
    refuse(b, REFUSED_COMPLETION)
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
        model=b.model,
        user=_who(b.user),
    )


def parse_embedding(body: Any) -> EmbeddingRequest:
    b = validate(EmbeddingBody, body)
    return EmbeddingRequest(b.input, b.encoding_format, b.dimensions, b.model, _who(b.user))


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
