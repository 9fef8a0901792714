"""serve/tool_choice.py on its own: tool settings, calls out of the model's text, streaming them."""

import json

import jsonschema
import pytest

from hanlm.serve.errors import APIError
from hanlm.serve.tool_choice import CallStream, call_deltas, call_schema, parse_tools, split_answer

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "calculator",
            "description": "计算",
            "parameters": {
                "type": "object",
                "properties": {"expression": {"type": "string"}},
                "required": ["expression"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "poet_dynasty",
            "parameters": {
                "type": "object",
                "properties": {"poet": {"type": "string"}},
                "required": ["poet"],
            },
        },
    },
]
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>'


@pytest.mark.parametrize(
    "body,param,text",
    [
        ({"tools": [{"type": "function"}]}, "tools", "tools[0]"),
        ({"tools": TOOLS, "tool_choice": "always"}, "tool_choice", "must be"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
            "'x'",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs 'tools'"),
        ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ],
)
def test_bad_tool_settings_are_400s_naming_the_field(body, param, text):
    with pytest.raises(APIError) as e:
        parse_tools(body)
    assert e.value.param == param and text in str(e.value)


def test_choices():
    assert parse_tools({}) is None
    assert parse_tools({"tools": TOOLS}).choice == "auto"
    none = parse_tools({"tools": TOOLS, "tool_choice": "none"})
    assert none.prompt_tools is None and not none.forced
    named = parse_tools(
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "poet_dynasty"}}}
    )
    assert named.forced and named.name == "poet_dynasty"


def test_calls_come_back_as_openai_tool_calls_and_malformed_ones_as_text():
    req = parse_tools({"tools": TOOLS})
    content, calls = split_answer("好的。\n" + CALL + "\n" + CALL, req)
    assert content == "好的。" and len(calls) == 2
    assert calls[0]["id"] != calls[1]["id"] and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["function"]["arguments"]) == {"expression": "1+2"}
    assert (
        len(
            split_answer(CALL + CALL, parse_tools({"tools": TOOLS, "parallel_tool_calls": False}))[
                1
            ]
        )
        == 1
    )
    for bad in (
        "<tool_call>\n{oops}\n</tool_call>",
        CALL.replace("calculator", "search"),
        CALL[:-3],
    ):
        assert split_answer(bad, req) == (bad, [])
    assert split_answer(CALL, parse_tools({"tools": TOOLS, "tool_choice": "none"})) == (CALL, [])


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_a_streamed_answer_sends_text_before_the_call_and_holds_the_call(cut):
    req = parse_tools({"tools": TOOLS})
    text = "先算一下 <tool 不是调用 < " + CALL
    pieces = [text[i : i + cut] for i in range(0, len(text), cut)]
    stream = CallStream(req)
    sent = "".join(stream.feed(p) for p in pieces)
    rest, calls = stream.finish()
    assert sent + rest == "先算一下 <tool 不是调用 < " and len(calls) == 1
    whole = split_answer(text, req)[1]
    assert [c["function"] for c in calls] == [c["function"] for c in whole]
    deltas = call_deltas(calls)
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "calculator", "arguments": ""}
    assert json.loads(deltas[1]["tool_calls"][0]["function"]["arguments"]) == {"expression": "1+2"}
    # a malformed call is sent as text at the end
    stream = CallStream(req)
    sent = "".join(stream.feed(p) for p in ["x ", "<tool_call>{bad"])
    assert sent + stream.finish()[0] == "x <tool_call>{bad"


@pytest.mark.parametrize("cut", [1, 4, 100])
def test_a_bare_call_json_is_a_call_whole_and_streamed_and_other_json_stays_text(cut):
    """An answer that is only a declared tool's call JSON, without the tags (what
    Qwen2.5-Coder-0.5B-Instruct writes), is that call; streamed, an answer that starts like
    JSON is held to the end, then sent as text when it is not a call."""
    req = parse_tools({"tools": TOOLS})
    bare = ' {"name": "calculator", "arguments": {"expression": "1+2"}}'
    content, calls = split_answer(bare, req)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {
        "expression": "1+2"
    }
    for text, n in ((bare, 1), ('{"answer": 3}', 0), ("3。", 0), ("\n\n3。", 0)):
        stream = CallStream(req)
        sent = "".join(stream.feed(text[i : i + cut]) for i in range(0, len(text), cut))
        rest, got = stream.finish()
        assert len(got) == n
        assert sent + rest == ("" if n else text)
    no_tools = parse_tools({"tools": TOOLS, "tool_choice": "none"})
    assert split_answer(bare, no_tools) == (bare, [])


def test_the_forced_call_schema_admits_exactly_the_allowed_calls():
    named = parse_tools(
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "poet_dynasty"}}}
    )
    schema = call_schema(named)
    jsonschema.validate({"name": "poet_dynasty", "arguments": {"poet": "李白"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "calculator", "arguments": {"expression": "1"}}, schema)
    anyof = call_schema(parse_tools({"tools": TOOLS, "tool_choice": "required"}))
    jsonschema.validate({"name": "calculator", "arguments": {"expression": "1"}}, anyof)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "calculator", "arguments": {"poet": "1"}}, anyof)
