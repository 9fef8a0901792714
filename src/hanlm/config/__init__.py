"""Typed configs: YAML files plus dotted command-line overrides, checked before anything is built.

Each stage's config is a dataclass composed of the small shared parts in `parts` (model, data,
training, LoRA, output). Every field carries a one-line help text in its metadata; `describe()`
turns that into `hanlm <command> --help`. `loading` reads YAML and overrides into them, refusing
unknown keys, wrong types and keys a command would not use, by name.
"""

from hanlm.config.loading import (
    all_keys,
    describe,
    load_config,
    parse_override,
    parse_value,
    read_yaml,
    to_dict,
)
from hanlm.config.parts import (
    TRACKER_PACKAGES,
    ConfigError,
    DataConfig,
    InferenceModelConfig,
    InputError,
    LoraConfig,
    ModelConfig,
    OutputConfig,
    RopeConfig,
    TemplateName,
    Tracker,
    TrainConfig,
    check_trackers,
    deepspeed_config,
    end_tracker_runs,
    opt,
    trackers,
    zero_stage,
)

__all__ = [
    "TRACKER_PACKAGES",
    "ConfigError",
    "DataConfig",
    "InferenceModelConfig",
    "InputError",
    "LoraConfig",
    "ModelConfig",
    "OutputConfig",
    "RopeConfig",
    "TemplateName",
    "Tracker",
    "TrainConfig",
    "all_keys",
    "check_trackers",
    "deepspeed_config",
    "describe",
    "end_tracker_runs",
    "load_config",
    "opt",
    "parse_override",
    "parse_value",
    "read_yaml",
    "to_dict",
    "trackers",
    "zero_stage",
]
