"""`hanlm sft`: instruction tuning with a chat template and loss on the answers only.

Reads top to bottom: model and tokenizer -> chat template (its special tokens added, the
embeddings resized) -> conversations rendered with `render()` into ids and answer-only labels,
long ones truncated by an explicit policy -> optional LoRA / QLoRA -> trl's SFTTrainer ->
held-out answer loss and stop-token rate before and after -> an HF directory whose tokenizer and
generation config carry the template and the stop tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from hanlm import IGNORE_INDEX
from hanlm.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    TemplateName,
    TrainConfig,
    opt,
    zero_stage,
)
from hanlm.data import load, or_demo, to_dataset
from hanlm.data.formats import split_last_answer
from hanlm.data.templates import apply_template, render, stop_token_ids
from hanlm.generation import GenerationOptions, generate
from hanlm.modeling import load_model, load_tokenizer, pad_batch
from hanlm.runs import Run, atomic_write_text
from hanlm.trainer import (
    apply_lora,
    batching_args,
    check_launch,
    count_padding,
    describe_trainable,
    metrics_callback,
    run_trainer,
    training_args,
)


@dataclass
class SFTConfig(OutputConfig):
    RENAMED: ClassVar[dict[str, str]] = {"cutoff_len": "max_length"}

    model: ModelConfig = opt(ModelConfig, "the model to tune (HF dir, .gguf, hub id)")
    data: DataConfig = opt(
        DataConfig, "alpaca / sharegpt / messages data (no paths: the embedded demo set)"
    )
    template: TemplateName = opt(
        "auto", "chat template; auto = the model's own (guessed if it lacks answer markers)"
    )
    max_length: int = opt(512, "most tokens per conversation")
    truncation: Literal["drop", "truncate_history"] = opt(
        "truncate_history",
        "too long: drop it, or drop the oldest turns (an answer is never cut)",
    )
    quantize: Literal["none", "4bit"] = opt("none", "4bit = QLoRA (bitsandbytes, GPU only)")
    neftune_alpha: float = opt(0.0, "NEFTune embedding noise (0 = off; 5 is the paper's)")
    packing: bool = opt(False, "pack several conversations into one sequence")
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(lr=2e-5),  # trl's default; the papers' are similar
        metadata={"help": "optimisation"},
    )
    lora: LoraConfig = opt(LoraConfig, "LoRA adapters")
    eval_prompts: int = opt(32, "held-out prompts answered greedily before and after training")
    generation: GenerationOptions = field(
        default_factory=lambda: GenerationOptions(max_new_tokens=128, temperature=0.0),
        metadata={"help": "decoding of the held-out answers"},
    )

    def validate(self) -> None:
        if self.quantize == "4bit" and not self.lora.enabled:
            raise ConfigError(
                "quantize=4bit trains LoRA adapters on a frozen 4-bit model: set lora.enabled=true"
            )
        if self.quantize == "4bit" and zero_stage(self.train) == 3:
            # ZeRO-3 partitions weights of one storage dtype; hanlm's 4-bit load keeps uint8
            # storage (no bnb_4bit_quant_storage), which ZeRO-3 cannot shard with the rest.
            raise ConfigError(
                f"quantize=4bit (QLoRA) with ZeRO-3 ({self.train.deepspeed}) cannot work here: use"
                " configs/deepspeed/zero2.json, or LoRA without quantize on ZeRO-3"
            )
        if self.max_length < 2:
            raise ConfigError("max_length must be at least 2 tokens")


# --------------------------------------------------------------------------- data


def fit_to_length(
    tok: Any,
    messages: list[dict[str, Any]],
    max_length: int,
    policy: str,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[list[int], list[int], int] | None:
    """Render a conversation within `max_length` tokens: (ids, labels, turns dropped) or None.

    With truncate_history the oldest user/assistant exchanges after the system prompt are
    dropped until it fits (an exchange ends with an answer that calls no tool, so a call is
    never parted from its result); an answer is never cut, so what cannot fit whole is dropped.
    """
    system = messages[:1] if messages[0]["role"] == "system" else []
    turns = messages[len(system) :]
    dropped = 0
    while True:
        ids, labels = render(tok, system + turns, tools=tools)
        if len(ids) <= max_length:
            return ids, labels, dropped
        if policy == "drop":
            return None
        # Drop through the first assistant turn: one whole exchange.
        ends = [
            i for i, m in enumerate(turns) if m["role"] == "assistant" and not m.get("tool_calls")
        ]
        cut = ends[0] if ends else None
        if cut is None or not any(m["role"] == "assistant" for m in turns[cut + 1 :]):
            return None
        turns = turns[cut + 1 :]
        dropped += cut + 1


def _encode(
    records: list[dict[str, Any]], tok: Any, cfg: SFTConfig
) -> tuple[list[dict[str, list[int]]], dict[str, int]]:
    from tqdm.auto import tqdm

    rows, counts = [], {"kept": 0, "dropped_too_long": 0, "history_truncated": 0}
    for rec in tqdm(records, desc="rendering", leave=False, mininterval=1.0):
        fitted = fit_to_length(
            tok, rec["messages"], cfg.max_length, cfg.truncation, rec.get("tools")
        )
        if fitted is None:
            counts["dropped_too_long"] += 1
            continue
        ids, labels, dropped = fitted
        counts["history_truncated"] += dropped > 0
        counts["kept"] += 1
        rows.append({"input_ids": ids, "labels": labels})
    return rows, counts


def _collator(tok: Any) -> Any:
    """trl's collator for padded batches of rendered conversations."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)


