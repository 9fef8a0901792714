"""The record formats users bring, detected and converted to three canonical shapes.

- text:       {"text": str}
- chat:       {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}
              (from `alpaca`, `sharegpt` and `messages` data), with `tools` and tool calls
              where the data has them (shape: hanlm.data.tools)
- preference: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
              (trl's conversational preference layout; strings become one-message lists)
- ranked:     {"prompt": [messages], "responses": [[messages], ...], "ranking": [[i, ...], ...]}
              (InstructGPT's K ranked answers; the ranking as tie groups, best first)
- unpaired:   {"prompt": [messages], "completion": [messages], "label": true|false}
              (trl's unpaired preference layout, for KTO: one answer marked good or bad)

Every converter raises `RecordError` saying which field was expected and what was found; the
caller adds the file and line.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from hanlm.data.records import RecordError, describe
from hanlm.data.tools import check_tool_use, tool_calls, tool_list

Format = Literal["text", "alpaca", "sharegpt", "messages", "preference", "ranked", "unpaired"]
FORMATS: tuple[str, ...] = (
    "text",
    "alpaca",
    "sharegpt",
    "messages",
    "preference",
    "ranked",
    "unpaired",
)
ROLES = ("system", "user", "assistant", "tool")

# ShareGPT speaker names seen in the wild, mapped to chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "system": "system",
    "function_call": "assistant",
    "function": "tool",
    "observation": "tool",
    "tool": "tool",
}
_MESSAGE_ROLES = {
    "system": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
    "human": "user",
    "gpt": "assistant",
}

FORMAT_HELP = (
    "text ({'text': ...}), alpaca ({'instruction','input','output'}), "
    "sharegpt ({'conversations': [{'from','value'}]}), "
    "messages ({'messages': [{'role','content'}]}), preference ({'prompt','chosen','rejected'}),"
    " ranked ({'prompt','responses','ranking'}), unpaired ({'prompt','completion','label'})"
)


def kind_of(fmt: str) -> str:
    """The canonical shape a format converts to: text, chat, preference, ranked or unpaired."""
    same = ("text", "preference", "ranked", "unpaired")
    return fmt if fmt in same else "chat"


def message_lists(rec: dict[str, Any]) -> list[list[dict[str, str]]]:
    """Every message list of a canonical chat, preference or ranked record (for lengths, cleaning
    and display, which would otherwise need to know each shape)."""
    out = []
    for key, value in rec.items():
        if key == "responses":
            out += value
        elif key not in ("ranking", "tools", "label"):
            out.append(value)
    return out


def _need_str(rec: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in rec:
        raise RecordError(f"missing field '{key}' (record has keys {sorted(rec)})")
    value = rec[key]
    if not isinstance(value, str):
        raise RecordError(f"field '{key}': expected a string, found {describe(value)}")
    if not allow_empty and not value.strip():
        raise RecordError(f"field '{key}': expected non-empty text, found an empty string")
    return value


def _opt_str(rec: dict[str, Any], key: str) -> str:
    value = rec.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"field '{key}': expected a string, found {describe(value)}")
    return value


def detect(rec: Any, text_field: str = "text") -> str:
    """Guess a record's format from its keys."""
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object (record), found {describe(rec)}")
    keys = set(rec)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"responses", "ranking"} <= keys:
        return "ranked"
    if {"completion", "label"} <= keys:
        return "unpaired"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if text_field in keys:
        return "text"
    raise RecordError(
        f"cannot tell the format from the keys {sorted(keys)}; expected one of: {FORMAT_HELP}."
        " Rename the fields or set format=..."
    )


def _check_chat(messages: list[dict[str, str]], require_answer: bool) -> list[dict[str, str]]:
    if not messages:
        raise RecordError("the conversation is empty")
    for i, m in enumerate(messages):
        if m["role"] == "system" and i != 0:
            raise RecordError(f"turn {i}: a system message may only come first")
    if require_answer and not any(m["role"] == "assistant" for m in messages):
        raise RecordError("the conversation has no assistant turn to learn from")
    if not any(m["role"] == "user" for m in messages):
        raise RecordError("the conversation has no user turn")
    return messages


