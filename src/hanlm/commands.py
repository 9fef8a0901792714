"""The command table: every `hanlm` command, its module, its config class and a one-line help.

`hanlm.cli` parses arguments against it and `hanlm.recipe` runs recipe stages through it, so a
command is added in one place. Modules are named, not imported: importing one pulls in torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    module: str  # module with `run(cfg)` and the config class
    config: str  # config class name in that module
    help: str  # one line for `hanlm --help`
    positional: str = ""  # config key that bare arguments fill (a list key takes several)
    usage: str = ""  # what the bare arguments are, for the usage line
    aliases: tuple[tuple[str, str], ...] = ()  # (--flag name, config key) pairs
    func: str = "run"  # the module's entry point (commands sharing a module differ here)


COMMANDS: dict[str, Command] = {
    "vocab": Command(
        "hanlm.stages.vocab",
        "VocabConfig",
        "train a Chinese tokenizer, or merge one into a base model's vocabulary and resize it",
    ),
    "data check": Command(
        "hanlm.data.check",
        "DataCheckConfig",
        "detect the format of data files, count and list bad records, show lengths and samples",
        positional="paths",
        usage="PATH [PATH ...]",
    ),
    "data prepare": Command(
        "hanlm.data.prepare",
        "DataPrepareConfig",
        "clean, dedup, mix and split data into train/valid JSONL with counts in hanlm.json",
        positional="data.paths",
        usage="PATH [PATH ...]",
    ),
    "sft": Command(
        "hanlm.stages.sft",
        "SFTConfig",
        "instruction-tune with a chat template and answer-only loss (full, LoRA, QLoRA)",
    ),
    "chat": Command(
        "hanlm.infer.chat",
        "ChatConfig",
        "chat with a model in the terminal, streaming (or answer one --prompt and exit)",
        positional="model.path",
        usage="MODEL_DIR",
    ),
    "serve": Command(
        "hanlm.serve.server",
        "ServeConfig",
        "serve an OpenAI-compatible API (continuous batching) and a web chat page",
        positional="model.path",
        usage="MODEL_DIR",
    ),
    "run": Command(
        "hanlm.recipe",
        "RunConfig",
        "run a recipe's stages (skip unchanged, resume interrupted) and write a report",
        positional="recipe",
        usage="RECIPE.yaml",
        aliases=(("from", "from_stage"),),
    ),
    "pretrain": Command(
        "hanlm.stages.pretrain",
        "PretrainConfig",
        "pretrain from scratch or continue pretraining (full, or LoRA + embeddings), packed",
    ),
    "reward": Command(
        "hanlm.stages.reward",
        "RewardConfig",
        "train a reward model on preference pairs (scalar head, pairwise ranking loss)",
    ),
    "reward score": Command(
        "hanlm.stages.reward",
        "RewardScoreConfig",
        "print a reward model's score of an answer (--prompt/--response) or of a JSONL file",
        positional="model.path",
        usage="MODEL_DIR",
        func="score",
    ),
    "ppo": Command(
        "hanlm.stages.ppo",
        "PPOConfig",
        "PPO against a reward model or rule rewards, KL penalty to the SFT model, PPO-ptx mix",
    ),
    "dpo": Command(
        "hanlm.stages.dpo",
        "DPOConfig",
        "direct preference optimisation (sigmoid, IPO, hinge) with cached reference log-probs",
    ),
    "grpo": Command(
        "hanlm.stages.grpo",
        "GRPOConfig",
        "GRPO with rewards from a reward model and/or rule functions (module:function)",
    ),
    "eval": Command(
        "hanlm.stages.evaluate",
        "EvalConfig",
        "score a model on C-Eval/CMMLU/MMLU-style benchmarks, perplexity and samples",
        positional="model.path",
        usage="MODEL_DIR",
    ),
    "eval contamination": Command(
        "hanlm.stages.contamination",
        "ContaminationConfig",
        "audit training data for benchmark items (n-gram overlap) before trusting a score",
        positional="train",
        usage="TRAIN_PATH [TRAIN_PATH ...]",
    ),
    "export": Command(
        "hanlm.stages.export",
        "ExportConfig",
        "merge LoRA, prune the vocabulary, write safetensors or GGUF (llama.cpp), check parity",
        positional="model.path",
        usage="MODEL_DIR",
    ),
}


def config_class(name: str) -> type:
    cmd = COMMANDS[name]
    return getattr(importlib.import_module(cmd.module), cmd.config)
