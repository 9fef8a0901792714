#!/usr/bin/env python3
"""The README's demo table, generated from a run of the demo recipe.

    python scripts/demo_figures.py runs/demo          # record the run, rewrite the README table
    python scripts/demo_figures.py --check            # the README table matches the record

Each stage's figures are its headline row in the run's report (`hanlm.pipeline.headline_rows`:
the figure that matters before -> after, and a verdict that names its judge), read from the
stage's `hanlm.json` and reports. The record, docs/demo-figures.json, keeps them with the date,
machine, commit and wall time of the run; the README table between the `demo-figures` markers is
rendered from it, and tests/test_readme.py fails when the two disagree, so the figures a
newcomer checks are the ones a run of the code produced.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RECORD = ROOT / "docs" / "demo-figures.json"
START, END = "<!-- demo-figures:start -->", "<!-- demo-figures:end -->"

# What each demo stage does, in the README's words (the figures come from the run).
WHAT = {
    "tokenizer": "trains an 8k SentencePiece tokenizer on Chinese + English",
    "pretrain": "a 1.8M-parameter LLaMA-style model from scratch",
    "sft": "instruction tuning with answer-only loss (ChatML)",
    "audit": "n-gram audit of the benchmark against all training data",
    "eval": "the embedded 4-option benchmark, zh/en perplexity",
    "reward": "the proxy reward model PPO optimises",
    "gold_reward": "a gold reward model on the other half of the pairs, which PPO never sees",
    "ppo": "PPO with KL penalty and pretraining mix",
    "ppo_ptx_only": "the control: the pretraining mix alone",
    "dpo": "DPO on the same pairs",
}


def record(run_dir: Path) -> dict:
    """The headline row of every stage of the demo run in `run_dir`."""
    from hanlm.pipeline.headline_rows import load_reports, stage_headline
    from hanlm.pipeline.recipe import find_recipe, load_recipe, stage_dir

    recipe = load_recipe(find_recipe("demo"))
    stages, seconds, infos = [], 0.0, []
    for stage in recipe.stages:
        d = stage_dir(recipe, stage.name) if run_dir is None else run_dir / stage.name
        info_path = d / "hanlm.json"
        if not info_path.is_file():
            sys.exit(f"{info_path}: missing; run the whole demo first (make demo)")
        info = json.loads(info_path.read_text(encoding="utf-8"))
        infos.append(info)
        h = stage_headline(stage.name, stage.command, info, load_reports(d, stage.command))
        if info.get("started") and info.get("ended"):  # ISO times with their offset
            took = datetime.datetime.fromisoformat(info["ended"]) - datetime.datetime.fromisoformat(
                info["started"]
            )
            seconds += took.total_seconds()
        stages.append(
            {
                "stage": stage.name,
                "command": stage.command,
                "figures": [f.text() for f in h.figures],
                "verdict": h.verdict,
            }
        )
    commits = {info.get("git_commit") for info in infos if info.get("git_commit")}
    commit = (
        ", ".join(sorted(c[:7] for c in commits))
        or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
    )
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "commit": commit,
        "stage_seconds": round(seconds),
        "stages": stages,
    }


def table(rec: dict) -> str:
    rows = [
        START,
        "| stage | what it does | what the run measured |",
        "|---|---|---|",
    ]
    for s in rec["stages"]:
        said = "; ".join(s["figures"][:3])
        if s["verdict"]:
            said = f"{said} — {s['verdict']}" if said else s["verdict"]
        what = WHAT.get(s["stage"], f"`hanlm {s['command']}`")
        rows.append(f"| `{s['stage']}` | {what} | {said.replace('|', '/')} |")
    rows.append("")
    rows.append(
        f"Figures of the run recorded in `docs/demo-figures.json` ({rec['date']}, commit"
        f" {rec['commit']}, {rec['machine']}; stages {rec['stage_seconds'] // 60} min)."
    )
    rows.append(END)
    return "\n".join(rows)


def readme_block(text: str) -> str:
    if START not in text or END not in text:
        sys.exit(f"{README}: the {START} ... {END} markers are missing")
    return text[text.index(START) : text.index(END) + len(END)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", nargs="?", help="the demo's run directory (runs/demo)")
    ap.add_argument("--check", action="store_true", help="only check README against the record")
    args = ap.parse_args()
    text = README.read_text(encoding="utf-8")
    if args.check or not args.run_dir:
        rec = json.loads(RECORD.read_text(encoding="utf-8"))
        if readme_block(text) != table(rec):
            print(f"{README}: the demo table differs from {RECORD}; run this script on a demo run")
            return 1
        print("README demo table matches docs/demo-figures.json")
        return 0
    rec = record(Path(args.run_dir))
    RECORD.write_text(json.dumps(rec, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    README.write_text(text.replace(readme_block(text), table(rec)), encoding="utf-8")
    print(f"wrote {RECORD} and the README table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
