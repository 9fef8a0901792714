"""Log-likelihood scoring of token sequences with a causal LM, the machinery under `hanlm eval`.

Shared by everything that asks a model how likely some text is: the benchmark scorers of
`hanlm eval`, and later a server's log-probabilities or a comparison against another harness.

- `score_sequences`: log-probabilities at the last positions of many sequences, batched, with
  their shared prompt prefix run once and its key/value cache reused;
- `letter_token_ids` and `score_letters`: the answer letters A-D after a multiple-choice prompt;
- `score_options`: the summed log-likelihood of each sequence's continuation;
- `perplexity`: sliding-window perplexity and bits per character of a text.

All of it is greedy and deterministic (no sampling; batches formed by a stable sort). torch is
imported inside the functions, so importing this module stays cheap (`hanlm --help`).
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from hanlm.eval.benchmarks import LETTERS

if TYPE_CHECKING:  # heavy imports stay lazy (hanlm eval --help must be fast)
    import torch


# --------------------------------------------------------------------------- scoring


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def letter_token_ids(tokenizer: Any, prompt: str, sep: str = "") -> list[int]:
    """The token each of A-D is when written right after `prompt` (with `sep` before it).

    Found by tokenising the end of the prompt with and without the letter: for byte-level BPE
    after `答案：` that is the bare `A`; for SentencePiece it is the un-prefixed piece (the
    reference scripts get the same id from `"：A"`); for MMLU it is ` A`.
    """
    tail = prompt[-16:]
    base = tokenizer.encode(tail, add_special_tokens=False)
    ids = []
    for letter in LETTERS:
        full = tokenizer.encode(tail + sep + letter, add_special_tokens=False)
        n = common_prefix_len(base, full)
        if n < len(base) or n >= len(full):
            # The letter merges with the prompt's last token: score its own last token instead.
            ids.append(tokenizer.encode(sep + letter, add_special_tokens=False)[-1])
        else:
            ids.append(full[n])
    if len(set(ids)) != len(ids):
        raise ValueError(f"the tokenizer gives the letters A-D non-distinct ids {ids}")
    return ids


def _cache_arg(model: Any) -> str:
    """The name of the forward's cache argument (transformers renamed past_key_values)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def score_sequences(
    model: Any,
    seqs: Sequence[Sequence[int]],
    keep: Sequence[int],
    reduce: Callable[[int, torch.Tensor], Any],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: Any = None,
    min_prefix: int = 16,
) -> list[Any]:
    """`reduce(i, logprobs)` for each sequence, where `logprobs` is the log-softmax of the model's
    next-token logits at its last `keep[i]` positions (a keep[i] x vocab tensor).

    The sequences of one call share a prompt prefix (a subject's header and shots); it is run
    once and its key/value cache reused by every batch, which makes k-shot evaluation cost about
    what zero-shot does. Suffixes are left-padded with explicit position ids, so each row sees
    exactly the positions it would alone.
    """
    import torch

    n = len(seqs)
    results: list[Any] = [None] * n
    if n == 0:
        return results
    shared = min(common_prefix_len(seqs[0], s) for s in seqs)
    prefix = min(shared, min(len(s) - k for s, k in zip(seqs, keep)))
    prefix = prefix if prefix >= min_prefix else 0
    cache_arg = _cache_arg(model)
    device = next(model.parameters()).device
    prefix_cache = None
    with torch.no_grad():
        if prefix:
            out = model(torch.tensor([list(seqs[0][:prefix])], device=device), use_cache=True)
            prefix_cache = out.get("cache")
            prefix_cache = out.get("past_key_values") if prefix_cache is None else prefix_cache
        order = sorted(range(n), key=lambda i: (-(len(seqs[i]) - prefix), i))
        for start in range(0, n, batch_size):
            rows = order[start : start + batch_size]
            width = max(len(seqs[i]) - prefix for i in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, i in enumerate(rows):
                suffix = seqs[i][prefix:]
                ids[r, width - len(suffix) :] = torch.tensor(suffix, dtype=torch.long)
                mask[r, width - len(suffix) :] = 1
            positions = (mask.cumsum(1) - 1).clamp(min=0) + prefix
            kwargs: dict[str, Any] = {}
            if prefix_cache is not None:
                cache = copy.deepcopy(prefix_cache)
                cache.batch_repeat_interleave(len(rows))
                kwargs[cache_arg] = cache
                mask = torch.cat([torch.ones((len(rows), prefix), dtype=torch.long), mask], 1)
            k = max(keep[i] for i in rows)
            logits = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                position_ids=positions.to(device),
                logits_to_keep=k,
                use_cache=prefix_cache is not None,
                **kwargs,
            ).logits
            logprobs = torch.log_softmax(logits[:, -k:].float(), dim=-1).cpu()
            for r, i in enumerate(rows):
                results[i] = reduce(i, logprobs[r, k - keep[i] :])
            if progress is not None:
                progress.update(len(rows))
    return results


