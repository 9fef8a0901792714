"""The preference losses of `hanlm dpo` that are not DPO's own: KTO, ORPO and SimPO, through trl.

- kto: Kahneman-Tversky optimisation (trl's KTOTrainer). Learns from unpaired answers, each
  labelled desirable or undesirable ({"prompt", "completion", "label"} records); preference
  pairs are split into two such answers (chosen -> true, rejected -> false). Keeps DPO's frozen
  reference model; its KL term is estimated from mismatched answers within a batch, so a batch
  holds at least 2 answers and trl reads them in order (hanlm shuffles them once, by the seed).
- orpo: odds-ratio preference optimisation (trl.experimental.orpo): the chosen answer's NLL plus
  λ·log σ(log odds(chosen) - log odds(rejected)), on per-token average log-probs. No reference.
- simpo: SimPO (trl.experimental.cpo with loss_type=simpo, cpo_alpha=0): -log σ(β·(mean
  log p(chosen) - mean log p(rejected)) - γ). No reference.

With no reference model the held-out preference figures compare the trained model with the
start model (measured before training), the same measure DPO reports.
"""

from __future__ import annotations

import random
import time
import warnings
from typing import Any

from hanlm.align.rollouts import HeldOut, prompts_and_references
from hanlm.data import DataError, LoadedData
from hanlm.data.templates import render
from hanlm.runs import Run
from hanlm.trainer import LENGTH, metrics_callback, training_args

TRL_LOSSES = ("kto", "orpo", "simpo")  # the losses built here; the others are DPOTrainer's
NO_REFERENCE = ("orpo", "simpo")
UNPAIRED_OK = ("kto",)  # the losses that can learn from unpaired (prompt, completion, label) data


def check_data(loss_type: str, data: LoadedData) -> None:
    """Refuse data the loss cannot use, naming the files and what to do (before a model loads)."""
    if data.kind == "preference" or (data.kind == "unpaired" and loss_type in UNPAIRED_OK):
        return
    files = ", ".join(f"{src} ({fmt} records)" for src, fmt in data.stats.formats.items())
    if data.kind == "unpaired":
        hint = (
            f"loss_type={loss_type} compares a chosen with a rejected answer to the same prompt and"
            " these records hold one answer each; train them with loss_type=kto, or give pairs"
            " ({'prompt','chosen','rejected'})"
        )
    else:
        hint = (
            f"loss_type={loss_type} needs preference pairs ({{'prompt','chosen','rejected'}})"
            + (
                " or unpaired labelled answers ({'prompt','completion','label'})"
                if loss_type in UNPAIRED_OK
                else ""
            )
        )
    raise DataError(f"{files or 'the data'}: {data.kind} data; {hint}")


