from dataclasses import dataclass

import pytest

from hanlm.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    OutputConfig,
    TrainConfig,
    all_keys,
    describe,
    load_config,
    opt,
    to_dict,
)


@dataclass
class StageConfig(OutputConfig):
    data: DataConfig = opt(DataConfig, "data")
    train: TrainConfig = opt(TrainConfig, "training")
    lora: LoraConfig = opt(LoraConfig, "adapters")
    name: str = opt("x", "a name")
    maybe: int | None = opt(None, "optional int")


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text, encoding="utf-8")
    return p


def test_yaml_and_overrides_merge(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1.0e-3\n  max_steps: 5\ndata:\n  paths: [a.jsonl]\n")
    cfg = load_config(StageConfig, p, ["train.lr=3e-4", "lora.enabled=true", "output_dir=out"])
    assert cfg.train.lr == pytest.approx(3e-4)  # YAML 1.1 reads 3e-4 as a string: coerced
    assert cfg.train.max_steps == 5
    assert cfg.lora.enabled is True
    assert cfg.data.paths == ["a.jsonl"]
    assert cfg.output_dir == "out"
    # Defaults stay per-instance: mutating one config never leaks into another.
    cfg.lora.targets.append("zzz")
    assert "zzz" not in StageConfig().lora.targets


def test_list_override_and_single_value_becomes_list():
    cfg = load_config(StageConfig, None, ["data.paths=[a.jsonl, b.jsonl]", "data.weights=[1, 0.5]"])
    assert cfg.data.paths == ["a.jsonl", "b.jsonl"]
    assert cfg.data.weights == [1.0, 0.5]
    cfg = load_config(StageConfig, None, ["data.paths=c.txt"])
    assert cfg.data.paths == ["c.txt"]


def test_tuple_overrides_and_optional():
    cfg = load_config(StageConfig, None, [("maybe", 3), ("name", "你好")])
    assert cfg.maybe == 3 and cfg.name == "你好"
    assert load_config(StageConfig, None, ["maybe=null"]).maybe is None


def test_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.lrr'.*did you mean 'train.lr'"
    ):
        load_config(StageConfig, None, ["train.lrr=1"])
    p = write(tmp_path, "trian:\n  lr: 1\n")
    with pytest.raises(
        ConfigError, match=r"c.yaml: unknown config key 'trian'.*did you mean 'train'"
    ):
        load_config(StageConfig, p)
    p = write(tmp_path, "train:\n  max_step: 1\n")
    with pytest.raises(ConfigError, match=r"'train.max_step'.*did you mean 'train.max_steps'"):
        load_config(StageConfig, p)


def test_wrong_type_names_field_and_expected():
    with pytest.raises(ConfigError, match=r"'train.max_steps': expected int, got str 'many'"):
        load_config(StageConfig, None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"'lora.enabled': expected bool"):
        load_config(StageConfig, None, ["lora.enabled=maybe"])
    with pytest.raises(ConfigError, match=r"'data.weights\[1\]': expected float"):
        load_config(StageConfig, None, ["data.weights=[1, x]"])


def test_bad_choice_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"'data.format': 'xml' is not allowed.*'alpaca'"):
        load_config(StageConfig, None, ["data.format=xml"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(StageConfig, tmp_path / "nope.yaml")
    p = write(tmp_path, "train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(StageConfig, p)
    p = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(StageConfig, p)


def test_override_must_be_key_value_and_section_is_not_scalar():
    with pytest.raises(ConfigError, match="must look like key=value"):
        load_config(StageConfig, None, ["train.lr"])
    with pytest.raises(ConfigError, match="'name' is not a section"):
        load_config(StageConfig, None, ["name=x", "name.sub=1"])


def test_describe_covers_every_key_with_help():
    rows = describe(StageConfig)
    keys = [r[0] for r in rows]
    assert keys == all_keys(StageConfig)
    assert "train.lr" in keys and "lora.targets" in keys and "output_dir" in keys
    assert all(r[3] for r in rows), "every field needs a help line"
    lr = next(r for r in rows if r[0] == "train.lr")
    assert lr[1] == "float" and lr[2] == "0.001"


def test_round_trip_through_dict():
    cfg = load_config(StageConfig, None, ["train.lr=0.5"])
    again = load_config(StageConfig, None, [(k, v) for k, v in to_dict(cfg).items()])
    assert again == cfg


@dataclass
class Gen:
    temperature: float = opt(0.7, "t")
    max_new_tokens: int = opt(256, "n")


def test_partial_section_keeps_the_fields_own_defaults():
    from dataclasses import field

    @dataclass
    class C:
        gen: Gen = field(default_factory=lambda: Gen(temperature=0.0), metadata={"help": "g"})

    cfg = load_config(C, None, ["gen.max_new_tokens=8"])
    assert cfg.gen.temperature == 0.0 and cfg.gen.max_new_tokens == 8


def test_renamed_keys_still_work_with_a_message(tmp_path, capsys):
    from hanlm.align.grpo import GRPOConfig
    from hanlm.align.ppo import PPOConfig
    from hanlm.train.sft import SFTConfig

    cfg = load_config(SFTConfig, None, ["cutoff_len=77"])
    assert cfg.max_length == 77
    assert "'cutoff_len' is now 'max_length'" in capsys.readouterr().err
    y = tmp_path / "ppo.yaml"
    y.write_text("max_prompt_len: 33\n")
    assert load_config(PPOConfig, y).max_prompt_length == 33
    assert "ppo.yaml: config key 'max_prompt_len' is now" in capsys.readouterr().err
    grpo = load_config(GRPOConfig, None, ["max_prompt_len=9", "rules.funcs=[stop]"])
    assert grpo.max_prompt_length == 9
    capsys.readouterr()
    assert load_config(SFTConfig).max_length == 512
    assert capsys.readouterr().err == ""  # the new names say nothing


def test_a_key_the_command_does_not_use_is_an_error():
    from hanlm.align.ppo import PPOConfig

    with pytest.raises(ConfigError, match="'train.epochs' is not used by this command"):
        load_config(PPOConfig, None, ["train.epochs=3"])
    # a whole resolved config (as a recipe writes it) carries the default: fine
    assert load_config(PPOConfig, None, ["train.epochs=1.0"]).train.epochs == 1.0
    with pytest.raises(ConfigError, match="batch_size=32 .* exceeds rollout_batch=16"):
        load_config(PPOConfig, None, ["train.batch_size=32"])


def test_stage_defaults_follow_the_papers():
    from hanlm.train.sft import SFTConfig

    assert load_config(SFTConfig).train.lr == 2e-5  # trl's SFT default, not pretraining's 1e-3


@pytest.mark.parametrize("on", [False, True])
def test_gradient_checkpointing_is_one_setting_for_every_trainer(tmp_path, on):
    """trl's configs default gradient checkpointing to on, the Trainer's to off: every stage
    gets `train.gradient_checkpointing` instead (off: a third less compute per step)."""
    from transformers import TrainingArguments
    from trl import DPOConfig, GRPOConfig, RewardConfig, SFTConfig

    from hanlm.config import TrainConfig
    from hanlm.trainer import training_args

    cfg = TrainConfig(precision="fp32", gradient_checkpointing=on)
    for cls in (TrainingArguments, SFTConfig, DPOConfig, RewardConfig, GRPOConfig):
        args = training_args(cfg, tmp_path, has_eval=False, args_cls=cls)
        assert args.gradient_checkpointing is on, cls.__name__
