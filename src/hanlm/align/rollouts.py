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
import json
import random
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hanlm.align.checks import check_answer, judge_answers
from hanlm.align.rewards import Scorer
from hanlm.config import DataConfig
from hanlm.data import load, or_demo
from hanlm.data.formats import split_last_answer
from hanlm.data.templates import prompt_ids
from hanlm.modeling import pad_batch
from hanlm.runs import atomic_write_text

if TYPE_CHECKING:
    import torch

Messages = list[dict[str, str]]


# --------------------------------------------------------------------------- prompts


def prompts_of(records: list[dict[str, Any]]) -> list[Messages]:
    """The conversation before the answer: a preference record's prompt, or a chat record up to
    its last assistant turn."""
    return [p for p, _ in prompts_and_references(records)]


def prompts_and_references(records: list[dict[str, Any]]) -> list[tuple[Messages, str | None]]:
    """(prompt, the known good answer) per record: a preference record's chosen answer (a ranked
    one's best), or a chat record's last answer (None when a chat record has none)."""
    out: list[tuple[Messages, str | None]] = []
    for rec in records:
        if "prompt" in rec:
            # a ranked record's reference is its best answer (the first of the top tie group)
            best = rec["responses"][rec["ranking"][0][0]] if "ranking" in rec else rec["chosen"]
            chosen = "".join(m["content"] for m in best if m["role"] == "assistant")
            out.append((rec["prompt"], chosen or None))
        else:
            out.append(split_last_answer(rec["messages"]))
    return out


@dataclass
class HeldOut:
    """Held-out prompts and, where the data knows one, the good answer to each."""

    prompts: list[Messages]
    references: list[str | None]

    def __len__(self) -> int:
        return len(self.prompts)


def load_prompts(
    data_cfg: DataConfig, tok: Any, max_prompt_length: int, eval_prompts: int, stage: str
) -> tuple[Any, list[Messages], HeldOut]:
    """Prompts for rollouts (PPO, GRPO): (loaded data, train prompts, held-out prompts with
    their references), keeping those that fit `max_prompt_length` tokens once rendered."""
    data = load(or_demo(data_cfg, "preference"))
    if data.kind == "text":
        raise ValueError(f"{stage} prompts come from chat or preference data, not plain text")

    def fitting(records: list[dict[str, Any]]) -> list[tuple[Messages, str | None]]:
        return [
            (p, ref)
            for p, ref in prompts_and_references(records)
            if len(prompt_ids(tok, p)) <= max_prompt_length
        ]

    held = fitting(data.valid)[:eval_prompts]
    held_out = HeldOut([p for p, _ in held], [r for _, r in held])
    return data, [p for p, _ in fitting(data.train)], held_out


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

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
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


@contextlib.contextmanager
def own_sampling(model: Any) -> Iterator[None]:
    """Generation that only the arguments given shape: transformers fills every generation
    setting left unset from `model.generation_config` (a shipped `repetition_penalty`,
    `no_repeat_ngram_size`, `min_new_tokens`, ...), which would make the sampled tokens follow
    another distribution than the log-probs PPO computes. The model's config is set aside
    meanwhile (a fresh one has only neutral defaults) and put back after."""
    from transformers import GenerationConfig

    targets = [model]
    if hasattr(model, "get_base_model"):  # a peft model generates through its base
        targets.append(model.get_base_model())
    saved = [t.generation_config for t in targets]
    try:
        for t in targets:
            t.generation_config = GenerationConfig()
        yield
    finally:
        for t, cfg in zip(targets, saved):
            t.generation_config = cfg


