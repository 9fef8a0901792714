"""`hanlm distill`: context distillation (Askell et al. 2021, "A General Language Assistant as a
Laboratory for Alignment").

A long context (a system prompt, a persona, few-shot examples) makes a model behave well but
costs its tokens on every request. Context distillation trains the model *without* the context
to match the frozen model *with* it: minimise KL(p(·|context, x) ‖ p_θ(·|x)) over the tokens of
answers y to prompts x, where the answers come from the prompted teacher (sampled) or from the
data (given). The teacher is the starting model itself, frozen: a separate copy (full tuning),
or the same model with its LoRA adapter disabled.

Reads top to bottom: tokenizer and template -> the context (a file or the text) -> prompts
(chat or preference records; teacher prompt = student prompt with the context as a system
message) -> answers (sampled from the teacher, cached in answers.jsonl so a resumed run trains
on the same ones; or the data's own) -> the teacher's top-k log-probs when `topk` > 0 (computed
once; no teacher is then held while training) -> held-out measures before -> transformers'
Trainer with the KL loss of `hanlm.losses` -> held-out measures after -> an HF directory.

Held-out measures (prompts the training never saw), each named by its judge:
- `kl`: KL(teacher with context ‖ model without) per answer token, full distribution, on answers
  sampled from the teacher: the training target, measured on held-out prompts;
- `behaviour_rate`: share of greedy answers *without* the context that match the rule `check`
  (a regex, not the training target), beside the teacher's rate *with* the context;
- `tokens_saved`: prompt tokens per request the context costs (teacher prompt - student prompt).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hanlm import IGNORE_INDEX, losses
from hanlm.align.rollouts import Messages, prompts_and_references, rollout
from hanlm.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    TemplateName,
    TrainConfig,
    opt,
)
from hanlm.data import load, or_demo, to_dataset
from hanlm.data.templates import prompt_ids, render, require_template, stop_token_ids
from hanlm.modeling import load_model, load_tokenizer, pad_batch
from hanlm.runs import Run, atomic_write_json, atomic_write_text
from hanlm.trainer import (
    apply_lora,
    check_launch,
    describe_trainable,
    metrics_callback,
    run_trainer,
    training_args,
)


@dataclass
class DistillConfig(OutputConfig):
    model: ModelConfig = opt(ModelConfig, "the model: the student's start and, frozen, the teacher")
    context: str = opt("", "the context to distil: a file path, or the text itself (required)")
    data: DataConfig = opt(
        DataConfig, "prompts: chat or preference records (no paths: the embedded demo chats)"
    )
    template: TemplateName = opt("auto", "chat template; auto = the model's own")
    answers: Literal["sample", "given"] = opt(
        "sample", "sample: answers from the prompted teacher; given: the data's own answers"
    )
    samples_per_prompt: int = opt(1, "answers sampled per training prompt")
    temperature: float = opt(1.0, "sampling temperature of the teacher's answers")
    max_new_tokens: int = opt(64, "most tokens per sampled answer")
    max_prompt_length: int = opt(256, "prompts longer than this (with the context) are dropped")
    max_prompts: int = opt(0, "use at most this many training prompts (0 = all)")
    topk: int = opt(
        0,
        "0: KL to the teacher's full distribution (teacher run alongside); k: its top-k"
        " log-probs computed once, plus one bucket for the rest (no teacher while training)",
    )
    check: str = opt(
        "", "regex an answer must match (re.search) to show the behaviour: the held-out rule check"
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=100, batch_size=8, lr=1e-4, eval_steps=0, logging_steps=5
        ),
        metadata={"help": "optimisation"},
    )
    lora: LoraConfig = opt(LoraConfig, "LoRA adapters (the teacher: the adapter disabled)")
    eval_prompts: int = opt(32, "held-out prompts for the measures before and after")

    def validate(self) -> None:
        if not self.context:
            raise ConfigError("context is required: a file with the context, or its text")
        if self.answers == "sample" and self.temperature < 0:
            raise ConfigError("temperature must be >= 0 (0 = greedy answers)")
        if self.topk < 0 or self.samples_per_prompt < 1:
            raise ConfigError("topk must be >= 0 and samples_per_prompt >= 1")
        if self.check:
            try:
                re.compile(self.check)
            except re.error as e:
                raise ConfigError(f"check={self.check!r}: not a valid regex ({e})") from None


# --------------------------------------------------------------------------- prompts


def read_context(spec: str) -> str:
    """The context: the file `spec` names if there is one, else `spec` itself."""
    path = Path(spec)
    try:
        if path.is_file():
            text = path.read_text(encoding="utf-8").strip()
            if not text:
                raise ValueError(f"context file {path} is empty")
            return text
    except OSError:  # a long text is no file name
        pass
    return spec


def with_context(messages: Messages, context: str) -> Messages:
    """The teacher's prompt: the context as the system message (before an existing one)."""
    if messages and messages[0]["role"] == "system":
        first = {"role": "system", "content": context + "\n\n" + messages[0]["content"]}
        return [first, *messages[1:]]
    return [{"role": "system", "content": context}, *messages]


