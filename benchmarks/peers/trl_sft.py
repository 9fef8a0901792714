#!/usr/bin/env python3
"""The peer of `hanlm sft`: a plain trl `SFTTrainer` script as trl's documentation writes it —
conversational `messages` data, `assistant_only_loss=True` (the tokenizer's chat template marks
the answers with `{% generation %}`), optionally peft LoRA.
Writes {"train_runtime", "losses", "examples"} as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory (with its tokenizer)")
    ap.add_argument("--data", required=True, help="JSONL with a `messages` field")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lora-r", type=int, default=0, help="0 = full fine-tuning")
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (a GPU)")
    ap.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations (trl's own default; off here as in hanlm's default)",
    )
    ap.add_argument(
        "--chat-template",
        default="",
        help="a Jinja file with {% generation %} markers, for a tokenizer whose own template has"
        " none (trl refuses assistant_only_loss then, e.g. SmolLM2's)",
    )
    args = ap.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    if args.chat_template:
        from pathlib import Path

        tok.chat_template = Path(args.chat_template).read_text(encoding="utf-8")
    ds = datasets.load_dataset("json", data_files=args.data, split="train")
    ds = ds.select_columns(["messages"])
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    peft_config = None
    if args.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=0.05,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            task_type="CAUSAL_LM",
        )
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            warmup_steps=args.warmup_ratio,
            lr_scheduler_type="cosine",
            max_grad_norm=1.0,
            seed=args.seed,
            data_seed=args.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=args.bf16,
            max_length=args.max_length,
            assistant_only_loss=True,
            packing=False,
            # trl turns it on by default; hanlm's default is off: the same work on both sides
            gradient_checkpointing=args.gradient_checkpointing,
        ),
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_config,
        callbacks=[Losses()],
    )
    t0 = time.time()
    result = trainer.train()
    out = {
        "train_runtime": result.metrics["train_runtime"],
        "train_wall": time.time() - t0,
        "losses": losses,
        "examples": args.steps * args.batch_size,
    }
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
