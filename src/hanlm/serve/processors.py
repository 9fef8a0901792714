"""What transformers calls back while the server decodes: the batching loop's sampler, and for
`generate` OpenAI's penalties, log-prob recording, the stopping criterion and the streamer that
hands tokens to a `Job`.

All are duck-typed (no transformers base classes), so this module imports without torch.
"""

from __future__ import annotations

import threading
from typing import Any

from hanlm.serve.jobs import End, Job, Token
from hanlm.serve.sampling import Sampling


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


class LogitBias:
    """OpenAI's `logit_bias`: a fixed value added to some tokens' logits (-100 bans a token in
    practice, +100 all but forces it)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self.ids, self.values = list(bias), list(bias.values())

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        values = torch.tensor(self.values, dtype=scores.dtype, device=scores.device)
        scores[:, self.ids] += values
        return scores


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


class CancelCriterion:
    """Stops `generate` when the job is cancelled, every row has finished on its own, or (a
    solo request) `handoff` is set because another request is waiting."""

    def __init__(
        self, job: Job, streamer: JobStreamer, handoff: threading.Event | None = None
    ) -> None:
        self.job, self.streamer, self.handoff = job, streamer, handoff

    def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
        import torch

        stop = self.job.cancelled.is_set() or all(self.streamer.done)
        if not stop and self.handoff is not None and self.handoff.is_set():
            self.streamer.handed_off = stop = True
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class JobStreamer:
    """Receives each step's tokens from `generate` and emits them to the job, row by row."""

    def __init__(
        self, job: Job, s: Sampling, stop_ids: list[int], recorder: LogprobRecorder | None
    ) -> None:
        self.job, self.stop_ids, self.recorder = job, set(stop_ids), recorder
        self.max_tokens = s.max_tokens
        self.done = [False] * s.n
        self.count = [0] * s.n
        self.tokens: list[int] = []  # row 0's tokens so far (a solo request's handoff)
        self.handed_off = False  # stopped to continue in the batching loop: no End here
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call hands over the prompt
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        lp = self.recorder.last if self.recorder is not None else None
        for row, t in enumerate(tokens):
            if self.done[row]:
                continue
            event = Token(row, int(t))
            if lp is not None:
                event.logprob = float(lp[row, t])
                if self.recorder.top > 0:
                    v, i = lp[row].topk(self.recorder.top)
                    event.top = list(zip(i.tolist(), v.tolist()))
            self.job.emit(event)
            self.count[row] += 1
            if row == 0:
                self.tokens.append(int(t))
            if t in self.stop_ids or self.count[row] >= self.max_tokens:
                self.done[row] = True
                # before the End: a request that arrives on it finds the engine free
                self.job.generated = all(self.done)
                self.job.emit(End(row, "stop" if t in self.stop_ids else "length"))

    def end(self) -> None:
        if self.handed_off:
            return
        left = [row for row, done in enumerate(self.done) if not done]
        self.done = [True] * len(self.done)
        self.job.generated = True
        for row in left:
            self.job.emit(End(row, "length"))