def score_letters(
    model: Any,
    seqs: Sequence[Sequence[int]],
    letter_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: Any = None,
) -> list[dict[str, Any]]:
    """Per prompt: the four letters' log-probabilities, their softmax (over A-D only) and the
    probability mass the model puts on them at all (low mass = it did not get the format)."""
    import torch

    def reduce(i: int, logprobs: torch.Tensor) -> dict[str, Any]:
        lp = logprobs[-1, list(letter_ids[i])]
        probs = torch.softmax(lp, dim=-1)
        return {
            "logprobs": [round(float(x), 6) for x in lp],
            "probs": [round(float(x), 6) for x in probs],
            "mass": round(float(lp.exp().sum()), 6),
            "pred": LETTERS[int(torch.argmax(lp))],  # first max wins: deterministic
        }

    keep = [1] * len(seqs)
    return score_sequences(model, seqs, keep, reduce, batch_size, pad_id, progress)


def score_options(
    model: Any,
    seqs: Sequence[Sequence[int]],
    cont_lens: Sequence[int],
    batch_size: int = 8,
    pad_id: int = 0,
    progress: Any = None,
) -> list[float]:
    """Sum of log-probabilities of the last `cont_lens[i]` tokens of each sequence."""
    import torch

    def reduce(i: int, logprobs: torch.Tensor) -> float:
        targets = torch.tensor(seqs[i][-cont_lens[i] :], dtype=torch.long)
        picked = logprobs[:-1].gather(1, targets[:, None])
        return float(picked.sum())

    keep = [c + 1 for c in cont_lens]
    return score_sequences(model, seqs, keep, reduce, batch_size, pad_id, progress)


# --------------------------------------------------------------------------- perplexity


def perplexity(
    model: Any, tokenizer: Any, text: str, window: int, stride: int, progress: bool = True
) -> dict[str, Any]:
    """Perplexity and bits per character of `text` with a sliding window.

    Each window of `window` tokens scores only the tokens the previous one did not, so every token
    is predicted once, with at least `window - stride` tokens of context (except at the start).
    A BOS (or EOS) token is put first so that the first character is scored too; bits per
    character = total negative log-likelihood / ln 2 / characters, comparable across tokenizers.
    """
    import torch
    from tqdm.auto import tqdm

    start_id = tokenizer.bos_token_id
    start_id = tokenizer.eos_token_id if start_id is None else start_id
    ids = tokenizer.encode(text, add_special_tokens=False)
    if start_id is not None:
        ids = [start_id, *ids]
    device = next(model.parameters()).device
    step = max(1, min(stride, window - 1))  # every scored token keeps >= 1 token of context
    nll, scored, prev_end = 0.0, 0, 1  # position 0 is never predicted
    bar = tqdm(total=len(ids) - 1, desc="perplexity", unit="tok", disable=not progress)
    with torch.no_grad():
        while prev_end < len(ids):
            end = min(window if prev_end == 1 else prev_end + step, len(ids))
            begin = max(0, end - window)
            x = torch.tensor([ids[begin:end]], device=device)
            logprobs = torch.log_softmax(model(x).logits[0, :-1].float(), dim=-1)
            picked = logprobs.gather(1, x[0, 1:, None])[:, 0]
            new = end - prev_end  # the tokens no earlier window scored
            nll -= float(picked[-new:].sum())
            scored += new
            bar.update(new)
            prev_end = end
    bar.close()
    return {
        "tokens": scored,
        "chars": len(text),
        "nll": nll,
        "ppl": math.exp(nll / scored) if scored else None,
        "bpc": nll / math.log(2) / len(text) if text else None,
        "tokens_per_char": round(scored / len(text), 4) if text else None,
        "window": window,
        "stride": stride,
    }
