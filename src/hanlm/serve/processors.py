"""Logits processors of the server's two generation paths: the batching loop's sampler, and
OpenAI's penalties and log-prob recording for `generate`."""

from __future__ import annotations

from typing import Any

from hanlm.serve.protocol import Sampling


class InverseCdfSampler:
    """The last logits processor of the batching loop: draws each row's token from
    softmax(scores) by the inverse of its cumulative distribution (one uniform number per row,
    from torch's global generator) and returns scores whose arg-max is that token. A row at the
    greedy temperature is one-hot after softmax, so it gets its arg-max."""

    supports_continuous_batching = True

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1)
        # u in [0, total): the first entry of the CDF above u (`right=True`) never has p = 0
        u = torch.rand(cdf.shape[0], 1, device=cdf.device) * cdf[:, -1:]
        token = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, token, 0.0)


class OpenAIPenalty:
    """OpenAI's presence/frequency penalties over the generated tokens only:
    logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, prompt_len: int, s: Sampling) -> None:
        self.prompt_len, self.presence, self.frequency = (
            prompt_len,
            s.presence_penalty,
            s.frequency_penalty,
        )

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class LogprobRecorder:
    """Keeps the log-softmax of each step's scores after penalties and guidance, before
    temperature and truncation (which `generate` applies after custom processors)."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores
