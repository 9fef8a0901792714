"""Evaluation: `hanlm eval` (benchmarks, perplexity, probes, samples), the contamination audit
and `hanlm judge` (chat answers judged by a model, MT-bench's way)."""

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
    Command(
        "judge",
        "hanlm.eval.judge",
        "JudgeConfig",
        "judge chat answers with a model over OpenAI-compatible endpoints (MT-bench's methods)",
        resumable=True,
        headline="hanlm.eval.headlines:judge",
        summary=(
            "*/score",
            "*/score_se",
            "win_rate",
            "win_rate_se",
            "position_bias",
            "gold_agreement",
            "label_agreement",
            "unparsed",
        ),
        reports=("judge_report.json",),
    ),
)
