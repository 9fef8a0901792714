"""The alignment math as pure tensor functions: reward ranking, KL estimates, GAE, PPO clipping.

Formulas follow shared/METHODS.md (InstructGPT, Ziegler et al. 2019, Schulman's KL estimators).
Every function takes plain tensors, no models, so each is unit-tested against hand-computed
values (tests/test_losses.py) and the PPO loop in `hanlm.stages.ppo` reads as their composition.

Shapes: sequence-level tensors are [B]; token-level tensors are [B, T] over the *response*
tokens, with `mask` [B, T] = 1 on real response tokens (a contiguous prefix of each row) and 0
on padding after the answer ended.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor


def _torch():
    import torch

    return torch


# --------------------------------------------------------------------------- reward model


def pairwise_ranking_loss(r_chosen: Tensor, r_rejected: Tensor, margin: float = 0.0) -> Tensor:
    """InstructGPT's reward-model loss: mean of -log σ(r_chosen - r_rejected - margin).

    A margin asks the chosen answer to win by at least that much before the loss fades.
    """
    import torch.nn.functional as F

    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


# --------------------------------------------------------------------------- masked statistics


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `x` where `mask` is 1 (over everything, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of `x` where `mask` is 1 (Bessel-corrected by default, as numpy's ddof=1)."""
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Normalise `x` to unit variance (and zero mean) over the masked entries of the whole batch.

    Whitening the advantages keeps the policy step's scale independent of the reward's scale.
    Masked-out entries come back as 0.
    """
    torch = _torch()
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns): 1 = a perfect critic, <= 0 = a useless one."""
    var_r = masked_var(returns, mask)
    return 1 - masked_var(returns - values, mask) / var_r.clamp(min=1e-8)


# --------------------------------------------------------------------------- log-probs, KL, entropy


def logprobs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(labels) under `logits` [B, T, V] -> [B, T]."""
    torch = _torch()
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution at each position: [B, T, V] -> [B, T] (nats)."""
    torch = _torch()
    logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k1 estimate of KL(π‖π_ref): log π(a) - log π_ref(a) for a sampled from π.

    Unbiased, but a single token's value can be negative; InstructGPT's penalty uses it.
    """
    return logp - ref_logp


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π‖π_ref): (q - 1) - log q with q = π_ref(a)/π(a).

    Unbiased and never negative (log q <= q - 1), with lower variance than k1: better to report.
    """
    torch = _torch()
    log_q = ref_logp - logp
    return torch.expm1(log_q) - log_q


# --------------------------------------------------------------------------- rewards and GAE


def per_token_rewards(kl: Tensor, scores: Tensor, mask: Tensor, beta: float | Tensor) -> Tensor:
    """InstructGPT's shaped reward: -β·KL at every response token, plus the score at the last one.

    `kl` [B, T] per-token KL estimates (k1), `scores` [B] sequence scores (reward model or rule).
    """
    torch = _torch()
    mask = mask.to(kl.dtype)
    rewards = -beta * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rows = torch.arange(kl.size(0), device=kl.device)
    rewards[rows, last] += scores.to(kl.dtype)
    return rewards


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over each row's masked response: (advantages, returns).

    δ_t = r_t + γ·V(s_{t+1}) - V(s_t) with V = 0 after the last response token;
    A_t = Σ_l (γλ)^l δ_{t+l};  R_t = A_t + V(s_t).  Masked positions come back as 0.
    """
    torch = _torch()
    mask = mask.to(values.dtype)
    values = values * mask
    T = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        next_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * next_mask * running
        advantages[:, t] = running * mask[:, t]
    returns = (advantages + values) * mask
    return advantages, returns


# --------------------------------------------------------------------------- PPO losses


def clipped_policy_loss(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's clipped surrogate: (loss, clip fraction, approx KL(old‖new)).

    loss = -mean(min(ρ·A, clip(ρ, 1-ε, 1+ε)·A)), ρ = π/π_old, averaged over response tokens.
    The clip fraction is the share of tokens where the clipped term was the one used.
    """
    torch = _torch()
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped > unclipped).to(logp.dtype), mask)
    approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, mask)  # k3 of old vs new
    return loss, clip_frac, approx_kl


def clipped_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float = 0.2
) -> tuple[Tensor, Tensor]:
    """½·mean(max((V - R)², (clip(V, V_old ± ε_v) - R)²)): (loss, clip fraction).

    Clipping keeps one PPO epoch from moving the value far from the values the advantages used.
    """
    torch = _torch()
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    clip_frac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    return loss, clip_frac


def ptx_mix(rl_loss: Tensor, ptx_loss: Tensor | None, ptx_coef: float) -> Tensor:
    """PPO-ptx: the RL loss plus ptx_coef times a language-modelling loss on pretraining text.

    Minimising `lm_loss = -mean log π(x)` is maximising InstructGPT's γ·E[log π(x)] term, which
    keeps the policy from forgetting what pretraining taught it (the "alignment tax").
    """
    if ptx_loss is None or ptx_coef == 0:
        return rl_loss
    return rl_loss + ptx_coef * ptx_loss


def adaptive_kl_coef(
    beta: float, kl: float, target: float, n_steps: int, horizon: int = 10000
) -> float:
    """Ziegler et al.'s adaptive β: raise it when the measured KL is above target, lower it below.

    β ← β·(1 + clip(KL/target - 1, -0.2, 0.2)·n_steps/horizon), `n_steps` samples since the
    last update. A target of 0 (or less) means a fixed β.
    """
    if target <= 0:
        return beta
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)
