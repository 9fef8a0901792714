"""The options of `hanlm ppo` (`hanlm.align.ppo`): the models (policy, reward, value, gold
judge), the prompts and the pretraining mix, the PPO step's sizes and coefficients, and the
checks that refuse a combination that cannot run."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from hanlm.align import distributed
from hanlm.align.rewards import RuleConfig
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


@dataclass
class PPOConfig(OutputConfig):
    RENAMED: ClassVar[dict[str, str]] = {"max_prompt_len": "max_prompt_length"}
    UNUSED: ClassVar[dict[str, str]] = {
        "train.epochs": "PPO runs train.max_steps steps of rollout_batch prompts each",
        "train.batching": "PPO's batches are its rollouts (answers to rollout_batch prompts)",
        "train.liger": "PPO's own loop reads the policy's and the critic's outputs itself",
    }
    model: ModelConfig = opt(ModelConfig, "the SFT model: the policy's start and the reference")
    reward_model: str = opt("", "reward model dir (from hanlm reward); empty = rule rewards only")
    value_model: str = opt(
        "", "value model start; empty = the reward model (InstructGPT), else the policy + new head"
    )
    rules: RuleConfig = opt(RuleConfig, "rule rewards, added to the reward model's score")
    gold_reward_model: str = opt(
        "",
        "a judge that is not the target: a reward model trained on other preferences (hanlm"
        " reward half=second); its held-out score is measured, never optimised",
    )
    keep_best: Literal["last", "gold"] = opt(
        "last", "the policy to save: the last one, or the one with the best held-out gold score"
    )
    center_value: bool = opt(
        True, "shift the critic on the first rollout so its values start on the shifted scores"
    )
    pg_coef: float = opt(
        1.0, "weight of the PPO policy loss; 0 (with ptx_coef > 0) is the ptx-alone control"
    )
    data: DataConfig = opt(
        DataConfig, "prompts: preference or chat records (no paths: the demo preference prompts)"
    )
    template: TemplateName = opt("auto", "chat template; auto = the model's own")
    max_prompt_length: int = opt(256, "prompts with more tokens are dropped (counted)")
    max_new_tokens: int = opt(64, "most tokens per sampled answer")
    temperature: float = opt(1.0, "sampling temperature of the rollouts (log-probs use it too)")
    rollout_batch: int = opt(
        16, "prompts (answers) per PPO step, per process (global batch = rollout_batch x processes)"
    )
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    gamma: float = opt(1.0, "GAE discount γ")
    lam: float = opt(0.95, "GAE λ")
    clip_eps: float = opt(0.2, "policy ratio clip ε")
    value_clip: float = opt(0.2, "value clip ε_v around the rollout's values")
    value_lr: float = opt(0.0, "value model learning rate (0 = train.lr)")
    entropy_coef: float = opt(0.0, "entropy bonus weight (0 = off, as InstructGPT)")
    kl_coef: float = opt(0.02, "β of the per-token KL penalty (InstructGPT: 0.02)")
    kl_target: float = opt(0.0, "adapt β toward this KL per answer, in nats (0 = fixed β)")
    kl_horizon: int = opt(10000, "adaptive β horizon (Ziegler et al.), in answers")
    normalize_score: bool = opt(
        True, "subtract the SFT policy's mean score (first rollout) so it starts at 0"
    )
    missing_stop_penalty: float = opt(
        -1.0,
        "added to the score of answers that never stop (the reward model cannot see it: it"
        " scores the re-rendered conversation); 0 = off",
    )
    ptx_coef: float = opt(0.0, "weight of the pretraining LM loss (PPO-ptx; 0 = plain PPO)")
    ptx_data: DataConfig = field(
        default_factory=lambda: DataConfig(max_records=4000),
        metadata={"help": "pretraining text for ptx and its held-out loss (default: demo corpus)"},
    )
    ptx_batch: int = opt(4, "pretraining blocks per minibatch when ptx_coef > 0")
    ptx_block: int = opt(128, "tokens per pretraining block")
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            max_steps=100,
            batch_size=8,
            lr=1e-5,
            warmup_ratio=0.0,
            scheduler="constant",
            eval_steps=25,
            logging_steps=1,
        ),
        metadata={
            "help": "optimisation: max_steps = PPO steps; batch_size = answers per optimiser"
            " update; grad_accum = micro-batches per update (the forward-pass size)"
        },
    )
    lora: LoraConfig = opt(LoraConfig, "LoRA on the policy (and the value model)")
    frozen: Literal["replicate", "partition"] = opt("replicate", distributed.FROZEN_HELP)
    eval_prompts: int = opt(64, "held-out prompts answered greedily and scored")
    eval_ptx_blocks: int = opt(32, "held-out pretraining blocks for the ptx loss (0 = skip)")

    def validate(self) -> None:
        if self.train.max_steps <= 0:
            raise ConfigError("train.max_steps must be > 0: it is the number of PPO steps")
        if self.rollout_batch < 2:
            raise ConfigError("rollout_batch must be at least 2 (advantages are whitened)")
        if not 0 < self.lam <= 1 or not 0 < self.gamma <= 1:
            raise ConfigError("gamma and lam must be in (0, 1]")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0: PPO needs sampled answers")
        if self.keep_best == "gold" and not self.gold_reward_model:
            raise ConfigError("keep_best=gold needs gold_reward_model=DIR")
        if self.pg_coef == 0 and self.ptx_coef <= 0:
            raise ConfigError("pg_coef=0 (no RL) trains nothing without ptx_coef > 0")
        if self.train.batch_size > self.rollout_batch:
            raise ConfigError(
                f"train.batch_size={self.train.batch_size} (answers per update) exceeds"
                f" rollout_batch={self.rollout_batch} (answers per step)"
            )
        if self.train.grad_accum < 1 or self.train.grad_accum > self.train.batch_size:
            raise ConfigError(
                "train.grad_accum must be between 1 and train.batch_size: it splits each"
                " update's answers into micro-batches"
            )
        # both need a whole policy outside the engines (the adapter merge; a best policy reloaded)
        whole = {"lora.enabled=true": self.lora.enabled, "keep_best=gold": self.keep_best == "gold"}
        distributed.refuse_on_zero3(self.train, "hanlm ppo", whole)
        distributed.check_frozen(self.train, self.frozen)
