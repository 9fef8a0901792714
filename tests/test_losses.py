"""hanlm.losses against values worked out by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from hanlm import losses

T = torch.tensor


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), T(b), atol=tol)


def test_pairwise_ranking_loss_with_and_without_margin():
    # -log σ(2 - 1) = log(1 + e^-1) = 0.3132617; with margin 1: -log σ(0) = log 2
    assert close(losses.pairwise_ranking_loss(T([2.0]), T([1.0])), 0.3132617)
    assert close(losses.pairwise_ranking_loss(T([2.0]), T([1.0]), margin=1.0), math.log(2))
    # a batch is averaged: (0.3132617 + log 2) / 2
    loss = losses.pairwise_ranking_loss(T([2.0, 0.0]), T([1.0, 0.0]))
    assert close(loss, (0.3132617 + math.log(2)) / 2)


def test_whiten_uses_only_masked_entries():
    # masked entries 1, 2, 3: mean 2, unbiased variance (1 + 0 + 1) / 2 = 1 -> -1, 0, 1; pad -> 0
    out = losses.whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]]))
    assert close(out, [[-1.0, 0.0, 1.0, 0.0]], tol=1e-4)
    # without shifting the mean the centre stays at 2
    out = losses.whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]]), shift_mean=False)
    assert close(out, [[1.0, 2.0, 3.0, 0.0]], tol=1e-4)


def test_kl_estimates():
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    # k1 = log 0.5 - log 0.25 = log 2
    assert close(losses.kl_k1(logp, ref), [math.log(2)])
    # k3: q = 0.25/0.5 = 0.5 -> (0.5 - 1) - log 0.5 = -0.5 + 0.6931472 = 0.1931472
    assert close(losses.kl_k3(logp, ref), [0.1931472])
    # k3 is never negative, and 0 when the two agree
    assert close(losses.kl_k3(ref, logp), [1 - math.log(2)])  # q = 2: (2 - 1) - log 2
    assert close(losses.kl_k3(logp, logp), [0.0])


def test_entropy_and_logprobs_from_logits():
    # uniform over 4 tokens: entropy log 4, every log-prob log 1/4
    logits = torch.zeros(1, 2, 4)
    logits[0, 1] = T([30.0, -30.0, -30.0, -30.0])  # (almost) certain: entropy ~ 0
    assert close(losses.entropy_from_logits(logits), [[math.log(4), 0.0]], tol=1e-4)
    lp = losses.logprobs_from_logits(logits, T([[2, 0]]))
    assert close(lp, [[math.log(0.25), 0.0]], tol=1e-4)


def test_per_token_rewards_penalise_kl_and_add_score_at_last_token():
    kl = T([[0.1, -0.2, 0.3], [0.5, 0.5, 0.5]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    # row 0: -0.1·[0.1, -0.2, 0.3] + [0, 0, 1] = [-0.01, 0.02, 0.97]
    # row 1 (two tokens): -0.1·[0.5, 0.5] + [0, 2] = [-0.05, 1.95], pad 0
    out = losses.per_token_rewards(kl, T([1.0, 2.0]), mask, beta=0.1)
    assert close(out, [[-0.01, 0.02, 0.97], [-0.05, 1.95, 0.0]])


def test_gae_by_hand():
    # γ = 1, λ = 0.5, values [0.5, 0.2, 0.4] (the 9.0 is padding and must be ignored)
    # t=2: δ = 1 + 0 - 0.4 = 0.6                 A = 0.6
    # t=1: δ = 0 + 0.4 - 0.2 = 0.2               A = 0.2 + 0.5·0.6 = 0.5
    # t=0: δ = 0 + 0.2 - 0.5 = -0.3              A = -0.3 + 0.5·0.5 = -0.05
    # returns = A + V = [0.45, 0.7, 1.0]
    # second row, one token: δ = 2 - 1 = 1 (no value after the end), returns 2
    rewards = T([[0.0, 0.0, 1.0, 0.0], [2.0, 5.0, 5.0, 5.0]])
    values = T([[0.5, 0.2, 0.4, 9.0], [1.0, 7.0, 7.0, 7.0]])
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert close(adv, [[-0.05, 0.5, 0.6, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert close(ret, [[0.45, 0.7, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    # λ = 1 makes returns the Monte-Carlo return: the final reward 1 at every step
    _, ret = losses.gae(rewards[:1], values[:1], mask[:1], gamma=1.0, lam=1.0)
    assert close(ret, [[1.0, 1.0, 1.0, 0.0]])
    # γ = 0.5, λ = 1, zero values: A_t = 0.5^(2-t)·1 = [0.25, 0.5, 1]
    adv, _ = losses.gae(T([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), torch.ones(1, 3), 0.5, 1.0)
    assert close(adv, [[0.25, 0.5, 1.0]])


def test_clipped_policy_loss_by_hand():
    # ε = 0.2; per token (ratio, A): -A·ρ vs -A·clip(ρ); the larger one counts
    # (1.5, +1): -1.5 vs -1.2 -> -1.2 (clipped)   (0.5, +1): -0.5 vs -0.8 -> -0.5
    # (0.5, -1):  0.5 vs  0.8 ->  0.8 (clipped)   (1.0, +2): -2 vs -2   -> -2
    # loss = (-1.2 - 0.5 + 0.8 - 2) / 4 = -0.725; clip fraction 2/4
    ratio = T([[1.5, 0.5, 0.5, 1.0, 3.0]])
    old = torch.zeros(1, 5)
    adv = T([[1.0, 1.0, -1.0, 2.0, 50.0]])
    mask = T([[1, 1, 1, 1, 0]])  # the last token is padding: ignored
    loss, clip_frac, approx_kl = losses.clipped_policy_loss(ratio.log(), old, adv, mask, 0.2)
    assert close(loss, -0.725) and close(clip_frac, 0.5)
    # approx KL: mean of (ρ-1) - log ρ = (0.0945349 + 0.1931472·2 + 0) / 4
    assert close(approx_kl, (0.0945349 + 2 * 0.1931472) / 4)


def test_clipped_value_loss_by_hand():
    # ε_v = 0.2
    # V=1.0, V_old=0.5, R=1: clip(V)=0.7 -> max(0, 0.09) = 0.09 (clipped counts)
    # V=0.0, V_old=0.1, R=1: clip(V)=0.0 -> max(1, 1) = 1
    # V=2.0, V_old=1.0, R=0: clip(V)=1.2 -> max(4, 1.44) = 4
    # loss = ½·(0.09 + 1 + 4)/3 = 0.8483333; clip fraction 1/3
    loss, frac = losses.clipped_value_loss(
        T([[1.0, 0.0, 2.0]]), T([[0.5, 0.1, 1.0]]), T([[1.0, 1.0, 0.0]]), torch.ones(1, 3), 0.2
    )
    assert close(loss, 0.8483333) and close(frac, 1 / 3)


def test_explained_variance():
    r = T([[1.0, 2.0, 3.0]])
    m = torch.ones(1, 3)
    assert close(losses.explained_variance(r, r, m), 1.0)
    assert close(losses.explained_variance(torch.zeros(1, 3), r, m), 0.0)
    # values off by a constant explain all the variance too
    assert close(losses.explained_variance(r + 5, r, m), 1.0)


def test_ptx_mix():
    assert close(losses.ptx_mix(T(1.0), T(2.0), 0.5), 2.0)
    assert close(losses.ptx_mix(T(1.0), T(2.0), 0.0), 1.0)
    assert close(losses.ptx_mix(T(1.0), None, 3.0), 1.0)


@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        (12.0, 0.1 * (1 + 0.2 * 100 / 10000)),  # KL/target - 1 = 1, clipped to 0.2
        (5.4, 0.1 * (1 - 0.1 * 100 / 10000)),  # 5.4/6 - 1 = -0.1
    ],
)
def test_adaptive_kl_coef(kl, expected):
    assert math.isclose(losses.adaptive_kl_coef(0.1, kl, 6.0, 100), expected)
    assert losses.adaptive_kl_coef(0.1, kl, 0.0, 100) == 0.1  # no target: fixed β
