"""`hanlm grpo`: group relative policy optimisation through trl's GRPOTrainer.

Reads top to bottom: tokenizer and template -> prompts (preference or chat records) -> rewards:
reward-model directories (trl scores the re-rendered conversation with each) and rule rewards
(`hanlm.rewards`: built-ins and `module:function` names) -> policy (full or LoRA) -> trl's
GRPOTrainer: `num_generations` sampled answers per prompt, advantages relative to the group ->
held-out greedy answers scored by the same rewards before and after -> an HF directory.

trl needs every generation batch (batch_size x grad_accum) to hold whole groups, so it must
divide by `num_generations`; this is checked before anything loads.
"""

from __future__ import annotations

import time
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
from hanlm.rewards import RuleConfig
from hanlm.runs import Run


@dataclass
class GRPOConfig(OutputConfig):
    model: ModelConfig = opt(ModelConfig, "the SFT model to train")
    reward_models: list[str] = opt([], "reward model dirs (hanlm reward); their scores are added")
    reward_model_weight: float = opt(1.0, "weight of each reward model's score")
    rules: RuleConfig = opt(RuleConfig, "rule rewards (built-ins, module:function)")
    data: DataConfig = opt(
        DataConfig, "prompts: preference or chat records (no paths: the demo preference prompts)"
    )
    template: TemplateName = opt("auto", "chat template; auto = the model's own")
    max_prompt_len: int = opt(256, "prompts with more tokens are dropped (counted)")
    num_generations: int = opt(4, "answers sampled per prompt (the group)")
    max_new_tokens: int = opt(64, "most tokens per answer")
    temperature: float = opt(1.0, "sampling temperature")
    beta: float = opt(
        0.0, "KL coefficient to the reference (0 = no reference model, trl's default)"
    )
    epsilon: float = opt(0.2, "ratio clip ε")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = opt(
        "dapo", "token aggregation of the loss (trl's default dapo avoids a length bias)"
    )
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group", "divide advantages by the reward std of the group, the batch, or not at all"
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


def run(cfg: GRPOConfig) -> Path:
    from transformers import set_seed
    from trl import GRPOConfig as TrlGRPOConfig
    from trl import GRPOTrainer

    from hanlm import training
    from hanlm.data import to_dataset
    from hanlm.data.templates import require_template, stop_token_ids
    from hanlm.modeling import load_model, load_tokenizer, save_model
    from hanlm.rewards import build_rules
    from hanlm.stages.ppo import Scorer, held_out_scores, load_prompts
    from hanlm.stages.reward import load_reward_model

    started = time.time()
    with Run(
        "grpo", cfg, cfg.output_dir, cfg.overwrite, resume=cfg.resume, seed=cfg.train.seed
    ) as run:
        set_seed(cfg.train.seed)
        tok = load_tokenizer(cfg.model.path)
        require_template(tok, cfg.template, cfg.model.path, "GRPO")
        stops = stop_token_ids(tok, cfg.template)

        data, train_prompts, eval_prompts = load_prompts(
            cfg.data, tok, cfg.max_prompt_len, cfg.eval_prompts, "GRPO"
        )
        if not train_prompts:
            raise ValueError(f"no prompt fits max_prompt_len={cfg.max_prompt_len}")
        run.set(
            "data",
            {
                **data.stats.as_dict(),
                "train_prompts": len(train_prompts),
                "eval_prompts": len(eval_prompts),
            },
        )

        model = load_model(cfg.model)
        model.config.pad_token_id = tok.pad_token_id
        # trl stops generation at the generation config's EOS ids: the template's stop tokens.
        model.generation_config.eos_token_id = stops
        model.generation_config.pad_token_id = tok.pad_token_id

        # Rewards: reward models as loaded modules with their own tokenizers, then rule functions.
        reward_funcs: list[Any] = []
        reward_tokenizers: list[Any] = []
        for path in cfg.reward_models:
            rm_tok = load_tokenizer(path)
            rm = load_reward_model(replace(cfg.model, path=path))
            rm.config.pad_token_id = rm_tok.pad_token_id
            reward_funcs.append(rm.requires_grad_(False).eval())
            reward_tokenizers.append(rm_tok)
        rules = build_rules(cfg.rules, tok, stops)
        weights = [cfg.reward_model_weight] * len(cfg.reward_models) + (
            list(cfg.rules.weights) or [1.0] * len(rules)
        )
        rms = [(m, t, cfg.reward_model_weight) for m, t in zip(reward_funcs, reward_tokenizers)]
        scorer = Scorer(rms, rules, cfg.rules.weights)
        summary: dict[str, Any] = {}
        if eval_prompts and not cfg.resume:
            before = held_out_scores(model, tok, eval_prompts, stops, scorer, cfg.max_new_tokens)
            summary.update({f"initial_eval_{k}": v for k, v in before.items()})
            print(f"[hanlm] before GRPO: held-out score {before['score']:.4f}")

        if cfg.lora.enabled:
            model = training.apply_lora(model, cfg.lora)
        summary.update(training.describe_trainable(model))

        tok.padding_side = "left"  # trl generates from left-padded prompts
        args = training.training_args(
            cfg.train,
            run.dir,
            has_eval=False,  # held-out answers are scored by hanlm before and after instead
            args_cls=TrlGRPOConfig,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_new_tokens,
            temperature=cfg.temperature,
            beta=cfg.beta,
            epsilon=cfg.epsilon,
            loss_type=cfg.loss_type,
            scale_rewards=cfg.scale_rewards,
            reward_weights=weights,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward_funcs + rules,
            args=args,
            train_dataset=to_dataset([{"prompt": p} for p in train_prompts]),
            processing_class=tok,
            reward_processing_classes=reward_tokenizers + [None] * len(rules),
            callbacks=[training.metrics_callback(run)],
        )
        result = trainer.train(resume_from_checkpoint=training.resume_point(run.dir, cfg.resume))
        summary.update(train_loss=result.training_loss, steps=result.global_step)
        rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
        if rewards:
            summary.update(first_train_reward=rewards[0], last_train_reward=rewards[-1])

        model = training.finish_lora(trainer.model, cfg.lora, run.dir)
        tok.padding_side = "right"
        if eval_prompts:
            after = held_out_scores(model, tok, eval_prompts, stops, scorer, cfg.max_new_tokens)
            summary.update({f"eval_{k}": v for k, v in after.items()})
            initial = summary.get("initial_eval_score", float("nan"))
            print(f"[hanlm] grpo: held-out score {initial:.4f} -> {after['score']:.4f}")
        model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
        if run.main and (not cfg.lora.enabled or cfg.lora.merge):
            save_model(model, tok, run.dir)
        summary["seconds"] = time.time() - started
        run.finish(summary)
    return run.dir
