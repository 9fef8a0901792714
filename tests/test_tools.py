"""Tool calls in data and templates: every format reads to one shape, bad calls name the turn,
templates render tools as Qwen does, and the loss covers calls but never tool results."""

import json

import pytest

from hanlm import IGNORE_INDEX
from hanlm.data.formats import RecordError, convert
from hanlm.data.templates import TemplateError, apply_template, render
from hanlm.data.tools import parse_tool_calls
from hanlm.testing import QWEN_TEMPLATE, TOOLS, qwen_tokenizer, tiny_tokenizer

OPENAI = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "你是一个助手。"},
        {"role": "user", "content": "李白是哪个朝代的？"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "poet_dynasty", "arguments": '{"poet": "李白"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "唐"},
        {"role": "assistant", "content": "李白是唐代诗人。"},
    ],
}
SHAREGPT = {  # LLaMA-Factory's layout: tools as a JSON string, the call as JSON text
    "system": "你是一个助手。",
    "tools": json.dumps([t["function"] for t in TOOLS], ensure_ascii=False),
    "conversations": [
        {"from": "human", "value": "李白是哪个朝代的？"},
        {
            "from": "function_call",
            "value": '{"name": "poet_dynasty", "arguments": {"poet": "李白"}}',
        },
        {"from": "observation", "value": "唐"},
        {"from": "gpt", "value": "李白是唐代诗人。"},
    ],
}


def test_openai_and_sharegpt_tool_records_read_to_the_same_shape():
    a, b = convert(OPENAI, "messages"), convert(SHAREGPT, "sharegpt")
    assert a["tools"] == b["tools"] == TOOLS
    call = a["messages"][2]["tool_calls"][0]
    assert call["function"] == {"name": "poet_dynasty", "arguments": {"poet": "李白"}}
    assert a["messages"][2]["content"] == ""
    assert a["messages"][3] == {"role": "tool", "content": "唐", "tool_call_id": "call_1"}
    assert b["messages"][2]["tool_calls"][0]["function"] == call["function"]
    assert b["messages"][3]["tool_call_id"] == b["messages"][2]["tool_calls"][0]["id"]


def _with(change):
    rec = json.loads(json.dumps(OPENAI))
    change(rec)
    return rec


@pytest.mark.parametrize(
    "change,error",
    [
        (
            lambda r: r.pop("tools"),
            r"messages\[2\]: calls 'poet_dynasty', which the record's tools",
        ),
        (
            lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{poet: 李白"),
            r"messages\[2\]\.tool_calls\[0\]\.arguments: not valid JSON",
        ),
        (
            lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments='{"who": 1}'),
            r"messages\[2\]: arguments of 'poet_dynasty' do not match its schema: 'poet' is a required",
        ),
        (
            lambda r: r["messages"].pop(3),
            r"messages\[3\]: call\(s\) \['call_1'\] before it have no",
        ),
        (
            lambda r: r["messages"][3].update(tool_call_id="call_9"),
            r"messages\[3\]: tool_call_id 'call_9' answers no open call",
        ),
        (lambda r: r["messages"].pop(2), r"messages\[2\]: a tool result that answers no call"),
        (lambda r: r.update(tools=[{"description": "x"}]), r"tools\[0\]: expected"),
    ],
    ids=["undeclared", "bad-json", "schema", "no-result", "wrong-id", "orphan-result", "bad-tool"],
)
def test_bad_tool_use_names_the_turn(change, error):
    with pytest.raises(RecordError, match=error):
        convert(_with(change), "messages")


