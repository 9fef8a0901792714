"""hanlm pretrain: loss falls, LoRA trains only what it should, resume is exact, output loads."""

import json
import random
import shutil
import subprocess
import sys

import pytest
import torch

from hanlm.config import ConfigError, load_config
from hanlm.pipeline import cli
from hanlm.runs import read_metrics, read_run
from hanlm.train.pretrain import PretrainConfig, run

LINES = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "In the beginning God created the heavens and the earth.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(240):
            text = "".join(rng.choice(LINES) for _ in range(3)) + f" {i}"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def config(tmp_path, corpus, *overrides, name="out"):
    base = [
        f"data.paths=[{corpus}]",
        "data.valid_fraction=0.1",
        "block_size=64",
        "train.batch_size=4",
        "train.max_steps=12",
        "train.eval_steps=6",
        "train.logging_steps=2",
        "train.lr=3e-3",
        f"output_dir={tmp_path / name}",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    return load_config(PretrainConfig, None, base + list(overrides))


def state(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def test_from_scratch_loss_falls_and_output_loads(tmp_path, corpus, tok_dir, summary_declared):
    out = run(config(tmp_path, corpus, f"tokenizer={tok_dir}", "preset=test"))
    summary_declared(out)
    info = read_run(out)
    s = info["summary"]
    assert info["status"] == "complete"
    assert s["eval_loss"] < s["initial_eval_loss"] - 0.3
    assert s["eval_bpc"] < s["initial_eval_bpc"]
    assert info["data"]["train_blocks"]["real_token_fraction"] >= 0.99
    steps = [m["step"] for m in read_metrics(out) if "loss" in m]
    assert steps == [2, 4, 6, 8, 10, 12]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("床前", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5 or tok.eos_token_id in gen[0].tolist()


def test_from_scratch_requires_tokenizer(tmp_path, corpus):
    with pytest.raises(ValueError, match="needs tokenizer=DIR"):
        run(config(tmp_path, corpus))


def _changed(before, after):
    return sorted(k for k in before if not torch.equal(before[k], after[k]))


def test_lora_with_embeddings_changes_only_adapted_and_embedding_tensors(
    tmp_path, corpus, tiny_model_path
):
    out = run(config(tmp_path, corpus, f"model.path={tiny_model_path}", "lora.enabled=true"))
    before, after = state(tiny_model_path), state(out)
    assert before.keys() == after.keys()
    changed = _changed(before, after)
    assert "model.embed_tokens.weight" in changed
    assert all(any(p in k for p in ("proj", "embed_tokens", "lm_head")) for k in changed)
    assert not any("norm" in k for k in changed)
    # every adapted projection of every layer changed
    assert sum("q_proj" in k for k in changed) == 2
    assert read_run(out)["summary"]["trainable_params"] < read_run(out)["summary"]["total_params"]


def test_lora_without_embeddings_leaves_them_untouched(tmp_path, corpus, tiny_model_path):
    out = run(
        config(
            tmp_path,
            corpus,
            f"model.path={tiny_model_path}",
            "lora.enabled=true",
            "train_embeddings=none",
            "lora.targets=[q_proj,v_proj]",
        )
    )
    changed = _changed(state(tiny_model_path), state(out))
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)


def test_trainable_tokens_change_only_new_rows(tmp_path, corpus, tiny_model_path):
    start = 500
    out = run(
        config(
            tmp_path,
            corpus,
            f"model.path={tiny_model_path}",
            "lora.enabled=true",
            "train_embeddings=new_tokens",
            f"new_tokens_from={start}",
        )
    )
    before = state(tiny_model_path)["model.embed_tokens.weight"]
    after = state(out)["model.embed_tokens.weight"]
    assert torch.equal(before[:start], after[:start])
    seen = {
        t
        for line in LINES
        for t in __import__("transformers").AutoTokenizer.from_pretrained(tiny_model_path)(line)[
            "input_ids"
        ]
    }
    used_new = [i for i in seen if i >= start]
    assert used_new, "the corpus must use some new rows for this test to mean anything"
    assert not torch.equal(before[used_new], after[used_new])


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path, corpus, tok_dir):
    args = [f"tokenizer={tok_dir}", "preset=test", "train.save_steps=6", "train.eval_steps=0"]
    full = run(config(tmp_path, corpus, *args, name="full"))
    # Simulate a run killed after step 6: its directory holds checkpoint-6 and nothing later.
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "checkpoint-12")
    (part / "model.safetensors").unlink()
    # A checkpoint without the completion marker (crash mid-save) is ignored and removed.
    (part / "checkpoints" / "checkpoint-9").mkdir()
    metrics = [m for m in read_metrics(part) if m["step"] <= 6]
    (part / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    resumed = run(config(tmp_path, corpus, *args, "resume=true", name="part"))
    losses = lambda d: [(m["step"], m["loss"]) for m in read_metrics(d) if "loss" in m]  # noqa: E731
    assert losses(resumed) == losses(full)
    assert not (part / "checkpoints" / "checkpoint-9").exists()
    assert read_run(resumed)["resumed"] is True
    for k, v in state(full).items():
        assert torch.allclose(v, state(resumed)[k], atol=1e-6), k


def test_cli_refuses_non_empty_output(tmp_path, corpus, tok_dir, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    code = cli.main(
        [
            "pretrain",
            f"tokenizer={tok_dir}",
            f"data.paths={corpus}",
            f"output_dir={tmp_path / 'busy'}",
        ]
    )
    assert code == 1 and "overwrite=true" in capsys.readouterr().err


def test_torchrun_two_process_cpu(tmp_path, corpus, tok_dir):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(29500 + random.Random().randint(0, 400)),
        "-m",
        "hanlm.pipeline.cli",
        "pretrain",
        f"tokenizer={tok_dir}",
        "preset=test",
        f"data.paths=[{corpus}]",
        "block_size=64",
        "train.batch_size=2",
        "train.max_steps=4",
        "train.eval_steps=0",
        f"output_dir={out}",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = read_run(out)
    assert info["status"] == "complete" and info["summary"]["steps"] == 4
    assert "world_size" in proc.stderr + proc.stdout or (out / "model.safetensors").is_file()


def test_streaming_pretraining_runs_and_needs_max_steps(tmp_path, corpus, tok_dir):
    out = run(
        load_config(
            PretrainConfig,
            None,
            [
                f"tokenizer={tok_dir}",
                "preset=test",
                "streaming=true",
                f"data.paths=[{corpus}]",
                f"data.valid_paths=[{corpus}]",
                "data.max_records=40",
                "block_size=32",
                "train.batch_size=2",
                "train.max_steps=6",
                "train.eval_steps=0",
                "train.lr=3e-3",
                f"output_dir={tmp_path / 's'}",
                f"cache_dir={tmp_path / 'cache'}",
            ],
        )
    )
    s = read_run(out)["summary"]
    assert s["steps"] == 6 and s["eval_loss"] < s["initial_eval_loss"]
    # a pure config check: it fails when the config is read, before anything loads
    with pytest.raises(ConfigError, match="streaming=true needs train.max_steps"):
        load_config(
            PretrainConfig,
            None,
            [
                "streaming=true",
                "train.max_steps=0",
                f"tokenizer={tok_dir}",
                f"output_dir={tmp_path / 'x'}",
            ],
        )


@pytest.mark.parametrize("num_proc", [1, 2])
def test_packing_matches_the_plain_definition(tmp_path, tiny_tokenizer, num_proc):
    """Blocks are the documents' ids joined with EOS and cut every block_size tokens, the tail
    padded with labels ignored and a one-token tail dropped; both tokenizing paths agree."""
    from hanlm import IGNORE_INDEX
    from hanlm.train.pretrain import _tokenize_and_pack

    tok, size, eos = tiny_tokenizer, 7, tiny_tokenizer.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    texts = ["春眠不觉晓", "处处闻啼鸟", "夜来风雨声，花落知多少"]
    tails = set()
    for k in range(12):  # tails of every length, one token among them
        docs = [*texts, "b" * k]
        flat = [t for x in docs for t in [*tok(x, add_special_tokens=False)["input_ids"], eos]]
        tails.add(len(flat) % size)
        cuts = [flat[i : i + size] for i in range(0, len(flat), size)]
        cuts = [c for c in cuts if len(c) >= 2]
        ds, stats = _tokenize_and_pack(docs, tok, size, num_proc, str(tmp_path / f"c{k}"))
        assert ds["input_ids"] == [c + [pad] * (size - len(c)) for c in cuts]
        assert ds["labels"] == [c + [IGNORE_INDEX] * (size - len(c)) for c in cuts]
        assert ds["attention_mask"] == [[1] * len(c) + [0] * (size - len(c)) for c in cuts]
        assert stats["tokens"] == len(flat) and stats["blocks"] == len(cuts)
        assert stats["predicted_tokens"] == sum(len(c) - 1 for c in cuts)
    assert 1 in tails and 0 in tails  # the dropped one-token tail and an exact fit were seen
