"""`hanlm label`: a page where people rank a model's answers (rankings.jsonl, `ranked` data)."""

from hanlm.stage import Command

COMMANDS = (
    Command(
        "label",
        "hanlm.label.ranking",
        "LabelConfig",
        "sample K answers per prompt and serve a page where people rank them (rankings.jsonl)",
        positional="inputs",
        usage="PROMPTS MODEL[,MODEL2...]",
    ),
)