def test_data_check_names_the_file_and_line(tmp_path):
    from hanlm.config import DataConfig
    from hanlm.data.loader import DataError, load

    path = tmp_path / "tools.jsonl"
    bad = _with(lambda r: r.pop("tools"))
    path.write_text(json.dumps(OPENAI, ensure_ascii=False) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(DataError, match=r"tools.jsonl:2.*calls 'poet_dynasty'"):
        load(DataConfig(paths=[str(path)], valid_fraction=0.0), kind="chat")


def _spans_text(tok, ids, labels):
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


CALL_TEXT = '<tool_call>\n{"name": "poet_dynasty", "arguments": {"poet": "李白"}}\n</tool_call>'


@pytest.mark.parametrize("template", ["chatml", "qwen2.5-own"])
def test_tool_calls_are_learned_and_tool_results_are_not(template):
    rec = convert(OPENAI, "messages")
    tok = qwen_tokenizer()
    if template == "chatml":
        apply_template(tok, "chatml")
    ids, labels = render(tok, rec["messages"], tools=rec["tools"])
    want = tok.apply_chat_template(
        rec["messages"], tools=rec["tools"], tokenize=True, return_dict=True
    )
    assert ids == want["input_ids"]
    assert _spans_text(tok, ids, labels) == [CALL_TEXT + "<|im_end|>", "李白是唐代诗人。<|im_end|>"]
    text = tok.decode(ids)
    assert "<tool_response>\n唐\n</tool_response>" in text and '"name": "calculator"' in text


def test_hanlm_chatml_renders_tools_exactly_as_qwen25():
    """With a system turn (Qwen's only difference is its default system prompt without one)."""
    rec = convert(OPENAI, "messages")
    tok = qwen_tokenizer()
    multi = [
        *rec["messages"][:2],
        {
            **rec["messages"][2],
            "content": "我来查一下。",
            "tool_calls": rec["messages"][2]["tool_calls"] * 2,
        },
        rec["messages"][3],
        {**rec["messages"][3], "content": "唐朝"},
        rec["messages"][4],
    ]
    for messages in (rec["messages"], multi):
        for gen in (False, True):
            tok.chat_template = QWEN_TEMPLATE
            want = tok.apply_chat_template(
                messages, tools=TOOLS, tokenize=False, add_generation_prompt=gen
            )
            apply_template(tok, "chatml")
            got = tok.apply_chat_template(
                messages, tools=TOOLS, tokenize=False, add_generation_prompt=gen
            )
            assert got == want


def test_a_template_without_tool_support_is_refused():
    tok = tiny_tokenizer(template="llama3")
    rec = convert(OPENAI, "messages")
    with pytest.raises(TemplateError, match="does not render tools"):
        render(tok, rec["messages"][:2], tools=rec["tools"])


@pytest.mark.parametrize(
    "text, calls",
    [
        ('{"name": "poet_dynasty", "arguments": {"poet": "李白"}}', 1),  # Qwen2.5-Coder-0.5B's way
        ('```json\n{"name": "poet_dynasty", "arguments": {"poet": "李白"}}\n```', 1),
        ('  {"name": "poet_dynasty", "parameters": "{\\"poet\\": \\"李白\\"}"}\n', 1),
        (
            '[{"name": "poet_dynasty", "arguments": {"poet": "李白"}},'
            ' {"name": "calculator", "arguments": {"expression": "1"}}]',
            2,
        ),
        ('{"name": "search", "arguments": {"q": "李白"}}', 0),  # not a declared tool
        ('{"name": "poet_dynasty", "arguments": {"poet": "李白"}, "age": 61}', 0),  # other keys
        ('{"name": "poet_dynasty", "arguments": ["李白"]}', 0),  # arguments not an object
        ('他是唐朝人。{"name": "poet_dynasty", "arguments": {"poet": "李白"}}', 0),  # prose first
        ('{"name": "poet_dynasty", "arguments": {"poet": "李白"}', 0),  # cut short
        ("[]", 0),
    ],
)
def test_an_answer_that_is_only_a_declared_tools_call_json_is_that_call(text, calls):
    """Without the `<tool_call>` tags, an answer counts as calls only when it is nothing but
    calls of declared tools; anything else stays text (no problem reported)."""
    names = {"poet_dynasty", "calculator"}
    content, got, problems = parse_tool_calls(text, names)
    assert len(got) == calls and not problems
    if calls:
        assert content == "" and got[0] == {"name": "poet_dynasty", "arguments": {"poet": "李白"}}
    assert parse_tool_calls(text)[1] == []  # no declared tools: never a bare call


def test_parse_tool_calls_reads_back_what_the_template_writes():
    content, calls, problems = parse_tool_calls("我来查一下。\n" + CALL_TEXT + "\n" + CALL_TEXT)
    assert content == "我来查一下。" and not problems
    assert calls == [{"name": "poet_dynasty", "arguments": {"poet": "李白"}}] * 2
    _, calls, problems = parse_tool_calls("<tool_call>\n{name: x}\n</tool_call>")
    assert calls == [] and "not JSON" in problems[0]
    _, calls, problems = parse_tool_calls('<tool_call>\n{"name": "x", "arguments": {}}')
    assert calls == [] and "not closed" in problems[0]


def test_generate_refuses_tool_lists_that_do_not_match_the_conversations():
    from hanlm.generation import GenerationOptions, generate

    ask = [[{"role": "user", "content": "李白是哪个朝代的？"}]]
    with pytest.raises(ValueError, match="2 tool lists for 1 conversations"):
        generate(None, None, ask, GenerationOptions(), tools_each=[TOOLS, None])
    with pytest.raises(ValueError, match="give one or the other"):
        generate(None, None, ask, GenerationOptions(), tools=TOOLS, tools_each=[TOOLS])


def test_held_out_answers_declare_each_records_tools(tmp_path):
    """SFT's held-out answers (before and after training) are asked with the tools their record
    declares, as the model was trained: a tiny Qwen model taught to answer one way with the
    tools declared and another without gives each record its own answer."""
    from hanlm.config import ModelConfig
    from hanlm.generation import GenerationOptions
    from hanlm.modeling import load_model, load_tokenizer
    from hanlm.testing import teach, tiny_qwen_dir
    from hanlm.train.sft import held_out_answers

    ask = [{"role": "user", "content": "李白是哪个朝代的？"}]
    with_tools = {"messages": [*ask, {"role": "assistant", "content": "查工具。"}], "tools": TOOLS}
    without = {"messages": [*ask, {"role": "assistant", "content": "唐朝。"}]}
    path = teach(tiny_qwen_dir(tmp_path / "qwen"), [with_tools, without], steps=200)
    model = load_model(ModelConfig(path=str(path), dtype="float32"))
    opts = GenerationOptions(max_new_tokens=16, temperature=0)
    got = held_out_answers(model, load_tokenizer(str(path)), [with_tools, without], opts)
    assert [a["text"] for a in got] == ["查工具。", "唐朝。"]
    assert [a["reference"] for a in got] == ["查工具。", "唐朝。"]
