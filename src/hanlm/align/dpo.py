"""`hanlm dpo`: direct preference optimisation through trl's DPOTrainer, and its relatives KTO,
ORPO and SimPO through trl's trainers for them (`loss_type`; hanlm.align.preference).

Reads top to bottom: tokenizer and template -> preference pairs -> policy (full, or LoRA whose
disabled adapter is the reference) and a frozen reference (a copy of the start model, or
`ref_model`) -> trl's DPOTrainer with the chosen loss (sigmoid = DPO, ipo, hinge, robust) ->
held-out preference accuracy and reward margins before and after -> an HF directory. KTO keeps
the reference and also learns from unpaired labelled answers; ORPO and SimPO have no reference
model (none is loaded, and the reference cache below does not apply).

Reference log-probabilities never change during training, so with `precompute_ref=true` they
are computed once and kept on disk. trl computes them when `precompute_ref_log_probs` is set and
caches the result next to a disk-backed dataset, keyed by the dataset's fingerprint and a hash
of the reference weights (the caching trl's maintainers point to for this request). hanlm gives
that dataset a stable home: `<ref_cache_dir>/<key>/`, where the key hashes the reference model's
files, the tokenizer and template, the pairs and `max_length`. A later run with the same model
and data finds trl's cache there and skips the reference pass; `hanlm.json` records whether the
cache was hit, and `manifest.json` in the cache directory counts the runs that used it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from hanlm.align import preference
from hanlm.align.checks import warnings_for
from hanlm.align.reward_model import half_of
from hanlm.align.rewards import RuleConfig, Scorer
from hanlm.align.rollouts import HeldOut, held_out_scores, write_samples
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
from hanlm.data.templates import render, require_template, stop_token_ids
from hanlm.modeling import load_model, load_tokenizer, pad_batch, resolve_source
from hanlm.runs import Run, atomic_dir, atomic_write_json
from hanlm.trainer import (
    LENGTH,
    apply_lora,
    batching_args,
    check_launch,
    count_padding,
    describe_trainable,
    run_trainer,
    training_args,
)


@dataclass
class DPOConfig(OutputConfig):
    model: ModelConfig = opt(ModelConfig, "the SFT model to align (also the reference)")
    ref_model: str = opt("", "a different frozen reference model dir (default: the start model)")
    data: DataConfig = opt(
        DataConfig, "preference pairs (no paths: the embedded demo set, derived from real text)"
    )
    template: TemplateName = opt("auto", "chat template; auto = the model's own")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust", "kto", "orpo", "simpo"] = opt(
        "sigmoid",
        "sigmoid = DPO; ipo = (h̄ - 1/2β)² with h̄ the log-ratio difference averaged per answer"
        " token (trl's length-normalised IPO, as the IPO authors ran it); hinge = SLiC;"
        " robust = noisy-label DPO; kto = KTO (pairs or unpaired answers labelled true/false);"
        " orpo = ORPO and simpo = SimPO (both without a reference model)",
    )
    beta: float = opt(
        0.1,
        "β: strength of the tie to the reference (IPO: its τ; KTO: its β); ORPO: λ, the weight"
        " of the odds-ratio term; SimPO: β, the scale of the length-normalised reward",
    )
    label_smoothing: float = opt(0.0, "robust: assumed share of flipped preference labels")
    desirable_weight: float = opt(1.0, "kto: weight of the losses on desirable answers")
    undesirable_weight: float = opt(1.0, "kto: weight of the losses on undesirable answers")
    simpo_gamma: float = opt(0.5, "simpo: γ, the target reward margin (trl's default)")
    max_length: int = opt(512, "pairs whose prompt + answer has more tokens are dropped (counted)")
    precompute_ref: bool = opt(
        False, "compute reference log-probs once and cache them on disk (reused by later runs)"
    )
    ref_cache_dir: str = opt("", "where cached reference log-probs live (~/.cache/hanlm/ref_logps)")
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(max_steps=200, lr=5e-5, eval_steps=50),
        metadata={"help": "optimisation"},
    )
    lora: LoraConfig = opt(LoraConfig, "LoRA adapters (the reference is the adapter-free model)")
    eval_pairs: int = opt(0, "held-out pairs measured before and after (0 = all)")
    half: Literal["all", "first", "second"] = opt(
        "all",
        "train on all records, or on one half split by prompt as `hanlm reward half=` splits"
        " them (a gold reward model trained on the other half then judges data it never saw)",
    )
    eval_prompts: int = opt(
        32, "held-out prompts answered greedily before and after, judged by rules (0 = skip)"
    )
    gold_reward_model: str = opt(
        "", "a judge of those answers that DPO never saw: a reward model on other preferences"
    )
    max_new_tokens: int = opt(64, "most tokens per held-out answer")

    def validate(self) -> None:
        if self.beta <= 0:
            raise ConfigError("beta must be > 0")
        if self.loss_type == "robust" and not 0 <= self.label_smoothing < 0.5:
            raise ConfigError("label_smoothing must be in [0, 0.5) for loss_type=robust")
        loss = self.loss_type
        if loss in preference.NO_REFERENCE and (self.ref_model or self.precompute_ref):
            raise ConfigError(
                f"loss_type={loss} uses no reference model: drop ref_model and precompute_ref"
            )
        if loss == "kto" and self.precompute_ref:
            raise ConfigError(
                "precompute_ref caches reference log-probs of pairs for DPO's losses; KTO computes"
                " its reference as it trains: drop precompute_ref"
            )
        if loss == "kto" and self.train.batch_size < 2:
            raise ConfigError(
                "loss_type=kto needs train.batch_size >= 2: its KL term is estimated from the"
                " other answers in a batch"
            )
        if min(self.desirable_weight, self.undesirable_weight) <= 0:
            raise ConfigError("desirable_weight and undesirable_weight must be > 0")


# --------------------------------------------------------------------------- cache key


def _hash_files(h: Any, path: str) -> None:
    """Feed a model's weights and config into `h` (content, not names or times)."""
    src = resolve_source(path)
    root = Path(src.path)
    if not root.exists():  # a hub id: its name is all we have
        h.update(src.path.encode())
        return
    names = [src.gguf_file] if src.gguf_file else []
    names += sorted(
        p.name
        for p in root.iterdir()
        if p.suffix in (".safetensors", ".bin", ".json")
        and p.name != "hanlm.json"
        and not p.name.startswith(("tokenizer", "special_tokens", "metrics"))
    )
    for name in names:
        h.update(name.encode() + b"\0")
        with open(root / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)


