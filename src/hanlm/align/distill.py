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
once; no teacher is then held while training) -> held-out measures before -> the student and
its teacher -> transformers' Trainer with the KL loss of `hanlm.align.distill_kl` -> held-out
measures after -> an HF directory.

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hanlm import IGNORE_INDEX, losses
from hanlm.align.distill_kl import (
    Collator,
    Teacher,
    answer_logits,
    encode,
    held_out_kl,
    make_trainer,
)
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
from hanlm.modeling import load_model, load_tokenizer
from hanlm.runs import Run, atomic_write_json, atomic_write_text
from hanlm.trainer import (
    LENGTH,
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


# --------------------------------------------------------------------------- run


def run(cfg: DistillConfig) -> Path:
    import torch
    from transformers import set_seed

    context = read_context(cfg.context)
    # before anything loads
    check_launch(cfg.train, "hanlm distill", no_liger="its loss compares the student's logits")
    batching = batching_args(cfg.train, "distill")
    with Run("distill", cfg) as run:
        set_seed(cfg.train.seed)
        tok, stops = _tokenizer(cfg)
        train, held, ctx_tokens = _prompts(cfg, run, tok, context)
        model = load_model(cfg.model)
        model.config.pad_token_id = tok.pad_token_id
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model.to(device)
        answers = _answers(cfg, run, model, tok, train, context, stops)
        rows, empty = _answer_rows(tok, train, context, answers)
        if cfg.topk:
            _store_teacher_topk(cfg, model, tok, rows, device)
        summary: dict[str, Any] = {
            "context_tokens": sum(ctx_tokens) / max(len(ctx_tokens), 1),
            "tokens_saved_per_request": sum(ctx_tokens) / max(len(ctx_tokens), 1),
            "train_answers": len(rows),
            "empty_answers_dropped": empty,
            "answer_tokens": sum(r["n"] for r in rows),
        }
        held_prompts = [p for p, _ in held]
        held_rows, before = _held_out_before(
            cfg, run, model, tok, held_prompts, context, stops, summary
        )
        model, teacher = _student_and_teacher(cfg, model, device)
        model = _train(cfg, run, model, tok, teacher, rows, summary, batching)
        if held_rows:
            measured = (held_rows, held_prompts, before)
            _held_out_after(cfg, run, model, tok, teacher, measured, stops, device, summary)
        model = run.save_model(model, tok, cfg.lora, stops)
        run.finish(summary)
        if held_rows:
            _report("after", summary, cfg.check)
    return run.dir


def _tokenizer(cfg: DistillConfig) -> tuple[Any, list[int]]:
    """The tokenizer (with a pad token) and the template's stop tokens."""
    tok = load_tokenizer(cfg.model.path)
    require_template(tok, cfg.template, cfg.model.path, "distill")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, stop_token_ids(tok, cfg.template)


def _prompts(
    cfg: DistillConfig, run: Run, tok: Any, context: str
) -> tuple[list[tuple[Messages, Any]], list[tuple[Messages, Any]], list[int]]:
    """Training and held-out (prompt, reference) pairs whose teacher prompt (the student's, with
    the context) fits, and the tokens the context adds to each held-out (else training) prompt."""
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
    return train, held, ctx_tokens


def _answers(
    cfg: DistillConfig,
    run: Run,
    model: Any,
    tok: Any,
    train: list[tuple[Messages, Any]],
    context: str,
    stops: list[int],
) -> list[dict[str, Any]]:
    """The training answers: sampled from the prompted teacher once (cached in answers.jsonl, so
    a resumed run reuses them), or the data's own."""
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
    return answers


def _answer_rows(
    tok: Any, train: list[tuple[Messages, Any]], context: str, answers: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int]:
    """The training rows (both views of each non-empty answer) and how many answers were empty."""
    rows = [
        encode(tok, train[a["prompt"]][0], with_context(train[a["prompt"]][0], context), a["ids"])
        for a in answers
        if a["ids"]
    ]
    for row in rows:  # what grouped batches sort on
        row[LENGTH] = max(len(row["student_ids"]), len(row["teacher_ids"]))
    if not rows:
        raise ValueError("every teacher answer is empty: nothing to distil")
    return rows, len(answers) - len(rows)


def _store_teacher_topk(
    cfg: DistillConfig, model: Any, tok: Any, rows: list[dict[str, Any]], device: Any
) -> None:
    """The teacher's top-k log-probs into each row, once, with the starting model (= the
    teacher)."""
    import torch

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


def _held_out_before(
    cfg: DistillConfig,
    run: Run,
    model: Any,
    tok: Any,
    held_prompts: list[Messages],
    context: str,
    stops: list[int],
    summary: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The held-out rows (the teacher's sampled answers, for the KL) and the student's greedy
    answers without the context, the figures before training added to `summary`.

    All are cached in initial.json with the teacher's greedy answers (the target's behaviour),
    so that a resumed run reports the same starting point.
    """
    from transformers import set_seed

    initial_file = run.dir / "initial.json"
    if cfg.resume and initial_file.is_file():
        saved = json.loads(initial_file.read_text(encoding="utf-8"))
        summary.update(saved["summary"])
        return saved["held_rows"], saved["before"]
    if not held_prompts:
        return [], []
    set_seed(cfg.train.seed + 1)
    t_prompts = [with_context(p, context) for p in held_prompts]
    sampled = []
    bs = max(cfg.train.batch_size, 1)
    for i in range(0, len(held_prompts), bs):
        r = rollout(model, tok, t_prompts[i : i + bs], stops, cfg.max_new_tokens, cfg.temperature)
        sampled += r.ids
    held_rows = [
        encode(tok, p, tp, ids) for p, tp, ids in zip(held_prompts, t_prompts, sampled) if ids
    ]
    teacher_greedy = greedy_answers(model, tok, t_prompts, stops, cfg)
    before = greedy_answers(model, tok, held_prompts, stops, cfg)
    first = {
        "initial_eval_kl": held_out_kl(
            model, contextlib.nullcontext, held_rows, tok.pad_token_id, bs
        ),
        "initial_eval_answer_tokens": sum(len(a["ids"]) for a in before) / len(before),
        "teacher_eval_answer_tokens": sum(len(a["ids"]) for a in teacher_greedy) / len(before),
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
    return held_rows, before


def _frozen_copy(cfg: DistillConfig, device: Any) -> Any:
    return load_model(cfg.model).to(device).requires_grad_(False).eval()


def _student_and_teacher(cfg: DistillConfig, model: Any, device: Any) -> tuple[Any, Teacher]:
    """The student (LoRA adapters on the model, or the model itself) and its teacher: the adapter
    disabled, a frozen copy (full tuning with the full KL), or none (top-k)."""
    if cfg.lora.enabled:
        return apply_lora(model, cfg.lora), Teacher()
    if not cfg.topk:
        return model, Teacher(_frozen_copy(cfg, device))
    return model, Teacher()


def _train(
    cfg: DistillConfig,
    run: Run,
    model: Any,
    tok: Any,
    teacher: Teacher,
    rows: list[dict[str, Any]],
    summary: dict[str, Any],
    batching: dict[str, Any],
) -> Any:
    """Train the student on the KL to its teacher, in batches formed as `batching`
    (`hanlm.trainer.batching_args`) says; the trained model."""
    summary.update(describe_trainable(model))
    args = training_args(cfg.train, run.dir, has_eval=False, **batching)
    trainer = make_trainer(
        teacher,
        model=model,
        args=args,
        train_dataset=to_dataset(rows),
        data_collator=Collator(tok.pad_token_id),
        processing_class=tok,
        callbacks=[metrics_callback(run)],
    )
    # the tokens the student reads, and the teacher's view when a teacher runs (not with top-k)
    masks = {"student_ids": "student_attn"}
    masks |= {} if cfg.topk else {"teacher_ids": "teacher_attn"}
    padding = count_padding(trainer, masks)
    result = run_trainer(trainer, run.resume_from())
    summary.update(train_loss=result.training_loss, steps=result.global_step)
    summary.update(padding.summary("distill", args))
    return trainer.model


def _held_out_after(
    cfg: DistillConfig,
    run: Run,
    model: Any,
    tok: Any,
    teacher: Teacher,
    measured: tuple[list[dict[str, Any]], list[Messages], list[dict[str, Any]]],
    stops: list[int],
    device: Any,
    summary: dict[str, Any],
) -> None:
    """The same held-out measures after training, against the teacher (reloaded if not held),
    into `summary`; the answers before and after side by side in samples.jsonl. `measured`: the
    held-out rows, prompts and greedy answers before."""
    held_rows, held_prompts, before = measured
    if teacher.frozen is None and not cfg.lora.enabled:
        teacher.frozen = _frozen_copy(cfg, device)
    summary["eval_kl"] = held_out_kl(
        model, teacher, held_rows, tok.pad_token_id, cfg.train.batch_size
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
                **({"after_matches": bool(re.search(cfg.check, a["text"]))} if cfg.check else {}),
            }
            for b, a in zip(before, after)
        ]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows_out)
        atomic_write_text(run.dir / "samples.jsonl", text)


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
