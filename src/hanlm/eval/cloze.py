"""A blank-infilling probe: cloze accuracy on held-out text, for causal and GLM-trained models.

An item is a window of held-out text with `span` tokens blanked, and `choices` candidate fills:
the true span and spans of the same token length cut from other items' texts. The model picks the
candidate it finds most likely; accuracy is the share of items where that is the true one
(chance = 1 / choices). Candidates have equal token counts, so summed log-probs compare fairly.

Two ways of asking, so that models trained either way can be compared:

- `causal`: log p(left + candidate + right), summed over the candidate and the right context (the
  left is the same for every candidate). Any causal LM can answer; the right context counts.
- `glm`: GLM's own way: Part A = left [MASK] right (bidirectional), Part B = <sop> candidate
  <eop>, scored on the candidate and <eop>. Only for tokenizers with the GLM tokens (a model
  pretrained with objective=glm).

Items are a deterministic function of the texts, the tokenizer and the seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from hanlm import IGNORE_INDEX
from hanlm.data.glm import GLMCollator, build_example, causal_example, glm_ids


@dataclass
class ClozeItem:
    left: list[int]
    right: list[int]
    options: list[list[int]]
    answer: int  # index of the true span in options


def cloze_items(
    texts: list[str],
    tok: Any,
    n_items: int,
    span: int = 2,
    choices: int = 4,
    context: int = 48,
    seed: int = 0,
) -> list[ClozeItem]:
    """Up to `n_items` items from `texts` (one per text at most, in a seeded order)."""
    rng = random.Random(seed)
    need = 2 * 4 + span  # at least 4 tokens of context on each side
    windows = []
    for text in texts:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) < need:
            continue
        start = rng.randint(4, len(ids) - span - 4)
        windows.append(
            (ids[max(0, start - context) : start], ids[start : start + span], ids[start + span :])
        )
    rng.shuffle(windows)
    windows = windows[:n_items]
    spans = [w[1] for w in windows]
    items = []
    for i, (left, true, right) in enumerate(windows):
        pool = [s for j, s in enumerate(spans) if j != i and s != true]
        distinct: list[list[int]] = []
        for s in rng.sample(pool, len(pool)):
            if s not in distinct:
                distinct.append(s)
            if len(distinct) == choices - 1:
                break
        if len(distinct) < choices - 1:
            continue
        options = [true, *distinct]
        rng.shuffle(options)
        items.append(ClozeItem(left, right[:context], options, options.index(true)))
    return items


def _examples(item: ClozeItem, mode: str, ids: Any) -> list[dict[str, Any]]:
    out = []
    for option in item.options:
        seq = item.left + option + item.right
        if mode == "glm":
            span = (len(item.left), len(item.left) + len(option))
            out.append(build_example(seq, [span], ids))
        else:
            ex = causal_example(seq)
            ex["labels"] = [IGNORE_INDEX] * len(item.left) + ex["labels"][len(item.left) :]
            out.append(ex)
    return out


def score_examples(model: Any, rows: list[dict[str, Any]], pad_id: int, batch: int) -> list[float]:
    """Summed log-probs of each example's labelled tokens (GLM layout, 4-D prefix mask)."""
    import torch

    device = next(model.parameters()).device
    collate = GLMCollator(pad_id)
    scores: list[float] = []
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            b = {k: v.to(device) for k, v in collate(rows[i : i + batch]).items()}
            logits = model(
                input_ids=b["input_ids"],
                attention_mask=b["attention_mask"],
                position_ids=b["position_ids"],
            ).logits.float()
            labels = b["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1], -1)
            keep = labels != IGNORE_INDEX
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            scores += (picked * keep).sum(1).tolist()
    return scores


def cloze_accuracy(
    model: Any, tok: Any, items: list[ClozeItem], mode: str, batch_size: int = 8
) -> dict[str, Any]:
    """Accuracy of `model` on `items`, asked the `mode` way (causal | glm)."""
    ids = glm_ids(tok)
    if mode == "glm" and ids is None:
        raise ValueError("the glm cloze needs a tokenizer with the GLM tokens (objective=glm)")
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    rows = [ex for item in items for ex in _examples(item, mode, ids)]
    scores = score_examples(model, rows, pad, batch_size)
    correct, pos = 0, 0
    for item in items:
        s = scores[pos : pos + len(item.options)]
        pos += len(item.options)
        correct += max(range(len(s)), key=s.__getitem__) == item.answer
    n = len(items)
    return {"accuracy": correct / n if n else 0.0, "n": n}
