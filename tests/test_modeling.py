"""Shared loading: RoPE scaling applied at load for every command, and kept in what is saved."""

import pytest
import torch

from hanlm.config import ConfigError, ModelConfig, RopeConfig, load_config
from hanlm.modeling import load_model, save_model


def _logits(model, ids, positions):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions).logits


def test_linear_rope_is_position_interpolation(tiny_model_path, tmp_path):
    """Linear scaling by s divides positions by s: the scaled model at positions 2p equals the
    plain one at p. Saved, the directory loads with the same scaling."""
    plain = load_model(ModelConfig(path=str(tiny_model_path), dtype="float32"))
    cfg = ModelConfig(path=str(tiny_model_path), dtype="float32", rope=RopeConfig("linear", 2.0))
    scaled = load_model(cfg)
    assert scaled.config.rope_parameters["rope_type"] == "linear"
    assert scaled.config.max_position_embeddings == 2 * plain.config.max_position_embeddings
    ids = torch.tensor([[5, 17, 42, 99, 7, 300]])
    pos = torch.arange(6)[None]
    torch.testing.assert_close(_logits(scaled, ids, 2 * pos), _logits(plain, ids, pos))
    assert not torch.allclose(_logits(scaled, ids, pos), _logits(plain, ids, pos))
    out = save_model(scaled, None, tmp_path / "scaled")
    (tmp_path / "scaled" / "tokenizer.json").write_bytes(
        (tiny_model_path / "tokenizer.json").read_bytes()
    )
    again = load_model(ModelConfig(path=str(out), dtype="float32"))  # no rope option given
    assert again.config.rope_parameters["factor"] == 2.0
    torch.testing.assert_close(_logits(again, ids, pos), _logits(scaled, ids, pos))


@pytest.mark.parametrize("kind", ["dynamic", "yarn", "llama3"])
def test_other_rope_types_load_and_change_long_positions(tiny_model_path, kind):
    cfg = ModelConfig(path=str(tiny_model_path), dtype="float32", rope=RopeConfig(kind, 4.0))
    model = load_model(cfg)
    params = model.config.rope_parameters
    assert params["rope_type"] == kind and params["original_max_position_embeddings"] == 512
    plain = load_model(ModelConfig(path=str(tiny_model_path), dtype="float32"))
    ids = torch.randint(5, 500, (1, 600))  # past the trained 512: every kind rescales there
    pos = torch.arange(600)[None]
    assert not torch.allclose(_logits(model, ids, pos), _logits(plain, ids, pos))


def test_rope_is_a_config_key_of_every_model_taking_command():
    from hanlm.train.sft import SFTConfig

    cfg = load_config(SFTConfig, None, ["model.rope.type=yarn", "model.rope.factor=4"])
    assert cfg.model.rope == RopeConfig("yarn", 4.0)
    with pytest.raises(ConfigError, match="must be >= 1"):
        load_config(SFTConfig, None, ["model.rope.type=linear", "model.rope.factor=0.5"])


@pytest.mark.parametrize(("kind", "weight_type"), [("int8", "Int8Tensor"), ("int4", "WeightQBits")])
def test_quantize_replaces_linear_weights_but_not_the_head(tiny_model_path, kind, weight_type):
    from hanlm.config import InferenceModelConfig

    plain = load_model(ModelConfig(path=str(tiny_model_path), dtype="float32"))
    q = load_model(InferenceModelConfig(path=str(tiny_model_path), dtype="float32", quantize=kind))
    for name, module in q.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            assert weight_type in type(module.weight).__name__, name
    assert type(q.lm_head.weight) is torch.nn.Parameter
    ids = torch.randint(5, 500, (1, 32))
    with torch.no_grad():
        a, b = plain(ids).logits, q(ids).logits
    err = float((a - b).abs().max() / a.abs().max())
    assert 0 < err < (0.02 if kind == "int8" else 0.2)  # changed, and close
    assert q.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 36)


def test_quantize_is_for_inference_commands_only():
    from hanlm.eval.evaluate import EvalConfig
    from hanlm.serve.chat import ChatConfig
    from hanlm.train.sft import SFTConfig

    assert load_config(ChatConfig, None, ["model.quantize=int4"]).model.quantize == "int4"
    assert load_config(EvalConfig, None, ["model.quantize=int8"]).model.quantize == "int8"
    with pytest.raises(ConfigError, match="quantize"):
        load_config(SFTConfig, None, ["model.quantize=int8"])


def test_dynamic_ntk_scales_past_the_trained_length_even_when_the_config_says_more(
    tiny_model_path,
):
    # The tiny model's config allows 512 positions; say it was trained at 128.
    rope = RopeConfig("dynamic", 4.0, 128)
    model = load_model(ModelConfig(path=str(tiny_model_path), dtype="float32", rope=rope))
    plain = load_model(ModelConfig(path=str(tiny_model_path), dtype="float32"))
    assert model.config.max_position_embeddings == 128
    ids = torch.randint(5, 500, (1, 300))
    pos = torch.arange(300)[None]
    assert not torch.allclose(_logits(model, ids, pos), _logits(plain, ids, pos))
    short = ids[:, :100]
    assert torch.allclose(_logits(model, short, pos[:, :100]), _logits(plain, short, pos[:, :100]))
