#!/usr/bin/env python3
"""Tool use of a model behind `hanlm serve`, asked as an OpenAI client asks: free
(`tool_choice=auto`) against a forced first call (`tool_choice=required`, the call constrained
to the declared tools' schemas).

The held-out prompts of the embedded tool set (`hanlm eval tools=demo`'s measure,
`hanlm.eval.tool_use`) run their tool loop through the OpenAI API of a live `hanlm serve`
around the model, greedily: each round sends the conversation with the record's tools; the
calls that come back (`tool_calls`) are run with the demo tools and their results sent back,
until an answer without a call (at most 3 rounds). With `required` only the first round is
forced; later rounds are free, so the model can answer with the result. The judge is exact
match against the reference conversation (not a model): the right tool, valid and correct
arguments, an answer that uses the result; and, on prompts whose reference answers directly,
how often the model answers without a call (forcing a call gives that up by design).

    python benchmarks/tool_use_served.py                       # Qwen2.5-Coder-0.5B (make qwen)
    python benchmarks/tool_use_served.py --model runs/tools/sft --limit 60

Writes benchmarks/results/tool_use_served.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

QWEN = ROOT / ".venv" / "models" / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"
SHOWN = ("right_tool", "valid_args", "correct_args", "answer_uses_result", "no_tool_direct")


def wire(conv: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The loop's conversation as OpenAI messages: call arguments as JSON strings."""
    out = []
    for m in conv:
        if m.get("tool_calls"):
            calls = [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False),
                    },
                }
                for c in m["tool_calls"]
            ]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out


def as_text(message: Any) -> str:
    """A response message as the text the loop reads: its content, then each call as the
    `<tool_call>` block the chat template writes."""
    text = message.content or ""
    for c in message.tool_calls or []:
        call = {"name": c.function.name, "arguments": json.loads(c.function.arguments)}
        text += f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(QWEN), help="a model dir or GGUF file hanlm serves")
    ap.add_argument("--limit", type=int, default=30, help="held-out prompts (0 = all)")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument(
        "--choices", nargs="+", choices=["auto", "required"], default=["auto", "required"]
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tool_use_served"))
    ap.add_argument(
        "--update",
        action="store_true",
        help="keep the other conditions of an existing --out file (measured with its settings)",
    )
    args = ap.parse_args()
    if args.model == str(QWEN) and not QWEN.is_file():
        sys.exit(f"{QWEN}: not there; run `make qwen` first, or give --model")

    import openai

    from hanlm.eval.tool_use import measure_tool_use, read_tool_set
    from hanlm.serve.api import create_app
    from hanlm.serve.engine import Engine
    from hanlm.serve.server import ServeConfig, load
    from hanlm.testing import ServedApp

    cfg = ServeConfig()
    cfg.model.path = args.model
    t0 = time.time()
    model, tok = load(cfg)
    engine = Engine(model, tok, max_queue=4)
    served = ServedApp(create_app(engine, model_name="m"))
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=900)
    print(f"[tools] serving {args.model} ({time.time() - t0:.0f} s to load)", flush=True)
    records = read_tool_set("demo", args.limit)

    def generate_fn(force: bool):
        def fn(convs: list[list[dict[str, Any]]], tools_each: list[list[Any]]) -> list[str]:
            texts = []
            for conv, tools in zip(convs, tools_each):
                first = not any(m["role"] == "tool" for m in conv)
                r = client.chat.completions.create(
                    model="m",
                    messages=wire(conv),
                    tools=tools,
                    tool_choice="required" if force and first else "auto",
                    max_tokens=args.max_tokens,
                    temperature=0,
                )
                texts.append(as_text(r.choices[0].message))
            return texts

        return fn

    out = Path(args.out)
    results: dict[str, Any] = {}
    if args.update and out.with_suffix(".json").is_file():
        results = json.loads(out.with_suffix(".json").read_text())["results"]
    try:
        for choice in args.choices:
            t0 = time.time()
            fig = measure_tool_use(records, generate_fn(choice == "required"))
            fig["seconds"] = round(time.time() - t0, 1)
            fig["prompts"] = len(records)
            results[choice] = fig
            shown = {k: fig.get(k) for k in SHOWN}
            print(f"[tools] tool_choice={choice}: {shown} ({fig['seconds']} s)", flush=True)
            write(out, args, len(records), results)
    finally:
        served.close()
        engine.close()


def write(out: Path, args: Any, n: int, results: dict[str, Any]) -> None:
    """The results so far as JSON and a Markdown table (printed too)."""
    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "model": args.model,
        "prompts": n,
        "max_tokens": args.max_tokens,
        "judge": "exact match against the reference conversation (not a model)",
    }
    out.with_suffix(".json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, ensure_ascii=False) + "\n"
    )
    lines = [
        f"# Tool use through hanlm serve — {meta['date']}, {meta['machine']}",
        "",
        f"`{Path(args.model).name}`, held-out prompts of the embedded tool set (the first n),"
        f" greedy, max_tokens {args.max_tokens}; judge: {meta['judge']}.",
        "",
        "| tool_choice (first round) | n | " + " | ".join(SHOWN) + " | malformed calls |",
        "|---|---|" + "---|" * (len(SHOWN) + 1),
    ]
    for choice, fig in results.items():
        cells = [f"{fig[k]:.0%}" if isinstance(fig.get(k), float) else "–" for k in SHOWN]
        row = f"| {choice} | {fig.get('prompts', n)} | " + " | ".join(cells)
        lines.append(row + f" | {fig.get('malformed_calls')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
