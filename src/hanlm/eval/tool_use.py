"""The tool-use measure of `hanlm eval tools=...`: on held-out tool prompts, does a model call the
right tool with the right arguments, and does its final answer use the result?

For each conversation of the test set (the embedded `tools.test.jsonl.gz`, or a file in the same
shape: hanlm.data.tools), the prompt is its turns before the first assistant turn, with the
record's tools declared through the model's chat template. The loop runs greedily: generate;
read the `<tool_call>` blocks (`parse_tool_calls`); if there are calls, run them with the demo
tools (`hanlm.datagen.demo_tools.execute`), append the assistant's call turn and the tool
results, and generate again (at most `max_rounds` rounds); the first answer without a call is
the final answer.

The judge is exact match against the reference conversation — its calls and the results its
tools returned — not a model:
- `right_tool`: the model's first round calls the same tools (by name) as the reference's;
- `valid_args`: it called, and every call names a declared tool with arguments its JSON schema
  accepts;
- `correct_args`: every round of calls equals the reference's (names and arguments, order within
  a round aside);
- `answer_uses_result`: the final answer contains what each reference result says (the next
  line, the meaning, the dynasty, the number, or the error the tool gave: `result_key`);
these four over the prompts whose reference calls a tool, and
- `no_tool_direct`: over the prompts whose reference answers directly, the share the model
  answers without a call;
- `malformed_calls`: `<tool_call>` blocks that do not parse (all prompts, all rounds).
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema

from hanlm import ASSETS
from hanlm.config import DataConfig
from hanlm.data import load
from hanlm.data.sources import DataError
from hanlm.data.tools import parse_tool_calls
from hanlm.datagen.demo_tools import execute, result_key, result_text
from hanlm.generation import GenerationOptions, generate

# (conversations, the tools declared to each) -> one generated text per conversation
GenerateFn = Callable[[list[list[dict[str, Any]]], list[list[dict[str, Any]]]], list[str]]
RATES = ("right_tool", "valid_args", "correct_args", "answer_uses_result")


def read_tool_set(spec: str, limit: int = 0) -> list[dict[str, Any]]:
    """`demo` (the embedded held-out split) or a chat file with tools, read through hanlm's
    loader (tool calls checked); the first `limit` records (0 = all)."""
    path = str(ASSETS / "tools.test.jsonl.gz") if spec == "demo" else spec
    if spec != "demo" and not Path(path).exists():
        raise DataError(f"tools={spec}: no such file")
    recs = load(DataConfig(paths=[path], dedup="none"), kind="chat", split=False).train
    recs = recs[:limit] if limit else recs
    for i, r in enumerate(recs):
        if not r.get("tools"):
            raise DataError(f"{path}: record {i + 1} declares no tools; the measure needs them")
    if not recs:
        raise DataError(f"{path}: no records")
    return recs


def reference(rec: dict[str, Any]) -> dict[str, Any]:
    """A record's prompt (the turns before its first assistant turn), its rounds of calls as
    sorted (name, arguments JSON) lists, and what each tool result says."""
    msgs = rec["messages"]
    first = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    rounds, keys = [], []
    for m in msgs[first:]:
        if m["role"] == "assistant" and m.get("tool_calls"):
            rounds.append(_calls(m["tool_calls"]))
        elif m["role"] == "tool":
            try:
                keys.append(result_key(json.loads(m["content"])))
            except (json.JSONDecodeError, ValueError, TypeError):
                keys.append(m["content"])
    return {"prompt": msgs[:first], "rounds": rounds, "keys": keys}


def _calls(calls: list[dict[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for c in calls:
        f = c.get("function", c)
        out.append((f["name"], json.dumps(f["arguments"], ensure_ascii=False, sort_keys=True)))
    return sorted(out)


def _valid(call: dict[str, Any], declared: dict[str, dict[str, Any]]) -> bool:
    schema = declared.get(call["name"])
    if schema is None:
        return False
    validator = jsonschema.Draft202012Validator(schema.get("parameters", {}))
    return not any(True for _ in validator.iter_errors(call["arguments"]))


def _step(item: dict[str, Any], text: str, max_rounds: int) -> bool:
    """Read one generation into the item's state; True while the loop goes on."""
    declared = {t["function"]["name"]: t["function"] for t in item["tools"]}
    content, calls, problems = parse_tool_calls(text, declared)
    item["malformed"] += len(problems)
    if not calls:
        item["final"] = text if problems else content
        return False
    item["rounds"].append(calls)
    item["valid"] = item["valid"] and all(_valid(c, declared) for c in calls)
    n = sum(len(r) for r in item["rounds"][:-1])
    ids = [f"call_{n + k}" for k in range(len(calls))]
    item["conv"].append(
        {
            "role": "assistant",
            "content": content,
            "tool_calls": [
                {"id": i, "type": "function", "function": c} for i, c in zip(ids, calls)
            ],
        }
    )
    for i, c in zip(ids, calls):
        res = execute(c["name"], c["arguments"])
        item["conv"].append({"role": "tool", "content": result_text(res), "tool_call_id": i})
    return len(item["rounds"]) < max_rounds


