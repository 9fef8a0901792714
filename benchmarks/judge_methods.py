#!/usr/bin/env python3
"""The preference methods of a `hanlm run preference-methods-qwen` run (or `preference-methods`)
judged by `hanlm judge` beside the gold reward model.

Each method's stage wrote `samples.jsonl`: the held-out prompts answered greedily before (the
start model) and after training, each answer with the gold reward model's score and the rule
checks. For every method, `hanlm judge mode=pairwise` compares the answer after with the answer
before on each prompt, in both orders (a win only when both orders agree, MT-bench's rule), the
prompt's reference answer shown to the judge; `gold_reward_model=` sets the gold reward model's
preference beside each verdict. The judge is a model behind an OpenAI-compatible endpoint:
`llama-server` (`make llamacpp`) on a GGUF, by default Qwen2.5-Coder-1.5B-Instruct
(`python scripts/fetch_model.py qwen2.5-1.5b`), which none of the methods trained against.

    python benchmarks/judge_methods.py runs/preference-methods-qwen
    python benchmarks/judge_methods.py RUN --methods dpo,simpo --limit 16 --judge URL

Writes --out .json and .md (default benchmarks/results/judge_methods_qwen); the judge's own
output directories (answers, verdicts, judge_report.json; resumable) go under --work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

JUDGE = ROOT / ".venv" / "models" / "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf"
METHODS = ("dpo", "kto", "orpo", "simpo")


def read_samples(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    if not rows or "before" not in rows[0]:
        sys.exit(f"{path}: expected rows of {{before, after}} answers (a stage's samples.jsonl)")
    return rows


def judge_inputs(rows: list[dict[str, Any]], work: Path) -> tuple[Path, Path, Path]:
    """questions.jsonl (each prompt, with its reference where it has one), and the answers
    after (a) and before (b) in `hanlm judge`'s answers format."""
    work.mkdir(parents=True, exist_ok=True)
    q, a, b = work / "questions.jsonl", work / "after.jsonl", work / "before.jsonl"
    questions, after, before = [], [], []
    for i, row in enumerate(rows):
        ref = row["before"].get("reference")
        rec = {"question_id": i, "category": "held_out", "turns": [row["before"]["prompt"]]}
        if ref:
            rec["reference"] = [ref]
        questions.append(rec)
        after.append({"question_id": i, "turns": [row["after"]["answer"]]})
        before.append({"question_id": i, "turns": [row["before"]["answer"]]})
    for path, recs in ((q, questions), (a, after), (b, before)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
        path.write_text(text, encoding="utf-8")
    return q, a, b


def gold_change(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The gold reward model's score before and after, and the paired change ± its s.e."""
    from hanlm.eval.judge_stats import mean_se

    diffs = [r["after"]["gold_score"] - r["before"]["gold_score"] for r in rows]
    change, se = mean_se(diffs)
    return {
        "before": mean_se([r["before"]["gold_score"] for r in rows])[0],
        "after": mean_se([r["after"]["gold_score"] for r in rows])[0],
        "change": change,
        "se": se,
        "up": sum(d > 0 for d in diffs),
        "down": sum(d < 0 for d in diffs),
    }


def run_judge(args: argparse.Namespace, url: str, run_dir: Path, method: str, rows: list) -> dict:
    work = args.work / method
    q, a, b = judge_inputs(rows, work / "inputs")
    cmd = [
        sys.executable,
        *("-m", "hanlm", "judge", "mode=pairwise", f"a={a}", f"b={b}", f"questions={q}"),
        *(f"judge={url}/v1", f"judge_max_tokens={args.judge_max_tokens}", f"lang={args.lang}"),
        *(f"concurrency={args.parallel}", "timeout=1800", f"output_dir={work / 'judge'}"),
        "resume=true",
    ]
    if (run_dir / "gold_reward").is_dir():
        cmd.append(f"gold_reward_model={run_dir / 'gold_reward'}")
    t0 = time.time()
    subprocess.run(cmd, check=True)
    report = json.loads((work / "judge" / "judge_report.json").read_text(encoding="utf-8"))
    from hanlm.eval.judge_stats import summary_of

    return {
        "seconds_this_run": round(time.time() - t0, 1),  # verdicts already asked are reused
        "judge": report.get("judge"),
        **summary_of(report),
        "first_position_share": report.get("first_position_share"),
        "gold": report.get("gold"),
        "identical_answers": sum(r["before"]["answer"] == r["after"]["answer"] for r in rows),
    }


def table(results: dict[str, Any]) -> str:
    from hanlm.eval.judge_stats import fmt

    head = (
        "| method | gold RM score (not the target): before → after, paired change ± 2 s.e. |"
        " judge: method wins / start wins / ties (of n) | method's win rate ± s.e. |"
        " position bias | judge agrees with the gold RM | unparsed |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for m, r in results.items():
        g, j = r["gold_rm"], r["judge"]
        gold = (
            f"{g['before']:.2f} → {g['after']:.2f} ({g['change']:+.2f} ± {2 * g['se']:.2f};"
            f" {g['up']} up, {g['down']} down)"
        )
        agree = j.get("gold") or {}
        both = agree.get("agree", 0) + agree.get("disagree", 0)
        agrees = f"{agree['agree']} of {both} (pairs where both name a winner)" if agree else "–"
        lines.append(
            f"| {m} | {gold} | {j['a_wins']} / {j['b_wins']} / {j['ties']} (of {j['pairs']}) |"
            f" {fmt(j['win_rate'])} ± {fmt(j['win_rate_se'])} | {fmt(j['position_bias'])} |"
            f" {agrees} | {j['unparsed']} |"
        )
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a preference-methods(-qwen) run directory")
    p.add_argument("--methods", default=",".join(METHODS), help="stages to judge (comma list)")
    p.add_argument("--limit", type=int, default=0, help="judge the first N prompts (0 = all)")
    p.add_argument("--judge", default="", help="a running judge's URL (default: llama-server)")
    p.add_argument("--judge-gguf", type=Path, default=JUDGE, help="the GGUF llama-server serves")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-server threads")
    p.add_argument("--parallel", type=int, default=2, help="requests at once (llama-server slots)")
    p.add_argument("--judge-max-tokens", type=int, default=320, help="max_tokens of a verdict")
    p.add_argument("--lang", default="zh", choices=("zh", "en"), help="the judge prompts' language")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "judge_methods")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/judge_methods_qwen")
    args = p.parse_args()

    samples = {}
    for m in args.methods.split(","):
        path = args.run_dir / m / "samples.jsonl"
        if not path.is_file():
            sys.exit(f"{path} is missing: run the recipe first (hanlm run preference-methods-qwen)")
        rows = read_samples(path)
        samples[m] = rows[: args.limit] if args.limit else rows

    from contextlib import nullcontext

    from hanlm.export.llamacpp import LlamaServer, find_llama_cpp

    if args.judge:
        server: Any = nullcontext()
    else:
        if not args.judge_gguf.is_file():
            sys.exit(f"{args.judge_gguf} is missing: python scripts/fetch_model.py qwen2.5-1.5b")
        bin_dir = find_llama_cpp()
        if bin_dir is None:
            sys.exit("llama-server is not built: make llamacpp (or give --judge URL)")
        server = LlamaServer(
            bin_dir,
            args.judge_gguf,
            ctx=4096,
            timeout=600,
            threads=args.threads,
            parallel=args.parallel,
        )
    results: dict[str, Any] = {}
    with server as s:
        url = args.judge or s.url
        for m, rows in samples.items():
            print(f"[judge_methods] {m}: {len(rows)} prompts, both orders", file=sys.stderr)
            results[m] = {
                "gold_rm": gold_change(rows),
                "judge": run_judge(args, url, args.run_dir, m, rows),
            }

    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "run_dir": str(args.run_dir),
        "judge": next(r["judge"]["judge"] for r in results.values()),
        "prompts": len(next(iter(samples.values()))),
        "command": "python benchmarks/judge_methods.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({**meta, "results": results}, ensure_ascii=False, indent=2) + "\n",
        encoding="utf-8",
    )
    md = (
        f"# Preference methods judged by `hanlm judge` and the gold reward model — {meta['date']},"
        f" {meta['machine']}\n\n`{meta['command']}`; {meta['prompts']} held-out prompts of"
        f" {meta['run_dir']}, greedy answers before and after each method; judge:"
        f" {meta['judge']} (pairwise, both orders, the reference shown; not any method's"
        " target); the gold reward model was not a target either.\n\n" + table(results)
    )
    args.out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)


if __name__ == "__main__":
    main()
