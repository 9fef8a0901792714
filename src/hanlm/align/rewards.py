"""Rewards for PPO and GRPO, in one place: reward models and rule rewards.

Reward models (`hanlm.generation` loads and runs them) each score the whole re-rendered
conversation with their own tokenizer. `Scorer` adds the models' scores, the weighted rule
rewards and a penalty for answers that never stopped.

Rule rewards: a few built-ins and any `module:function` the config names.

A reward function follows trl's GRPO convention, so the same function serves both stages:

    def my_reward(prompts, completions, completion_ids=None, **kwargs) -> list[float]

`prompts` are message lists, `completions` are `[{"role": "assistant", "content": text}]` lists
(or plain strings), `completion_ids` the generated ids including the stop token when the answer
ended on one. Built-ins (names in `RuleConfig.funcs`):

- `length`: 1 if the answer has between `length_min` and `length_max` characters, else 0.
- `stop`: 1 if the answer ended on a stop token (end-of-turn or EOS), else 0 (ran out of room).
- `regex`: 1 if `regex` matches somewhere in the answer, else 0.
- `token_share`: the share of the answer's tokens that are tokens of `target` (stop token not
  counted) — a dense signal that is handy for checking that an RL loop learns at all.

This module stays free of heavy imports (torch, transformers load inside functions): configs
import it for `--help`.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hanlm.config import ConfigError, ModelConfig, opt
from hanlm.generation import load_reward_model, score_conversations, trained_max_length
from hanlm.modeling import load_tokenizer

RewardFn = Callable[..., list[float]]
BUILTINS = ("length", "stop", "regex", "token_share")


@dataclass
class RuleConfig:
    funcs: list[str] = opt(
        [], f"rule rewards: built-ins ({', '.join(BUILTINS)}) and/or module:function names"
    )
    weights: list[float] = opt([], "weight per rule (default 1 each); rewards are summed")
    length_min: int = opt(1, "length: fewest characters an answer may have")
    length_max: int = opt(64, "length: most characters an answer may have")
    regex: str = opt("", "regex: the pattern an answer should contain (Python re syntax)")
    target: str = opt("", "token_share: text whose tokens count as target tokens")

    def validate(self) -> None:
        if self.weights and len(self.weights) != len(self.funcs):
            raise ConfigError(
                f"rules.weights has {len(self.weights)} values for {len(self.funcs)} rules.funcs"
            )
        for name in self.funcs:
            if name not in BUILTINS and ":" not in name:
                raise ConfigError(
                    f"rules.funcs: '{name}' is neither a built-in ({', '.join(BUILTINS)})"
                    " nor a module:function name"
                )
        if "regex" in self.funcs:
            if not self.regex:
                raise ConfigError("rules.funcs has 'regex' but rules.regex is empty")
            try:
                re.compile(self.regex)
            except re.error as e:
                raise ConfigError(
                    f"rules.regex {self.regex!r} is not a valid pattern: {e}"
                ) from None
        if "token_share" in self.funcs and not self.target:
            raise ConfigError("rules.funcs has 'token_share' but rules.target is empty")
        if self.length_min > self.length_max:
            raise ConfigError("rules.length_min must not exceed rules.length_max")


def text_of(completion: Any) -> str:
    """The answer text of a completion given as a string or as a list of messages."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content", "") for m in completion if m.get("role") == "assistant")


def _named(fn: RewardFn, name: str) -> RewardFn:
    fn.__name__ = name  # trl logs each reward under its function's name
    fn.__qualname__ = name
    return fn


def length_reward(lo: int, hi: int) -> RewardFn:
    def reward(prompts: list[Any], completions: list[Any], **kw: Any) -> list[float]:
        return [float(lo <= len(text_of(c).strip()) <= hi) for c in completions]

    return _named(reward, "length")


def stop_reward(stop_ids: list[int]) -> RewardFn:
    stops = set(stop_ids)

    def reward(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **kw: Any
    ) -> list[float]:
        if completion_ids is None:
            raise ValueError("the 'stop' reward needs completion_ids (the generated token ids)")
        return [float(bool(ids) and ids[-1] in stops) for ids in completion_ids]

    return _named(reward, "stop")


def regex_reward(pattern: str) -> RewardFn:
    rx = re.compile(pattern)

    def reward(prompts: list[Any], completions: list[Any], **kw: Any) -> list[float]:
        return [float(rx.search(text_of(c)) is not None) for c in completions]

    return _named(reward, "regex")


def token_share_reward(target_ids: list[int], stop_ids: list[int]) -> RewardFn:
    targets, stops = set(target_ids), set(stop_ids)

    def reward(
        prompts: list[Any], completions: list[Any], completion_ids: Any = None, **kw: Any
    ) -> list[float]:
        if completion_ids is None:
            raise ValueError("the 'token_share' reward needs completion_ids")
        out = []
        for ids in completion_ids:
            body = ids[:-1] if ids and ids[-1] in stops else ids
            out.append(sum(t in targets for t in body) / len(body) if body else 0.0)
        return out

    return _named(reward, "token_share")


