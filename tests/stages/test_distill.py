"""hanlm distill: the KL to the prompted teacher falls on held-out prompts and the weights change
(full, top-k, LoRA), answers given or sampled, and a resumed run repeats the interrupted one."""

import json
import shutil

import pytest
import torch

from hanlm.align.distill import DistillConfig, read_context, run, with_context
from hanlm.config import ConfigError, load_config
from hanlm.runs import read_metrics, read_run

CONTEXT = "你是一个礼貌的助手。每个回答都以“谢谢！”结尾。Always end with 'Thanks!' 😀"
QUESTIONS = [
    "床前明月光的下一句是什么？",
    "白日依山尽，下一句？",
    "Hello, how are you?",
    "学而时习之",
]


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    path = tmp_path_factory.mktemp("chats") / "chats.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(40):
            q = f"{QUESTIONS[i % 4]} ({i})"
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": f"好的{i}。"}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random tiny model whose outputs depend on its context (a larger initialisation than the
    default's near-uniform outputs), so there is a context effect to distil."""
    from hanlm.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("m") / "model", initializer_range=0.2)


def config(tmp_path, model, chats, *overrides, name="out"):
    base = [
        f"model.path={model}",
        f"context={CONTEXT}",
        f"data.paths=[{chats}]",
        "data.valid_fraction=0.2",
        "max_new_tokens=8",
        "eval_prompts=6",
        "check=谢谢",
        "train.batch_size=8",
        "train.max_steps=10",
        "train.lr=3e-3",
        "train.warmup_ratio=0",
        "train.logging_steps=1",
        f"output_dir={tmp_path / name}",
    ]
    return load_config(DistillConfig, None, base + list(overrides))


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def assert_distilled(out, start):
    info = read_run(out)
    s = info["summary"]
    assert info["status"] == "complete"
    assert s["eval_kl"] < 0.8 * s["initial_eval_kl"], s  # held-out prompts, never trained on
    loss = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert loss[-1] < loss[0]
    assert s["tokens_saved_per_request"] > 10 and 0 <= s["behaviour_rate"] <= 1
    moved = [k for k, v in weights(out).items() if not torch.equal(v, start[k])]
    assert moved
    return s


def test_full_distribution_full_tuning(tmp_path, model_dir, chats):
    start = weights(model_dir)
    out = run(config(tmp_path, model_dir, chats))
    assert_distilled(out, start)
    answers = (out / "answers.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(answers) == 32  # one sampled per training prompt
    sample = json.loads((out / "samples.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert {"prompt", "teacher_with_context", "before", "after", "after_matches"} <= set(sample)


def test_topk_and_given_answers(tmp_path, model_dir, chats):
    start = weights(model_dir)
    out = run(config(tmp_path, model_dir, chats, "topk=16", "answers=given"))
    assert_distilled(out, start)
    first = json.loads((out / "answers.jsonl").read_text(encoding="utf-8").splitlines()[0])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.decode(first["ids"]).startswith("好的")  # the data's answer, end of turn after


def test_lora_teacher_is_the_adapter_disabled(tmp_path, model_dir, chats):
    start = weights(model_dir)
    out = run(config(tmp_path, model_dir, chats, "lora.enabled=true", "lora.r=8"))
    s = assert_distilled(out, start)  # merged: the saved weights moved
    assert s["trainable_params"] < s["total_params"]


def test_resume_repeats_the_interrupted_run(tmp_path, model_dir, chats):
    args = ["train.max_steps=8", "train.save_steps=4", "topk=8"]
    full = run(config(tmp_path, model_dir, chats, *args, name="full"))
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "checkpoint-8")
    (part / "model.safetensors").unlink()
    metrics = [m for m in read_metrics(part) if m["step"] <= 4]
    (part / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    resumed = run(config(tmp_path, model_dir, chats, *args, "resume=true", name="part"))
    losses = lambda d: [(m["step"], round(m["loss"], 5)) for m in read_metrics(d) if "loss" in m]  # noqa: E731
    assert losses(resumed) == losses(full)
    a, b = read_run(full)["summary"], read_run(resumed)["summary"]
    assert a["initial_eval_kl"] == b["initial_eval_kl"]
    assert abs(a["eval_kl"] - b["eval_kl"]) < 1e-5
    for k, v in weights(full).items():
        assert torch.allclose(v, weights(resumed)[k], atol=1e-6), k


def test_context_and_config(tmp_path):
    f = tmp_path / "ctx.txt"
    f.write_text("  系统提示 😀\n", encoding="utf-8")
    assert read_context(str(f)) == "系统提示 😀"
    assert read_context("直接的文本") == "直接的文本"
    msgs = [{"role": "system", "content": "原有"}, {"role": "user", "content": "问"}]
    assert with_context(msgs, "新") == [
        {"role": "system", "content": "新\n\n原有"},
        {"role": "user", "content": "问"},
    ]
    with pytest.raises(ConfigError, match="context is required"):
        load_config(DistillConfig, None, ["output_dir=x"])
    with pytest.raises(ConfigError, match="regex"):
        load_config(DistillConfig, None, ["context=x", "check=(("])