def _text_parts(value: Any) -> bool:
    """OpenAI content parts: [{"type": "text", "text": ...}]."""
    return isinstance(value, list) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in value
    )


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if _text_parts(value):
        return "".join(str(p.get("text", "")) for p in value)
    raise RecordError(f"{where}: expected string content, found {describe(value)}")


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise RecordError(f"field '{field}': expected a list of messages, found {describe(value)}")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise RecordError(
                f"{where}: expected an object with role and content, found {describe(m)}"
            )
        calls = m.get("tool_calls") or m.get("function_call")
        if "role" not in m or ("content" not in m and not calls):
            raise RecordError(f"{where}: expected keys 'role' and 'content', found {sorted(m)}")
        role = _MESSAGE_ROLES.get(str(m["role"]).lower()) if isinstance(m["role"], str) else None
        if role is None:
            raise RecordError(f"{where}: unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if calls and role != "assistant":
            raise RecordError(f"{where}: only an assistant turn may carry tool calls")
        content = m.get("content")
        if role == "tool" and isinstance(content, (dict, list)) and not _text_parts(content):
            content = json.dumps(content, ensure_ascii=False)  # a structured tool result
        msg: dict[str, Any] = {
            "role": role,
            "content": "" if calls and content is None else _content(content, where),
        }
        if calls:
            n = sum(len(x.get("tool_calls", ())) for x in out)
            msg["tool_calls"] = tool_calls(calls, f"{where}.tool_calls", start=n)
        if role == "tool" and m.get("tool_call_id") is not None:
            msg["tool_call_id"] = str(m["tool_call_id"])
        out.append(msg)
    return out


def _tools_of(rec: dict[str, Any], messages: list[dict[str, Any]]) -> dict[str, Any]:
    """The canonical chat record: messages, and the declared tools when there are any; tool
    turns are checked against them (hanlm.data.tools.check_tool_use)."""
    tools = tool_list(rec["tools"]) if rec.get("tools") else None
    if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages):
        check_tool_use(messages, tools)
    return {"messages": messages, **({"tools": tools} if tools else {})}


def tool_turns(messages: Any, tools: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A request's messages and tools in the canonical shape, tool use checked as in training
    data (`check_tool_use`) but without a training record's other rules (a user turn, ...)."""
    declared = tool_list(tools) if tools else []
    canonical = _messages(messages, "messages")
    if declared or any(m["role"] == "tool" or m.get("tool_calls") for m in canonical):
        check_tool_use(canonical, declared)
    return canonical, declared


def from_messages(rec: dict[str, Any], require_answer: bool = True) -> dict[str, Any]:
    messages = _check_chat(_messages(rec.get("messages"), "messages"), require_answer)
    return _tools_of(rec, messages)


def from_sharegpt(rec: dict[str, Any], require_answer: bool = True) -> dict[str, Any]:
    conv = rec.get("conversations")
    if not isinstance(conv, list):
        raise RecordError(f"field 'conversations': expected a list, found {describe(conv)}")
    messages = []
    system = _opt_str(rec, "system")
    if system.strip():
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(conv):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            found = sorted(turn) if isinstance(turn, dict) else describe(turn)
            raise RecordError(f"{where}: expected keys 'from' and 'value', found {found}")
        speaker = turn["from"]
        role = SHAREGPT_ROLES.get(speaker.lower()) if isinstance(speaker, str) else None
        if role is None:
            raise RecordError(
                f"{where}: unknown speaker {speaker!r}; use one of {', '.join(SHAREGPT_ROLES)}"
            )
        if not isinstance(turn["value"], str):
            raise RecordError(f"{where}.value: expected a string, found {describe(turn['value'])}")
        if speaker.lower() == "function_call":  # LLaMA-Factory: the value is the call as JSON
            try:
                call = json.loads(turn["value"])
            except json.JSONDecodeError as e:
                raise RecordError(f"{where}.value: a function_call must be JSON ({e.msg})") from e
            n = sum(len(x.get("tool_calls", ())) for x in messages)
            calls = tool_calls(call, f"{where}.value", start=n)
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
        else:
            messages.append({"role": role, "content": turn["value"]})
    return _tools_of(rec, _check_chat(messages, require_answer))


def from_alpaca(rec: dict[str, Any], require_answer: bool = True) -> dict[str, Any]:
    instruction = _need_str(rec, "instruction")
    extra = _opt_str(rec, "input")
    output = _need_str(rec, "output") if require_answer else _opt_str(rec, "output")
    messages = []
    system = _opt_str(rec, "system")
    if system.strip():
        messages.append({"role": "system", "content": system})
    history = rec.get("history") or []
    if not isinstance(history, list):
        raise RecordError(
            "field 'history': expected a list of [user, assistant] pairs,"
            f" found {describe(history)}"
        )
    for i, pair in enumerate(history):
        if not (
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(x, str) for x in pair)
        ):
            raise RecordError(
                f"history[{i}]: expected a [user, assistant] pair of strings,"
                f" found {describe(pair)}"
            )
        messages += [
            {"role": "user", "content": pair[0]},
            {"role": "assistant", "content": pair[1]},
        ]
    prompt = f"{instruction}\n{extra}" if extra.strip() else instruction
    messages.append({"role": "user", "content": prompt})
    if output:
        messages.append({"role": "assistant", "content": output})
    return {"messages": messages}


