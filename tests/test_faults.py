"""Faults: damaged checkpoints are caught before a resume loads them, a full disk stops a run with
an error naming the directory and leaves the last complete checkpoint intact, a resume from the
last step's checkpoint takes no extra step, and the kill-anywhere soak (slow)."""

import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hanlm.config import OutputConfig, TrainConfig, load_config
from hanlm.runs import (
    CHECKPOINTS,
    COMPLETE,
    CheckpointError,
    DiskFullError,
    Run,
    checkpoint_problem,
    prune_checkpoints,
    read_metrics,
    read_run,
)

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Cfg(OutputConfig):
    train: TrainConfig = None  # type: ignore[assignment]

    def __post_init__(self):
        self.train = self.train or TrainConfig(save_total_limit=0)


def _write_checkpoints(out: Path, steps=(10, 20)) -> Path:
    """A run with complete checkpoints holding a safetensors file, a .pt optimiser state and a
    json trainer state, as the Trainer writes them."""
    with Run("demo", Cfg(output_dir=str(out))) as run:
        for step in steps:
            with run.checkpoint(step) as d:
                save_file({"w": torch.full((64, 64), float(step))}, str(d / "model.safetensors"))
                torch.save({"exp_avg": torch.ones(128) * step}, d / "optimizer.pt")
                (d / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return out / CHECKPOINTS


def _resume(out: Path) -> str | None:
    return Run("demo", Cfg(output_dir=str(out), resume=True)).resume_from()


def test_a_good_checkpoint_resumes_and_its_manifest_lists_every_file(tmp_path):
    root = _write_checkpoints(tmp_path / "r")
    marker = json.loads((root / "checkpoint-20" / COMPLETE).read_text())
    assert marker["step"] == 20
    assert sorted(marker["files"]) == ["model.safetensors", "optimizer.pt", "trainer_state.json"]
    size = (root / "checkpoint-20" / "optimizer.pt").stat().st_size
    assert marker["files"]["optimizer.pt"]["size"] == size
    assert _resume(tmp_path / "r") == str(root / "checkpoint-20")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("truncate_safetensors", r"model\.safetensors truncated: 1000 of \d+ bytes"),
        ("truncate_pt", r"optimizer\.pt truncated: 100 of \d+ bytes"),
        ("missing_optimizer", r"optimizer\.pt is missing"),
        ("flipped_byte", r"model\.safetensors is damaged: its sha256 differs"),
        ("grown", r"trainer_state\.json has \d+ bytes, \d+ were written"),
        ("bad_marker", r"marker hanlm-complete is unreadable"),
    ],
)
def test_a_damaged_checkpoint_is_refused_naming_the_file_and_the_previous_one(
    tmp_path, damage, expected
):
    out = tmp_path / "r"
    root = _write_checkpoints(out)
    d = root / "checkpoint-20"
    if damage == "truncate_safetensors":
        os.truncate(d / "model.safetensors", 1000)
    elif damage == "truncate_pt":
        os.truncate(d / "optimizer.pt", 100)
    elif damage == "missing_optimizer":
        (d / "optimizer.pt").unlink()
    elif damage == "flipped_byte":
        data = bytearray((d / "model.safetensors").read_bytes())
        data[-5] ^= 0xFF
        (d / "model.safetensors").write_bytes(bytes(data))
    elif damage == "grown":
        with open(d / "trainer_state.json", "a") as f:
            f.write(" ")
    elif damage == "bad_marker":
        (d / COMPLETE).write_text('{"step": 20, "fi')
    before = read_run(out)
    with pytest.raises(CheckpointError) as e:
        _resume(out)
    msg = str(e.value)
    assert msg.startswith(f"{d} is corrupt (")
    assert __import__("re").search(expected, msg), msg
    assert "the previous complete one is checkpoint-10" in msg
    assert f"delete (or move aside) {d}" in msg and "resume=true" in msg
    # nothing was touched: the user decides (the checkpoint and hanlm.json are as they were)
    assert d.is_dir() and read_run(out) == before
    # doing what the message says resumes from the previous one
    shutil.rmtree(d)
    assert _resume(out) == str(root / "checkpoint-10")


def test_when_no_good_checkpoint_is_left_the_error_says_so(tmp_path):
    out = tmp_path / "r"
    root = _write_checkpoints(out)
    for step in (10, 20):
        (root / f"checkpoint-{step}" / "optimizer.pt").unlink()
    with pytest.raises(CheckpointError, match="no earlier complete checkpoint is left"):
        _resume(out)


def test_a_marker_without_manifest_from_an_older_hanlm_is_taken_as_it_is(tmp_path):
    d = tmp_path / "r" / CHECKPOINTS / "checkpoint-5"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"x")
    (d / COMPLETE).write_text("5")
    assert checkpoint_problem(d) is None
    assert _resume(tmp_path / "r") == str(d)


