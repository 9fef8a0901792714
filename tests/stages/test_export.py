"""hanlm export: merged LoRA, safetensors in each dtype, GGUF read back by transformers' own GGUF
reader, vocabulary pruning. Every check here is made independently of the command's own parity
report (the test loads what was written and compares it with the source)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hanlm.config import ConfigError, load_config
from hanlm.export.export import ExportConfig, ExportError, run
from hanlm.testing import SAMPLE_TEXT, sp_model_dir

TEXTS = ["床前明月光，疑是地上霜。", "The quick brown fox jumps.", "长城是中国古代的军事防御工程。"]


def _export(src, out, *overrides: str) -> Path:
    """Exports judged by transformers' GGUF reader (the llama.cpp judge: test_export_llamacpp)."""
    cfg = load_config(
        ExportConfig,
        None,
        [f"model.path={src}", f"output_dir={out}", "judge=transformers", *overrides],
    )
    return run(cfg)


def _logits(model, tok, texts=TEXTS) -> list[torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([tok(t)["input_ids"]])).logits[0] for t in texts]


def _load(path, **kw):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    return m, AutoTokenizer.from_pretrained(path, **kw)


def _report(out: Path) -> dict:
    return json.loads((out / "hanlm.json").read_text())


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    return sp_model_dir(tmp_path_factory.mktemp("sp") / "model", [*SAMPLE_TEXT, *TEXTS])


def test_safetensors_fp32_is_the_source_exactly(tiny_model_path, tmp_path):
    out = _export(tiny_model_path, tmp_path / "out")
    src, tok = _load(tiny_model_path)
    new, new_tok = _load(out)
    for a, b in zip(_logits(src, tok), _logits(new, new_tok)):
        assert torch.equal(a, b)
    parity = _report(out)["parity"]["safetensors_fp32"]
    assert parity["passed"] and parity["greedy_equal"] and parity["rel_logit_diff"] == 0
    assert new_tok.chat_template == tok.chat_template
    assert json.loads((out / "hanlm.json").read_text())["summary"]["stop_ids"]


def test_bf16_safetensors_are_bf16_and_close(tiny_model_path, tmp_path):
    out = _export(tiny_model_path, tmp_path / "out", "dtype=bf16")
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}  # noqa: SIM118
    parity = _report(out)["parity"]["safetensors_bf16"]
    assert parity["passed"] and 0 < parity["rel_logit_diff"] < 5e-2


@pytest.mark.parametrize("gtype", ["f32", "q8_0"])
def test_gguf_loads_back_through_transformers_reader(tiny_model_path, tmp_path, gtype):
    out = _export(tiny_model_path, tmp_path / "out", "format=gguf", f"gguf_type={gtype}")
    name = f"model-{gtype}.gguf"
    assert (out / name).is_file() and not (out / "model.safetensors").exists()
    src, tok = _load(tiny_model_path)
    g, g_tok = _load(out, gguf_file=name)
    for t in TEXTS:
        assert g_tok(t)["input_ids"] == tok(t)["input_ids"]
    worst = max(float((a - b).abs().max()) for a, b in zip(_logits(src, tok), _logits(g, g_tok)))
    if gtype == "f32":
        assert worst < 1e-5
    else:  # q8_0 is close, not exact
        assert 0 < worst < 0.05 * max(float(x.abs().max()) for x in _logits(src, tok))
    assert g_tok.chat_template == tok.chat_template
    assert _report(out)["parity"][f"gguf_{gtype}"]["passed"]


def test_sentencepiece_gguf_keeps_ids_and_logits(sp_model, tmp_path):
    out = _export(sp_model, tmp_path / "out", "format=gguf", "gguf_type=f32")
    parity = _report(out)["parity"]["gguf_f32"]
    assert parity["tokenizer_model"] == "llama"
    assert parity["token_ids_equal"] and parity["greedy_equal"]
    assert parity["max_abs_logit_diff"] < 1e-4


