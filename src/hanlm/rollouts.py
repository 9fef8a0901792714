"""Rollouts: prompts, sampled answers and what is measured on them (PPO and GRPO share these).

- `load_prompts`: the conversations before the answer, from chat or preference data, those
  that fit `max_prompt_length` tokens once rendered.
- `rollout`: answers from a model to a batch of prompts (left-padded), cut after the first stop
  token, as a `Rollout` with the masks the losses use.
- `answer_logits`, `token_values`, `lm_loss`, `reference_of`: the forward passes PPO needs on a
  rollout (policy, value model, frozen reference) and on pretraining text.
- `held_out_scores`: greedy answers to held-out prompts, scored, with length and stop rate.
- `Cycler`, `pack_blocks`, `ptx_blocks`: resumable data order and packed pretraining blocks.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hanlm.config import DataConfig
from hanlm.data import load, or_demo
from hanlm.data.formats import split_last_answer
from hanlm.data.templates import prompt_ids
from hanlm.modeling import pad_batch
from hanlm.rewards import Scorer

if TYPE_CHECKING:
    import torch

Messages = list[dict[str, str]]


# --------------------------------------------------------------------------- prompts


def prompts_of(records: list[dict[str, Any]]) -> list[Messages]:
    """The conversation before the answer: a preference record's prompt, or a chat record up to
    its last assistant turn."""
    return [
        rec["prompt"] if "prompt" in rec else split_last_answer(rec["messages"])[0]
        for rec in records
    ]


def load_prompts(
    data_cfg: DataConfig, tok: Any, max_prompt_length: int, eval_prompts: int, stage: str
) -> tuple[Any, list[Messages], list[Messages]]:
    """Prompts for rollouts (PPO, GRPO): (loaded data, train prompts, held-out prompts), keeping
    those that fit `max_prompt_length` tokens once rendered."""
    data = load(or_demo(data_cfg, "preference"))
    if data.kind == "text":
        raise ValueError(f"{stage} prompts come from chat or preference data, not plain text")

    def fitting(records: list[dict[str, Any]]) -> list[Messages]:
        return [p for p in prompts_of(records) if len(prompt_ids(tok, p)) <= max_prompt_length]

    return data, fitting(data.train), fitting(data.valid)[:eval_prompts]


class Cycler:
    """Endless shuffled passes over range(n); its state (pass, position) resumes exactly."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 1000003 + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos >= self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self._order[self.pos])
            self.pos += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm()


def pack_blocks(texts: list[str], tok: Any, block: int) -> list[list[int]]:
    """Documents joined with EOS and cut into full blocks of `block` tokens (the tail dropped)."""
    if not texts:
        return []
    eos = tok.eos_token_id
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream += [*ids, eos]
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)]


def ptx_blocks(
    data_cfg: DataConfig, tok: Any, block: int, train: bool, n_valid: int, main: bool = True
) -> tuple[list[list[int]], list[list[int]]]:
    """Pretraining blocks (default: the embedded Chinese corpus) for the ptx term (when `train`)
    and up to `n_valid` held-out ones for the held-out ptx loss: (train, valid)."""
    if not train and n_valid <= 0:
        return [], []
    ptx = load(or_demo(data_cfg, "zh_corpus"), kind="text")
    blocks: list[list[int]] = []
    if train:
        blocks = pack_blocks([r["text"] for r in ptx.train], tok, block)
        if not blocks:
            raise ValueError("the ptx data gives no full block; lower ptx_block")
    valid = pack_blocks([r["text"] for r in ptx.valid], tok, block)[:n_valid]
    if not valid and main:  # say so: a missing figure should not pass unnoticed
        print(
            "[hanlm] note: no held-out pretraining text, so the held-out ptx loss is not"
            " measured; set ptx_data.valid_paths or ptx_data.valid_fraction",
            file=sys.stderr,
        )
    return blocks, valid


# --------------------------------------------------------------------------- rollouts


@dataclass
class Rollout:
    prompts: list[Messages]
    seq: torch.Tensor  # [B, P + R]: left-padded prompts, then right-padded answers
    attn: torch.Tensor  # [B, P + R]
    ctx: int  # P, the padded prompt width
    mask: torch.Tensor  # [B, R] float, 1 on answer tokens up to and including the stop token
    texts: list[str]
    ids: list[list[int]]  # answer ids, the stop token included when the answer ended on one
    stopped: list[bool]

    def score(self, scorer: Scorer, batch_size: int) -> tuple[list[float], dict[str, float]]:
        """The scorer's total per answer and the mean of each of its parts."""
        return scorer(self.prompts, self.texts, self.ids, self.stopped, batch_size)