def ref_cache_key(
    ref_path: str, tok: Any, splits: dict[str, list[dict[str, Any]]], max_length: int
) -> tuple[str, str, str]:
    """(key, model hash, data hash) for the reference log-probs of these pairs."""
    import trl

    mh = hashlib.sha256()
    _hash_files(mh, ref_path)
    dh = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    dh.update((backend.to_str() if backend is not None else repr(tok.get_vocab())).encode())
    dh.update(str(tok.chat_template).encode())
    dh.update(json.dumps([max_length, trl.__version__]).encode())
    for name in sorted(splits):
        dh.update(name.encode() + b"\0")
        for rec in splits[name]:
            dh.update(json.dumps(rec, ensure_ascii=False, sort_keys=True).encode() + b"\n")
    model_hash, data_hash = mh.hexdigest(), dh.hexdigest()
    key = hashlib.sha256((model_hash + data_hash).encode()).hexdigest()[:24]
    return key, model_hash, data_hash


def _cache_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("cache-*.arrow")}


def cached_splits(
    root: Path, splits: dict[str, list[dict[str, Any]]], info: dict[str, Any]
) -> dict[str, Any]:
    """Disk-backed datasets of the pairs under `root` (written once, atomically)."""
    import datasets

    for name, records in splits.items():
        target = root / name
        if not (target / "dataset_info.json").is_file():
            with atomic_dir(target) as tmp:
                datasets.Dataset.from_list(records).save_to_disk(str(tmp))
    manifest = root / "manifest.json"
    if not manifest.is_file():
        atomic_write_json(manifest, {**info, "runs": 0})
    return {name: datasets.load_from_disk(str(root / name)) for name in splits}


def fitting_pairs(
    records: list[dict[str, Any]], tok: Any, max_length: int
) -> tuple[list[dict[str, Any]], int, int]:
    """The pairs whose prompt + answer (either side) fit `max_length` tokens, and the counts
    dropped as too long and as identical (chosen = rejected teaches nothing; DPO's loss on such
    a pair is a constant)."""
    kept, identical = [], 0
    for rec in records:
        if rec["chosen"] == rec["rejected"]:
            identical += 1
            continue
        longest = max(len(render(tok, rec["prompt"] + rec[k])[0]) for k in ("chosen", "rejected"))
        if longest <= max_length:
            kept.append({**rec, LENGTH: longest})  # what grouped batches sort on
    return kept, len(records) - len(kept) - identical, identical


# --------------------------------------------------------------------------- measures