def run_loop(
    records: list[dict[str, Any]], generate_fn: GenerateFn, max_rounds: int = 3
) -> list[dict[str, Any]]:
    """Every record's tool loop, all prompts of a round generated together."""
    items = [
        {
            "ref": reference(r),
            "tools": r["tools"],
            "conv": [dict(m) for m in reference(r)["prompt"]],
            "rounds": [],
            "valid": True,
            "malformed": 0,
            "final": None,
            "outputs": [],
        }
        for r in records
    ]
    active = list(range(len(items)))
    while active:
        texts = generate_fn([items[i]["conv"] for i in active], [items[i]["tools"] for i in active])
        going = []
        for i, text in zip(active, texts):
            items[i]["outputs"].append(text)
            if _step(items[i], text, max_rounds):
                going.append(i)
        active = going
    return items


def score(items: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures (see the module docstring), overall and by the reference's first tool."""
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    malformed = 0
    for it in items:
        ref, rounds = it["ref"], it["rounds"]
        malformed += it["malformed"]
        if not ref["rounds"]:
            by["no_tool"]["no_tool_direct"].append(float(not rounds and not it["malformed"]))
            continue
        group = ref["rounds"][0][0][0]
        model_rounds = [_calls(r) for r in rounds]
        first = {n for n, _ in model_rounds[0]} if model_rounds else set()
        final = it["final"] or ""
        row = {
            "right_tool": first == {n for n, _ in ref["rounds"][0]},
            "valid_args": bool(rounds) and it["valid"],
            "correct_args": model_rounds == ref["rounds"],
            "answer_uses_result": bool(ref["keys"]) and all(k in final for k in ref["keys"]),
        }
        for k, v in row.items():
            by[group][k].append(float(v))
            by["all"][k].append(float(v))
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    n_tool = len(by["all"]["right_tool"])
    n_direct = len(by["no_tool"]["no_tool_direct"])
    out: dict[str, Any] = {"n": len(items), "n_tool": n_tool, "n_no_tool": n_direct}
    out |= {k: mean(by["all"][k]) for k in RATES}
    out["no_tool_direct"] = mean(by["no_tool"]["no_tool_direct"])
    out["malformed_calls"] = malformed
    out["by_tool"] = {
        g: {"n": len(v["right_tool"]), **{k: mean(v[k]) for k in RATES}}
        for g, v in sorted(by.items())
        if g not in ("all", "no_tool")
    }
    return out


def measure_tool_use(
    records: list[dict[str, Any]],
    generate_fn: GenerateFn,
    out: Path | None = None,
    max_rounds: int = 3,
) -> dict[str, Any]:
    """Run the loop over `records` and score it; with `out`, one JSON line per prompt (the
    reference, every generation, the calls made and the final answer) for auditing."""
    items = run_loop(records, generate_fn, max_rounds)
    if out is not None:
        with open(out, "w", encoding="utf-8") as f:
            for it in items:
                row = {
                    "prompt": it["ref"]["prompt"],
                    "reference_calls": it["ref"]["rounds"],
                    "reference_keys": it["ref"]["keys"],
                    "outputs": it["outputs"],
                    "calls": it["rounds"],
                    "final": it["final"],
                    "malformed": it["malformed"],
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return score(items)


def model_generate(model: Any, tokenizer: Any, max_new_tokens: int, batch_size: int) -> GenerateFn:
    """A `GenerateFn` over hanlm's kernel generation: greedy, no repetition penalty."""
    opts = GenerationOptions(max_new_tokens=max_new_tokens, temperature=0.0)
    opts.repetition_penalty = 1.0

    def fn(convs: list[list[dict[str, Any]]], tools: list[list[dict[str, Any]]]) -> list[str]:
        answers = generate(model, tokenizer, convs, opts, batch_size, tools_each=tools)
        return [r["text"] for r in answers]

    return fn
