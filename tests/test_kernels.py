"""The GPU kernel options, `train.liger` and `model.attn_implementation`: refused before anything
loads where they cannot run (no CUDA GPU, the package missing, a stage that cannot take them),
and passed to the Trainer and to transformers where they can. The kernels themselves run only
on a GPU (benchmarks/gpu_check.sh); these tests need none."""

import importlib.util

import pytest
import torch

from hanlm.align.ppo_config import PPOConfig
from hanlm.config import ConfigError, ModelConfig, TrainConfig, load_config
from hanlm.embed.train import EmbedTrainConfig
from hanlm.modeling import load_model
from hanlm.train.sft import SFTConfig
from hanlm.trainer import batching_args, check_launch, training_args


@pytest.fixture
def a_gpu_with(monkeypatch):
    """Pretend this machine has a CUDA GPU and exactly the named kernel packages."""

    def have(*modules: str) -> None:
        real = importlib.util.find_spec
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: object() if name in modules else real(name, *a),
        )

    return have


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
@pytest.mark.parametrize(
    "override", ["train.liger=true", "model.attn_implementation=flash_attention_2"]
)
def test_kernel_options_are_refused_without_a_cuda_gpu(override):
    with pytest.raises(ConfigError, match=rf"{override}.* runs CUDA kernels.*no CUDA GPU"):
        load_config(SFTConfig, overrides=[override, "model.path=x"])


def test_kernel_options_name_the_package_they_need(a_gpu_with):
    a_gpu_with()  # a GPU, but neither package
    with pytest.raises(ConfigError, match=r"liger_kernel package.*pip install 'hanlm\[liger\]'"):
        load_config(SFTConfig, overrides=["train.liger=true"])
    with pytest.raises(ConfigError, match="flash_attn package.*pip install flash-attn"):
        load_config(SFTConfig, overrides=["model.attn_implementation=flash_attention_2"])
    a_gpu_with("liger_kernel", "flash_attn")
    cfg = load_config(
        SFTConfig, overrides=["train.liger=true", "model.attn_implementation=flash_attention_2"]
    )
    assert cfg.train.liger and cfg.model.attn_implementation == "flash_attention_2"


def test_liger_reaches_the_trainer_in_the_stages_that_take_it(tmp_path):
    assert training_args(TrainConfig(liger=True), tmp_path, False).use_liger_kernel
    assert not training_args(TrainConfig(), tmp_path, False).use_liger_kernel
    for command in ("hanlm pretrain", "hanlm sft"):
        check_launch(TrainConfig(liger=True), command)
    refusals = {
        "hanlm dpo": "its losses read the log-probabilities itself",
        "hanlm reward": "a reward model has a score head",
    }
    for command, why in refusals.items():
        with pytest.raises(ConfigError, match=rf"{command} does not take Liger's kernels \({why}"):
            check_launch(TrainConfig(liger=True), command, no_liger=why)
    check_launch(TrainConfig(), "hanlm dpo", no_liger="its losses read the log-probabilities")


@pytest.mark.parametrize("cls", [PPOConfig, EmbedTrainConfig])
def test_own_loop_stages_refuse_liger(cls):
    with pytest.raises(ConfigError, match="'train.liger' is not used by this command"):
        load_config(cls, overrides=["train.liger=true"])


@pytest.mark.parametrize("stage", ["dpo", "reward", "distill", "grpo"])
def test_trainer_stages_that_cannot_take_liger_refuse_it_before_loading(stage, tmp_path):
    import importlib

    from hanlm.pipeline.commands import COMMANDS, config_class

    cfg = config_class(stage)(output_dir=str(tmp_path / "out"))
    cfg.train.liger = True
    command = COMMANDS[stage]
    with pytest.raises(ConfigError, match=f"hanlm {stage} does not take Liger's kernels"):
        getattr(importlib.import_module(command.module), command.func)(cfg)
    assert not (tmp_path / "out").exists()


def test_padding_free_is_sfts_default_only_under_flash_attention():
    cfg = TrainConfig()  # batching=auto
    assert batching_args(cfg, "sft", padding_free=True, attention="flash_attention_2") == {
        "padding_free": True
    }
    grouped = batching_args(cfg, "sft", padding_free=True, attention="sdpa")
    assert grouped["train_sampling_strategy"] == "group_by_length"
    assert batching_args(cfg, "sft", padding_free=True)["train_sampling_strategy"] == (
        "group_by_length"
    )


def test_the_attention_kernel_reaches_the_model(tiny_model_path):
    def kernel(**kw):
        cfg = ModelConfig(path=str(tiny_model_path), dtype="float32", **kw)
        return load_model(cfg).config._attn_implementation

    assert kernel() == "sdpa"  # transformers' own choice
    assert kernel(attn_implementation="eager") == "eager"
    assert kernel(attn_implementation="sdpa") == "sdpa"
