"""Tools on `/v1/chat/completions` through the official `openai` client, against a live server
around a random tiny model: a forced call (named or `required`) parses and follows its tool's
schema whatever the model samples, streamed and whole responses carry the same calls, a whole
tool loop (call, result, final answer) renders through the chat template, and what a template
cannot render is a 400."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from hanlm.data.tools import function_tool  # noqa: E402

# The calculator takes an integer too, so constrained arguments must carry one.
TOOLS = [
    function_tool("poet_dynasty", "查询诗人所属的朝代", {"poet": "string"}),
    function_tool("calculator", "计算算术表达式", {"expression": "string", "digits": "integer"}),
]
ASK = [{"role": "user", "content": "李白是哪个朝代的？"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def served(tmp_path_factory, serve_random):
    path = tmp_path_factory.mktemp("tools") / "model"
    with serve_random(path, seed=5, max_positions=2048) as out:
        yield out


def _check(calls, allowed):
    assert calls, "no tool call came back"
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert c.function.name in allowed
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_a_named_tool_choice_returns_a_call_that_follows_its_schema(served, temperature):
    client, _ = served
    named = {"type": "function", "function": {"name": "calculator"}}
    r = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice=named,
        temperature=temperature,
        max_tokens=120,
        seed=1,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check(choice.message.tool_calls, {"calculator"})


def test_required_picks_a_declared_tool_and_streaming_carries_the_same_calls(served):
    client, _ = served
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=120)
    whole = client.chat.completions.create(temperature=0, **kw).choices[0]
    assert whole.finish_reason == "tool_calls"
    _check(whole.message.tool_calls, {"poet_dynasty", "calculator"})

    names, args, finish, ids = {}, {}, None, {}
    for chunk in client.chat.completions.create(temperature=0, stream=True, **kw):
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        for tc in c.delta.tool_calls or []:
            if tc.id:
                ids[tc.index] = tc.id
            if tc.function and tc.function.name:
                names[tc.index] = tc.function.name
            if tc.function and tc.function.arguments:
                args[tc.index] = args.get(tc.index, "") + tc.function.arguments
        finish = c.finish_reason or finish
    assert finish == "tool_calls"
    streamed = [(names[i], json.loads(args[i])) for i in sorted(names)]
    want = [(t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls]
    assert streamed == want and all(ids.values())


def test_a_whole_tool_loop_renders_through_the_template(served):
    """Call, result, final answer: the result turn is accepted and reaches the prompt exactly
    as `apply_chat_template(tools=...)` renders the conversation."""
    client, engine = served
    first = client.chat.completions.create(
        model="tiny",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=120,
        temperature=0,
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "唐"},
    ]
    final = client.chat.completions.create(
        model="tiny", messages=messages, tools=TOOLS, max_tokens=8, temperature=0
    )
    assert final.choices[0].finish_reason in ("stop", "length")
    canonical = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": json.loads(call.function.arguments),
                    },
                }
            ],
        },
        {"role": "tool", "content": "唐"},
    ]
    ids = engine.tok.apply_chat_template(
        canonical, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert final.usage.prompt_tokens == len(ids["input_ids"])
    text = engine.tok.decode(ids["input_ids"])
    assert "<tool_response>\n唐\n</tool_response>" in text and "<tools>" in text

    # tool_choice none: the tools stay out of the prompt
    none = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=4, temperature=0
    )
    plain = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=4, temperature=0)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens
    assert not none.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "search"}}}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
        ({"tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions"),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(served, extra, param):
    client, _ = served
    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert e.value.body["param"] == param


def test_a_tool_result_answering_no_call_is_a_400(served):
    client, _ = served
    messages = [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "唐"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=4)
    assert "answers no call" in e.value.body["message"]
