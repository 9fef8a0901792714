"""`hanlm reward`: a reward model trained on preference pairs; `hanlm reward score` applies one.

Reads top to bottom: tokenizer and chat template -> preference pairs rendered as whole
conversations (prompt + chosen, prompt + rejected) -> a sequence-classification model with one
output, its scalar read at the last non-pad token, initialised from an SFT model -> optional
LoRA (the new `score` head trained in full) -> trl's RewardTrainer, loss -log σ(r_w - r_l - m)
-> held-out pairwise accuracy and mean reward gap before and after -> an ordinary HF directory
(`AutoModelForSequenceClassification.from_pretrained` loads it).

Ranked data (K answers per prompt, `hanlm label`'s output) takes InstructGPT's path instead: all
C(K, 2) pairs of a prompt in the same batch, the loss averaged over each prompt's pairs
(`losses.ranked_ranking_loss`), held-out pair accuracy and Kendall τ per prompt.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

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
from hanlm.data.formats import RecordError, from_preference, from_ranked, ranked_pairs
from hanlm.data.sources import BadJson, DataError, iter_source, resolve
from hanlm.data.templates import apply_template, render
from hanlm.generation import (
    load_reward_model,
    score_conversations,
    score_ids,
    trained_max_length,
)
from hanlm.losses import kendall_tau, ranked_ranking_loss
from hanlm.modeling import load_tokenizer
from hanlm.runs import Run, atomic_write_text
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
class RewardConfig(OutputConfig):
    model: ModelConfig = opt(ModelConfig, "the SFT model the reward model starts from")
    data: DataConfig = opt(
        DataConfig, "preference pairs (no paths: the embedded demo set, derived from real text)"
    )
    template: TemplateName = opt("auto", "chat template; auto = the model's own")
    max_length: int = opt(512, "most tokens per rendered conversation; longer pairs are dropped")
    margin: float = opt(0.0, "ranking margin m in -log σ(r_chosen - r_rejected - m)")
    center_coef: float = opt(
        0.0, "pull the mean reward toward 0 with this weight (Eisenstein et al.; 0.01 typical)"
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(max_steps=300, lr=3e-4, eval_steps=100),
        metadata={"help": "optimisation"},
    )
    lora: LoraConfig = opt(LoraConfig, "LoRA adapters (the score head is always trained in full)")
    eval_pairs: int = opt(
        0, "held-out pairs (ranked data: prompts) scored before and after (0 = all)"
    )
    half: Literal["all", "first", "second"] = opt(
        "all",
        "train on all pairs, or on one of two disjoint halves (split by prompt): a proxy reward"
        " model on one and a gold judge on the other (Gao et al.'s gold vs proxy)",
    )


@dataclass
class RewardScoreConfig:
    model: ModelConfig = opt(ModelConfig, "the reward model directory")
    prompt: str = opt("", "score one answer: the user prompt")
    response: str = opt("", "score one answer: the answer")
    file: str = opt(
        "",
        "JSONL of {prompt, response}, {messages}, {prompt, chosen, rejected} or ranked"
        " {prompt, responses, ranking} records",
    )
    output: str = opt("", "write JSONL results here (default: standard output)")
    group_by: str = opt(
        "", "pairs: also give the accuracy per value of this record field (dotted: meta.defect)"
    )
    batch_size: int = opt(16, "conversations scored at once")
    max_length: int = opt(
        0, "longer conversations keep their last tokens (0 = the length the model was trained at)"
    )


def half_of(record: dict[str, Any]) -> str:
    """ "first" or "second": a stable split of preference records by their prompt text, so that
    every pair about one prompt lands in the same half."""
    text = "".join(m["content"] for m in record["prompt"])
    return "first" if hashlib.sha256(text.encode("utf-8")).digest()[0] < 128 else "second"


def encode_pairs(
    records: list[dict[str, Any]], tok: Any, max_length: int
) -> tuple[list[dict[str, list[int]]], int]:
    """(rows of chosen_ids / rejected_ids, pairs dropped as too long)."""
    rows, dropped = [], 0
    for rec in records:
        chosen, _ = render(tok, rec["prompt"] + rec["chosen"])
        rejected, _ = render(tok, rec["prompt"] + rec["rejected"])
        longest = max(len(chosen), len(rejected))  # also what grouped batches sort on
        if longest > max_length:
            dropped += 1
            continue
        rows.append({"chosen_ids": chosen, "rejected_ids": rejected, LENGTH: longest})
    return rows, dropped


def pair_metrics(
    model: Any, rows: list[dict[str, list[int]]], pad_id: int, batch_size: int = 16
) -> dict[str, float]:
    """Held-out pairwise accuracy (r_chosen > r_rejected), mean reward gap, reward mean/std."""
    import statistics

    chosen = score_ids(model, [r["chosen_ids"] for r in rows], pad_id, batch_size)
    rejected = score_ids(model, [r["rejected_ids"] for r in rows], pad_id, batch_size)
    gaps = [c - r for c, r in zip(chosen, rejected)]
    both = chosen + rejected
    return {
        "accuracy": sum(g > 0 for g in gaps) / max(len(gaps), 1),
        "reward_gap": sum(gaps) / max(len(gaps), 1),
        "reward_mean": statistics.fmean(both) if both else 0.0,
        "reward_std": statistics.pstdev(both) if len(both) > 1 else 0.0,
    }


# --------------------------------------------------------------------------- hanlm reward


def _with_lora(model: Any, cfg: RewardConfig, added: list[str]) -> Any:
    """LoRA on the reward model when asked: the score head (and embeddings that grew with the
    template's tokens) trained in full beside the adapters."""
    if not cfg.lora.enabled:
        return model
    extra = {"score"} | ({"embed_tokens", "lm_head"} if added else set())
    lora = replace(cfg.lora, modules_to_save=sorted(set(cfg.lora.modules_to_save) | extra))
    return apply_lora(model, lora, task="SEQ_CLS")


def run(cfg: RewardConfig) -> Path:
    from transformers import set_seed
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    # before anything loads
    check_launch(cfg.train, "hanlm reward", no_liger="a reward model has a score head, no LM head")
    batching = batching_args(cfg.train, "reward")
    with Run("reward", cfg) as run:
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.path)
        added = apply_template(tok, cfg.template)

        dcfg = or_demo(cfg.data, "preference")
        data = load(dcfg)
        if data.kind not in ("preference", "ranked"):
            raise DataError(
                f"hanlm reward needs preference pairs or ranked answers; this data is {data.kind}"
                f" ({', '.join(sorted(set(data.stats.formats.values())))})"
            )
        print(data.stats.summary())
        if cfg.half != "all":
            data.train = [r for r in data.train if half_of(r) == cfg.half]
            print(f"[hanlm] training on the {cfg.half} half: {len(data.train)} records")
        if data.kind == "ranked":
            _train_ranked(cfg, run, tok, added, data)
            return run.dir
        train_rows, train_dropped = encode_pairs(data.train, tok, cfg.max_length)
        valid_rows, valid_dropped = encode_pairs(data.valid, tok, cfg.max_length)
        if not train_rows:
            raise ValueError(f"no preference pair fits max_length={cfg.max_length}; raise it")
        run.set(
            "data",
            {
                **data.stats.as_dict(),
                "train_pairs": len(train_rows),
                "valid_pairs": len(valid_rows),
                "dropped_too_long": train_dropped + valid_dropped,
                "half": cfg.half,
            },
        )
        eval_rows = valid_rows[: cfg.eval_pairs] if cfg.eval_pairs > 0 else valid_rows

        model = load_reward_model(cfg.model)
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=True)
        model.config.pad_token_id = tok.pad_token_id  # the head reads the last non-pad token

        summary: dict[str, Any] = {"template_tokens_added": added, **run.initial}
        if eval_rows and not run.initial:  # measured once, kept across a resume
            before = pair_metrics(model, eval_rows, tok.pad_token_id, cfg.train.batch_size)
            summary.update({f"initial_{k}": v for k, v in before.items()})
            run.record_initial(summary)
            print(
                f"[hanlm] before: held-out accuracy {before['accuracy']:.3f},"
                f" reward gap {before['reward_gap']:.4f}"
            )

        model = _with_lora(model, cfg, added)
        summary.update(describe_trainable(model))

        def with_margin(rows: list[dict[str, Any]]) -> Any:
            if cfg.margin:
                rows = [{**r, "margin": cfg.margin} for r in rows]
            return to_dataset(rows)

        args = training_args(
            cfg.train,
            run.dir,
            has_eval=bool(valid_rows),
            args_cls=TrlRewardConfig,
            max_length=None,  # lengths were enforced above
            center_rewards_coefficient=cfg.center_coef or None,
            **batching,
        )
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=with_margin(train_rows),
            eval_dataset=with_margin(valid_rows) if valid_rows else None,
            processing_class=tok,
            callbacks=[metrics_callback(run)],
        )
        padding = count_padding(trainer)
        result = run_trainer(trainer, run.resume_from())
        summary.update(train_loss=result.training_loss, steps=result.global_step)
        summary.update(padding.summary("reward", trainer.args))

        model = run.save_model(trainer.model, tok, cfg.lora)
        if eval_rows:
            after = pair_metrics(model, eval_rows, tok.pad_token_id, cfg.train.batch_size)
            summary.update(after)
            print(
                f"[hanlm] reward: held-out accuracy {summary.get('initial_accuracy', 0):.3f}"
                f" -> {after['accuracy']:.3f}, reward gap {after['reward_gap']:.4f}"
                f" (rewards {after['reward_mean']:.3f} ± {after['reward_std']:.3f})"
            )
        run.finish(summary)
    return run.dir


