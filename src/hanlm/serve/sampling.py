"""`Sampling`: how one request is decoded, and which of the engine's paths can honour it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sampling:
    """How one request is decoded; `route()` says which engine path can honour it."""

    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    guidance_scale: float = 1.0
    negative_ids: list[int] | None = None  # CFG's unconditional prompt (None = last prompt token)
    n: int = 1
    logprobs: int | None = None  # None = off; k = how many alternatives per token
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    constraint: Any = None  # a hanlm.serve.constrain.Constraint the output must follow

    def route(self, truncation: bool = False) -> str:
        """'batch' (continuous batching) or 'generate' (`model.generate` on the worker).

        The continuous-batching manager takes the temperature per request (and top-k/top-p
        when its warpers are on: `truncation`); it has no per-request seed, penalties, guidance
        (it refuses negative prompts), log-probs of the unprocessed distribution, several
        answers per prompt, logit biases or grammars (its per-request processors are its own
        temperature, top-k and top-p).
        """
        truncated = self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)
        plain = (
            self.seed is None
            and self.presence_penalty == 0
            and self.frequency_penalty == 0
            and self.repetition_penalty == 1
            and self.guidance_scale == 1
            and self.n == 1
            and self.logprobs is None
            and not self.logit_bias
            and self.constraint is None
            and (truncation or not truncated)
        )
        return "batch" if plain else "generate"