def unpaired(records: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    """Preference pairs as KTO's unpaired answers (chosen -> label true, rejected -> label
    false); unpaired records as they are. Shuffled once by `seed`: trl reads KTO's data in order
    and estimates its KL term from neighbours in a batch, which should mix prompts and labels."""
    out: list[dict[str, Any]] = []
    for rec in records:
        if "chosen" in rec:  # each answer sorts as the pair's longer one in grouped batches
            for side, label in (("chosen", True), ("rejected", False)):
                answer = {"prompt": rec["prompt"], "completion": rec[side], "label": label}
                out.append({**answer, LENGTH: rec[LENGTH]})
        else:
            out.append(rec)
    random.Random(seed).shuffle(out)
    return out


def fitting_unpaired(
    records: list[dict[str, Any]], tok: Any, max_length: int
) -> tuple[list[dict[str, Any]], int]:
    """The unpaired answers whose prompt + answer fit `max_length` tokens, and the count dropped."""
    kept = []
    for rec in records:
        length = len(render(tok, rec["prompt"] + rec["completion"])[0])
        if length <= max_length:
            kept.append({**rec, LENGTH: length})  # what grouped batches sort on
    return kept, len(records) - len(kept)


def held_out_prompts(records: list[dict[str, Any]], limit: int) -> HeldOut:
    """Held-out prompts and their good answers: a pair's chosen answer, an unpaired record's
    answer when it is labelled desirable (each prompt once)."""
    if not records or "label" not in records[0]:
        held = prompts_and_references(records)[:limit]
        return HeldOut([p for p, _ in held], [r for _, r in held])
    prompts, refs, seen = [], [], []
    for rec in records:
        answer = "".join(m["content"] for m in rec["completion"] if m["role"] == "assistant")
        if rec["prompt"] in seen:
            i = seen.index(rec["prompt"])
            if rec["label"] and refs[i] is None:
                refs[i] = answer
            continue
        seen.append(rec["prompt"])
        prompts.append(rec["prompt"])
        refs.append(answer if rec["label"] else None)
    return HeldOut(prompts[:limit], refs[:limit])


def pair_rows(tok: Any, records: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    """Held-out pairs as token ids the way trl tokenizes conversational pairs (the chat template
    over the prompt with a generation prompt, then over prompt + answer)."""
    rows = []
    for rec in records:
        prompt_ids = _ids(tok, rec["prompt"], add_generation_prompt=True)
        full = {side: _ids(tok, rec["prompt"] + rec[side]) for side in ("chosen", "rejected")}
        n = min(_common(prompt_ids, ids) for ids in full.values())
        rows.append({"prompt_ids": prompt_ids[:n], **{f"{k}_ids": v[n:] for k, v in full.items()}})
    return rows


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _ids(tok: Any, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)
    return list(out["input_ids"])


def trainer(
    cfg: Any,
    run: Run,
    model: Any,
    ref_model: Any,
    tok: Any,
    datasets_: dict[str, Any],
    summary: dict[str, Any],
    batching: dict[str, Any],
) -> Any:
    """trl's trainer for `cfg.loss_type` (kto, orpo or simpo) on these datasets, its batches
    formed as `batching` (`hanlm.trainer.batching_args`) says."""
    if cfg.loss_type == "kto":
        from trl import KTOConfig, KTOTrainer

        cls, args_cls, extra = KTOTrainer, KTOConfig, {"ref_model": ref_model}
        settings = {
            "desirable_weight": cfg.desirable_weight,
            "undesirable_weight": cfg.undesirable_weight,
            "max_length": None,  # lengths are enforced by hanlm before this
        }
    else:
        ORPOConfig, ORPOTrainer, CPOConfig, CPOTrainer = _experimental()
        extra, settings = {}, {"max_length": cfg.max_length}
        if cfg.loss_type == "orpo":
            cls, args_cls = ORPOTrainer, ORPOConfig
        else:  # SimPO proper (no behaviour-cloning term), not CPO-SimPO
            cls, args_cls = CPOTrainer, CPOConfig
            settings |= {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": cfg.simpo_gamma}
    args = training_args(
        cfg.train,
        run.dir,
        args_cls=args_cls,
        has_eval="valid" in datasets_,
        beta=cfg.beta,
        **settings,
        **batching,
    )
    return build_trainer(cls, args, run, model, tok, datasets_, summary, **extra)


def build_trainer(
    cls: Any,
    args: Any,
    run: Run,
    model: Any,
    tok: Any,
    datasets_: dict[str, Any],
    summary: dict[str, Any],
    **extra: Any,
) -> Any:
    """`cls` (a trl preference trainer) on these datasets, logging to the run; the seconds it
    took to build (trl tokenizes, and may score the reference, as it is built) go in `summary`."""
    t0 = time.time()
    out = cls(
        model=model,
        args=args,
        train_dataset=datasets_["train"],
        eval_dataset=datasets_.get("valid"),
        processing_class=tok,
        callbacks=[metrics_callback(run)],
        **extra,
    )
    summary["trainer_setup_seconds"] = time.time() - t0
    return out


def _experimental() -> tuple[Any, Any, Any, Any]:
    """trl's ORPO and CPO classes, without the notice trl prints on importing its experimental
    package (the user chose the method by name; the notice is for library users)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"You are importing from 'trl\.experimental'")
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return ORPOConfig, ORPOTrainer, CPOConfig, CPOTrainer