def test_pruning_removes_the_marker_first(tmp_path, monkeypatch):
    root = _write_checkpoints(tmp_path / "r", steps=(1, 2, 3))
    # a crash mid-removal (rmtree removes nothing here) leaves a directory that is not complete
    monkeypatch.setattr("hanlm.runs.shutil.rmtree", lambda *a, **k: None)
    prune_checkpoints(tmp_path / "r", keep=1)
    assert not (root / "checkpoint-1" / COMPLETE).exists()
    assert (root / "checkpoint-1" / "optimizer.pt").exists()
    monkeypatch.undo()
    assert _resume(tmp_path / "r") == str(root / "checkpoint-3")
    assert not (root / "checkpoint-1").exists()  # removed at resume as incomplete


def test_resume_cleans_what_a_killed_write_left(tmp_path):
    out = tmp_path / "r"
    root = _write_checkpoints(out, steps=(4,))
    (root / ".checkpoint-8.abc.tmp").mkdir()
    (root / ".checkpoint-8.abc.tmp" / "policy.pt").write_bytes(b"half")
    (tmp_path / ".r.save.xyz").mkdir()  # modeling.save_model's temporary sibling
    (out / ".hanlm.json.123.tmp").write_text("{")
    with open(out / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 1, "loss": 2.0}) + "\n" + '{"step": 2, "lo')
    assert _resume(out) == str(root / "checkpoint-4")
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4"]
    assert not (tmp_path / ".r.save.xyz").exists() and not (out / ".hanlm.json.123.tmp").exists()
    assert read_metrics(out) == [{"step": 1, "loss": 2.0}]  # the torn line is gone


