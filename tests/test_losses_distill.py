"""Context-distillation KL against hand-computed values (full distribution and top-k)."""

import math

import torch

from hanlm.losses import distill_kl, distill_kl_topk, teacher_topk

P = torch.tensor([0.5, 0.25, 0.25])  # teacher
Q = torch.tensor([0.25, 0.5, 0.25])  # student


def logits(p):
    return p.log().view(1, 1, -1)  # [B=1, T=1, V=3]; softmax(log p) = p


def test_full_kl_by_hand():
    # KL(P‖Q) = 0.5·ln(0.5/0.25) + 0.25·ln(0.25/0.5) + 0.25·ln 1 = 0.25·ln 2
    kl = distill_kl(logits(P), logits(Q), torch.ones(1, 1))
    assert torch.allclose(kl, torch.tensor([[0.25 * math.log(2)]]), atol=1e-6)
    assert torch.allclose(distill_kl(logits(P), logits(P), torch.ones(1, 1)), torch.zeros(1, 1))
    # Logits shifted by a constant are the same distribution; masked positions give 0
    t = torch.cat([logits(P), logits(P) + 3.0], 1)
    s = torch.cat([logits(Q), logits(Q)], 1)
    kl2 = distill_kl(t, s, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(kl2, torch.tensor([[0.25 * math.log(2), 0.0]]), atol=1e-6)


def test_topk_kl_by_hand():
    logp, ids = teacher_topk(logits(P), 1)
    assert ids.tolist() == [[[0]]] and torch.allclose(logp.exp(), torch.tensor([[[0.5]]]))
    # Buckets {token 0, the rest}: teacher (0.5, 0.5), student (0.25, 0.75)
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl = distill_kl_topk(logp, ids, logits(Q), torch.ones(1, 1))
    assert torch.allclose(kl, torch.tensor([[want]]), atol=1e-6)
    assert kl.item() <= 0.25 * math.log(2)  # a lower bound of the full KL
    # k = V is the full KL (the rest bucket is empty)
    logp3, ids3 = teacher_topk(logits(P), 3)
    full = distill_kl_topk(logp3, ids3, logits(Q), torch.ones(1, 1))
    assert torch.allclose(full, torch.tensor([[0.25 * math.log(2)]]), atol=1e-6)


def test_gradients_reach_the_student_only():
    t = logits(P).clone().requires_grad_(True)
    s = logits(Q).clone().requires_grad_(True)
    distill_kl(t, s, torch.ones(1, 1)).sum().backward()
    assert t.grad is None or not t.grad.any()
    # d KL / d student logits = q - p
    assert torch.allclose(s.grad, (Q - P).view(1, 1, -1), atol=1e-6)
    s2 = logits(Q).clone().requires_grad_(True)
    logp, ids = teacher_topk(logits(P), 2)
    distill_kl_topk(logp, ids, s2, torch.ones(1, 1)).sum().backward()
    assert torch.isfinite(s2.grad).all() and s2.grad.abs().sum() > 0
