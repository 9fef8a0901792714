"""Context distillation measured: a model with a system prompt whose behaviour a rule can check,
distilled into the same model without it (`hanlm distill`), judged on held-out prompts:

- behaviour rate without the prompt, before -> after (judge: the regex `--check`, which is not
  the training target), beside the teacher's rate *with* the prompt (what can be reached);
- KL(teacher with the prompt ‖ model without it) per answer token, before -> after, on answers
  sampled from the teacher (judge: the training objective itself, on prompts never trained on);
- prompt tokens saved per request (the context's length once rendered).

    python benchmarks/distill.py NAME --model DIR --context TEXT --check REGEX [--data PATH]
        [-- extra hanlm distill overrides]

Each run is added under NAME to distill.json and the table distill.md in --out (default
benchmarks/results). `--chatterbot WHEEL` first turns the English conversations of the
chatterbot-corpus wheel (PyPI, BSD) into a chat JSONL of prompts for an English model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path


def chatterbot_prompts(wheel: str, out: Path) -> Path:
    """First exchange of every English chatterbot conversation as a chat record, one per
    question (a question asked twice would otherwise land in training and held-out alike)."""
    import yaml

    rows, seen = [], set()
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if "/data/english/" not in name or not name.endswith(".yml"):
                continue
            data = yaml.safe_load(z.read(name).decode("utf-8"))
            for conv in data.get("conversations") or []:
                if len(conv) < 2 or not all(isinstance(x, str) for x in conv[:2]):
                    continue
                if conv[0].strip().lower() not in seen:
                    seen.add(conv[0].strip().lower())
                    rows.append(
                        {
                            "messages": [
                                {"role": "user", "content": conv[0]},
                                {"role": "assistant", "content": conv[1]},
                            ]
                        }
                    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return out


def table(results: dict) -> str:
    lines = [
        "| model | run | behaviour rate w/o prompt: before -> after | teacher with prompt |"
        " held-out KL to teacher (nats/token): before -> after | prompt tokens saved /request |"
        " answer tokens: before -> after | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = r["summary"]
        lines.append(
            f"| {r['model']} | {name} | {s['initial_behaviour_rate']:.0%} ->"
            f" {s['behaviour_rate']:.0%} | {s['teacher_behaviour_rate']:.0%} |"
            f" {s['initial_eval_kl']:.3f} -> {s['eval_kl']:.3f} |"
            f" {s['tokens_saved_per_request']:.0f} |"
            f" {s['initial_eval_answer_tokens']:.1f} -> {s['eval_answer_tokens']:.1f} |"
            f" {r['seconds']:.0f} |"
        )
    lines.append("")
    for name, r in results.items():
        lines.append(
            f"- {name}: `{r['command']}` ({r['setup']}); rule check `{r['check']}`;"
            f" context: {r['context']!r}"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--model", required=True)
    ap.add_argument("--context", required=True)
    ap.add_argument("--check", required=True)
    ap.add_argument("--data", default="")
    ap.add_argument("--chatterbot", default="", help="chatterbot-corpus wheel: English prompts")
    ap.add_argument("--work", default="runs/bench-distill")
    ap.add_argument("--out", default="benchmarks/results")
    args, extra = ap.parse_known_args()  # the rest: more hanlm distill overrides (key=value)
    args.extra = [e for e in extra if e != "--"]

    data = args.data
    if args.chatterbot:
        data = str(chatterbot_prompts(args.chatterbot, Path(args.work) / "chatterbot_en.jsonl"))
    out = Path(args.work) / args.name
    cmd = [
        "distill",
        f"model.path={args.model}",
        f"context={args.context}",
        f"check={args.check}",
        f"output_dir={out}",
        "overwrite=true",
        *([f"data.paths=[{data}]", "data.valid_fraction=0.2"] if data else []),
        *args.extra,
    ]
    exe = str(Path(sys.executable).with_name("hanlm"))
    t0 = time.time()
    subprocess.run(["nice", "-n", "10", exe, *cmd], check=True)
    seconds = time.time() - t0
    info = json.loads((out / "hanlm.json").read_text(encoding="utf-8"))
    s = info["summary"]
    setup = (
        f"{info['data']['train_prompts']} training prompts, {s['train_answers']} teacher"
        f" answers, {s['steps']} steps, {info['data']['eval_prompts']} held-out prompts,"
        f" {'LoRA' if info['config']['lora']['enabled'] else 'full'},"
        f" {'top-' + str(info['config']['topk']) if info['config']['topk'] else 'full-vocab'} KL"
    )
    res_dir = Path(args.out)
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / "distill.json"
    results = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    results[args.name] = {
        "model": args.model,
        "context": args.context,
        "check": args.check,
        "command": "hanlm " + shlex.join(c for c in cmd if not c.startswith("overwrite")),
        "setup": setup,
        "summary": s,
        "seconds": round(seconds, 1),
    }
    path.write_text(json.dumps(results, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (res_dir / "distill.md").write_text(table(results), encoding="utf-8")
    print(table(results))


if __name__ == "__main__":
    main()
