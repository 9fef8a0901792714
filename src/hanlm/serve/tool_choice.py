"""Tools on `/v1/chat/completions`: the request's `tools`, `tool_choice` and
`parallel_tool_calls`, the conversation's tool turns, and the model's `<tool_call>` blocks
turned into OpenAI `tool_calls` (whole, or streamed as OpenAI streams them).

The model sees the tools through its own chat template (`apply_chat_template(tools=...)`); a
template that would leave them out is refused with a 400. A call the model writes malformed is
returned as text. `tool_choice: "none"` leaves the tools out of the prompt; `"required"` and a
named function make the model write a call whose JSON is constrained to the tools' schemas
(`call_schema`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from hanlm.data.formats import tool_turns
from hanlm.data.records import RecordError
from hanlm.data.templates import TemplateError, check_renders_tools
from hanlm.data.tools import parse_tool_calls, tool_list
from hanlm.serve.errors import APIError

OPEN = "<tool_call>"


@dataclass
class ToolRequest:
    tools: list[dict[str, Any]]  # canonical OpenAI function tools
    choice: str  # auto | none | required | function
    name: str | None = None  # the function `tool_choice` names
    parallel: bool = True

    @property
    def prompt_tools(self) -> list[dict[str, Any]] | None:
        """The tools the prompt declares (none under tool_choice "none")."""
        return None if self.choice == "none" else self.tools

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")


def parse_tools(body: dict[str, Any]) -> ToolRequest | None:
    """The request's tool settings, or None when it declares no tools. 400s name the field."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise APIError("'parallel_tool_calls' must be true or false", param="parallel_tool_calls")
    if not raw:
        if choice not in (None, "none", "auto"):
            raise APIError("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    try:
        tools = tool_list(raw)
    except RecordError as e:
        raise APIError(f"invalid 'tools': {e}", param="tools") from e
    names = [t["function"]["name"] for t in tools]
    req = ToolRequest(tools, "auto", parallel=parallel is not False)
    if choice is None or choice in ("auto", "none", "required"):
        req.choice = choice or "auto"
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in names:
            raise APIError(
                f"'tool_choice' names function {name!r}, which 'tools' does not declare"
                f" (declared: {names})",
                param="tool_choice",
            )
        req.choice, req.name = "function", name
    else:
        raise APIError(
            '\'tool_choice\' must be "none", "auto", "required" or'
            ' {"type": "function", "function": {"name": ...}}',
            param="tool_choice",
        )
    return req


def tool_conversation(
    messages: list[dict[str, Any]], req: ToolRequest | None, tokenizer: Any
) -> list[dict[str, Any]]:
    """The request's messages with their tool calls and results in hanlm's canonical shape
    (arguments as objects, as chat templates render them), tool use checked as in training data
    (every call declared and answered, arguments that match the schema)."""
    if req is None and not any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
        return messages
    try:
        canonical, _ = tool_turns(messages, req.tools if req else None)
        check_renders_tools(tokenizer, canonical, req.prompt_tools if req else None)
    except (RecordError, TemplateError) as e:
        raise APIError(str(e), param="messages" if isinstance(e, RecordError) else "tools") from e
    return canonical


def call_schema(req: ToolRequest) -> dict[str, Any]:
    """The JSON a forced call must be: {"name": one of the allowed tools, "arguments": that
    tool's parameters}."""
    allowed = [t for t in req.tools if req.name in (None, t["function"]["name"])]
    options = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"]["parameters"],
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in allowed
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def openai_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {
                "name": c["name"],
                "arguments": json.dumps(c["arguments"], ensure_ascii=False),
            },
        }
        for c in calls
    ]


def split_answer(text: str, req: ToolRequest | None) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, OpenAI tool_calls) of a whole answer. Calls count only when every block parses
    and names a declared tool; otherwise the whole text is the content. An answer that is only
    a declared tool's call JSON without the tags counts as that call (`bare_tool_calls`)."""
    if req is None or req.choice == "none":
        return text, []
    declared = {t["function"]["name"] for t in req.tools}
    content, calls, problems = parse_tool_calls(text, declared)
    if problems or not calls or any(c["name"] not in declared for c in calls):
        return text, []
    if not req.parallel:
        calls = calls[:1]
    return (content or None), openai_calls(calls)


def forced_answer(text: str, req: ToolRequest) -> tuple[str | None, list[dict[str, Any]]]:
    """A forced call: the model wrote the call's JSON (constrained to `call_schema`)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return text, []  # cut short by max_tokens: returned as text, finish_reason "length"
    return None, openai_calls([call])


class CallStream:
    """Streams an answer's text while holding back what may be a `<tool_call>` block, or the
    whole answer when it starts as a bare call's JSON may (`{`, `[` or a code fence): `feed`
    returns the text safe to send as content now, `finish` the rest as (content, calls)."""

    def __init__(self, req: ToolRequest | None) -> None:
        self.req = req
        self.held = ""
        self.calling = False
        self.text = ""

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.req is None or self.req.choice == "none":
            return piece
        self.held += piece
        if self.calling:
            return ""
        if self.held == self.text:  # nothing sent yet: the answer may be a bare call
            start = self.held.lstrip()
            if not start:
                return ""
            if start[0] in "{[`":
                self.calling = True
                return ""
        at = self.held.find(OPEN)
        if at >= 0:
            self.calling = True
            out, self.held = self.held[:at], self.held[at:]
            return out
        # keep a tail that could still grow into "<tool_call>"
        keep = next((k for k in range(len(OPEN) - 1, 0, -1) if self.held.endswith(OPEN[:k])), 0)
        out = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep :]
        return out

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """(content still to send, the calls) once the answer is complete."""
        if not self.calling:
            held, self.held = self.held, ""
            return held, []
        content, calls = split_answer(self.held, self.req)
        if not calls:
            return self.held, []
        return (content or ""), calls


def call_deltas(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The `delta`s that stream `calls` as OpenAI does: id, type and name first (arguments
    empty), then the arguments."""
    out = []
    for i, c in enumerate(calls):
        head = {"index": i, "id": c["id"], "type": "function"}
        out.append(
            {"tool_calls": [{**head, "function": {"name": c["function"]["name"], "arguments": ""}}]}
        )
        out.append(
            {"tool_calls": [{"index": i, "function": {"arguments": c["function"]["arguments"]}}]}
        )
    return out
