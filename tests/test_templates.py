"""Every chat template: render() equals apply_chat_template, labels cover exactly the answers."""

import pytest

from hanlm import IGNORE_INDEX
from hanlm.data.templates import TEMPLATES, TemplateError, apply_template, render, stop_token_ids
from hanlm.testing import tiny_tokenizer

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


def test_unknown_template_and_missing_markers():
    t = tiny_tokenizer()
    with pytest.raises(TemplateError, match="unknown chat template 'vicuna'"):
        apply_template(t, "vicuna")
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(TemplateError, match="no chat template hanlm recognises"):
        apply_template(t, "auto")
    with pytest.raises(TemplateError, match="generation"):
        render(t, CONV[1:3])


def test_auto_keeps_a_marked_template_and_upgrades_a_known_unmarked_one():
    t = tiny_tokenizer(template="llama3")
    marked = t.chat_template
    assert apply_template(t, "auto") == [] and t.chat_template == marked
    t.chat_template = "{{ '<|im_start|>' }}"  # e.g. SmolLM2's own ChatML template, no markers
    apply_template(t, "auto")
    assert t.chat_template == TEMPLATES["chatml"].jinja


def test_config_template_names_match_the_table():
    from hanlm.data.templates import TEMPLATE_NAMES

    assert sorted(TEMPLATE_NAMES) == sorted(("auto", *TEMPLATES))
