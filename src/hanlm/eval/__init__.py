"""Evaluation: `hanlm eval` (benchmarks, perplexity, probes, samples) and the contamination
audit."""

from hanlm.stage import Command

COMMANDS = (
    Command(
        "eval",
        "hanlm.eval.evaluate",
        "EvalConfig",
        "score a model on C-Eval/CMMLU/MMLU-style benchmarks, perplexity and samples",
        positional="model.path",
        usage="MODEL_DIR",
        headline="hanlm.eval.headlines:evaluate",
        summary=("*/accuracy", "tools/*"),
        reports=("eval_report.json",),
    ),
    Command(
        "eval contamination",
        "hanlm.eval.contamination",
        "ContaminationConfig",
        "audit training data for benchmark items (n-gram overlap) before trusting a score",
        positional="train",
        usage="TRAIN_PATH [TRAIN_PATH ...]",
        headline="hanlm.eval.headlines:audit",
        summary=("*/contaminated",),
        reports=("contamination.json",),
    ),
)