def import_reward(spec: str) -> RewardFn:
    """`package.module:function` -> the function (the module is imported on demand)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"reward '{spec}': expected module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"reward '{spec}': cannot import {module_name}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"reward '{spec}': {module_name} has no function '{attr}'")
    return fn


def build_rules(cfg: RuleConfig, tokenizer: Any, stop_ids: list[int]) -> list[RewardFn]:
    """The configured rule rewards as callables, in `cfg.funcs` order."""
    fns = []
    for name in cfg.funcs:
        if name == "length":
            fns.append(length_reward(cfg.length_min, cfg.length_max))
        elif name == "stop":
            fns.append(stop_reward(stop_ids))
        elif name == "regex":
            fns.append(regex_reward(cfg.regex))
        elif name == "token_share":
            ids = tokenizer(cfg.target, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ConfigError(f"rules.target {cfg.target!r} gives no tokens")
            fns.append(token_share_reward(ids, stop_ids))
        else:
            fns.append(import_reward(name))
    return fns


def score_rules(
    fns: list[RewardFn],
    weights: list[float],
    prompts: list[Any],
    completions: list[Any],
    completion_ids: list[list[int]],
) -> tuple[list[float], dict[str, float]]:
    """Weighted sum of the rule rewards per answer, and each rule's batch mean (for logging)."""
    total = [0.0] * len(completions)
    means = {}
    for i, fn in enumerate(fns):
        w = weights[i] if weights else 1.0
        values = fn(prompts=prompts, completions=completions, completion_ids=completion_ids)
        if len(values) != len(completions):
            raise ValueError(
                f"reward {fn.__name__} returned {len(values)} values for {len(completions)} answers"
            )
        values = [0.0 if v is None else float(v) for v in values]
        means[f"rule_{fn.__name__}"] = sum(values) / max(len(values), 1)
        total = [t + w * v for t, v in zip(total, values)]
    return total, means


class Scorer:
    """Scores answers: reward models (each on the re-rendered conversation, with its own
    tokenizer and training length) + weighted rule rewards + a penalty for answers that never
    stopped."""

    def __init__(
        self,
        models: list[tuple[Any, Any, float, int]],
        rules: list[RewardFn],
        rule_weights: list[float],
        missing_stop_penalty: float = 0.0,
    ) -> None:
        self.models, self.rules, self.weights = models, rules, rule_weights
        self.missing_stop_penalty = missing_stop_penalty
        if not self.models and not self.rules:
            raise ConfigError("no reward: name a reward model and/or rules.funcs=[...]")

    @classmethod
    def build(
        cls,
        reward_models: list[str],
        rules: RuleConfig,
        tok: Any,
        stop_ids: list[int],
        device: Any = None,
        base: ModelConfig | None = None,
        missing_stop_penalty: float = 0.0,
        model_weight: float = 1.0,
    ) -> Scorer:
        """Load the reward models (frozen, on `device`) and build the rule functions."""
        models = []
        for path in reward_models:
            rm_tok = load_tokenizer(path)
            rm = load_reward_model(replace(base or ModelConfig(), path=path))
            if device is not None:
                rm = rm.to(device)
            rm.config.pad_token_id = rm_tok.pad_token_id
            rm = rm.requires_grad_(False).eval()
            models.append((rm, rm_tok, model_weight, trained_max_length(path)))
        fns = build_rules(rules, tok, stop_ids)
        return cls(models, fns, rules.weights, missing_stop_penalty)

    def map_models(self, fn: Callable[[Any], Any]) -> None:
        """Replace each reward model by `fn(model)` (e.g. an inference engine that calls it)."""
        self.models = [(fn(rm), tok, w, n) for rm, tok, w, n in self.models]

    def __call__(
        self,
        prompts: list[list[dict[str, str]]],
        texts: list[str],
        ids: list[list[int]],
        stopped: list[bool],
        batch_size: int = 16,
    ) -> tuple[list[float], dict[str, float]]:
        """(total score per answer, mean of each part) for answers `texts` to `prompts`; `ids`
        are the answers' token ids (stop token included when `stopped`)."""
        n = len(texts)
        total, parts = [0.0] * n, {}
        convs = [[*p, {"role": "assistant", "content": t}] for p, t in zip(prompts, texts)]
        for i, (rm, rm_tok, weight, max_length) in enumerate(self.models):
            scores = score_conversations(rm, rm_tok, convs, batch_size, max_length)
            parts["rm_score" if i == 0 else f"rm{i}_score"] = sum(scores) / n
            total = [a + weight * b for a, b in zip(total, scores)]
        if self.rules:
            completions = [[{"role": "assistant", "content": t}] for t in texts]
            rule, means = score_rules(self.rules, self.weights, prompts, completions, ids)
            parts.update(means)
            total = [a + b for a, b in zip(total, rule)]
        if self.missing_stop_penalty:
            penalty = [0.0 if stop else self.missing_stop_penalty for stop in stopped]
            parts["stop_penalty"] = sum(penalty) / n  # apart: no judge saw it
            total = [s + x for s, x in zip(total, penalty)]
        return total, parts