def completion_logps(
    model: Any, rows: list[dict[str, list[int]]], batch_size: int = 8
) -> list[list[float]]:
    """Summed log-probs of each row's chosen and rejected answer given its prompt: [[c, r], ...]."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    out: list[list[float]] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            seqs, spans = [], []
            for r in batch:
                for side in ("chosen_ids", "rejected_ids"):
                    seqs.append(r["prompt_ids"] + r[side])
                    spans.append((len(r["prompt_ids"]), len(r["prompt_ids"]) + len(r[side])))
            ids, mask = pad_batch(seqs, 0, "right", device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            token_logp = logp[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            sums = [float(token_logp[i, a - 1 : b - 1].sum()) for i, (a, b) in enumerate(spans)]
            out += [[sums[i], sums[i + 1]] for i in range(0, len(sums), 2)]
    return out


def preference_metrics(
    policy: list[list[float]], ref: list[list[float]], beta: float
) -> dict[str, float]:
    """Implicit-reward accuracy and margin, and plain log-prob preference accuracy. A tie (the
    start, where the policy is the reference) counts half: chance is 0.5."""
    n = max(len(policy), 1)
    margins = [beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(policy, ref)]
    return {
        "reward_accuracy": sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / n,
        "reward_margin": sum(margins) / n,
        "logp_accuracy": sum(c > r for c, r in policy) / n,
        "chosen_logp": sum(c for c, _ in policy) / n,
        "rejected_logp": sum(r for _, r in policy) / n,
    }


# --------------------------------------------------------------------------- run


def run(cfg: DPOConfig) -> Path:
    from transformers import set_seed

    # before anything loads
    check_launch(cfg.train, "hanlm dpo", no_liger="its losses read the log-probabilities itself")
    # trl's KTO reads its answers in one fixed order (its KL term pairs each with a neighbour)
    kto = cfg.loss_type == "kto"
    batching = batching_args(cfg.train, "dpo loss_type=kto" if kto else "dpo", grouped=not kto)
    with Run("dpo", cfg) as run:
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.path)
        require_template(tok, cfg.template, cfg.model.path, "DPO")
        data, splits, eval_pairs = _pairs(cfg, run, tok)
        datasets_, cache = _datasets(cfg, tok, splits)
        model, ref_model = _policy_and_reference(cfg, tok)
        summary: dict[str, Any] = {"loss_type": cfg.loss_type}
        summary.update(describe_trainable(model))
        if cfg.loss_type in preference.TRL_LOSSES:
            trainer = preference.trainer(
                cfg, run, model, ref_model, tok, datasets_, summary, batching
            )
            eval_rows = preference.pair_rows(tok, eval_pairs)
        else:
            trainer = _trainer(cfg, run, model, ref_model, tok, datasets_, summary, batching)
            eval_rows = _eval_rows(trainer)
        padding = count_padding(trainer)
        if cache is not None:
            _count_cache_use(cache, summary)
        ref_logps = _preferences_before(cfg, model, ref_model, eval_rows, summary)
        stops = stop_token_ids(tok, cfg.template)
        held_out, gold = _held_out(cfg, data, tok, stops)
        answers_before: list[dict[str, Any]] = []
        # measured once, kept across a resume
        initial = {k[13:]: v for k, v in run.initial.items() if k.startswith("initial_eval_")}
        if held_out and not initial:
            initial = held_out_scores(
                model, tok, held_out, stops, None, cfg.max_new_tokens, 16, gold, answers_before
            )
            run.record_initial({f"initial_eval_{k}": v for k, v in initial.items()})
        summary.update({f"initial_eval_{k}": v for k, v in initial.items()})

        result = run_trainer(trainer, run.resume_from())
        summary.update(train_loss=result.training_loss, steps=result.global_step)
        summary.update(padding.summary(_name(cfg), trainer.args))

        model = run.save_model(trainer.model, tok, cfg.lora, stops)
        if eval_rows:
            _preferences_after(cfg, model, eval_rows, ref_logps, summary)
        if held_out:
            answers_after: list[dict[str, Any]] = []
            final = held_out_scores(
                model, tok, held_out, stops, None, cfg.max_new_tokens, 16, gold, answers_after
            )
            summary.update({f"eval_{k}": v for k, v in final.items()})
            summary["warnings"] = warnings_for(initial, final)
            write_samples(run.dir, answers_before, answers_after)
            if "gold_score" in final:
                print(
                    f"[hanlm] {_name(cfg)}: held-out gold judge"
                    f" {initial.get('gold_score', math.nan):.4f} -> {final['gold_score']:.4f}"
                )
        run.finish(summary)
    return run.dir


def _name(cfg: DPOConfig) -> str:
    return {"sigmoid": "dpo", "robust": "robust dpo"}.get(cfg.loss_type, cfg.loss_type)


def _pairs(
    cfg: DPOConfig, run: Run, tok: Any
) -> tuple[Any, dict[str, list[dict[str, Any]]], list[dict[str, Any]]]:
    """The loaded data, its records that fit by split (`valid` cut to `eval_pairs`) in the form
    the loss trains on, and the held-out pairs measured before and after (none when the held-out
    data is unpaired).

    Lengths are enforced here, not by trl: its length filter closes over the whole trainer
    config, which would tie the reference cache to every training argument.
    """
    dcfg = or_demo(cfg.data, "preference")
    data = load(dcfg)
    preference.check_data(cfg.loss_type, data)  # before any model loads
    if cfg.half != "all":
        data.train = [r for r in data.train if half_of(r) == cfg.half]
        print(f"[hanlm] training on the {cfg.half} half: {len(data.train)} records")
    print(data.stats.summary())
    counts = {"dropped_too_long": 0, "dropped_identical": 0}
    fitted = {}
    for name, records in (("train", data.train), ("valid", data.valid)):
        if data.kind == "unpaired":
            fitted[name], too_long = preference.fitting_unpaired(records, tok, cfg.max_length)
        else:
            fitted[name], too_long, same = fitting_pairs(records, tok, cfg.max_length)
            counts["dropped_identical"] += same
        counts["dropped_too_long"] += too_long
    if counts["dropped_identical"]:
        print(
            f"[hanlm] dropped {counts['dropped_identical']} pairs whose chosen and rejected"
            " answers are identical",
            file=sys.stderr,
        )
    if not fitted["train"]:
        raise ValueError(f"no preference record fits max_length={cfg.max_length}; raise it")
    if fitted["valid"] and cfg.eval_pairs > 0:
        fitted["valid"] = fitted["valid"][: cfg.eval_pairs]
    eval_pairs = fitted["valid"] if data.kind == "preference" else []
    if cfg.loss_type == "kto":
        fitted = {k: preference.unpaired(v, cfg.train.seed) for k, v in fitted.items()}
        if data.kind == "preference":
            n = len(fitted["train"])
            print(
                f"[hanlm] kto: {n // 2} preference pairs -> {n} unpaired answers (chosen -> label"
                " true, rejected -> label false)"
            )
            counts["kto_from_pairs"] = True
    splits = {k: v for k, v in fitted.items() if v}
    run.set("data", {**data.stats.as_dict(), **counts})
    return data, splits, eval_pairs


@dataclass
class RefCache:
    """Where the reference log-probs of a run's pairs are cached, and its files before the run."""

    root: Path
    files_before: set[str]