def given_answer(tok: Any, prompt: Messages, answer: str, where: str) -> list[int]:
    """The answer's tokens as the template writes them after `prompt` (end-of-turn included)."""
    start = prompt_ids(tok, prompt)
    ids, labels = render(tok, [*prompt, {"role": "assistant", "content": answer}])
    if ids[: len(start)] != start:
        raise ValueError(f"{where}: the template renders the prompt differently with an answer")
    last = max(i for i, lab in enumerate(labels) if lab != IGNORE_INDEX)
    return ids[len(start) : last + 1]


# --------------------------------------------------------------------------- batches


def encode(tok: Any, student: Messages, teacher: Messages, answer: list[int]) -> dict[str, Any]:
    s, t = prompt_ids(tok, student), prompt_ids(tok, teacher)
    return {
        "student_ids": s + answer,
        "teacher_ids": t + answer,
        "student_start": len(s),
        "teacher_start": len(t),
        "n": len(answer),
    }


class Collator:
    """Right-pads both views of each row and indexes the positions that predict the answer."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        import torch

        width = max(r["n"] for r in rows)
        out: dict[str, Any] = {}
        for who in ("student", "teacher"):
            ids, attn = pad_batch([r[f"{who}_ids"] for r in rows], self.pad_id, "right")
            pos = [[r[f"{who}_start"] - 1 + min(j, r["n"] - 1) for j in range(width)] for r in rows]
            out[f"{who}_ids"], out[f"{who}_attn"] = ids, attn
            out[f"{who}_pos"] = torch.tensor(pos)
        out["mask"] = torch.tensor([[1.0] * r["n"] + [0.0] * (width - r["n"]) for r in rows])
        if "topk_ids" in rows[0]:
            k = len(rows[0]["topk_ids"][0])
            fill = width

            def pad3(key: str, value: float) -> Any:
                return torch.tensor(
                    [r[key] + [[value] * k] * (fill - r["n"]) for r in rows],
                    dtype=torch.float32 if key == "topk_logp" else torch.long,
                )

            out["topk_logp"], out["topk_ids"] = pad3("topk_logp", 0.0), pad3("topk_ids", 0)
        return out


def answer_logits(model: Any, ids: Any, attn: Any, pos: Any) -> Any:
    """Logits at the positions that predict the answer tokens: [B, N, V]."""
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
    index = pos.to(logits.device).unsqueeze(-1).expand(-1, -1, logits.size(-1))
    return logits.gather(1, index)


TeacherOf = Callable[[Any], AbstractContextManager[Any]]


def batch_kl(student: Any, teacher_of: TeacherOf, b: dict[str, Any]) -> Any:
    """Per-token KL [B, N] of a collated batch: to the stored top-k, or to the full distribution
    of the teacher `teacher_of(student)` yields (run without gradients, and after the student:
    under LoRA the teacher is the student with its adapter disabled)."""
    import torch

    device = next(student.parameters()).device
    b = {k: v.to(device) for k, v in b.items()}
    s_logits = answer_logits(student, b["student_ids"], b["student_attn"], b["student_pos"])
    if "topk_ids" in b:
        return losses.distill_kl_topk(b["topk_logp"], b["topk_ids"], s_logits, b["mask"])
    with torch.no_grad(), teacher_of(student) as teacher:
        t_logits = answer_logits(teacher, b["teacher_ids"], b["teacher_attn"], b["teacher_pos"])
    return losses.distill_kl(t_logits, s_logits, b["mask"])


def make_trainer(teacher_of: TeacherOf, **kw: Any) -> Any:
    """A transformers Trainer whose loss is the distillation KL (mean per answer token)."""
    from transformers import Trainer

    class DistillTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            unwrapped = self.accelerator.unwrap_model(model)
            kl = batch_kl(model, lambda _: teacher_of(unwrapped), inputs)
            loss = kl.sum() / inputs["mask"].sum().clamp(min=1)
            return (loss, None) if return_outputs else loss

    return DistillTrainer(**kw)


# --------------------------------------------------------------------------- measures


def greedy_answers(
    model: Any, tok: Any, prompts: list[Messages], stops: list[int], cfg: DistillConfig
) -> list[dict[str, Any]]:
    out = []
    bs = max(cfg.train.batch_size, 1)
    for i in range(0, len(prompts), bs):
        r = rollout(model, tok, prompts[i : i + bs], stops, cfg.max_new_tokens, 0.0)
        out += [
            {"text": t, "ids": ids, "stopped": s} for t, ids, s in zip(r.texts, r.ids, r.stopped)
        ]
    return out


def behaviour(answers: list[dict[str, Any]], check: str) -> float | None:
    if not check or not answers:
        return None
    return sum(bool(re.search(check, a["text"])) for a in answers) / len(answers)


def held_out_kl(
    student: Any, teacher_of: TeacherOf, rows: list[dict[str, Any]], pad_id: int, batch: int
) -> float:
    """KL(teacher with context ‖ student without) per answer token, full distributions."""
    import torch

    collate = Collator(pad_id)
    total, count = 0.0, 0.0
    student.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            b = collate([{k: v for k, v in r.items() if not k.startswith("topk")} for r in chunk])
            kl = batch_kl(student, teacher_of, b)
            total += float(kl.sum())
            count += float(b["mask"].sum())
    return total / max(count, 1.0)


# --------------------------------------------------------------------------- run


def run(cfg: DistillConfig) -> Path:
    import torch
    from transformers import set_seed

    context = read_context(cfg.context)
    check_launch(cfg.train, "hanlm distill")  # before anything loads
    with Run("distill", cfg) as run:
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.path)
        require_template(tok, cfg.template, cfg.model.path, "distill")
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        stops = stop_token_ids(tok, cfg.template)

        # Prompts: the student's (as in the data) and the teacher's (with the context).
        data = load(or_demo(cfg.data, "sft"))
        if data.kind == "text":
            raise ValueError("distill prompts come from chat or preference data, not plain text")

        def pairs(records: list[dict[str, Any]], limit: int) -> list[tuple[Messages, Any]]:
            kept = []
            for p, ref in prompts_and_references(records):
                if len(prompt_ids(tok, with_context(p, context))) <= cfg.max_prompt_length:
                    kept.append((p, ref))
            return kept[:limit] if limit else kept

        train = pairs(data.train, cfg.max_prompts)
        held = pairs(data.valid, cfg.eval_prompts)
        if not train:
            raise ValueError(
                f"no prompt fits max_prompt_length={cfg.max_prompt_length} with the context"
                f" ({len(prompt_ids(tok, with_context([], context)))} tokens alone); raise it"
            )
        if not held and run.main:  # say so: the figures that judge the run would be missing
            print(
                "[hanlm] note: no held-out prompts, so nothing is measured before and after;"
                " set data.valid_paths or data.valid_fraction",
                file=sys.stderr,
            )
        ctx_tokens = [
            len(prompt_ids(tok, with_context(p, context))) - len(prompt_ids(tok, p))
            for p, _ in held or train
        ]
        run.set(
            "data",
            {
                **data.stats.as_dict(),
                "train_prompts": len(train),
                "eval_prompts": len(held),
                "context_chars": len(context),
            },
        )

        model = load_model(cfg.model)
        model.config.pad_token_id = tok.pad_token_id
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)

        # Answers: sampled from the prompted teacher once (cached for resume), or given.
        cache = run.dir / "answers.jsonl"
        if cache.is_file() and cfg.resume:
            answers = [json.loads(x) for x in cache.read_text(encoding="utf-8").splitlines()]
            print(f"[hanlm] reusing {len(answers)} teacher answers from {cache}")
        elif cfg.answers == "given":
            answers = []
            for i, (p, ref) in enumerate(train):
                if ref is None:
                    raise ValueError(f"training record {i}: answers=given, but it has no answer")
                answers.append({"prompt": i, "ids": given_answer(tok, p, ref, f"record {i}")})
        else:
            from tqdm.auto import tqdm

            answers = []
            jobs = [i for i in range(len(train)) for _ in range(cfg.samples_per_prompt)]
            bs = max(cfg.train.batch_size, 1)
            for start in tqdm(range(0, len(jobs), bs), desc="teacher answers", mininterval=1.0):
                idx = jobs[start : start + bs]
                r = rollout(
                    model,
                    tok,
                    [with_context(train[i][0], context) for i in idx],
                    stops,
                    cfg.max_new_tokens,
                    cfg.temperature,
                )
                answers += [
                    {"prompt": i, "ids": ids, "text": t} for i, ids, t in zip(idx, r.ids, r.texts)
                ]
        if run.main:
            text = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
            atomic_write_text(cache, text)
        rows = [
            encode(
                tok, train[a["prompt"]][0], with_context(train[a["prompt"]][0], context), a["ids"]
            )
            for a in answers
            if a["ids"]
        ]
        empty = len(answers) - len(rows)
        if not rows:
            raise ValueError("every teacher answer is empty: nothing to distil")

        # The teacher's top-k, once, with the starting model (= the teacher).
        if cfg.topk:
            model.eval()
            collate = Collator(tok.pad_token_id)
            with torch.no_grad():
                for i in range(0, len(rows), cfg.train.batch_size):
                    chunk = rows[i : i + cfg.train.batch_size]
                    b = collate(chunk)
                    t_logits = answer_logits(
                        model,
                        b["teacher_ids"].to(device),
                        b["teacher_attn"].to(device),
                        b["teacher_pos"],
                    )
                    logp, ids = losses.teacher_topk(t_logits, cfg.topk)
                    for r, lp, ix in zip(chunk, logp.tolist(), ids.tolist()):
                        r["topk_logp"], r["topk_ids"] = lp[: r["n"]], ix[: r["n"]]

        # Held-out: the teacher's sampled answers (for the KL), its greedy ones (the target's
        # behaviour), the student's greedy ones without the context; all cached with the
        # figures before training, so that a resumed run reports the same starting point.
        initial_file = run.dir / "initial.json"
        summary: dict[str, Any] = {
            "context_tokens": sum(ctx_tokens) / max(len(ctx_tokens), 1),
            "tokens_saved_per_request": sum(ctx_tokens) / max(len(ctx_tokens), 1),
            "train_answers": len(rows),
            "empty_answers_dropped": empty,
            "answer_tokens": sum(r["n"] for r in rows),
        }
        held_rows: list[dict[str, Any]] = []
        before: list[dict[str, Any]] = []
        held_prompts = [p for p, _ in held]
        if cfg.resume and initial_file.is_file():
            saved = json.loads(initial_file.read_text(encoding="utf-8"))
            held_rows, before = saved["held_rows"], saved["before"]
            summary.update(saved["summary"])
        elif held:
            set_seed(cfg.train.seed + 1)
            t_prompts = [with_context(p, context) for p in held_prompts]
            sampled = []
            bs = max(cfg.train.batch_size, 1)
            for i in range(0, len(held), bs):
                r = rollout(
                    model, tok, t_prompts[i : i + bs], stops, cfg.max_new_tokens, cfg.temperature
                )
                sampled += r.ids
            held_rows = [
                encode(tok, p, tp, ids)
                for p, tp, ids in zip(held_prompts, t_prompts, sampled)
                if ids
            ]
            teacher_greedy = greedy_answers(model, tok, t_prompts, stops, cfg)
            before = greedy_answers(model, tok, held_prompts, stops, cfg)
            first = {
                "initial_eval_kl": held_out_kl(
                    model, contextlib.nullcontext, held_rows, tok.pad_token_id, bs
                ),
                "initial_eval_answer_tokens": sum(len(a["ids"]) for a in before) / len(before),
                "teacher_eval_answer_tokens": sum(len(a["ids"]) for a in teacher_greedy)
                / len(before),
            }
            if cfg.check:
                first["initial_behaviour_rate"] = behaviour(before, cfg.check)
                first["teacher_behaviour_rate"] = behaviour(teacher_greedy, cfg.check)
            summary.update(first)
            for b, t, p in zip(before, teacher_greedy, held_prompts):
                b["prompt"], b["teacher"] = p[-1]["content"], t["text"]
            if run.main:
                atomic_write_json(
                    initial_file, {"summary": first, "held_rows": held_rows, "before": before}
                )
            _report("before", summary, cfg.check)

        # The student, and its teacher: a frozen copy, or the adapter disabled (LoRA).
        frozen = None
        if cfg.lora.enabled:
            model = apply_lora(model, cfg.lora)
        elif not cfg.topk:
            frozen = load_model(cfg.model).to(device).requires_grad_(False).eval()

        @contextlib.contextmanager
        def teacher_of(student: Any) -> Iterator[Any]:
            if frozen is not None:
                yield frozen
            elif hasattr(student, "disable_adapter"):
                with student.disable_adapter():
                    yield student
            else:  # top-k: the teacher is in the rows
                yield None

        summary.update(describe_trainable(model))
        args = training_args(cfg.train, run.dir, has_eval=False)
        trainer = make_trainer(
            teacher_of,
            model=model,
            args=args,
            train_dataset=to_dataset(rows),
            data_collator=Collator(tok.pad_token_id),
            processing_class=tok,
            callbacks=[metrics_callback(run)],
        )
        result = run_trainer(trainer, run.resume_from())
        summary.update(train_loss=result.training_loss, steps=result.global_step)

        # After: the same held-out measures, against the teacher (reloaded if not held).
        model = trainer.model
        if held_rows:
            if frozen is None and not cfg.lora.enabled:
                frozen = load_model(cfg.model).to(device).requires_grad_(False).eval()
            summary["eval_kl"] = held_out_kl(
                model, teacher_of, held_rows, tok.pad_token_id, cfg.train.batch_size
            )
            after = greedy_answers(model, tok, held_prompts, stops, cfg)
            summary["eval_answer_tokens"] = sum(len(a["ids"]) for a in after) / len(after)
            if cfg.check:
                summary["behaviour_rate"] = behaviour(after, cfg.check)
            if run.main:
                rows_out = [
                    {
                        "prompt": b.get("prompt"),
                        "teacher_with_context": b.get("teacher"),
                        "before": b["text"],
                        "after": a["text"],
                        **(
                            {"after_matches": bool(re.search(cfg.check, a["text"]))}
                            if cfg.check
                            else {}
                        ),
                    }
                    for b, a in zip(before, after)
                ]
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_out)
                atomic_write_text(run.dir / "samples.jsonl", text)
        model = run.save_model(model, tok, cfg.lora, stops)
        run.finish(summary)
        if held_rows:
            _report("after", summary, cfg.check)
    return run.dir


def _report(when: str, s: dict[str, Any], check: str) -> None:
    if when == "before":
        line = (
            f"[hanlm] before distillation: KL to the prompted teacher {s['initial_eval_kl']:.4f}"
            f" nats/token; context {s['context_tokens']:.0f} tokens per request"
        )
        if check:
            line += (
                f"; behaviour rate without the context {s['initial_behaviour_rate']:.2%},"
                f" teacher with it {s['teacher_behaviour_rate']:.2%}"
            )
    else:
        line = (
            f"[hanlm] distill: held-out KL to the prompted teacher (the training target)"
            f" {s.get('initial_eval_kl', math.nan):.4f} -> {s['eval_kl']:.4f} nats/token"
        )
        if check:
            line += (
                f"; behaviour rate without the context (rule check {check!r})"
                f" {s.get('initial_behaviour_rate', math.nan):.2%} -> {s['behaviour_rate']:.2%}"
                f" (teacher with it: {s.get('teacher_behaviour_rate', math.nan):.2%})"
            )
        line += f"; {s['tokens_saved_per_request']:.0f} prompt tokens saved per request"
    print(line, file=sys.stdout)
