"""Launch settings refused before anything loads: train.deepspeed files, combinations
that cannot work, DeepSpeed/FSDP on CPU through accelerate, and a world size without a process
group. Plus the shipped DeepSpeed/accelerate configs and how a loop fills their "auto" values."""

import json
from pathlib import Path

import pytest
import yaml

from hanlm import trainer
from hanlm.align import loop
from hanlm.config import ConfigError, load_config
from hanlm.pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
ZERO2 = ROOT / "configs" / "deepspeed" / "zero2.json"
ZERO3 = ROOT / "configs" / "deepspeed" / "zero3.json"


def _ppo_cfg(*overrides):
    from hanlm.align.ppo import PPOConfig

    return load_config(PPOConfig, None, ["model.path=unused", "output_dir=unused", *overrides])


def test_shipped_configs_parse_and_say_what_they_are():
    stages = {
        name: json.loads((ROOT / "configs" / "deepspeed" / f"{name}.json").read_text())
        for name in ("zero2", "zero3", "zero3_offload")
    }
    assert {k: v["zero_optimization"]["stage"] for k, v in stages.items()} == {
        "zero2": 2,
        "zero3": 3,
        "zero3_offload": 3,
    }
    assert stages["zero3_offload"]["zero_optimization"]["offload_param"]["device"] == "cpu"
    for cfg in stages.values():  # the Trainer fills these from TrainingArguments
        assert cfg["train_micro_batch_size_per_gpu"] == "auto"
        assert cfg["gradient_accumulation_steps"] == "auto"
    kinds = {}
    for name in ("ddp", "fsdp", "deepspeed_zero2"):
        acc = yaml.safe_load((ROOT / "configs" / "accelerate" / f"{name}.yaml").read_text())
        kinds[name] = acc["distributed_type"]
    assert kinds == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}
    ds = yaml.safe_load((ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml").read_text())
    assert (ROOT / ds["deepspeed_config"]["deepspeed_config_file"]).resolve() == ZERO2.resolve()


def test_a_missing_or_broken_deepspeed_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.json: no such file"):
        _ppo_cfg(f"train.deepspeed={tmp_path / 'nope.json'}")
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"bad\.json: not valid JSON \(.*line 1"):
        _ppo_cfg(f"train.deepspeed={bad}")
    odd = tmp_path / "odd.json"
    odd.write_text('{"zero_optimization": {"stage": 4}}')
    with pytest.raises(ConfigError, match="odd.json: zero_optimization.stage=4"):
        _ppo_cfg(f"train.deepspeed={odd}")


def test_deepspeed_not_installed_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name)
    )
    with pytest.raises(ConfigError, match=r"pip install 'hanlm\[deepspeed\]'"):
        _ppo_cfg(f"train.deepspeed={ZERO2}")


def test_combinations_that_cannot_work_are_refused_at_the_config():
    with pytest.raises(ConfigError, match="lora.enabled=true with ZeRO-3.*zero2.json"):
        _ppo_cfg(f"train.deepspeed={ZERO3}", "lora.enabled=true")
    with pytest.raises(ConfigError, match="keep_best=gold with ZeRO-3"):
        _ppo_cfg(f"train.deepspeed={ZERO3}", "keep_best=gold", "gold_reward_model=x")
    assert _ppo_cfg(f"train.deepspeed={ZERO2}", "lora.enabled=true").lora.enabled  # works

    from hanlm.train.sft import SFTConfig

    with pytest.raises(ConfigError, match=r"quantize=4bit \(QLoRA\) with ZeRO-3"):
        load_config(
            SFTConfig,
            None,
            ["model.path=x", "quantize=4bit", "lora.enabled=true", f"train.deepspeed={ZERO3}"],
        )