def rollout(
    model: Any,
    tok: Any,
    prompts: list[Messages],
    stop_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    synced: bool = False,
) -> Rollout:
    """Answers to `prompts` from `model` (sampled at `temperature`, greedy when it is 0).
    `synced`: every process runs the same number of forward passes until all have stopped (a
    ZeRO-3 model's passes are collective)."""
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
    with torch.no_grad(), own_sampling(model):
        out = model.generate(
            input_ids=ids, attention_mask=attn, generation_config=gen, synced_gpus=synced
        )
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
    """The value model as a module whose forward is `token_values` plus a trainable `offset`.
    DDP averages gradients only through the wrapped module's own forward, and the value model's
    forward gives one score per sequence, so this is what goes through `accelerator.prepare`.
    The shift centres a critic started from a reward model (whose head has no bias) on the
    shifted scores it must predict; the offset then learns as a bias."""
    import torch

    class TokenValues(torch.nn.Module):
        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model
            # shape (1,), not (): DeepSpeed cannot broadcast or partition 0-dim parameters
            self.offset = torch.nn.Parameter(torch.zeros(1, device=model.device))
            # the centring, set once outside the optimiser (whose master copy a ZeRO engine
            # would write back over a changed parameter)
            self.register_buffer("shift", torch.zeros(1, device=model.device))

        def forward(self, seq: torch.Tensor, attn: torch.Tensor, ctx: int) -> torch.Tensor:
            return token_values(self.model, seq, attn, ctx) + self.offset + self.shift

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
    prompts: list[Messages] | HeldOut,
    stop_ids: list[int],
    scorer: Scorer | None,
    max_new_tokens: int,
    batch_size: int = 16,
    gold: Scorer | None = None,
    samples: list[dict[str, Any]] | None = None,
    synced: bool = False,
) -> dict[str, float]:
    """Greedy answers to held-out prompts, measured: the proxy `score` (the training reward, if
    a `scorer` is given:
    `rm_score` + rules + `stop_penalty`, each part also given), the `gold_score` of a judge that
    was not the target, the rule checks and collapse detectors of `hanlm.align.checks` (with the
    references a `HeldOut` carries), answer length in tokens and the stop rate. `samples`, if
    given, receives one row per answer."""
    held = prompts if isinstance(prompts, HeldOut) else HeldOut(prompts, [None] * len(prompts))
    scores: list[float] = []
    parts: dict[str, float] = {}
    golds: list[float] = []
    texts: list[str] = []
    stopped: list[bool] = []
    lengths = 0
    for i in range(0, len(held.prompts), batch_size):
        batch = held.prompts[i : i + batch_size]
        r = rollout(model, tok, batch, stop_ids, max_new_tokens, 0.0, synced=synced)
        s, p = r.score(scorer, batch_size) if scorer else ([0.0] * len(r.texts), {})
        scores += s
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v * len(s)
        if gold is not None:
            golds += r.score(gold, batch_size)[0]
        lengths += sum(len(x) for x in r.ids)
        texts += r.texts
        stopped += r.stopped
    n = max(len(scores), 1)
    questions = [p[-1]["content"] if p else "" for p in held.prompts]
    out = {
        **({"score": sum(scores) / n} if scorer else {}),
        **{k: v / n for k, v in parts.items()},
        "length": lengths / n,
        "stop_rate": sum(stopped) / n,
    }
    if golds:
        out["gold_score"] = mean = sum(golds) / n
        # Its standard error, so a change can be told from noise (report's verdict).
        var = sum((g - mean) ** 2 for g in golds) / max(len(golds) - 1, 1)
        out["gold_score_sem"] = (var / len(golds)) ** 0.5
    judged = judge_answers(questions, texts, held.references, stopped)
    judged["answer_chars"] = judged.pop("length", 0.0)
    out.update(judged)
    if samples is not None:
        for j, (q, t) in enumerate(zip(questions, texts)):
            row = {"prompt": q, "answer": t, "reference": held.references[j]}
            if scorer:
                row["score"] = scores[j]
            if golds:
                row["gold_score"] = golds[j]
            row.update(check_answer(q, t, held.references[j], stopped[j]))
            samples.append(row)
    return out


def write_samples(out: Path, before: list[dict], after: list[dict]) -> None:
    """The held-out answers before and after, side by side: a look at the answers themselves."""
    rows = [{"before": b, "after": a} for b, a in zip(before, after)] if before else after
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    atomic_write_text(Path(out) / "samples.jsonl", text)
