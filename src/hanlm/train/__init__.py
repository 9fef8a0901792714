"""Training a model on text and conversations: `hanlm pretrain` and `hanlm sft`."""

from hanlm.stage import Command

COMMANDS = (
    Command(
        "sft",
        "hanlm.train.sft",
        "SFTConfig",
        "instruction-tune with a chat template and answer-only loss (full, LoRA, QLoRA)",
        resumable=True,
        headline="hanlm.train.headlines:sft",
        summary=("answer_loss", "stop_rate"),
    ),
    Command(
        "pretrain",
        "hanlm.train.pretrain",
        "PretrainConfig",
        "pretrain from scratch or continue pretraining (full, or LoRA + embeddings), packed",
        resumable=True,
        headline="hanlm.train.headlines:pretrain",
        summary=("eval_bpc", "eval_loss"),
    ),
)
