#!/usr/bin/env python3
"""The peer of `hanlm eval scoring=loglik`: lm-evaluation-harness with its `hf` model on the same
multiple-choice items, written as a local task YAML whose dataset is a local JSON file (the prompt
is hanlm's, the options follow it directly, as hanlm scores them).
Writes {"seconds", "items": [{"doc_id", "loglik": [...]}]} as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory")
    ap.add_argument("--docs", required=True, help="JSONL: prompt, choices, target")
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--batch-size", default="8")
    ap.add_argument(
        "--dtype", default="float32", help="the dtype hanlm eval loads (its model.dtype)"
    )
    args = ap.parse_args()

    t0 = time.time()
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tasks:
        Path(tasks, "hanlm_bench.yaml").write_text(
            "task: hanlm_bench\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {Path(args.docs).resolve()}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            "doc_to_text: prompt\n"
            "doc_to_choice: choices\n"
            "doc_to_target: target\n"
            'target_delimiter: ""\n'
            "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
            encoding="utf-8",
        )
        results = simple_evaluate(
            model="hf",
            model_args={"pretrained": args.model, "dtype": args.dtype},
            tasks=["hanlm_bench"],
            task_manager=TaskManager(include_path=tasks),
            device="cuda" if torch.cuda.is_available() else "cpu",
            batch_size=args.batch_size,
            log_samples=True,
        )
    samples = sorted(results["samples"]["hanlm_bench"], key=lambda s: s["doc_id"])
    items = [
        {"doc_id": s["doc_id"], "loglik": [float(r[0]) for r in s["filtered_resps"]]}
        for s in samples
    ]
    metrics = results["results"]["hanlm_bench"]
    out = {
        "seconds": time.time() - t0,
        "items": items,
        "acc": metrics.get("acc,none"),
        "acc_norm": metrics.get("acc_norm,none"),
    }
    Path(args.out).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