@pytest.mark.parametrize(
    "how", ["train.deepspeed", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"]
)
def test_trainer_stage_sharding_on_cpu_is_refused_before_loading(
    tmp_path, monkeypatch, capsys, how
):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the refusal is for machines without a GPU")
    args = ["pretrain", f"tokenizer={tmp_path / 'no-tokenizer'}", f"output_dir={tmp_path / 'o'}"]
    if how == "train.deepspeed":
        args.append(f"train.deepspeed={ZERO2}")
    else:  # what `accelerate launch --use_fsdp` / `--use_deepspeed` put in the environment
        monkeypatch.setenv(how, "true")
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "needs GPUs" in err and "torchrun --nproc_per_node N -m hanlm pretrain" in err
    assert not (tmp_path / "o").exists()  # refused before the run directory or the tokenizer


@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_ppo_under_accelerate_sharding_is_refused_with_the_way_that_works(monkeypatch, env):
    monkeypatch.setenv(env, "true")
    with pytest.raises(ValueError, match=r"torchrun.*train.deepspeed=configs/deepspeed/zero2"):
        loop.loop_accelerator("fp32", "hanlm ppo")


def test_a_world_size_without_a_process_group_is_refused(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2\) but this one sees 1.*torchrun"):
        trainer.check_world(1, "hanlm sft")
    trainer.check_world(2, "hanlm sft")  # a real 2-process run passes

    # the accelerate CPU trap: the launcher says 2, the Accelerator runs alone
    import accelerate

    class Alone:
        def __init__(self, **kw):
            self.num_processes = 1
            self.distributed_type = type("T", (), {"name": "NO"})()

    monkeypatch.setattr(accelerate, "Accelerator", Alone)
    with pytest.raises(ValueError, match="hanlm ppo: the launcher started 2 processes"):
        loop.loop_accelerator("fp32", "hanlm ppo")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert loop.loop_accelerator("fp32", "hanlm ppo").num_processes == 1


def test_a_loop_fills_the_auto_values_from_train(tmp_path, capsys):
    pytest.importorskip("deepspeed")
    from hanlm.align.distributed import loop_deepspeed_config
    from hanlm.config import TrainConfig

    with_opt = tmp_path / "opt.json"
    cfg = json.loads(ZERO3.read_text())
    cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto"}}
    with_opt.write_text(json.dumps(cfg))
    train = TrainConfig(grad_accum=2, max_grad_norm=0.5, precision="fp32", deepspeed=str(with_opt))
    got = loop_deepspeed_config(train, micro_batch=3, world=4)
    assert got["train_micro_batch_size_per_gpu"] == 3
    assert got["gradient_accumulation_steps"] == 2
    assert got["train_batch_size"] == 3 * 2 * 4
    assert got["gradient_clipping"] == 0.5
    assert got["bf16"]["enabled"] is False and got["fp16"]["enabled"] is False
    assert "optimizer" not in got and "ignoring its optimizer" in capsys.readouterr().err
    zero = got["zero_optimization"]
    assert zero["stage"] == 3 and "auto" not in zero.values()
    assert got["zero_allow_untested_optimizer"] is True


LEAVER = """
import atexit, sys
import torch.distributed as dist
from hanlm.compat import keep_process_group, leave_process

if len(sys.argv) > 1:  # under torchrun
    dist.init_process_group("gloo")
keep_process_group()
atexit.register(lambda: print("interpreter teardown ran", flush=True))
print("work done", end="")  # left in the buffer: leave_process must flush it
sys.exit(leave_process(0 if len(sys.argv) > 1 else 3))
"""


def test_a_torchrun_process_leaves_without_destroying_its_process_group(tmp_path):
    """A process of a multi-process job keeps its process group (torch's gloo teardown can hang:
    see hanlm.compat) and leaves with os._exit, its buffered output flushed; a single process
    exits normally, with its exit code and interpreter teardown."""
    import os
    import subprocess
    import sys

    script = tmp_path / "leaver.py"
    script.write_text(LEAVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    alone = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert alone.returncode == 3 and alone.stdout == "work doneinterpreter teardown ran\n"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    job = subprocess.run(
        [*cmd, str(script), "torchrun"], env=env, capture_output=True, text=True, timeout=120
    )
    assert job.returncode == 0, job.stderr[-2000:]
    assert job.stdout.count("work done") == 2 and "teardown" not in job.stdout