def test_initial_figures_outlive_a_resume(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(RuntimeError), Run("demo", Cfg(output_dir=str(out))) as run:
        run.record_initial({"initial_eval_loss": 5.5, "other": 1})
        raise RuntimeError("killed")
    resumed = Run("demo", Cfg(output_dir=str(out), resume=True))
    assert resumed.initial == {"initial_eval_loss": 5.5}
    resumed.finish({"eval_loss": 4.0})
    assert read_run(out)["summary"]["initial_eval_loss"] == 5.5


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MiB tmpfs at tmp_path/fs (needs root and mount permission; skipped otherwise)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a size-limited tmpfs needs root (mount -t tmpfs)")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """Fill the filesystem until `leave` bytes are free."""
    filler = mnt / "filler"
    free = shutil.disk_usage(mnt).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(free - leave, 0))
    return filler


def test_disk_full_names_the_directory_and_keeps_the_last_checkpoint(small_fs):
    out = small_fs / "run"
    _write_checkpoints(out, steps=(1,))
    filler = _fill(small_fs, 200_000)
    run = Run("demo", Cfg(output_dir=str(out), resume=True))
    with pytest.raises(DiskFullError) as e, run, run.checkpoint(2) as d:
        torch.save({"exp_avg": torch.ones(250_000)}, d / "optimizer.pt")  # 1 MB: no room
    msg = str(e.value)
    assert f"no space left on the filesystem holding {out}" in msg
    assert "checkpoint-1" in msg and "resume=true" in msg
    root = out / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-1"]  # the tmp dir is gone
    assert checkpoint_problem(root / "checkpoint-1") is None
    assert read_run(out)["status"] == "failed"
    filler.unlink()  # space freed: the run continues from checkpoint-1
    assert _resume(out) == str(root / "checkpoint-1")


def _pretrain_cfg(out: Path, data: Path, tok: str, cache: Path, *extra: str):
    from hanlm.train.pretrain import PretrainConfig

    return load_config(
        PretrainConfig,
        None,
        [
            f"tokenizer={tok}",
            "preset=test",
            f"data.paths=[{data}]",
            "block_size=32",
            "train.batch_size=4",
            "train.max_steps=15",
            "train.save_steps=3",
            "train.eval_steps=0",
            "train.logging_steps=1",
            f"cache_dir={cache}",
            f"output_dir={out}",
            *extra,
        ],
    )


def test_pretrain_on_a_full_disk_fails_clearly_and_resumes_to_the_same_model(
    small_fs, tmp_path, tiny_model_path
):
    from safetensors.torch import load_file

    from hanlm.train.pretrain import run

    rng = random.Random(0)
    data = tmp_path / "c.jsonl"
    words = ["床前明月光，", "疑是地上霜。", "Hello, world! ", "白日依山尽，"]
    data.write_text(
        "".join(
            json.dumps({"text": "".join(rng.choice(words) for _ in range(8))}, ensure_ascii=False)
            + "\n"
            for _ in range(80)
        )
    )
    cache = tmp_path / "cache"
    torch.set_num_threads(1)
    ref = run(_pretrain_cfg(tmp_path / "ref", data, tiny_model_path, cache))

    out = small_fs / "run"
    filler = _fill(small_fs, 1_400_000)  # room for two checkpoints (~0.55 MB each), not three
    with pytest.raises(DiskFullError) as e:
        run(_pretrain_cfg(out, data, tiny_model_path, cache))
    msg = str(e.value)
    assert f"no space left on the filesystem holding {out}" in msg and "resume=true" in msg
    root = out / CHECKPOINTS
    left = sorted(p.name for p in root.iterdir() if p.name.startswith(("checkpoint", ".")))
    assert left and all(checkpoint_problem(root / n) is None for n in left), left
    assert not (out / "model.safetensors").exists()
    assert read_run(out)["status"] == "failed"

    filler.unlink()
    done = run(_pretrain_cfg(out, data, tiny_model_path, cache, "resume=true"))
    assert read_run(done)["status"] == "complete" and read_run(done)["resumed"]
    a, b = load_file(str(ref / "model.safetensors")), load_file(str(done / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = lambda d: {m["step"]: m["loss"] for m in read_metrics(d) if "loss" in m}  # noqa: E731
    assert losses(done) == losses(ref)


# --------------------------------------------------------------------------- resume at the end


def test_resume_from_the_last_steps_checkpoint_takes_no_extra_step(tmp_path, tiny_model_path):
    """transformers would run step max_steps + 1 here; `run_trainer` loads and stops."""
    from safetensors.torch import load_file

    from hanlm.train.pretrain import run

    data = tmp_path / "c.jsonl"
    data.write_text(
        "".join(
            json.dumps({"text": f"床前明月光，疑是地上霜。{i} Hello!"}) + "\n" for i in range(60)
        )
    )
    torch.set_num_threads(1)
    cfg = lambda *x: _pretrain_cfg(tmp_path / "r", data, tiny_model_path, tmp_path / "c", *x)  # noqa: E731
    out = run(cfg("train.max_steps=7", "train.save_steps=7"))  # 7 steps: not an epoch's end
    first = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()  # as if killed while saving the final model
    again = run(cfg("train.max_steps=7", "train.save_steps=7", "resume=true"))
    assert read_run(again)["summary"]["steps"] == 7
    assert max(m["step"] for m in read_metrics(again)) == 7
    second = load_file(str(again / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)


# --------------------------------------------------------------------------- the soak


@pytest.mark.slow
def test_kill_anywhere_soak_three_stages(tmp_path):
    """scripts/soak.py, reduced: pretrain, sft (its padding count kept across resumes) and ppo
    (its reward trend read from re-logged steps), 3 SIGKILLs each, equal to the reference."""
    out = tmp_path / f"soak-{uuid.uuid4().hex[:6]}"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak.py"),
            "--stages",
            "pretrain,sft,ppo",
            "--kills",
            "3",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(Path(f"{out}.json").read_text())
    for stage in report["stages"]:
        assert stage["kills_survived"] >= 3 and stage["ok"], stage["stage"]
        assert stage["problems"] == [] and stage["differences"] == []
        assert stage["tensors_compared"] > 0 and stage["metrics_rows_compared"] > 0


def test_a_resumed_trl_run_counts_tokens_on_and_keeps_its_initial_figures(
    tmp_path, tiny_model_path
):
    """trl does not checkpoint its token count (logged `num_tokens`): hanlm does."""
    from hanlm.align.reward_model import RewardConfig
    from hanlm.align.reward_model import run as reward

    rows = [
        {"prompt": f"床前明月光 #{i}", "chosen": "疑是地上霜。", "rejected": "0123456789"}
        for i in range(24)
    ]
    for name, part in (("t", rows[:16]), ("v", rows[16:])):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part)
        )
    torch.set_num_threads(1)

    def cfg(out, *extra):
        return load_config(
            RewardConfig,
            None,
            [
                f"model.path={tiny_model_path}",
                f"data.paths=[{tmp_path / 't.jsonl'}]",
                f"data.valid_paths=[{tmp_path / 'v.jsonl'}]",
                "train.max_steps=4",
                "train.save_steps=2",
                "train.logging_steps=1",
                "train.batch_size=4",
                f"output_dir={out}",
                *extra,
            ],
        )

    full = reward(cfg(tmp_path / "full"))
    part = tmp_path / "part"
    shutil.copytree(full, part)  # as if killed after checkpoint-2
    shutil.rmtree(part / CHECKPOINTS / "checkpoint-4")
    (part / "model.safetensors").unlink()
    (part / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in read_metrics(full) if m["step"] <= 2)
    )
    info = read_run(part)
    info["status"], info["summary"] = "running", {"initial_accuracy": 0.123}
    (part / "hanlm.json").write_text(json.dumps(info))
    resumed = reward(cfg(part, "resume=true"))
    tokens = lambda d: {m["step"]: m["num_tokens"] for m in read_metrics(d) if "num_tokens" in m}  # noqa: E731
    assert tokens(resumed) == tokens(full) and tokens(full)[4] > tokens(full)[2]
    # the figure measured before training comes from the interrupted run, not measured again
    assert read_run(resumed)["summary"]["initial_accuracy"] == 0.123
