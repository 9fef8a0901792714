"""`response_format` (json_object, json_schema) against a live server around a random tiny
model: whatever it samples, the answer parses and validates, whole and streamed, within
`max_tokens` (the grammar closes the JSON as the budget runs out); and the constraint's logits
processor on a plain `model.generate`, as a forced tool call will use it."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

CHAT = [{"role": "user", "content": "用 JSON 介绍一位诗人"}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "dynasty": {"enum": ["唐", "宋", "元"]},
        "famous": {"type": "boolean"},
        "works": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "dynasty", "famous", "works"],
    "additionalProperties": False,
}
FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "poet", "schema": SCHEMA, "strict": True},
}


@pytest.fixture(scope="module")
def random_live(tmp_path_factory, serve_random):
    """A random (untrained) tiny model served with continuous batching."""
    with serve_random(tmp_path_factory.mktemp("json") / "model", seed=3) as out:
        yield out


def _valid(text: str, schema: dict | None) -> dict:
    value = json.loads(text)
    assert isinstance(value, dict)
    if schema is not None:
        jsonschema.validate(value, schema)
    return value


def test_a_random_model_answers_schema_valid_json_whole_and_streamed(random_live):
    client, _ = random_live
    seen = set()
    for seed, temperature, max_tokens in ((1, 1.0, 80), (2, 1.5, 120), (3, 0.0, 80)):
        r = client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            response_format=FORMAT,
            temperature=temperature,
            seed=seed,
            n=2,
            max_tokens=max_tokens,
        )
        for choice in r.choices:
            seen.add(_valid(choice.message.content, SCHEMA)["dynasty"])
            assert choice.finish_reason == "stop"
        assert r.usage.completion_tokens <= 2 * max_tokens
        stream = client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            response_format=FORMAT,
            temperature=temperature,
            max_tokens=max_tokens,
            stream=True,
        )
        chunks = [c for c in stream if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        _valid(text, SCHEMA)
        assert chunks[-1].choices[0].finish_reason == "stop"
    assert seen <= {"唐", "宋", "元"}


def test_json_object_is_any_json_object(random_live):
    client, _ = random_live
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            response_format={"type": "json_object"},
            temperature=1.0,
            seed=seed,
            max_tokens=40,
        )
        _valid(r.choices[0].message.content, None)
    plain = client.chat.completions.create(
        model="tiny", messages=CHAT, response_format={"type": "text"}, max_tokens=20, seed=0
    )
    with pytest.raises(ValueError):  # text: unconstrained (a random model writes no JSON)
        json.loads(plain.choices[0].message.content)


def test_a_budget_too_small_for_the_json_is_cut_with_finish_reason_length(random_live):
    """As OpenAI does: the content is the JSON so far, and finish_reason says it was cut."""
    client, _ = random_live
    r = client.chat.completions.create(
        model="tiny", messages=CHAT, response_format=FORMAT, temperature=1.0, seed=1, max_tokens=6
    )
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 6
    assert choice.message.content.startswith("{")
    with pytest.raises(ValueError):
        json.loads(choice.message.content)


def test_a_bad_schema_is_400_naming_it(random_live):
    client, _ = random_live
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=CHAT, response_format=bad, max_tokens=5
        )
    assert e.value.body["param"] == "response_format.json_schema.schema"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny",
            messages=CHAT,
            response_format={"type": "json_schema", "json_schema": {"name": "bad name!"}},
            max_tokens=5,
        )
    assert e.value.body["param"] == "response_format.json_schema.name"


def test_the_processor_on_generate_with_text_around_the_json(random_live):
    """`json_schema_processor` on a plain `generate`, with literal text before and after the
    JSON (a Hermes-style `<tool_call>` wrapper), several rows sampled at once."""
    import torch

    from hanlm.data.templates import prompt_ids
    from hanlm.serve.constrain import Grammars

    _, engine = random_live
    tool = {
        "type": "object",
        "properties": {"name": {"const": "lookup"}, "arguments": SCHEMA},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }
    grammars = Grammars(engine.tok, engine.stop_ids, engine.logits_width)
    constraint = grammars.constraint(tool, prefix="<tool_call>\n", suffix="\n</tool_call>")
    ids = torch.tensor([prompt_ids(engine.tok, CHAT)] * 3)
    torch.manual_seed(0)
    out = engine.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        logits_processor=[constraint.processor(3, 200, ids.shape[1])],
        max_new_tokens=200,  # the shortest such call is 108 tokens of the tiny vocabulary
        do_sample=True,
        temperature=1.0,
        eos_token_id=engine.stop_ids,
        pad_token_id=engine.pad_id,
    )
    for row in out[:, ids.shape[1] :]:
        text = engine.tok.decode(row, skip_special_tokens=True)
        assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
        call = _valid(text[len("<tool_call>\n") : -len("\n</tool_call>")], tool)
        assert call["name"] == "lookup"


def test_constrained_requests_run_on_generate_and_plain_ones_still_batch(random_live):
    from hanlm.serve.sampling import Sampling

    _, engine = random_live

    assert engine.route(Sampling(max_tokens=5, temperature=0.7)) == "batch"
    assert engine.route(Sampling(max_tokens=5, constraint=object())) == "generate"


def test_json_schema_processor_on_a_qwen_layout_model(tmp_path):
    """The public function on a random Qwen2 model with a Qwen-like tokenizer (special tokens
    after the vocabulary, `<|im_end|>` ends the turn): every sampled row validates."""
    import torch
    from transformers import AutoModelForCausalLM

    from hanlm.data.templates import prompt_ids, stop_token_ids
    from hanlm.modeling import load_tokenizer
    from hanlm.serve.constrain import json_schema_processor
    from hanlm.testing import tiny_qwen_dir

    path = tiny_qwen_dir(tmp_path / "qwen")
    tok, model = load_tokenizer(str(path)), AutoModelForCausalLM.from_pretrained(path).eval()
    stops = stop_token_ids(tok)
    ids = torch.tensor([prompt_ids(tok, CHAT)] * 4)
    width = model.get_output_embeddings().weight.shape[0]
    proc = json_schema_processor(tok, SCHEMA, stops, width, 90, ids.shape[1], rows=4)
    torch.manual_seed(1)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        logits_processor=[proc],
        max_new_tokens=90,
        do_sample=True,
        temperature=1.3,
        eos_token_id=stops,
        pad_token_id=tok.pad_token_id,
    )
    for row in out[:, ids.shape[1] :]:
        assert int(row[row != tok.pad_token_id][-1]) in stops  # ended on its own
        _valid(tok.decode(row, skip_special_tokens=True), SCHEMA)