def _datasets(
    cfg: DPOConfig, tok: Any, splits: dict[str, list[dict[str, Any]]]
) -> tuple[dict[str, Any], RefCache | None]:
    """The splits as datasets: with `precompute_ref`, disk-backed in the reference cache (trl's
    precomputed reference log-probs land beside them), else in memory."""
    if not cfg.precompute_ref:
        return {name: to_dataset(recs) for name, recs in splits.items()}, None
    ref_path = cfg.ref_model or cfg.model.path
    key, model_hash, data_hash = ref_cache_key(ref_path, tok, splits, cfg.max_length)
    base = cfg.ref_cache_dir or os.path.expanduser("~/.cache/hanlm/ref_logps")
    cache_root = Path(base) / key
    info = {"ref_model": ref_path, "model_hash": model_hash, "data_hash": data_hash}
    datasets_ = cached_splits(cache_root, splits, info)
    return datasets_, RefCache(cache_root, _cache_files(cache_root))


def _policy_and_reference(cfg: DPOConfig, tok: Any) -> tuple[Any, Any]:
    """The policy (LoRA adapters on the start model, or the model itself) and its frozen
    reference: None where trl has it otherwise (the adapter disabled, or the precomputed
    log-probs of the start model)."""
    model = load_model(cfg.model)
    model.config.pad_token_id = tok.pad_token_id
    ref_model = None
    if cfg.lora.enabled:
        if cfg.ref_model:
            raise ConfigError("with LoRA the reference is the adapter-free model; drop ref_model")
        model = apply_lora(model, cfg.lora)
    elif cfg.loss_type not in preference.NO_REFERENCE and (cfg.ref_model or not cfg.precompute_ref):
        # An explicit frozen copy: trl would otherwise rebuild one from config._name_or_path.
        ref_path = cfg.ref_model or cfg.model.path
        ref_model = load_model(replace(cfg.model, path=ref_path)).requires_grad_(False).eval()
    return model, ref_model


