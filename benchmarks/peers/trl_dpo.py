#!/usr/bin/env python3
"""The peer of `hanlm dpo`: a plain trl `DPOTrainer` script as trl's documentation writes it —
conversational preference pairs (a user turn, then the chosen and rejected assistant turns),
the model's own chat template, a frozen copy of the start model as the reference (computed at
every step, trl's default), random batches.
Writes {"train_runtime", "setup_seconds", "losses", "examples"} as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory (with its tokenizer)")
    ap.add_argument("--data", required=True, help="JSONL with prompt / chosen / rejected text")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5, help="hanlm dpo's default")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (a GPU)")
    args = ap.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import DPOConfig, DPOTrainer

    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    rows = datasets.load_dataset("json", data_files=args.data, split="train")

    def conversational(r: dict) -> dict:
        return {
            "prompt": [{"role": "user", "content": r["prompt"]}],
            "chosen": [{"role": "assistant", "content": r["chosen"]}],
            "rejected": [{"role": "assistant", "content": r["rejected"]}],
        }

    ds = rows.map(conversational, remove_columns=rows.column_names)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    t0 = time.time()
    trainer = DPOTrainer(
        model=model,
        ref_model=ref,
        args=DPOConfig(
            output_dir=args.output_dir,
            num_train_epochs=1,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            beta=args.beta,
            seed=args.seed,
            data_seed=args.seed,
            logging_steps=5,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=args.bf16,
            max_length=args.max_length,
            # trl turns it on by default; hanlm's default is off: the same work on both sides
            gradient_checkpointing=False,
        ),
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Losses()],
    )
    setup = time.time() - t0
    result = trainer.train()
    out = {
        "train_runtime": result.metrics["train_runtime"],
        "setup_seconds": setup,
        "losses": losses,
        "examples": len(ds),
    }
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
