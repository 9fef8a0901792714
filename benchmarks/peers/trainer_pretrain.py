#!/usr/bin/env python3
"""The peer of `hanlm pretrain`: a plain transformers `Trainer` script, written the way the
library's own `run_clm.py` example is — `datasets.map` to tokenize, `group_texts` to pack,
`DataCollatorForLanguageModeling(mlm=False)`, optionally peft LoRA with trainable embeddings.

One difference from `run_clm.py`, so that both sides train on the same blocks in the same
order: the last partial block is kept, padded (hanlm keeps it; `run_clm.py` drops it).
Writes {"train_runtime", "losses", "tokens", "params"} as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF model directory (with its tokenizer)")
    ap.add_argument("--data", required=True, help="JSONL with a `text` field")
    ap.add_argument("--output-dir", required=True)
    ap.add_argument("--out", required=True, help="result JSON")
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--scheduler", default="cosine")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--lora-r", type=int, default=0, help="0 = full training")
    ap.add_argument("--lora-alpha", type=int, default=32)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (a GPU)")
    args = ap.parse_args()

    import datasets
    import torch
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    set_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    raw = datasets.load_dataset("json", data_files=args.data, split="train")

    def tokenize(batch):
        ids = tok(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[*x, tok.eos_token_id] for x in ids]}

    def group_texts(batch):
        stream = [t for ids in batch["input_ids"] for t in ids]
        bs = args.block_size
        blocks = [stream[i : i + bs] for i in range(0, len(stream), bs)]
        blocks = [b + [pad_id] * (bs - len(b)) for b in blocks if len(b) >= 2]
        return {"input_ids": blocks}

    ds = raw.map(tokenize, batched=True, remove_columns=raw.column_names)
    collate_tok = tok
    if tok.pad_token_id == tok.eos_token_id:
        # DataCollatorForLanguageModeling ignores every label equal to the pad id: with pad = EOS
        # (SmolLM2) every document end would leave the loss, which hanlm (and run_clm.py) train
        # on. The collator gets a copy whose pad is a special token the corpus never contains.
        import copy
        import itertools

        used = set(itertools.chain.from_iterable(ds["input_ids"]))
        spare = [i for i in tok.all_special_ids if i not in used]
        if not spare:
            raise SystemExit("no special token is free to pad with; give the tokenizer a pad")
        collate_tok = copy.deepcopy(tok)
        collate_tok.pad_token = tok.convert_ids_to_tokens(spare[0])
    pad_id = collate_tok.pad_token_id
    ds = ds.map(group_texts, batched=True, batch_size=len(ds))  # one group: one token stream

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = get_peft_model(
            model,
            LoraConfig(
                r=args.lora_r,
                lora_alpha=args.lora_alpha,
                lora_dropout=0.05,
                target_modules=targets,
                modules_to_save=["embed_tokens", "lm_head"],
                task_type="CAUSAL_LM",
            ),
        )
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=args.output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            warmup_steps=args.warmup_ratio,
            lr_scheduler_type=args.scheduler,
            max_grad_norm=1.0,
            seed=args.seed,
            data_seed=args.seed,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            bf16=args.bf16,
            dataloader_num_workers=0,
        ),
        train_dataset=ds,
        data_collator=DataCollatorForLanguageModeling(collate_tok, mlm=False),
        callbacks=[Losses()],
    )
    t0 = time.time()
    result = trainer.train()
    out = {
        "train_runtime": result.metrics["train_runtime"],
        "train_wall": time.time() - t0,
        "losses": losses,
        "tokens": args.steps * args.batch_size * args.block_size,
        "params": sum(p.numel() for p in model.parameters()),
        "blocks": len(ds),
    }
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