def from_text(rec: dict[str, Any], text_field: str = "text") -> dict[str, Any]:
    return {"text": _need_str(rec, text_field)}


def _side(value: Any, field: str, role: str) -> list[dict[str, str]]:
    if isinstance(value, str):
        if not value.strip():
            raise RecordError(f"field '{field}': expected non-empty text, found an empty string")
        return [{"role": role, "content": value}]
    return _messages(value, field)


def from_preference(rec: dict[str, Any]) -> dict[str, Any]:
    for key in ("chosen", "rejected"):
        if key not in rec:
            raise RecordError(f"missing field '{key}' (record has keys {sorted(rec)})")
    chosen = _side(rec["chosen"], "chosen", "assistant")
    rejected = _side(rec["rejected"], "rejected", "assistant")
    if rec.get("prompt") is not None:
        prompt = _side(rec["prompt"], "prompt", "user")
    else:
        # Implicit prompt (Anthropic HH style): the shared opening of both conversations.
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise RecordError(
                "missing field 'prompt', and 'chosen'/'rejected' share no opening turns"
                " to use as one"
            )
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if not any(m["role"] == "user" for m in prompt):
        raise RecordError("field 'prompt': no user turn")
    for key, side in (("chosen", chosen), ("rejected", rejected)):
        if side[-1]["role"] != "assistant":
            raise RecordError(f"field '{key}': must end with an assistant turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


RANKING_HELP = (
    "give 'ranking' as indices into 'responses', best first, each index once; tied answers as a"
    " nested list: [0, 2, 1] or [[0, 2], 1]"
)


def parse_ranking(value: Any, n: int) -> list[list[int]]:
    """A ranking of `n` answers as tie groups, best first: [0, [2, 1]] -> [[0], [2, 1]]."""
    if not isinstance(value, list) or not value:
        raise RecordError(
            f"field 'ranking': expected a list, found {describe(value)}; {RANKING_HELP}"
        )
    groups: list[list[int]] = []
    seen: set[int] = set()
    for pos, item in enumerate(value):
        members = item if isinstance(item, list) else [item]
        if not members:
            raise RecordError(f"ranking[{pos}]: an empty tie group; {RANKING_HELP}")
        for idx in members:
            # bool is an int in Python; true/false in a ranking is a mistake, not an index
            if not isinstance(idx, int) or isinstance(idx, bool):
                raise RecordError(
                    f"ranking[{pos}]: expected an index or a list of indices, found"
                    f" {describe(idx)}; {RANKING_HELP}"
                )
            if not 0 <= idx < n:
                raise RecordError(
                    f"ranking[{pos}]: index {idx} is out of range for {n} responses"
                    f" (indices start at 0: 0..{n - 1})"
                )
            if idx in seen:
                raise RecordError(f"ranking: response {idx} appears twice; {RANKING_HELP}")
            seen.add(idx)
        groups.append(list(members))
    missing = sorted(set(range(n)) - seen)
    if missing:
        raise RecordError(
            f"ranking: response(s) {missing} are not ranked; {RANKING_HELP}"
            " (drop an answer from 'responses' to leave it out)"
        )
    return groups


def from_ranked(rec: dict[str, Any]) -> dict[str, Any]:
    """InstructGPT-style data: one prompt, K answers and a labeller's ranking of them."""
    if rec.get("prompt") is None:
        raise RecordError(f"missing field 'prompt' (record has keys {sorted(rec)})")
    prompt = _side(rec["prompt"], "prompt", "user")
    if not any(m["role"] == "user" for m in prompt):
        raise RecordError("field 'prompt': no user turn")
    responses = rec.get("responses")
    if not isinstance(responses, list) or len(responses) < 2:
        raise RecordError(
            f"field 'responses': expected a list of at least 2 answers, found {describe(responses)}"
        )
    sides = []
    for i, r in enumerate(responses):
        side = _side(r, f"responses[{i}]", "assistant")
        if not side or side[-1]["role"] != "assistant":
            raise RecordError(f"field 'responses[{i}]': must end with an assistant turn")
        sides.append(side)
    return {
        "prompt": prompt,
        "responses": sides,
        "ranking": parse_ranking(rec.get("ranking"), len(sides)),
    }


def _said(messages: list[dict[str, str]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"].strip()) for m in messages]


def unteachable(rec: dict[str, Any]) -> str | None:
    """Why a well-formed canonical record can teach nothing, or None: a preference pair whose
    two answers are the same (no preference to learn), ranked answers that are all the same, a
    conversation whose answer is empty."""
    if "chosen" in rec:
        if _said(rec["chosen"]) == _said(rec["rejected"]):
            return "the chosen and rejected answers are the same"
    elif "responses" in rec:
        if len({tuple(_said(r)) for r in rec["responses"]}) == 1:
            return "all the ranked answers are the same"
    elif "messages" in rec:
        answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        if answers and not answers[-1].strip():
            return "the answer (the last assistant turn) is empty"
    return None


def from_unpaired(rec: dict[str, Any]) -> dict[str, Any]:
    """KTO's data: one answer to a prompt, labelled desirable (true) or undesirable (false)."""
    for key in ("prompt", "completion", "label"):
        if rec.get(key) is None:
            raise RecordError(f"missing field '{key}' (record has keys {sorted(rec)})")
    prompt = _side(rec["prompt"], "prompt", "user")
    if not any(m["role"] == "user" for m in prompt):
        raise RecordError("field 'prompt': no user turn")
    completion = _side(rec["completion"], "completion", "assistant")
    if completion[-1]["role"] != "assistant":
        raise RecordError("field 'completion': must end with an assistant turn")
    label = rec["label"]
    if not isinstance(label, bool):
        raise RecordError(
            f"field 'label': expected true (a desirable answer) or false (an undesirable one),"
            f" found {describe(label)}"
        )
    return {"prompt": prompt, "completion": completion, "label": label}


def ranked_pairs(ranking: list[list[int]]) -> list[tuple[int, int]]:
    """Every (better, worse) pair a tie-group ranking implies: C(K, 2) minus the tied pairs."""
    return [
        (w, lose)
        for i, better in enumerate(ranking)
        for worse in ranking[i + 1 :]
        for w in better
        for lose in worse
    ]


def convert(
    rec: Any, fmt: str, text_field: str = "text", require_answer: bool = True
) -> dict[str, Any]:
    """Convert one raw record of format `fmt` to its canonical shape."""
    if not isinstance(rec, dict):
        raise RecordError(f"expected a JSON object (record), found {describe(rec)}")
    if fmt == "text":
        return from_text(rec, text_field)
    if fmt == "alpaca":
        return from_alpaca(rec, require_answer)
    if fmt == "sharegpt":
        return from_sharegpt(rec, require_answer)
    if fmt == "messages":
        return from_messages(rec, require_answer)
    if fmt == "preference":
        return from_preference(rec)
    if fmt == "ranked":
        return from_ranked(rec)
    if fmt == "unpaired":
        return from_unpaired(rec)
    raise RecordError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def split_last_answer(messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], str | None]:
    """(the conversation before its last assistant turn, that turn's text); a conversation
    without an answer is all prompt (None). What a model is asked to continue."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        return list(messages), None
    return messages[:last], messages[last]["content"]
