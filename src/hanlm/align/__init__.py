"""Alignment: reward models, PPO-ptx, DPO, GRPO and context distillation, and what they share:
rollouts, rewards, held-out checks, the hand-written loop and its distribution."""