# --------------------------------------------------------------------------- measures


def answer_loss(model: Any, rows: list[dict[str, list[int]]], batch_size: int = 8) -> float:
    """Mean loss per answer token over `rows` (labels mask everything but the answers)."""
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            ids, mask = pad_batch([r["input_ids"] for r in batch], 0, "right", device)
            labels, _ = pad_batch([r["labels"] for r in batch], IGNORE_INDEX, "right", device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            total += loss.item()
            count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


def held_out_answers(
    model: Any, tok: Any, records: list[dict[str, Any]], opts: GenerationOptions
) -> list[dict[str, Any]]:
    """Greedy answers to held-out prompts (the conversation up to its last answer), each with
    the tools its record declares."""
    prompts, refs = [], []
    for rec in records:
        prompt, answer = split_last_answer(rec["messages"])
        prompts.append(prompt)
        refs.append(answer)
    tools = [rec.get("tools") or None for rec in records]
    answers = generate(model, tok, prompts, opts, tools_each=tools)
    return [
        {"prompt": p[-1]["content"], "reference": r, **a} for p, r, a in zip(prompts, refs, answers)
    ]


# --------------------------------------------------------------------------- run


def run(cfg: SFTConfig) -> Path:
    import torch
    from transformers import set_seed
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    if cfg.quantize == "4bit" and not torch.cuda.is_available():
        raise ValueError(
            "quantize=4bit (QLoRA) needs a CUDA GPU and bitsandbytes; on this machine use"
            " lora.enabled=true without quantize, or full fine-tuning"
        )
    check_launch(cfg.train, "hanlm sft")  # before anything loads
    attention = cfg.model.attn_implementation  # flash-attention: padding-free by default
    batching = batching_args(cfg.train, "sft", not cfg.packing, not cfg.packing, attention)
    with Run("sft", cfg) as run:
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.path)
        added = apply_template(tok, cfg.template)

        dcfg = or_demo(cfg.data, "sft")
        data = load(dcfg, kind="chat")
        print(data.stats.summary())
        train_rows, train_counts = _encode(data.train, tok, cfg)
        valid_rows, valid_counts = _encode(data.valid, tok, cfg)
        if not train_rows:
            raise ValueError(f"no conversation fits max_length={cfg.max_length}; raise it")
        print(
            f"[hanlm] rendered {train_counts['kept']} conversations; dropped as too long:"
            f" {train_counts['dropped_too_long']};"
            f" history truncated: {train_counts['history_truncated']}"
        )
        run.set(
            "data",
            {**data.stats.as_dict(), "train_render": train_counts, "valid_render": valid_counts},
        )

        # Model: load (4-bit for QLoRA), grow the embeddings for new template tokens.
        kw: dict[str, Any] = {}
        if cfg.quantize == "4bit":
            from transformers import BitsAndBytesConfig

            kw["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
            )
        model = load_model(cfg.model, **kw)
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=True)
        model.config.pad_token_id = tok.pad_token_id

        summary: dict[str, Any] = {"template_tokens_added": added, **run.initial}
        valid_eval = data.valid[: cfg.eval_prompts]
        if valid_rows and not run.initial:  # measured once, kept across a resume
            summary["initial_answer_loss"] = answer_loss(model, valid_rows)
            before = held_out_answers(model, tok, valid_eval, cfg.generation)
            summary["initial_stop_rate"] = sum(a["stopped"] for a in before) / max(len(before), 1)
            run.record_initial(summary)
            print(
                f"[hanlm] before SFT: answer loss {summary['initial_answer_loss']:.4f},"
                f" stop rate {summary['initial_stop_rate']:.2%}"
            )

        if cfg.lora.enabled:
            if cfg.quantize == "4bit":
                from peft import prepare_model_for_kbit_training

                model = prepare_model_for_kbit_training(model)
            lora = cfg.lora
            if added:
                # New template tokens need trainable rows, or the model can never learn to stop.
                # (peft's trainable-token rows clash with trl's fused LM-head loss, so the
                # embeddings and head are trained whole.)
                extra = {"embed_tokens", "lm_head"}
                lora = replace(lora, modules_to_save=sorted(set(lora.modules_to_save) | extra))
            model = apply_lora(model, lora)
        summary.update(describe_trainable(model))

        args = training_args(
            cfg.train,
            run.dir,
            has_eval=bool(valid_rows),
            args_cls=TrlSFTConfig,
            max_length=None,  # lengths were enforced above, by the truncation policy
            packing=cfg.packing,
            neftune_noise_alpha=cfg.neftune_alpha or None,
            **batching,
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            data_collator=None if cfg.packing or args.padding_free else _collator(tok),
            train_dataset=to_dataset(train_rows),
            eval_dataset=to_dataset(valid_rows) if valid_rows else None,
            processing_class=tok,
            callbacks=[metrics_callback(run)],
        )
        padding = count_padding(trainer)
        result = run_trainer(trainer, run.resume_from())
        summary.update(train_loss=result.training_loss, steps=result.global_step)
        summary.update(padding.summary("sft", args))

        # The stop tokens travel with the model: chat, the API, transformers and vLLM read them.
        stops = stop_token_ids(tok, cfg.template)
        model.config.eos_token_id = stops[0]
        model = run.save_model(trainer.model, tok, cfg.lora, stops)
        if valid_rows:
            summary["answer_loss"] = answer_loss(model, valid_rows)
            after = held_out_answers(model, tok, valid_eval, cfg.generation)
            summary["stop_rate"] = sum(a["stopped"] for a in after) / max(len(after), 1)
            lines = [json.dumps(a, ensure_ascii=False) for a in after]
            atomic_write_text(run.dir / "samples.jsonl", "\n".join(lines) + "\n")
        run.finish(summary)
        if "answer_loss" in summary:
            print(
                f"[hanlm] sft: answer loss {summary.get('initial_answer_loss', math.nan):.4f}"
                f" -> {summary['answer_loss']:.4f}; stop rate"
                f" {summary.get('initial_stop_rate', math.nan):.2%} -> {summary['stop_rate']:.2%}"
            )
    return run.dir
