"""`hanlm export` judged by the real llama.cpp (`make llamacpp`): the llama and qwen2 exports at
f32, f16 and q8_0 tokenize, answer greedily and stop in llama-server exactly as transformers on
the source model. The models are tiny ones taught a few answers first: a random tiny model's
logits are near ties everywhere, so its greedy answers flip on any rounding, while a taught one
has clear margins. The test runs llama-server itself (not only reading the command's report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hanlm.config import load_config
from hanlm.export.export import ExportConfig, run
from hanlm.export.llamacpp import LlamaServer, find_llama_cpp
from hanlm.testing import TAUGHT_PROMPTS as PROMPTS

pytestmark = pytest.mark.slow

TEXTS = ["床前明月光，疑是地上霜。", "<|im_start|>user\n你好<|im_end|>\n", "Hello 😀 world\n\n  x"]


@pytest.fixture(scope="module")
def llama_cpp() -> Path:
    found = find_llama_cpp()
    if found is None:
        pytest.skip("llama.cpp is not built: run `make llamacpp` (or set $HANLM_LLAMA_CPP)")
    return found


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def taught(request, tmp_path_factory) -> Path:
    from hanlm.data.templates import apply_template
    from hanlm.modeling import load_tokenizer
    from hanlm.testing import TAUGHT_CHATS, teach, tiny_model_dir, tiny_qwen_dir

    d = tmp_path_factory.mktemp(request.param) / "model"
    if request.param == "llama":
        tiny_model_dir(d)
    else:  # Qwen's own template has no {% generation %} markers for teach's answer-only loss
        tiny_qwen_dir(d, "qwen2")
        tok = load_tokenizer(str(d))
        apply_template(tok, "chatml")
        tok.save_pretrained(d)
    return teach(d, TAUGHT_CHATS, steps=200)


def _hf_greedy(model, tok, ids: list[int], n: int, stops: list[int]) -> tuple[list[int], bool]:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=stops[0],
        )[0, len(ids) :].tolist()
    cut = next((i for i, t in enumerate(out) if t in stops), None)
    return (out, False) if cut is None else (out[:cut], True)


@pytest.mark.parametrize("gtype", ["f32", "f16", "q8_0"])
def test_llama_cpp_matches_transformers(llama_cpp, taught, tmp_path, gtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    overrides = [f"model.path={taught}", f"output_dir={out}", "format=gguf", f"gguf_type={gtype}"]
    cfg = load_config(ExportConfig, None, [*overrides, "judge=llama.cpp", "max_new_tokens=32"])
    cfg.prompts = PROMPTS
    run(cfg)
    report = json.loads((out / "hanlm.json").read_text())
    parity = report["parity"][f"gguf_{gtype}"]
    assert report["summary"]["parity_judge"] == "llama.cpp"
    assert parity["passed"], parity
    assert parity["token_ids_equal"] and parity["greedy_equal"], parity
    assert parity["stops_equal"] == "3/3" and parity["template_equal"] == "4/4", parity

    # independently of the report: llama-server on the written file against transformers
    model = AutoModelForCausalLM.from_pretrained(taught, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(taught)
    stops = report["summary"]["stop_ids"]
    with LlamaServer(llama_cpp, out / f"model-{gtype}.gguf") as server:
        for t in TEXTS:
            assert server.tokenize(t) == tok(t)["input_ids"], t
        for p in PROMPTS:
            chat = [{"role": "user", "content": p}]
            ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_dict=True)
            ids = list(ids["input_ids"])
            want, stopped = _hf_greedy(model, tok, ids, 32, stops)
            got = server.complete(ids, 32)
            assert got["stopped"] == stopped, p
            assert (got["ids"][:-1] if got["stopped"] else got["ids"]) == want, p
        text = server.apply_template([{"role": "user", "content": PROMPTS[0]}])
        assert text == tok.apply_chat_template(
            [{"role": "user", "content": PROMPTS[0]}], tokenize=False, add_generation_prompt=True
        )
