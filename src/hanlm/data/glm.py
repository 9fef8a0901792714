"""GLM blank infilling (Du et al. 2022; GLM-130B) on the Llama-architecture models hanlm trains.

A block of text becomes one GLM example:

  Part A  the text with each blanked span replaced by one [MASK] (or a trailing span by [gMASK]);
          every Part A token sees all of Part A (bidirectional) and nothing of Part B.
  Part B  the spans in shuffled order, each as `<sop> t1 .. tl <eop>`, generated left to right:
          a Part B token sees all of Part A and the Part B tokens before it (causal).

The loss is on Part B only: each span token and the `<eop>` closing it (predicted from the
token before it, the usual shift), never on Part A or on `<sop>`.

Attention is a prefix-LM mask, handed to the model as a boolean 4-D mask [B, 1, T, T]
(True = may attend). transformers 5 passes a 4-D mask through unchanged (masking_utils:
"If the mask is already 4D, simply return as-is"), and sdpa accepts a boolean mask; eager
attention adds the mask as floats, so `check_attention` refuses it.

Positions: GLM's 2-D positions (the [MASK]'s position in Part A; the position inside the span)
are folded into RoPE's one dimension: a span is numbered as if written in place of its [MASK],
so `<sop>` takes the [MASK]'s position and the span's i-th token the i-th after it. Part A is
numbered 0..|A|-1. Relative distances from a span token to the text around its blank are then
those of the uncorrupted text, which is what a relative (rotary) position code can express.

Span lengths follow Poisson(λ=3) (at least 1), drawn until `mask_ratio` of the block is blanked;
spans never touch (one unmasked token at least between two). A [gMASK] example blanks one
trailing span of 50-100% of the block (GLM's generation objective); GLM-130B mixes [gMASK] and
[MASK] examples 70/30. A `causal_fraction` of blocks can be kept as plain causal LM examples
(an empty Part A), for a causal/GLM mix.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hanlm import IGNORE_INDEX
from hanlm.config import ConfigError, opt

if TYPE_CHECKING:
    import torch

MASK, GMASK, SOP, EOP = "[MASK]", "[gMASK]", "<|startofpiece|>", "<|endofpiece|>"
GLM_TOKENS = (MASK, GMASK, SOP, EOP)


@dataclass
class GLMConfig:
    mask_ratio: float = opt(0.15, "[MASK] examples: share of a block's tokens blanked (GLM: 15%)")
    span_lambda: float = opt(3.0, "[MASK] examples: span lengths ~ Poisson(λ), at least 1")
    gmask_fraction: float = opt(
        0.7, "share of GLM examples that blank one trailing span with [gMASK] (GLM-130B: 70%)"
    )
    causal_fraction: float = opt(
        0.0, "share of blocks kept as plain causal-LM examples (0.5 = a 50/50 causal/GLM mix)"
    )
    shuffle_spans: bool = opt(True, "Part B spans in random order (GLM); false keeps text order")

    def validate(self) -> None:
        for name in ("mask_ratio", "gmask_fraction", "causal_fraction"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ConfigError(f"glm.{name}={v}: must be between 0 and 1")
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"glm.mask_ratio={self.mask_ratio}: must be between 0 and 1")
        if self.span_lambda <= 0:
            raise ConfigError(f"glm.span_lambda={self.span_lambda}: must be > 0")


@dataclass(frozen=True)
class GLMIds:
    mask: int
    gmask: int
    sop: int
    eop: int


def add_glm_tokens(tokenizer: Any) -> list[str]:
    """Add the four GLM tokens the tokenizer lacks (special: never split, never merged); returns
    those added. The caller resizes the model's embeddings."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in GLM_TOKENS if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def glm_ids(tokenizer: Any) -> GLMIds | None:
    """The GLM token ids of a tokenizer, or None if it lacks any (not trained with GLM)."""
    vocab = tokenizer.get_vocab()
    if not all(t in vocab for t in GLM_TOKENS):
        return None
    return GLMIds(*(vocab[t] for t in GLM_TOKENS))


def poisson(rng: random.Random, lam: float) -> int:
    """One Poisson(λ) draw (Knuth's method: fine for the small λ of span lengths)."""
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def sample_spans(n: int, rng: random.Random, ratio: float, lam: float) -> list[tuple[int, int]]:
    """Non-touching (start, end) spans over n tokens, Poisson(λ) long, blanking about `ratio`
    of them (at least one token, at least one left unmasked), in text order."""
    if n < 2:
        return []
    target = max(1, round(ratio * n))
    lengths: list[int] = []
    while sum(lengths) < target:
        lengths.append(max(1, poisson(rng, lam)))
    # Trim so that the spans and one separator between each fit, with one token left over.
    while lengths and sum(lengths) + len(lengths) > n:
        if lengths[-1] > 1:
            lengths[-1] -= 1
        else:
            lengths.pop()
    if not lengths:
        return []
    rng.shuffle(lengths)
    k = len(lengths)
    free = n - sum(lengths)  # unmasked tokens; they make free + 1 gaps, one span per gap
    gaps = sorted(rng.sample(range(free + 1), k))
    spans, pos, prev_gap = [], 0, 0
    for gap, length in zip(gaps, lengths):
        pos += gap - prev_gap  # the unmasked tokens before this span
        spans.append((pos, pos + length))
        pos += length
        prev_gap = gap
    return spans