def _lora(base: Path, out: Path, with_base: bool = True) -> Path:
    """A LoRA adapter on `base` with non-zero B (so merging changes the logits)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.save_pretrained(out)
    if not with_base:
        conf = json.loads((out / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = None
        (out / "adapter_config.json").write_text(json.dumps(conf))
    return out


def test_lora_adapter_alone_merges_to_peft_logits(tiny_model_path, tmp_path):
    from peft import PeftModel

    adapter = _lora(tiny_model_path, tmp_path / "adapter")
    out = _export(adapter, tmp_path / "out")
    assert not (out / "adapter_config.json").exists()
    base, tok = _load(tiny_model_path)
    before = _logits(base, tok)
    peft = PeftModel.from_pretrained(base, adapter)
    want = _logits(peft, tok)
    merged, _ = _load(out)
    got = _logits(merged, tok)
    for w, g, b in zip(want, got, before):
        assert torch.allclose(w, g, atol=1e-4)
        assert not torch.allclose(g, b, atol=1e-3)  # the adapter did change the model
    assert _report(out)["parity"]["merge"]["passed"]


def test_adapter_without_a_base_names_what_to_pass(tiny_model_path, tmp_path):
    adapter = _lora(tiny_model_path, tmp_path / "adapter", with_base=False)
    with pytest.raises(ExportError, match=r"model.path=BASE adapter=ADAPTER_DIR"):
        _export(adapter, tmp_path / "out")
    out = _export(tiny_model_path, tmp_path / "out2", f"adapter={adapter}")
    assert _report(out)["parity"]["merge"]["passed"]


def test_prune_keeps_corpus_logits_and_shrinks(sp_model, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS))
    out = _export(sp_model, tmp_path / "out", f"prune_vocab=[{corpus}]")
    src, tok = _load(sp_model)
    new, new_tok = _load(out)
    assert len(new_tok) < len(tok)
    assert new.get_input_embeddings().weight.shape[0] == len(new_tok)
    for t in TEXTS:
        old_ids, new_ids = tok(t)["input_ids"], new_tok(t)["input_ids"]
        assert len(old_ids) == len(new_ids) and new_tok.decode(new_ids) == tok.decode(old_ids)
        keep = [
            tok.convert_tokens_to_ids(new_tok.convert_ids_to_tokens(i)) for i in range(len(new_tok))
        ]
        a = _logits(src, tok, [t])[0][:, keep]
        b = _logits(new, new_tok, [t])[0]
        assert torch.allclose(a, b, atol=1e-5)
    # text outside the corpus still round-trips (bytes are kept)
    assert (
        new_tok.decode(new_tok("鹦鹉 zebra 😀")["input_ids"], skip_special_tokens=True)
        == "鹦鹉 zebra 😀"
    )
    prune = _report(out)["parity"]["prune"]
    assert prune["passed"] and prune["params_removed"] > 0


def test_failed_parity_is_an_error_and_the_run_says_failed(tiny_model_path, tmp_path):
    with pytest.raises(ExportError, match="parity check failed"):
        _export(
            tiny_model_path, tmp_path / "out", "format=gguf", "gguf_type=q8_0", "tolerance=1e-9"
        )
    assert _report(tmp_path / "out")["status"] == "failed"
    out = _export(
        tiny_model_path,
        tmp_path / "out2",
        "format=gguf",
        "gguf_type=q8_0",
        "tolerance=1e-9",
        "parity=warn",
    )
    assert _report(out)["summary"]["parity_failures"]


def test_bad_options_fail_before_loading(tmp_path):
    with pytest.raises(ConfigError, match="must end in .gguf"):
        load_config(
            ExportConfig, None, ["model.path=x", f"output_dir={tmp_path}", "gguf_name=m.bin"]
        )
    with pytest.raises(ConfigError):
        load_config(
            ExportConfig, None, ["model.path=x", f"output_dir={tmp_path}", "gguf_type=q4_k"]
        )


def test_unsupported_architecture_for_gguf_is_named(tmp_path):
    from transformers import GPT2Config

    from hanlm.export.gguf import GGUFExportError, check_architecture

    with pytest.raises(GGUFExportError, match="gpt2|GPT2|Llama"):
        check_architecture(GPT2Config())


def test_source_directory_is_left_untouched(tiny_model_path, tmp_path):
    before = {p.name: p.stat().st_mtime for p in Path(tiny_model_path).iterdir()}
    _export(tiny_model_path, tmp_path / "out", "format=both", "gguf_type=f16")
    assert {p.name: p.stat().st_mtime for p in Path(tiny_model_path).iterdir()} == before