def _trainer(
    cfg: DPOConfig,
    run: Run,
    model: Any,
    ref_model: Any,
    tok: Any,
    datasets_: dict[str, Any],
    summary: dict[str, Any],
    batching: dict[str, Any],
) -> Any:
    """trl's DPOTrainer (which computes the precomputed reference log-probs as it is built)."""
    from trl import DPOConfig as TrlDPOConfig
    from trl import DPOTrainer

    args = training_args(
        cfg.train,
        run.dir,
        has_eval="valid" in datasets_,
        args_cls=TrlDPOConfig,
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        max_length=None,
        precompute_ref_log_probs=cfg.precompute_ref,
        **batching,
    )
    return preference.build_trainer(
        DPOTrainer, args, run, model, tok, datasets_, summary, ref_model=ref_model
    )


def _count_cache_use(cache: RefCache, summary: dict[str, Any]) -> None:
    """A hit (trl created no files in the cache) or a miss, in the manifest and the summary."""
    created = _cache_files(cache.root) - cache.files_before
    hit = not created
    manifest = json.loads((cache.root / "manifest.json").read_text(encoding="utf-8"))
    manifest["runs"] = manifest.get("runs", 0) + 1
    manifest["hits"] = manifest.get("hits", 0) + hit
    atomic_write_json(cache.root / "manifest.json", manifest)
    summary.update(ref_cache="hit" if hit else "miss", ref_cache_dir=str(cache.root))
    print(
        f"[hanlm] reference log-probs {'reused from' if hit else 'computed and cached in'}"
        f" {cache.root} ({summary['trainer_setup_seconds']:.1f}s)"
    )


def _eval_rows(trainer: Any) -> list[dict[str, Any]]:
    """The held-out pairs as trl tokenized them."""
    eval_ds = trainer.eval_dataset
    if eval_ds is None:
        return []
    return [
        {k: eval_ds[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
        for i in range(len(eval_ds))
    ]


def _preferences_before(
    cfg: DPOConfig,
    model: Any,
    ref_model: Any,
    eval_rows: list[dict[str, Any]],
    summary: dict[str, Any],
) -> list[list[float]]:
    """The reference's log-probs of the held-out pairs, and the preference figures before training
    into `summary`. Before and after go through the same path, `completion_logps` (at the start
    the policy is the reference: every pair a tie, 0.5)."""
    if not eval_rows:
        return []
    ref_logps = completion_logps(ref_model or model, eval_rows, cfg.train.batch_size)
    start = completion_logps(model, eval_rows, cfg.train.batch_size) if ref_model else ref_logps
    before = preference_metrics(start, ref_logps, cfg.beta)
    summary.update({f"initial_{k}": v for k, v in before.items()})
    summary["reward_accuracy_chance"] = 0.5
    print(
        f"[hanlm] before {_name(cfg)}: held-out reward accuracy {before['reward_accuracy']:.3f}"
        f" (chance 0.5), log-prob accuracy {before['logp_accuracy']:.3f}"
    )
    return ref_logps


def _preferences_after(
    cfg: DPOConfig,
    model: Any,
    eval_rows: list[dict[str, Any]],
    ref_logps: list[list[float]],
    summary: dict[str, Any],
) -> None:
    after = preference_metrics(
        completion_logps(model, eval_rows, cfg.train.batch_size), ref_logps, cfg.beta
    )
    summary.update(after)
    print(
        f"[hanlm] {_name(cfg)}: held-out reward accuracy"
        f" {summary['initial_reward_accuracy']:.3f} -> {after['reward_accuracy']:.3f}"
        f" (chance 0.5), margin {after['reward_margin']:.4f}; log-prob accuracy"
        f" {summary['initial_logp_accuracy']:.3f} -> {after['logp_accuracy']:.3f}"
    )


def _held_out(cfg: DPOConfig, data: Any, tok: Any, stops: list[int]) -> tuple[HeldOut, Any]:
    """The held-out prompts answered greedily before and after, and their gold judge if any."""
    held_out = HeldOut([], [])
    if cfg.eval_prompts > 0:
        held_out = preference.held_out_prompts(data.valid, cfg.eval_prompts)
    gold = None
    if cfg.gold_reward_model and held_out:
        gold = Scorer.build([cfg.gold_reward_model], RuleConfig(), tok, stops, base=cfg.model)
    return held_out, gold
