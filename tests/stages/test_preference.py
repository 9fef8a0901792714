"""hanlm dpo's other losses on a tiny random model: KTO (pairs and unpaired answers), ORPO and
SimPO run end to end, start from the loss their formula gives, and refuse data they cannot use."""

import json
import math

import pytest

from hanlm.config import ConfigError, load_config
from hanlm.data import DataError
from hanlm.data.formats import RecordError, convert, detect
from hanlm.pipeline import cli
from hanlm.runs import read_metrics, read_run

GOOD = ["疑是地上霜。", "黄河入海流。", "处处闻啼鸟。", "Hello, world!"]
BAD = ["The quick brown fox.", "0123456789", "😀😀😀", "不亦乐乎？不亦乐乎？"]
QUESTIONS = ["床前明月光的下一句？", "白日依山尽的下一句？", "春眠不觉晓的下一句？", "Say hello."]
NO_WARNINGS = ("warnings",)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _write(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture(scope="module")
def pref(tmp_path_factory):
    d = tmp_path_factory.mktemp("pref")
    rows = [
        {"prompt": f"{QUESTIONS[i % 4]} #{i}", "chosen": GOOD[i % 4], "rejected": BAD[(i + 1) % 4]}
        for i in range(40)
    ]
    _write(d / "train.jsonl", rows[:32])
    _write(d / "valid.jsonl", rows[32:])
    unpaired = [
        {"prompt": f"{QUESTIONS[i % 4]} #{i}", "completion": (GOOD if i % 2 else BAD)[i % 4],
         "label": bool(i % 2)}
        for i in range(40)
    ]
    _write(d / "unpaired.jsonl", unpaired[:32])
    _write(d / "unpaired_valid.jsonl", unpaired[32:])
    return d


def _dpo(tmp_path, model, name, *extra):
    from hanlm.align.dpo import DPOConfig, run

    cfg = load_config(
        DPOConfig,
        None,
        [
            f"model.path={model}",
            "train.max_steps=4",
            "train.batch_size=4",
            "train.lr=1e-3",
            "train.logging_steps=1",
            "train.warmup_ratio=0",
            "eval_prompts=4",
            "max_new_tokens=8",
            f"output_dir={tmp_path / name}",
            *extra,
        ],
    )
    out = run(cfg)
    return out, read_run(out)["summary"], read_metrics(out)
