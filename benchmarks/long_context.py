"""Long context by RoPE scaling: held-out bits per character at 1x, 2x, 4x and 8x the length a
model was trained at, with no scaling, linear interpolation, dynamic NTK and YaRN, before and
after a short position-interpolation fine-tune (Chen et al. 2023: continued pretraining at the
longer length with linear scaling).

    python benchmarks/long_context.py MODEL_DIR --trained 256 [--finetune STEPS] [--out DIR]

Writes `long_context.json` and `long_context.md` (a table) into --out (default
benchmarks/results). The judge is the held-out corpus' next-token loss, which no variant was
tuned on (the fine-tune uses the training corpus).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("none", "linear", "dynamic", "yarn")


def held_out_tokens(tok, limit: int) -> tuple[list[int], float]:
    """Held-out Chinese text as one token stream, and its tokens per character."""
    from hanlm import ASSETS
    from hanlm.config import DataConfig
    from hanlm.data import load

    texts = [
        r["text"]
        for r in load(
            DataConfig(paths=[str(ASSETS / "zh_corpus.valid.jsonl.gz")]), kind="text"
        ).train
    ]
    ids: list[int] = []
    chars = 0
    for t in texts:
        piece = tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids += piece
        chars += len(t) + 1
        if len(ids) >= limit:
            break
    return ids, len(ids) / chars


def bits_per_char(model, ids: list[int], window: int, tpc: float) -> float:
    """Mean next-token loss over non-overlapping windows of `window` tokens, as bits/char."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - window + 1, window):
            x = torch.tensor([ids[start : start + window]])
            out = model(input_ids=x, labels=x)
            total += float(out.loss) * (window - 1)
            count += window - 1
    return total / count * tpc / math.log(2)


def measure(
    model_dir: str, trained: int, tokens: int, kinds: tuple[str, ...] = KINDS
) -> dict[str, dict[str, float]]:
    """bits/char per RoPE kind and length multiple; "saved" = the directory's own config."""
    from hanlm.config import ModelConfig, RopeConfig
    from hanlm.modeling import load_model, load_tokenizer

    tok = load_tokenizer(model_dir)
    ids, tpc = held_out_tokens(tok, tokens)
    table: dict[str, dict[str, float]] = {}
    for kind in kinds:
        row = {}
        for mult in (1, 2, 4, 8):
            rope = (
                RopeConfig(kind, float(mult), trained)
                if kind not in ("none", "saved") and mult > 1
                else RopeConfig()
            )
            model = load_model(ModelConfig(path=model_dir, dtype="float32", rope=rope)).eval()
            row[f"{mult}x"] = round(bits_per_char(model, ids, trained * mult, tpc), 3)
        table[kind] = row
        print(f"[long-context] {model_dir} {kind}: {row}", flush=True)
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument(
        "--trained", type=int, required=True, help="the length the model was trained at"
    )
    ap.add_argument("--finetune", type=int, default=0, help="PI fine-tune steps at 4x (0 = skip)")
    ap.add_argument("--tokens", type=int, default=16384, help="held-out tokens measured")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    from hanlm import ASSETS

    started = time.time()
    result = {"model": args.model, "trained_length": args.trained, "judge": "held-out zh corpus"}
    result["before"] = measure(args.model, args.trained, args.tokens)
    if args.finetune:
        ft = Path(args.out) / "long_context_pi_model"
        cmd = [
            sys.executable, "-m", "hanlm.pipeline.cli", "pretrain", f"model.path={args.model}",
            "model.dtype=float32", "model.rope.type=linear", "model.rope.factor=4",
            f"model.rope.original_max_position_embeddings={args.trained}",
            f"block_size={4 * args.trained}", f"train.max_steps={args.finetune}",
            "train.batch_size=4", "train.lr=5e-4", "train.eval_steps=0", "data.max_records=4000",
            f"data.paths=[{ASSETS}/zh_corpus.train.jsonl.gz,{ASSETS}/en_corpus.train.jsonl.gz]",
            f"output_dir={ft}", "overwrite=true",
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
        # The fine-tuned directory keeps linear x4 in its config: measured as saved.
        after = measure(str(ft), args.trained, args.tokens, ("saved",))
        result["after_pi_finetune"] = {"steps": args.finetune, "factor": 4, "table": after}
    result["seconds"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "long_context.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    lines = [
        f"Held-out bits per character (lower is better) of {args.model}, trained at"
        f" {args.trained} tokens, at 1x-8x that length:",
        "",
        "| model | RoPE | 1x | 2x | 4x | 8x |",
        "|---|---|---|---|---|---|",
    ]
    for name, table in (
        ("as trained", result["before"]),
        ("after PI fine-tune", result.get("after_pi_finetune", {}).get("table", {})),
    ):
        for kind, row in table.items():
            label = "linear x4 (saved)" if kind == "saved" else kind
            lines.append(
                f"| {name} | {label} | "
                + " | ".join(str(row[k]) for k in ("1x", "2x", "4x", "8x"))
                + " |"
            )
    (out / "long_context.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
