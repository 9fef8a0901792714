"""Alignment: reward models, PPO-ptx, DPO (with KTO, ORPO and SimPO), GRPO and context
distillation, and what they share:
rollouts, rewards, held-out checks, the hand-written loop and its distribution."""

from hanlm.stage import Command

JUDGED_SUMMARY = (  # what the held-out judges measure (hanlm.align.headlines.judged)
    "eval_gold_score",
    "eval_gold_score_sem",
    "eval_distinct_answers",
    "eval_top_answer_share",
    "eval_defect_rate",
    "eval_correct",
    "warnings",
)
# PPO and GRPO share a headline; GRPO has no final_kl (its KL is read from the metrics)
GRPO_SUMMARY = ("eval_rm_score", "eval_score", *JUDGED_SUMMARY)

COMMANDS = (
    Command(
        "reward",
        "hanlm.align.reward_model",
        "RewardConfig",
        "train a reward model on preference pairs or ranked answers (InstructGPT's C(K,2) loss)",
        resumable=True,
        headline="hanlm.align.headlines:reward",
        summary=("accuracy", "reward_gap", "gold_split"),
    ),
    Command(
        "reward score",
        "hanlm.align.reward_model",
        "RewardScoreConfig",
        "print a reward model's score of an answer (--prompt/--response) or of a JSONL file",
        positional="model.path",
        usage="MODEL_DIR",
        func="score",
    ),
    Command(
        "ppo",
        "hanlm.align.ppo",
        "PPOConfig",
        "PPO against a reward model or rule rewards, KL penalty to the SFT model, PPO-ptx mix",
        resumable=True,
        headline="hanlm.align.headlines:ppo",
        summary=(*GRPO_SUMMARY, "final_kl", "reward_first_quarter", "reward_last_quarter"),
        plot_over_kl=True,
    ),
    Command(
        "dpo",
        "hanlm.align.dpo",
        "DPOConfig",
        "preference optimisation: DPO (sigmoid, IPO, hinge; cached reference log-probs), KTO,"
        " ORPO, SimPO",
        resumable=True,
        headline="hanlm.align.headlines:dpo",
        summary=("reward_accuracy", "reward_margin", "loss_type", *JUDGED_SUMMARY),
    ),
    Command(
        "grpo",
        "hanlm.align.grpo",
        "GRPOConfig",
        "GRPO (or DAPO, Dr. GRPO) with rewards from reward models and/or rule functions",
        resumable=True,
        headline="hanlm.align.headlines:grpo",
        summary=GRPO_SUMMARY,
        plot_over_kl=True,
    ),
    Command(
        "distill",
        "hanlm.align.distill",
        "DistillConfig",
        "context distillation: match the model prompted with a context, without it (KL, LoRA)",
    ),
)