def position_ids(attn: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as generate() numbers left-padded prompts."""
    pos = attn.long().cumsum(-1) - 1
    return pos.masked_fill(attn == 0, 1)


def rollout(
    model: Any,
    tok: Any,
    prompts: list[Messages],
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float,
) -> Rollout:
    """Answers to `prompts` from `model` (sampled at `temperature`, greedy when it is 0)."""
    import torch
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    pad = tok.pad_token_id
    ids, attn = pad_batch([prompt_ids(tok, p) for p in prompts], pad, "left", device)
    width = ids.size(1)
    # A fresh config: sampling must follow the policy's own distribution (no top-k/p, no
    # repetition penalty), or the log-probs PPO uses would not be those of the sampled tokens.
    gen = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        top_p=1.0 if temperature > 0 else None,
        eos_token_id=stop_ids,
        pad_token_id=pad,
    )
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)
    answer = out[:, width:]
    is_stop = torch.isin(answer, torch.tensor(stop_ids, device=device))
    before = is_stop.long().cumsum(1) - is_stop.long()  # stops strictly before each position
    mask = (before == 0).float()
    texts, id_lists, stopped = [], [], []
    for row, m, s in zip(answer.tolist(), mask.tolist(), is_stop.any(1).tolist()):
        kept = row[: int(sum(m))]
        id_lists.append(kept)
        stopped.append(bool(s))
        body = kept[:-1] if s else kept
        texts.append(tok.decode(body, skip_special_tokens=True))
    full_attn = torch.cat([attn, mask.long()], dim=1)
    return Rollout(prompts, out, full_attn, width, mask, texts, id_lists, stopped)


def answer_logits(model: Any, seq: torch.Tensor, attn: torch.Tensor, ctx: int) -> torch.Tensor:
    """Logits at the positions that predict the answer tokens: [B, R, V]."""
    out = model(
        input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False
    )
    return out.logits[:, ctx - 1 : -1]


# --------------------------------------------------------------------------- value and reference


def _value_parts(value_model: Any) -> tuple[Any, Any]:
    base = value_model.get_base_model() if hasattr(value_model, "get_base_model") else value_model
    return getattr(base, base.base_model_prefix), base.score


def token_values(value_model: Any, seq: torch.Tensor, attn: torch.Tensor, ctx: int) -> torch.Tensor:
    """V(s_t) for every answer token: the value head applied to each position's hidden state."""
    backbone, head = _value_parts(value_model)
    hidden = backbone(
        input_ids=seq, attention_mask=attn, position_ids=position_ids(attn), use_cache=False
    ).last_hidden_state
    return head(hidden[:, ctx - 1 : -1]).squeeze(-1).float()


def token_value_module(value_model: Any) -> torch.nn.Module:
    """The value model as a module whose forward is `token_values`. DDP averages gradients only
    through the wrapped module's own forward, and the value model's forward gives one score per
    sequence, so this is what goes through `accelerator.prepare`."""
    import torch

    class TokenValues(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, seq: torch.Tensor, attn: torch.Tensor, ctx: int) -> torch.Tensor:
            return token_values(self.model, seq, attn, ctx)

    return TokenValues(value_model)


@contextlib.contextmanager
def reference_of(policy: Any, ref_model: Any | None) -> Iterator[Any]:
    """The frozen reference: a separate copy, or the LoRA policy with its adapter disabled."""
    if ref_model is not None:
        yield ref_model
    else:
        with policy.disable_adapter():
            yield policy


def lm_loss(model: Any, blocks: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss on full pretraining blocks (the ptx term)."""
    return model(input_ids=blocks, labels=blocks, use_cache=False).loss


def held_out_scores(
    model: Any,
    tok: Any,
    prompts: list[Messages],
    stop_ids: list[int],
    scorer: Scorer,
    max_new_tokens: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """Greedy answers to held-out prompts: mean score, answer length (tokens) and stop rate."""
    scores: list[float] = []
    parts: dict[str, float] = {}
    lengths = stopped = 0
    for i in range(0, len(prompts), batch_size):
        r = rollout(model, tok, prompts[i : i + batch_size], stop_ids, max_new_tokens, 0.0)
        s, p = r.score(scorer, batch_size)
        scores += s
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v * len(s)
        lengths += sum(len(x) for x in r.ids)
        stopped += sum(r.stopped)
    n = max(len(scores), 1)
    return {
        "score": sum(scores) / n,
        **{k: v / n for k, v in parts.items()},
        "length": lengths / n,
        "stop_rate": stopped / n,
    }
