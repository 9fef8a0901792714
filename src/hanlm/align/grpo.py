"""`hanlm grpo`: group relative policy optimisation through trl's GRPOTrainer.

Reads top to bottom: tokenizer and template -> prompts (preference or chat records) -> rewards:
reward-model directories (trl scores the re-rendered conversation with each) and rule rewards
(`hanlm.align.rewards`: built-ins and `module:function` names) -> policy (full or LoRA) -> trl's
GRPOTrainer: `num_generations` sampled answers per prompt, advantages relative to the group ->
held-out greedy answers scored by the same rewards before and after -> an HF directory.

The loss (`loss_type`) is trl's: how the per-token terms are summed. grpo: averaged per answer,
then over answers (the GRPO paper's; it favours short answers with positive advantages and long
ones with negative); dapo (the default here and in trl): averaged over every answer token of the
batch (DAPO's token-level loss); dr_grpo: summed per answer and divided by a constant, the answer
budget `max_new_tokens` (Dr. GRPO's). Each comes with what its paper pairs with it, where trl has
the setting (`scale_rewards=auto`, `epsilon_high=0`): DAPO's higher upper clip (ε_high 0.28, the
value trl's documentation gives from the paper) and Dr. GRPO's advantages without the division
by the group's reward std; set either key to choose otherwise. DAPO's overlong filtering is
`mask_truncated_completions` (off by default: with a short answer budget most answers are cut).

trl needs every generation batch (batch_size x grad_accum) to hold whole groups, so it must
divide by `num_generations`; this is checked before anything loads.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from hanlm.align.checks import warnings_for
from hanlm.align.rewards import RuleConfig, Scorer
from hanlm.align.rollouts import held_out_scores, load_prompts, write_samples
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
from hanlm.data import to_dataset
from hanlm.data.templates import require_template, stop_token_ids
from hanlm.modeling import load_model, load_tokenizer
from hanlm.runs import Run
from hanlm.trainer import (
    apply_lora,
    check_launch,
    describe_trainable,
    metrics_callback,
    run_trainer,
    training_args,
)

# why hanlm grpo batches at random only, and takes no Liger kernels (`check_launch`)
RANDOM_ONLY = "its batches are answers sampled to each prompt by trl"
NO_LIGER = "trl's GRPO loss reads the policy's log-probabilities itself"


@dataclass
class GRPOConfig(OutputConfig):
    RENAMED: ClassVar[dict[str, str]] = {"max_prompt_len": "max_prompt_length"}

    model: ModelConfig = opt(ModelConfig, "the SFT model to train")
    reward_models: list[str] = opt([], "reward model dirs (hanlm reward); their scores are added")
    reward_model_weight: float = opt(1.0, "weight of each reward model's score")
    gold_reward_model: str = opt(
        "", "a judge that is not the target (a reward model on other preferences): measured only"
    )
    rules: RuleConfig = opt(RuleConfig, "rule rewards (built-ins, module:function)")
    data: DataConfig = opt(
        DataConfig, "prompts: preference or chat records (no paths: the demo preference prompts)"
    )
    template: TemplateName = opt("auto", "chat template; auto = the model's own")
    max_prompt_length: int = opt(256, "prompts with more tokens are dropped (counted)")
    num_generations: int = opt(4, "answers sampled per prompt (the group)")
    max_new_tokens: int = opt(64, "most tokens per answer")
    temperature: float = opt(1.0, "sampling temperature")
    beta: float = opt(
        0.0, "KL coefficient to the reference (0 = no reference model, trl's default)"
    )
    epsilon: float = opt(0.2, "ratio clip ε (the lower bound, and the upper one unless set)")
    epsilon_high: float = opt(
        0.0, "upper ratio clip ε_high; 0 = auto: 0.28 for loss_type=dapo (DAPO), else ε"
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = opt(
        "dapo",
        "how token terms are summed: grpo = per answer then over answers (GRPO); dapo = over"
        " all answer tokens of the batch (DAPO; trl's default); dr_grpo = per answer over a"
        " constant, max_new_tokens (Dr. GRPO); bnpo = over the tokens of the local batch",
    )
    scale_rewards: Literal["auto", "group", "batch", "none"] = opt(
        "auto",
        "divide advantages by the reward std of the group, the batch, or not at all; auto ="
        " none for loss_type=dr_grpo (Dr. GRPO), group otherwise",
    )
    mask_truncated_completions: bool = opt(
        False, "leave answers cut at max_new_tokens out of the loss (DAPO's overlong filtering)"
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=100, batch_size=8, lr=1e-5, eval_steps=0, logging_steps=5
        ),
        metadata={"help": "optimisation; batch_size x grad_accum answers per generation batch"},
    )
    lora: LoraConfig = opt(LoraConfig, "LoRA adapters (a disabled adapter gives the reference)")
    eval_prompts: int = opt(32, "held-out prompts answered greedily and scored, before and after")

    def validate(self) -> None:
        if self.num_generations < 2:
            raise ConfigError(
                "num_generations must be at least 2: GRPO compares answers in a group"
            )
        per_gen = self.train.batch_size * max(1, self.train.grad_accum)
        if per_gen % self.num_generations:
            raise ConfigError(
                f"train.batch_size x train.grad_accum = {per_gen} answers per generation batch"
                f" must divide by num_generations={self.num_generations} (whole groups only);"
                f" (e.g. train.batch_size={self.num_generations}, or a multiple of it)"
            )
        if not self.reward_models and not self.rules.funcs:
            raise ConfigError("no reward: set reward_models=[DIR] and/or rules.funcs=[...]")
        if self.epsilon_high and self.epsilon_high < self.epsilon:
            raise ConfigError(f"epsilon_high={self.epsilon_high} must be >= epsilon={self.epsilon}")


# What each loss's paper pairs with it, where trl has the setting (trl's GRPOConfig docs: DAPO
# recommends epsilon_high 0.28; Dr. GRPO recommends no std scaling of the rewards).
DAPO_EPSILON_HIGH = 0.28


def loss_settings(cfg: GRPOConfig) -> dict[str, Any]:
    """The loss settings passed to trl, with `auto` resolved for `cfg.loss_type`."""
    high = cfg.epsilon_high or (DAPO_EPSILON_HIGH if cfg.loss_type == "dapo" else cfg.epsilon)
    scale = cfg.scale_rewards
    if scale == "auto":
        scale = "none" if cfg.loss_type == "dr_grpo" else "group"
    return {
        "loss_type": cfg.loss_type,
        "epsilon": cfg.epsilon,
        "epsilon_high": high,
        "scale_rewards": scale,
        "mask_truncated_completions": cfg.mask_truncated_completions,
    }


def run(cfg: GRPOConfig) -> Path:
    from transformers import set_seed
    from trl import GRPOConfig as TrlGRPOConfig
    from trl import GRPOTrainer

    check_launch(cfg.train, "hanlm grpo", RANDOM_ONLY, NO_LIGER)  # before anything loads
    with Run("grpo", cfg) as run:
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.path)
        require_template(tok, cfg.template, cfg.model.path, "GRPO")
        stops = stop_token_ids(tok, cfg.template)

        data, train_prompts, held_out = load_prompts(
            cfg.data, tok, cfg.max_prompt_length, cfg.eval_prompts, "GRPO"
        )
        if not train_prompts:
            raise ValueError(f"no prompt fits max_prompt_length={cfg.max_prompt_length}")
        run.set(
            "data",
            {
                **data.stats.as_dict(),
                "train_prompts": len(train_prompts),
                "eval_prompts": len(held_out),
            },
        )

        model = load_model(cfg.model)
        model.config.pad_token_id = tok.pad_token_id
        # trl stops generation at the generation config's EOS ids: the template's stop tokens.
        model.generation_config.eos_token_id = stops
        model.generation_config.pad_token_id = tok.pad_token_id

        # Rewards: the reward models (trl calls them as modules, each with its own tokenizer) and
        # the rule functions; the same Scorer judges the held-out answers before and after.
        scorer = Scorer.build(
            cfg.reward_models,
            cfg.rules,
            tok,
            stops,
            base=cfg.model,
            model_weight=cfg.reward_model_weight,
        )
        reward_funcs = [m for m, _, _, _ in scorer.models] + scorer.rules
        reward_tokenizers = [t for _, t, _, _ in scorer.models] + [None] * len(scorer.rules)
        weights = [cfg.reward_model_weight] * len(scorer.models) + (
            list(cfg.rules.weights) or [1.0] * len(scorer.rules)
        )
        gold = None
        if cfg.gold_reward_model:
            gold = Scorer.build([cfg.gold_reward_model], RuleConfig(), tok, stops, base=cfg.model)

        def measure(samples: list[dict[str, Any]]) -> dict[str, float]:
            return held_out_scores(
                model, tok, held_out, stops, scorer, cfg.max_new_tokens, gold=gold, samples=samples
            )

        summary: dict[str, Any] = {}
        answers_before: list[dict[str, Any]] = []
        # measured once, kept across a resume
        initial = {k[13:]: v for k, v in run.initial.items() if k.startswith("initial_eval_")}
        if held_out and not initial:
            initial = measure(answers_before)
            run.record_initial({f"initial_eval_{k}": v for k, v in initial.items()})
            print(f"[hanlm] before GRPO: held-out score {initial['score']:.4f}")
        summary.update({f"initial_eval_{k}": v for k, v in initial.items()})

        if cfg.lora.enabled:
            model = apply_lora(model, cfg.lora)
        summary.update(describe_trainable(model))

        tok.padding_side = "left"  # trl generates from left-padded prompts
        loss = loss_settings(cfg)
        run.set("loss", loss)
        print(
            f"[hanlm] grpo: loss {loss['loss_type']}, clip [1-{loss['epsilon']},"
            f" 1+{loss['epsilon_high']}], advantages scaled by: {loss['scale_rewards']}"
        )
        args = training_args(
            cfg.train,
            run.dir,
            has_eval=False,  # held-out answers are scored by hanlm before and after instead
            args_cls=TrlGRPOConfig,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature,
            beta=cfg.beta,
            reward_weights=weights,
            **loss,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=to_dataset([{"prompt": p} for p in train_prompts]),
            processing_class=tok,
            reward_processing_classes=reward_tokenizers,
            callbacks=[metrics_callback(run)],
        )
        result = run_trainer(trainer, run.resume_from())
        summary.update(train_loss=result.training_loss, steps=result.global_step)
        rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
        if rewards:
            summary.update(first_train_reward=rewards[0], last_train_reward=rewards[-1])

        tok.padding_side = "right"
        model = run.save_model(trainer.model, tok, cfg.lora, stops)
        if held_out:
            answers_after: list[dict[str, Any]] = []
            after = measure(answers_after)
            summary.update({f"eval_{k}": v for k, v in after.items()})
            summary["warnings"] = warnings_for(initial, after)
            write_samples(run.dir, answers_before, answers_after)
            start = summary.get("initial_eval_score", float("nan"))
            print(f"[hanlm] grpo: held-out score {start:.4f} -> {after['score']:.4f}")
            for w in summary["warnings"]:
                print(f"[hanlm] warning: {w}", file=sys.stderr)
        run.finish(summary)
    return run.dir
