"""Sentence embeddings from a decoder: pooling (`hanlm embed`) and contrastive training."""

from hanlm.stage import Command

COMMANDS = (
    Command(
        "embed",
        "hanlm.embed.pooling",
        "EmbedConfig",
        "sentence embeddings from a decoder (SGPT weighted-mean, mean or last-token pooling)",
        positional="model.path",
        usage="MODEL_DIR",
    ),
    Command(
        "embed train",
        "hanlm.embed.train",
        "EmbedTrainConfig",
        "contrastive fine-tuning of the embeddings (SGPT-BE: in-batch InfoNCE; bias, LoRA, full)",
    ),
)