# --------------------------------------------------------------------------- ranked data


def encode_ranked(
    records: list[dict[str, Any]], tok: Any, max_length: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(rows of per-answer ids, the ranking and its pairs; counts of records dropped and why)."""
    rows: list[dict[str, Any]] = []
    dropped = {"dropped_too_long": 0, "dropped_all_tied": 0}
    for rec in records:
        pairs = ranked_pairs(rec["ranking"])
        if not pairs:  # an all-tied ranking (e.g. "all bad" with no order) teaches nothing
            dropped["dropped_all_tied"] += 1
            continue
        ids = [render(tok, rec["prompt"] + resp)[0] for resp in rec["responses"]]
        if max(len(x) for x in ids) > max_length:
            dropped["dropped_too_long"] += 1
            continue
        rows.append({"ids": ids, "pairs": pairs, "ranking": rec["ranking"]})
    return rows, dropped


def collate_ranked(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """Every answer of every prompt in one right-padded batch, with the pairs indexing into it:
    InstructGPT keeps all pairs of a prompt in the same batch element."""
    import torch

    flat, winners, losers, owner = [], [], [], []
    for p, row in enumerate(rows):
        base = len(flat)
        flat += row["ids"]
        for w, lose in row["pairs"]:
            winners.append(base + w)
            losers.append(base + lose)
            owner.append(p)
    width = max(len(x) for x in flat)
    return {
        "input_ids": torch.tensor([x + [pad_id] * (width - len(x)) for x in flat]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in flat]),
        "winners": torch.tensor(winners),
        "losers": torch.tensor(losers),
        "prompt_of_pair": torch.tensor(owner),
    }


def ranked_metrics(
    model: Any, rows: list[dict[str, Any]], pad_id: int, batch_size: int = 16
) -> dict[str, float]:
    """Held-out accuracy over all pairs, the mean per-prompt accuracy, Kendall τ-b per prompt
    (mean) and the mean reward gap of the pairs."""
    import statistics

    flat = [ids for row in rows for ids in row["ids"]]
    scores = iter(score_ids(model, flat, pad_id, batch_size))
    wins = gaps = n_pairs = 0.0
    per_prompt, taus = [], []
    for row in rows:
        r = [next(scores) for _ in row["ids"]]
        won = [r[w] > r[lose] for w, lose in row["pairs"]]
        wins += sum(won)
        gaps += sum(r[w] - r[lose] for w, lose in row["pairs"])
        n_pairs += len(won)
        per_prompt.append(sum(won) / len(won))
        tau = kendall_tau(r, row["ranking"])
        if tau is not None:
            taus.append(tau)
    return {
        "accuracy": wins / max(n_pairs, 1),
        "prompt_accuracy": statistics.fmean(per_prompt) if per_prompt else 0.0,
        "kendall_tau": statistics.fmean(taus) if taus else 0.0,
        "reward_gap": gaps / max(n_pairs, 1),
        "pairs": int(n_pairs),
        "prompts": len(rows),
    }


def _train_ranked(cfg: RewardConfig, run: Run, tok: Any, added: list[str], data: Any) -> None:
    from transformers import Trainer

    if cfg.train.batching == "grouped":  # (padding_free: refused by batching_args already)
        raise ConfigError(
            f"train.batching={cfg.train.batching}: ranked answers train in random batches (a row"
            " is a prompt with all its answers); set train.batching=random or auto"
        )
    train_rows, train_drop = encode_ranked(data.train, tok, cfg.max_length)
    valid_rows, valid_drop = encode_ranked(data.valid, tok, cfg.max_length)
    if not train_rows:
        raise ValueError(
            f"no ranked record is usable (too long for max_length={cfg.max_length}: "
            f"{train_drop['dropped_too_long']}, all tied: {train_drop['dropped_all_tied']})"
        )
    run.set(
        "data",
        {
            **data.stats.as_dict(),
            "kind": "ranked",
            "train_prompts": len(train_rows),
            "train_pairs": sum(len(r["pairs"]) for r in train_rows),
            "valid_prompts": len(valid_rows),
            "valid_pairs": sum(len(r["pairs"]) for r in valid_rows),
            **{k: train_drop[k] + valid_drop[k] for k in train_drop},
            "half": cfg.half,
        },
    )
    eval_rows = valid_rows[: cfg.eval_pairs] if cfg.eval_pairs > 0 else valid_rows

    model = load_reward_model(cfg.model)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), pad_to_multiple_of=64, mean_resizing=True)
    model.config.pad_token_id = tok.pad_token_id
    pad = tok.pad_token_id

    summary: dict[str, Any] = {"template_tokens_added": added, "loss": "ranked (InstructGPT)"}
    summary.update(run.initial)
    if eval_rows and not run.initial:  # measured once, kept across a resume
        before = ranked_metrics(model, eval_rows, pad, cfg.train.batch_size)
        summary.update({f"initial_{k}": v for k, v in before.items()})
        run.record_initial(summary)
        print(
            f"[hanlm] before: held-out pair accuracy {before['accuracy']:.3f},"
            f" Kendall τ {before['kendall_tau']:.3f}"
        )
    model = _with_lora(model, cfg, added)
    summary.update(describe_trainable(model))

    class RankedTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            rewards = model(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).logits[:, 0]
            loss = ranked_ranking_loss(
                rewards, inputs["winners"], inputs["losers"], inputs["prompt_of_pair"], cfg.margin
            )
            if cfg.center_coef:
                loss = loss + cfg.center_coef * (rewards**2).mean()
            return (loss, rewards) if return_outputs else loss

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            import torch

            inputs = self._prepare_inputs(inputs)
            with torch.no_grad():
                loss = self.compute_loss(model, inputs)
            return loss.detach(), None, None

    # one row = one prompt with all its answers; train.batch_size counts prompts
    args = training_args(cfg.train, run.dir, has_eval=bool(valid_rows))
    trainer = RankedTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=valid_rows or None,
        data_collator=lambda rows: collate_ranked(rows, pad),
        processing_class=tok,
        callbacks=[metrics_callback(run)],
    )
    result = run_trainer(trainer, run.resume_from())
    summary.update(train_loss=result.training_loss, steps=result.global_step)

    model = run.save_model(trainer.model, tok, cfg.lora)
    if eval_rows:
        after = ranked_metrics(model, eval_rows, pad, cfg.train.batch_size)
        summary.update(after)
        print(
            f"[hanlm] reward (ranked): held-out pair accuracy"
            f" {summary.get('initial_accuracy', 0):.3f} -> {after['accuracy']:.3f},"
            f" Kendall τ {summary.get('initial_kendall_tau', 0):.3f} -> {after['kendall_tau']:.3f}"
            f" over {after['prompts']} prompts / {after['pairs']} pairs"
        )
    run.finish(summary)


# --------------------------------------------------------------------------- hanlm reward score


def _score_records(path: str) -> list[dict[str, Any]]:
    out = []
    for source in resolve(path):
        for raw, loc in iter_source(source):
            if isinstance(raw, BadJson) or not isinstance(raw, dict):
                raise DataError(f"{loc}: not a JSON object")
            try:
                if "chosen" in raw and "rejected" in raw:
                    out.append({"kind": "pair", "raw": raw, **from_preference(raw)})
                elif "responses" in raw and "ranking" in raw:
                    out.append({"kind": "ranked", "raw": raw, **from_ranked(raw)})
                elif "messages" in raw:
                    out.append({"kind": "conversation", "raw": raw, "messages": raw["messages"]})
                elif "prompt" in raw and "response" in raw:
                    # the same checks as a preference record whose two answers are this one
                    conv = from_preference({**raw, "chosen": raw["response"], "rejected": "-"})
                    msgs = conv["prompt"] + conv["chosen"]
                    out.append({"kind": "conversation", "raw": raw, "messages": msgs})
                else:
                    raise RecordError(
                        "expected {prompt, response}, {messages}, {prompt, chosen, rejected} or"
                        f" {{prompt, responses, ranking}}; found keys {sorted(raw)}"
                    )
            except RecordError as e:
                raise DataError(f"{loc}: {e}") from None
    return out


def score(cfg: RewardScoreConfig) -> int:
    """Print the reward of one answer (a bare number) or of every record in a file (JSONL)."""
    if bool(cfg.file) == bool(cfg.prompt or cfg.response):
        print("hanlm reward score: give either --prompt and --response, or --file", file=sys.stderr)
        return 2
    if not cfg.file and not (cfg.prompt and cfg.response):
        print("hanlm reward score: --prompt and --response go together", file=sys.stderr)
        return 2
    tok = load_tokenizer(cfg.model.path)
    model = load_reward_model(cfg.model)
    model.config.pad_token_id = tok.pad_token_id

    max_length = cfg.max_length or trained_max_length(cfg.model.path)

    def conv_score(convs: list[list[dict[str, str]]]) -> list[float]:
        return score_conversations(model, tok, convs, cfg.batch_size, max_length)

    if not cfg.file:
        conv = [
            {"role": "user", "content": cfg.prompt},
            {"role": "assistant", "content": cfg.response},
        ]
        print(f"{conv_score([conv])[0]:.6f}")
        return 0

    records = _score_records(cfg.file)
    convs = [r["messages"] for r in records if r["kind"] == "conversation"]
    pairs = [r for r in records if r["kind"] == "pair"]
    conv_scores = iter(conv_score(convs))
    chosen = iter(conv_score([p["prompt"] + p["chosen"] for p in pairs]))
    rejected = iter(conv_score([p["prompt"] + p["rejected"] for p in pairs]))
    ranked = [r for r in records if r["kind"] == "ranked"]
    answers = iter(conv_score([r["prompt"] + a for r in ranked for a in r["responses"]]))
    ranked_wins, ranked_pairs_n, taus = 0, 0, []
    lines, wins = [], 0
    groups: dict[str, list[bool]] = {}
    for r in records:
        row = {k: v for k, v in r["raw"].items() if k != "meta"}
        if r["kind"] == "pair":
            c, j = next(chosen), next(rejected)
            wins += c > j
            row.update(chosen_reward=c, rejected_reward=j)
            if cfg.group_by:
                groups.setdefault(_field(r["raw"], cfg.group_by), []).append(c > j)
        elif r["kind"] == "ranked":
            rewards = [next(answers) for _ in r["responses"]]
            won = [rewards[w] > rewards[lose] for w, lose in ranked_pairs(r["ranking"])]
            ranked_wins += sum(won)
            ranked_pairs_n += len(won)
            tau = kendall_tau(rewards, r["ranking"])
            taus += [tau] if tau is not None else []
            row.update(rewards=rewards, kendall_tau=tau)
        else:
            row["reward"] = next(conv_scores)
        lines.append(json.dumps(row, ensure_ascii=False))
    text = "\n".join(lines) + "\n"
    if cfg.output:
        atomic_write_text(cfg.output, text)
    else:
        sys.stdout.write(text)
    if pairs:
        print(
            f"[hanlm] pairwise accuracy {wins / len(pairs):.4f} over {len(pairs)} pairs",
            file=sys.stderr,
        )
        for name, won in sorted(groups.items()):
            print(
                f"[hanlm]   {cfg.group_by}={name}: {sum(won) / len(won):.4f} over {len(won)}",
                file=sys.stderr,
            )
    if ranked:
        print(
            f"[hanlm] ranked: pair accuracy {ranked_wins / max(ranked_pairs_n, 1):.4f} over"
            f" {ranked_pairs_n} pairs, mean Kendall τ {sum(taus) / max(len(taus), 1):.4f}"
            f" over {len(taus)} prompts",
            file=sys.stderr,
        )
    return 0


def _field(raw: dict[str, Any], dotted: str) -> str:
    """The value at a dotted path of a record, as text ("(missing)" when absent)."""
    value: Any = raw
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return "(missing)"
        value = value[part]
    return str(value)
