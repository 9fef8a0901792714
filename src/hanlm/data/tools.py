"""Tool calls in conversations: the canonical shape (read from each format and checked by
`hanlm.data.formats`), and reading calls back out of a model's text.

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
from typing import Any

_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(text outside the calls, the calls a model wrote, problems): each `<tool_call>` block
    must hold {"name": str, "arguments": object}; a block that does not is a problem, and the
    caller decides (a server returns the whole text as content)."""
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
