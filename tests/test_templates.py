"""Every chat template: render() equals apply_chat_template, labels cover exactly the answers."""

import pytest

from hanlm import IGNORE_INDEX
from hanlm.data.templates import (
    TEMPLATES,
    TemplateError,
    apply_template,
    prompt_ids,
    render,
    stop_token_ids,
)
from hanlm.testing import qwen_tokenizer, tiny_tokenizer

CONV = [
    {"role": "system", "content": "你是一位诗人。"},
    {"role": "user", "content": "写一句关于月亮的诗"},
    {"role": "assistant", "content": "床前明月光，疑是地上霜。"},
    {"role": "user", "content": "And in English? 🌙"},
    {"role": "assistant", "content": "Moonlight before my bed."},
]


@pytest.fixture(scope="module", params=list(TEMPLATES))
def tok(request):
    return tiny_tokenizer(template=request.param), request.param


def _spans(labels):
    """Contiguous runs of labelled positions."""
    runs, cur = [], []
    for i, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


@pytest.mark.parametrize(
    "conv", [CONV, CONV[1:], CONV[1:3]], ids=["system+2turns", "2turns", "1turn"]
)
def test_render_matches_apply_chat_template_and_labels_only_answers(tok, conv):
    tok, name = tok
    ids, labels = render(tok, conv)
    assert ids == tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    assert len(labels) == len(ids)
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    spans = _spans(labels)
    assert len(spans) == len(answers), "one labelled span per assistant turn"
    eot = tok.convert_ids_to_tokens(stop_token_ids(tok, name)[0])
    for span, answer in zip(spans, answers):
        assert [labels[i] for i in span] == [ids[i] for i in span]
        text = tok.decode([ids[i] for i in span])
        assert text.strip() == answer + eot, (name, text)
    # nothing of the system or user turns is labelled
    labelled = tok.decode([t for t in labels if t != IGNORE_INDEX])
    assert "诗人" not in labelled and "English" not in labelled


def test_generation_prompt_is_the_prefix_training_saw(tok):
    tok, _ = tok
    prompt = render(tok, CONV[1:2], add_generation_prompt=True)[0]
    full = render(tok, CONV[1:3])[0]
    assert full[: len(prompt)] == prompt


def test_unknown_template_and_broken_markers():
    t = tiny_tokenizer()
    with pytest.raises(TemplateError, match="unknown chat template 'vicuna'"):
        apply_template(t, "vicuna")
    t.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% generation %}{% endgeneration %}{% endfor %}"
    )
    with pytest.raises(TemplateError, match="mark no tokens"):
        render(t, CONV[1:3])


# SmolLM2-Instruct's own template (ChatML, a default system prompt, no generation markers).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging"
    " Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' +"
    " message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma-like turns: the end of turn is a token of its own, not EOS.
GEMMA = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\n'"
    " + m['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def _own(template, extra=()):
    t = tiny_tokenizer()
    if extra:
        t.add_special_tokens({"additional_special_tokens": list(extra)})
    t.chat_template = template
    return t


@pytest.mark.parametrize(
    "make",
    [
        lambda: qwen_tokenizer(),
        lambda: _own(SMOLLM2),
        lambda: _own(GEMMA, ("<start_of_turn>", "<end_of_turn>")),
    ],
    ids=["qwen2.5", "smollm2", "gemma-like"],
)
@pytest.mark.parametrize("conv", [CONV, CONV[1:], CONV[1:3]], ids=["system", "2turns", "1turn"])
def test_a_models_own_unmarked_template_trains_as_it_is(make, conv):
    """`auto` keeps the template; ids equal apply_chat_template's; labels are the answers and
    the end-of-turn token the template writes after them (not EOS unless it is the same)."""
    tok = make()
    own = tok.chat_template
    assert apply_template(tok, "auto") == [] and tok.chat_template == own
    ids, labels = render(tok, conv)
    assert ids == tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
    eot = tok.convert_ids_to_tokens(stop_token_ids(tok)[0])
    assert eot == ("<end_of_turn>" if "<end_of_turn>" in own else "<|im_end|>")
    answers = [m["content"] for m in conv if m["role"] == "assistant"]
    spans = _spans(labels)
    assert [tok.decode([ids[i] for i in s]) for s in spans] == [a + eot for a in answers]
    # the prompt generation starts from is the prefix training saw, default system prompt included
    prompt = prompt_ids(tok, conv[:-1])
    assert ids[: len(prompt)] == prompt
    assert (
        prompt
        == tok.apply_chat_template(
            conv[:-1], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )


def test_a_template_that_rewrites_earlier_turns_is_refused():
    # drops earlier answers' reasoning, as Qwen3's template does: prefixes are not stable
    t = _own(
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'].split('</think>')[-1] }}"
        "{% else %}{{ m['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    conv = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "<think>easy</think>2"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    with pytest.raises(TemplateError, match="renders turn 2 differently"):
        render(t, conv)
    assert render(t, conv[:2])[0]  # one turn is fine


def test_naming_a_template_replaces_the_own_one_and_says_how_prompts_change(capsys):
    t = qwen_tokenizer()
    assert apply_template(t, "chatml") == []
    assert t.chat_template == TEMPLATES["chatml"].jinja
    err = capsys.readouterr().err
    assert "replaces the model's own chat template" in err and "You are Qwen" in err
    # a model whose own template renders the same text gets no note
    t2 = _own(
        TEMPLATES["chatml"].jinja.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    )
    apply_template(t2, "chatml")
    assert "replaces" not in capsys.readouterr().err


def test_a_tokenizer_without_a_template_gets_chatml():
    t = tiny_tokenizer()
    t.chat_template = None
    apply_template(t, "auto")
    assert t.chat_template == TEMPLATES["chatml"].jinja


def test_config_template_names_match_the_table():
    from hanlm.data.templates import TEMPLATE_NAMES

    assert sorted(TEMPLATE_NAMES) == sorted(("auto", *TEMPLATES))


@pytest.mark.parametrize("command", ["serve", "dpo"])
def test_a_model_without_a_chat_template_is_named_with_what_to_do(tmp_path, capsys, command):
    """A tokenizer with no chat template and without ChatML's special tokens cannot be served or
    aligned as a chat model: a clear error naming the model directory and the fix, no traceback,
    no model written."""
    from hanlm.modeling import build_model, save_model
    from hanlm.pipeline import cli

    tok = tiny_tokenizer(template="alpaca")  # adds no special tokens
    tok.chat_template = None
    assert "<|im_start|>" not in tok.get_vocab()
    model = build_model("test", vocab_size=len(tok), max_positions=64)
    d = save_model(model, tok, tmp_path / "base")
    out = tmp_path / "out"
    where = [f"output_dir={out}"] if command == "dpo" else []
    assert cli.main([command, f"model.path={d}", *where]) != 0
    err = capsys.readouterr().err
    assert f"{d}: the tokenizer has no chat template and lacks the chatml chat template's" in err
    assert "tune this one first (hanlm sft template=chatml)" in err and "Traceback" not in err
    assert not list(out.glob("*.safetensors"))