def build_example(
    ids: list[int],
    spans: list[tuple[int, int]],
    tok_ids: GLMIds,
    gmask: bool = False,
    order: list[int] | None = None,
) -> dict[str, Any]:
    """A GLM example from `ids` with `spans` blanked: input_ids, labels (Part B only),
    position_ids (the 1-D fold of GLM's 2-D positions) and prefix_len (|Part A|). `order` is
    the order of the spans in Part B (default: text order); `gmask` marks the blanks [gMASK]."""
    blank = tok_ids.gmask if gmask else tok_ids.mask
    part_a: list[int] = []
    mask_pos: list[int] = []
    cursor = 0
    for start, end in spans:
        part_a += ids[cursor:start]
        mask_pos.append(len(part_a))
        part_a.append(blank)
        cursor = end
    part_a += ids[cursor:]
    input_ids = list(part_a)
    labels = [IGNORE_INDEX] * len(part_a)
    positions = list(range(len(part_a)))
    for s in order if order is not None else range(len(spans)):
        start, end = spans[s]
        span = ids[start:end]
        input_ids += [tok_ids.sop, *span, tok_ids.eop]
        labels += [IGNORE_INDEX, *span, tok_ids.eop]
        positions += [mask_pos[s] + i for i in range(len(span) + 2)]
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions,
        "prefix_len": len(part_a),
    }


def causal_example(ids: list[int]) -> dict[str, Any]:
    """A plain causal-LM example in the same layout (empty Part A: the mask is causal)."""
    return {
        "input_ids": list(ids),
        "labels": list(ids),
        "position_ids": list(range(len(ids))),
        "prefix_len": 0,
    }


def glm_example(ids: list[int], cfg: GLMConfig, tok_ids: GLMIds, seed: int) -> dict[str, Any]:
    """The example for one block, a deterministic function of (block, config, seed): [MASK],
    [gMASK] or causal, as the config's fractions draw it."""
    rng = random.Random(seed)
    n = len(ids)
    if n < 3 or rng.random() < cfg.causal_fraction:
        return causal_example(ids)
    if rng.random() < cfg.gmask_fraction:
        length = rng.randint(max(1, math.ceil(n / 2)), n - 1)  # 50-100%, some context kept
        return build_example(ids, [(n - length, n)], tok_ids, gmask=True)
    spans = sample_spans(n, rng, cfg.mask_ratio, cfg.span_lambda)
    if not spans:
        return causal_example(ids)
    order = list(range(len(spans)))
    if cfg.shuffle_spans:
        rng.shuffle(order)
    return build_example(ids, spans, tok_ids, order=order)


# --------------------------------------------------------------------------- batches


def prefix_lm_mask(lengths: list[int], prefix: list[int], width: int) -> torch.Tensor:
    """Boolean [B, 1, width, width] mask, True = may attend: key j is visible to query i when j
    is a real token and (j is in Part A, or j <= i). So Part A is bidirectional, Part B is
    causal and sees Part A, and Part A never sees Part B. Padding rows see the real tokens (an
    all-False row would make sdpa return NaN); their outputs carry no loss."""
    import torch

    idx = torch.arange(width)
    real = idx[None, :] < torch.tensor(lengths)[:, None]  # [B, T] keys that are real
    in_a = idx[None, :] < torch.tensor(prefix)[:, None]  # [B, T] keys in Part A
    causal = idx[None, :] <= idx[:, None]  # [T, T]: key j <= query i
    allowed = real[:, None, :] & (in_a[:, None, :] | causal[None, :, :])
    return allowed[:, None, :, :]


class GLMCollator:
    """Pads GLM examples (and causal ones in the same layout) to the batch's longest and adds
    the prefix-LM 4-D attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        import torch

        width = max(len(r["input_ids"]) for r in rows)

        def pad(key: str, fill: int) -> torch.Tensor:
            return torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows])

        lengths = [len(r["input_ids"]) for r in rows]
        return {
            "input_ids": pad("input_ids", self.pad_id),
            "labels": pad("labels", IGNORE_INDEX),
            "position_ids": pad("position_ids", 0),
            "attention_mask": prefix_lm_mask(lengths, [r["prefix_len"] for r in rows], width),
        }


def check_attention(model: Any) -> None:
    """The boolean 4-D mask needs an attention that takes one (sdpa, flex); eager adds it."""
    impl = getattr(model.config, "_attn_implementation", None)
    if impl == "eager":
        raise ValueError(
            "objective=glm needs the sdpa attention (a boolean 4-D prefix mask); this model"
            " was loaded with attn_implementation='eager'"
        )
