"""The alignment math as pure tensor functions: reward ranking, KL estimates, GAE, PPO clipping.

Formulas follow InstructGPT (Ouyang et al. 2022), Ziegler et al. 2019 and Schulman's KL estimators.
Every function takes plain tensors, no models, so each is unit-tested against hand-computed
values (tests/test_losses.py) and the PPO step in `hanlm.align.ppo_algorithm` reads as their
composition.

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


def ranked_ranking_loss(
    rewards: Tensor, winners: Tensor, losers: Tensor, prompt_of_pair: Tensor, margin: float = 0.0
) -> Tensor:
    """InstructGPT's loss on K ranked answers per prompt, all C(K, 2) pairs of a prompt at once:
    mean over prompts of [ -1/P_x · Σ_(w,l) log σ(r_w - r_l - margin) ], P_x the prompt's pairs.

    Averaging within a prompt first keeps a prompt with many answers (K=9: 36 pairs) from
    outweighing one with few (K=2: 1 pair); with one pair per prompt it is the pairwise loss.
    `rewards` [N] holds every answer of the batch; `winners`/`losers` [P] index into it;
    `prompt_of_pair` [P] says which prompt (0..B-1) each pair belongs to.
    """
    import torch.nn.functional as F

    torch = _torch()
    per_pair = -F.logsigmoid(rewards[winners] - rewards[losers] - margin)
    n_prompts = int(prompt_of_pair.max().item()) + 1
    sums = torch.zeros(n_prompts, dtype=per_pair.dtype, device=per_pair.device)
    counts = torch.zeros_like(sums)
    sums = sums.index_add(0, prompt_of_pair, per_pair)
    counts = counts.index_add(0, prompt_of_pair, torch.ones_like(per_pair))
    has_pairs = counts > 0
    return (sums[has_pairs] / counts[has_pairs]).mean()


def kendall_tau(scores: list[float], ranking: list[list[int]]) -> float | None:
    """Kendall's τ-b between model scores and a human ranking given as tie groups (best first);
    None when either side has no order to compare (everything tied)."""
    rank = {i: -g for g, group in enumerate(ranking) for i in group}  # higher = better
    idx = sorted(rank)
    concordant = discordant = ties_x = ties_y = 0
    for a in range(len(idx)):
        for b in range(a + 1, len(idx)):
            i, j = idx[a], idx[b]
            dx, dy = rank[i] - rank[j], scores[i] - scores[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = ((concordant + discordant + ties_x) * (concordant + discordant + ties_y)) ** 0.5
    return (concordant - discordant) / denom if denom else None


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


# --------------------------------------------------------------------------- distillation


def distill_kl(teacher_logits: Tensor, student_logits: Tensor, mask: Tensor) -> Tensor:
    """Context distillation (Askell et al. 2021): per-token KL(p_teacher ‖ p_student) over the
    full next-token distributions, [B, T, V] each -> [B, T], 0 where `mask` is 0.

    Forward KL, teacher first: the student is pushed to cover every token the prompted teacher
    would give mass to. The teacher takes no gradient.
    """
    torch = _torch()
    logp = torch.log_softmax(teacher_logits.detach().float(), dim=-1)
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    return kl * mask.to(kl.dtype)


def distill_kl_topk(
    teacher_logp: Tensor, teacher_ids: Tensor, student_logits: Tensor, mask: Tensor
) -> Tensor:
    """KL over the teacher's top-k tokens plus one bucket for everything else, [B, T] (masked).

    `teacher_logp`/`teacher_ids` [B, T, k]: the teacher's k most likely tokens and their
    log-probs under its full softmax, so only k numbers per position need keeping. The k+1
    buckets are a coarsening of the vocabulary, so this is a lower bound of the full KL
    (data-processing inequality) and equals it when k = V; it is 0 only when the student gives
    each top-k token the teacher's probability.
    """
    torch = _torch()
    logits = student_logits.float()
    log_z = torch.logsumexp(logits, dim=-1)  # [B, T]
    logq_k = logits.gather(-1, teacher_ids) - log_z.unsqueeze(-1)  # [B, T, k]
    logp_k = teacher_logp.detach().float()
    head = (logp_k.exp() * (logp_k - logq_k)).sum(-1)
    # The rest bucket: the teacher's leftover mass, and the student's from its other logits.
    p_rest = (1.0 - logp_k.exp().sum(-1)).clamp(min=0.0)
    others = logits.scatter(-1, teacher_ids, float("-inf"))
    logq_rest = torch.logsumexp(others, dim=-1) - log_z
    has_rest = (p_rest > 1e-7) & torch.isfinite(logq_rest)
    safe_p = torch.where(has_rest, p_rest, torch.ones_like(p_rest))
    safe_q = torch.where(has_rest, logq_rest, torch.zeros_like(logq_rest))
    tail = torch.where(has_rest, safe_p * (safe_p.log() - safe_q), torch.zeros_like(p_rest))
    kl = head + tail
    return kl * mask.to(kl.dtype)


def teacher_topk(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most likely tokens of each teacher distribution: (log-probs, ids), [..., k] each."""
    torch = _torch()
    logp = torch.log_softmax(teacher_logits.float(), dim=-1)
    values, ids = logp.topk(min(k, logp.size(-1)), dim=-1)
    return values, ids
