"""Tool calls in conversations: the canonical shape, reading declared tools and calls
(`tool_list`, `tool_calls`, used by `hanlm.data.formats` for every format), checking a
conversation's tool use (`check_tool_use`), and reading calls back out of a model's text.

Canonical (OpenAI's chat layout, arguments kept as objects so chat templates render them):
- a record may carry `tools`: [{"type": "function", "function": {"name", "description",
  "parameters": JSON schema}}, ...]
- an assistant turn may carry `tool_calls`: [{"id", "type": "function",
  "function": {"name", "arguments": {...}}}] (its `content` may be empty)
- a tool turn: {"role": "tool", "content": str, "tool_call_id": id}

Models write calls the Hermes / Qwen way, `<tool_call>\n{"name": ..., "arguments": {...}}\n
</tool_call>`, which `parse_tool_calls` reads back.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Collection
from typing import Any

from hanlm.data.records import RecordError, describe


def function_tool(name: str, description: str, params: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool declaration whose arguments are all required. Each of `params` is a JSON
    schema or a type name for short ({"poet": "string"})."""
    properties = {k: {"type": v} if isinstance(v, str) else v for k, v in params.items()}
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": list(params)},
        },
    }


def _arguments(value: Any, where: str) -> dict[str, Any]:
    """Call arguments as an object: OpenAI sends a JSON string, templates need the object."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as e:
            raise RecordError(f"{where}.arguments: not valid JSON ({e.msg}): {value[:80]!r}") from e
    if not isinstance(value, dict):
        raise RecordError(f"{where}.arguments: expected a JSON object, found {describe(value)}")
    return value


def tool_list(value: Any, field: str = "tools") -> list[dict[str, Any]]:
    """A record's declared tools, as OpenAI function tools (a JSON string is read first, as
    LLaMA-Factory's ShareGPT files store it; bare function objects are wrapped)."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as e:
            raise RecordError(f"field '{field}': not valid JSON ({e.msg})") from e
    if not isinstance(value, list):
        raise RecordError(f"field '{field}': expected a list of tools, found {describe(value)}")
    out = []
    for i, tool in enumerate(value):
        where = f"{field}[{i}]"
        if isinstance(tool, dict) and "function" not in tool and "name" in tool:
            tool = {"type": "function", "function": tool}
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError(
                f"{where}: expected {{'type': 'function', 'function': {{'name', 'description',"
                f" 'parameters'}}}}, found {describe(tool)}"
            )
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise RecordError(f"{where}.parameters: expected a JSON schema object")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    names = [t["function"]["name"] for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RecordError(f"field '{field}': tool(s) {dup} declared twice")
    return out


def tool_calls(value: Any, where: str, start: int = 0) -> list[dict[str, Any]]:
    """An assistant turn's calls in the canonical shape (ids made up where the data has none)."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise RecordError(f"{where}: expected a list of tool calls, found {describe(value)}")
    out = []
    for i, call in enumerate(value):
        here = f"{where}[{i}]"
        if not isinstance(call, dict):
            raise RecordError(f"{here}: expected a tool call object, found {describe(call)}")
        fn = call.get("function", call)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError(f"{here}: a tool call needs a function name, found {describe(call)}")
        call_id = call.get("id") or f"call_{start + i}"
        out.append(
            {
                "id": str(call_id),
                "type": "function",
                "function": {
                    "name": fn["name"],
                    "arguments": _arguments(fn.get("arguments"), here),
                },
            }
        )
    return out


def _schema_errors(args: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    try:
        import jsonschema
    except ImportError:  # checks without jsonschema: required keys only
        return [f"missing '{k}'" for k in schema.get("required", []) if k not in args]
    validator = jsonschema.Draft202012Validator(schema)
    return [e.message for e in validator.iter_errors(args)][:3]


def check_tool_use(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> None:
    """Every call names a declared tool with arguments its schema accepts, and is answered by a
    tool turn (by `tool_call_id` when the turn has one, else in order); no tool turn answers
    nothing. Raises RecordError naming the turn."""
    declared = {t["function"]["name"]: t["function"] for t in tools or []}
    pending: list[str] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m["role"] == "assistant" and m.get("tool_calls"):
            if pending:
                raise RecordError(f"{where}: call(s) {pending} before it have no tool result")
            for call in m["tool_calls"]:
                name, args = call["function"]["name"], call["function"]["arguments"]
                if name not in declared:
                    raise RecordError(
                        f"{where}: calls '{name}', which the record's tools do not declare"
                        f" (declared: {sorted(declared) or 'none'})"
                    )
                errors = _schema_errors(args, declared[name].get("parameters", {}))
                if errors:
                    raise RecordError(
                        f"{where}: arguments of '{name}' do not match its schema:"
                        f" {'; '.join(errors)}"
                    )
                pending.append(call["id"])
        elif m["role"] == "tool":
            if not pending:
                raise RecordError(f"{where}: a tool result that answers no call")
            call_id = m.get("tool_call_id")
            if call_id is None:
                m["tool_call_id"] = pending.pop(0)
            elif call_id in pending:
                pending.remove(call_id)
            else:
                raise RecordError(f"{where}: tool_call_id {call_id!r} answers no open call")
        elif pending:
            raise RecordError(f"{where}: call(s) {pending} before it have no tool result")
    if pending:
        raise RecordError(f"the conversation ends with call(s) {pending} unanswered")


_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)
_FENCE = re.compile(r"```(?:json)?\s*(.*?)\s*```", re.S)
CALL_KEYS = {"name", "arguments", "parameters"}


def bare_tool_calls(text: str, names: Collection[str]) -> list[dict[str, Any]]:
    """The calls of an answer that is nothing but calls' JSON without the `<tool_call>` tags
    (what Qwen2.5-Coder-0.5B-Instruct writes): one {"name", "arguments"} object or a list of
    them, perhaps in a ```json fence, each naming a tool in `names` and holding no other key.
    [] for anything else, so an answer that only contains some JSON stays text."""
    body = text.strip()
    fenced = _FENCE.fullmatch(body)
    body = fenced.group(1) if fenced else body
    if not body.startswith(("{", "[")):
        return []
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, RecursionError):
        return []
    calls = []
    for item in obj if isinstance(obj, list) and obj else [obj]:
        if not (isinstance(item, dict) and item.get("name") in names and set(item) <= CALL_KEYS):
            return []
        args = item.get("arguments", item.get("parameters", {}))
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):
                args = json.loads(args)
        if not isinstance(args, dict):
            return []
        calls.append({"name": item["name"], "arguments": args})
    return calls


def parse_tool_calls(
    text: str, names: Collection[str] = ()
) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(text outside the calls, the calls a model wrote, problems): each `<tool_call>` block
    must hold {"name": str, "arguments": object}; a block that does not is a problem, and the
    caller decides (a server returns the whole text as content). An answer without a block
    that is nothing but a call of one of the declared tools `names` (`bare_tool_calls`) is that
    call."""
    if "<tool_call>" not in text and names:
        bare = bare_tool_calls(text, names)
        if bare:
            return "", bare, []
    calls: list[dict[str, Any]] = []
    problems: list[str] = []
    for block in _CALL.findall(text):
        try:
            obj = json.loads(block)
        except json.JSONDecodeError as e:
            problems.append(f"not JSON ({e.msg}): {block[:60]!r}")
            continue
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            problems.append(f"no function name: {block[:60]!r}")
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            with contextlib.suppress(json.JSONDecodeError):
                args = json.loads(args)
        if not isinstance(args, dict):
            problems.append(f"arguments are not an object: {block[:60]!r}")
            continue
        calls.append({"name": obj["name"], "arguments": args})
    if "<tool_call>" in text and text.count("<tool_call>") != text.count("</tool_call>"):
        problems.append("a <tool_call> block is not closed")
    content = _CALL.sub("", text).strip()
    return content, calls, problems
