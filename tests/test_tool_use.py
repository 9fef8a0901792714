"""The embedded tool-use set and its measure: the demo tools compute and look up correctly (no
eval, misses and errors a model can relay), the shipped set is what its builder writes, loads
through hanlm's checks and holds out its test items, and `hanlm eval tools=` counts right (a
scripted model) and runs end to end on a tiny model trained on tool records."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hanlm import ASSETS
from hanlm.config import DataConfig, load_config
from hanlm.data import load
from hanlm.datagen import demo_tools as T
from hanlm.eval.tool_use import measure_tool_use, read_tool_set
from hanlm.pipeline import cli
from hanlm.runs import read_run
from hanlm.train.sft import SFTConfig, run

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "valid", "test")


def records(split: str) -> list[dict]:
    with gzip.open(ASSETS / f"tools.{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# --------------------------------------------------------------------------- tools


@pytest.mark.parametrize(
    ("expr", "want"),
    [
        ("1+2*3", "7"),
        ("(1+2)*3", "9"),
        ("2**10", "1024"),
        ("-3+5", "2"),
        ("7/2", "3.5"),
        ("1/3", "0.333333"),
        ("2/3", "0.666667"),
        ("0.1+0.2", "0.3"),  # exact: no 0.30000000000000004
        ("2**-2", "0.25"),
        ("１２×３", "36"),  # full-width digits and ×
        ("（1＋2）÷3", "1"),
        ("2^3", "8"),
        ("  6 / 3 ", "2"),
    ],
)
def test_calculator_values(expr, want):
    assert T.calculator(expr) == {"expression": expr.strip(), "result": want}


@pytest.mark.parametrize(
    ("expr", "error"),
    [
        ("1/0", "除数不能为零"),
        ("5/(2-2)", "除数不能为零"),
        ("0**-1", "除数不能为零"),
        ("2**1000", "指数不能超过 64"),
        ("2**0.5", "指数必须是整数"),
        ("10**20*10**20", "数太大"),
        ("1e400", "数太大"),
        ("", "算式是空的"),
        ("1+", "算式写得不对"),
        ("__import__('os').system('echo no')", "只能计算数字、+ - * / ** 和括号"),
        ("abs(-1)", "只能计算数字、+ - * / ** 和括号"),
        ("x+1", "只能计算数字、+ - * / ** 和括号"),
        ("True+1", "只能计算数字、+ - * / ** 和括号"),
        ("7//2", "只能计算数字、+ - * / ** 和括号"),
        ("1" * 201, "算式太长（最多 200 个字符）"),
    ],
)
def test_calculator_refuses_with_a_reason(expr, error):
    assert T.calculator(expr) == {"error": error}


@pytest.fixture
def db():
    return T.Database(
        {
            "poems": [
                {
                    "key": "k1",
                    "title": "静夜思",
                    "author": "李白",
                    "lines": ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。"],
                }
            ],
            "idioms": {"画蛇添足": "比喻做了多余的事，反而不恰当。"},
            "poets": {"李白": ["唐"], "王维": ["唐", "宋"]},
        }
    )


def test_lookups_hit_miss_and_relay(db):
    assert T.execute("next_line", {"line": "床前明月光"}, db) == {
        "line": "床前明月光",
        "next": "疑是地上霜",
        "title": "静夜思",
        "author": "李白",
    }
    assert T.next_line(db, "「疑是地上霜。」")["next"] == "举头望明月"  # across lines, quoted
    assert T.next_line(db, "床前明月光，疑是地上霜")["next"] == "举头望明月"  # its last clause
    assert T.next_line(db, "低头思故乡") == {"error": "「低头思故乡」是李白《静夜思》的最后一句"}
    assert T.next_line(db, "春眠不觉晓") == {"error": "没有查到「春眠不觉晓」"}
    assert T.execute("idiom_meaning", {"idiom": "「画蛇添足」"}, db)["meaning"].startswith("比喻")
    assert T.execute("idiom_meaning", {"idiom": "守株待兔"}, db) == {
        "error": "没有查到「守株待兔」"
    }
    assert T.execute("poet_dynasty", {"poet": " 李白 "}, db) == {"poet": "李白", "dynasty": "唐"}
    assert T.execute("poet_dynasty", {"poet": "王维"}, db)["dynasty"] == "唐、宋"
    assert T.execute("poet_dynasty", {"poet": "杜甫"}, db) == {"error": "没有查到「杜甫」"}
    assert T.execute("search", {"q": "x"}, db) == {"error": "没有这个工具：search"}
    bad = {"error": "poet_dynasty 需要一个字符串参数 poet"}
    assert T.execute("poet_dynasty", {"poet": 1}, db) == bad
    assert T.execute("poet_dynasty", {"poet": "李白", "x": 1}, db) == bad
    assert T.result_key(T.calculator("6*7")) == "42"
    assert T.result_key(T.next_line(db, "床前明月光")) == "疑是地上霜"


# --------------------------------------------------------------------------- the data


def test_shipped_set_is_what_the_builder_writes(tmp_path):
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "build_tool_data.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    for name in [f"tools.{s}.jsonl.gz" for s in SPLITS] + ["tools_db.json.gz"]:
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name
    manifest = json.loads((ASSETS / "manifest.json").read_text("utf-8"))["tools"]["files"]
    for s in SPLITS:
        assert manifest[f"tools.{s}.jsonl.gz"]["records"] == len(records(s))


@pytest.mark.parametrize("split", SPLITS)
def test_records_load_through_the_checks_and_results_come_from_the_tools(split):
    recs = records(split)
    loaded = load(
        DataConfig(paths=[str(ASSETS / f"tools.{split}.jsonl.gz")], dedup="none"),
        kind="chat",
        split=False,
    ).train
    assert len(loaded) == len(recs)
    tasks = set()
    for r in recs:
        assert r["tools"] == T.TOOLS and r["meta"]["derived"] is True
        tasks.add(r["meta"]["task"])
        calls = [c for m in r["messages"] for c in m.get("tool_calls", ())]
        assert [c["function"]["name"] for c in calls] == r["meta"]["tools_used"]
        results = {m["tool_call_id"]: m["content"] for m in r["messages"] if m["role"] == "tool"}
        final = r["messages"][-1]
        assert final["role"] == "assistant" and final["content"] and not final.get("tool_calls")
        for c in calls:  # each result is the tool's own output, and the answer relays it
            res = T.execute(c["function"]["name"], c["function"]["arguments"])
            assert results[c["id"]] == T.result_text(res)
            assert T.result_key(res) in final["content"]
    assert tasks == {"next_line", "idiom_meaning", "poet_dynasty", "calculator"} | {
        "two_calls",
        "miss",
        "no_tool",
    }


def test_test_split_is_held_out():
    keys = {s: {k for r in records(s) for k in r["meta"]["source_keys"]} for s in SPLITS}
    assert not keys["test"] & (keys["train"] | keys["valid"])
    held = set(json.loads((ASSETS / "manifest.json").read_text("utf-8"))["held_out_source_keys"])
    assert not held & (keys["train"] | keys["valid"] | keys["test"])
    assert 150 <= len(records("test")) <= 250 and len(records("train")) >= 2000
    size = sum((ASSETS / f"tools.{s}.jsonl.gz").stat().st_size for s in SPLITS)
    assert size + (ASSETS / "tools_db.json.gz").stat().st_size < 700_000


# --------------------------------------------------------------------------- the measure


def _rec(question, calls, results, final, tools=T.TOOLS):
    msgs = [{"role": "user", "content": question}]
    if calls:
        msgs.append(
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
                    for i, (n, a) in enumerate(calls)
                ],
            }
        )
        for i, res in enumerate(results):
            msgs.append({"role": "tool", "content": T.result_text(res), "tool_call_id": f"c{i}"})
    msgs.append({"role": "assistant", "content": final})
    return {"messages": msgs, "tools": tools}


def _call(name, **args):
    return f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args)}}}\n</tool_call>'


def test_measure_counts_exactly_with_a_scripted_model():
    recs = [
        _rec("6*7?", [("calculator", {"expression": "6*7"})], [{"result": "42"}], "42"),
        _rec("1+1?", [("calculator", {"expression": "1+1"})], [{"result": "2"}], "2"),
        _rec("3*3?", [("calculator", {"expression": "3*3"})], [{"result": "9"}], "9"),
        _rec("2**3?", [("calculator", {"expression": "2**3"})], [{"result": "8"}], "8"),
        _rec("你好", [], [], "你好！"),
        _rec("再见", [], [], "再见！"),
    ]
    script = {  # question -> what the model writes in each round
        "6*7?": [_call("calculator", expression="6*7"), "结果是 42。"],  # all right
        "1+1?": [_call("calculator", expression="1 + 1"), "等于 2"],  # args differ, answer ok
        "3*3?": [_call("poet_dynasty", poet="3*3"), "不知道"],  # wrong tool
        "2**3?": ['<tool_call>\n{"name": calculator}\n</tool_call>'],  # malformed, no call
        "你好": ["你好！"],  # direct
        "再见": [_call("calculator", exp=1), "再见"],  # calls when it should not; bad args
    }
    seen = []

    def fake(convs, tools):
        assert tools == [T.TOOLS] * len(convs)  # each conversation's own list
        seen.extend(convs)
        return [script[c[0]["content"]][(len(c) - 1) // 2] for c in convs]

    res = measure_tool_use(recs, fake)
    assert res["n"] == 6 and res["n_tool"] == 4 and res["n_no_tool"] == 2
    assert res["right_tool"] == 0.5  # 6*7 and 1+1
    assert res["valid_args"] == 0.75  # all but the malformed one made schema-valid calls
    assert res["correct_args"] == 0.25  # only 6*7
    assert res["answer_uses_result"] == 0.5  # 42 and 2
    assert res["no_tool_direct"] == 0.5
    assert res["malformed_calls"] == 1
    assert res["by_tool"]["calculator"]["n"] == 4
    # the second round saw the call turn and the result of running the tool
    second = next(c for c in seen if c[0]["content"] == "6*7?" and len(c) == 3)
    assert second[1]["tool_calls"][0]["function"] == {
        "name": "calculator",
        "arguments": {"expression": "6*7"},
    }
    assert json.loads(second[2]["content"]) == {"expression": "6*7", "result": "42"}


def test_measure_on_the_reference_answers_scores_full_marks():
    """Replaying each test record's own turns through the loop scores 1.0 everywhere: the
    reference, the tools and the scoring agree."""
    recs = read_tool_set("demo")

    def replay(convs, tools):
        out = []
        for c in convs:
            rec = next(r for r in recs if r["messages"][: len(c)] == c)
            m = rec["messages"][len(c)]
            calls = "\n".join(
                _call(x["function"]["name"], **x["function"]["arguments"])
                for x in m.get("tool_calls") or ()
            )
            out.append(calls or m["content"])
        return out

    res = measure_tool_use(recs, replay)
    assert res["n"] == len(recs) == 200
    for key in ("right_tool", "valid_args", "correct_args", "answer_uses_result"):
        assert res[key] == 1.0, key
    assert res["no_tool_direct"] == 1.0 and res["malformed_calls"] == 0


def test_eval_tools_end_to_end_on_a_tiny_sft_model(tmp_path, tiny_model_path, summary_declared):
    """`hanlm sft` on a few tool records, then `hanlm eval tools=` on held-out ones: the loop
    runs through real generation and every figure is a share."""

    def short(r):  # only the tools the record calls: short prompts for the tiny model
        used = set(r["meta"]["tools_used"]) or {"calculator"}
        tools = [t for t in r["tools"] if t["function"]["name"] in used]
        return {"messages": r["messages"], "tools": tools}

    def write(path, recs):
        path.write_text("".join(json.dumps(short(r), ensure_ascii=False) + "\n" for r in recs))
        return path

    train = write(tmp_path / "train.jsonl", records("train")[:12])
    valid = write(tmp_path / "valid.jsonl", records("valid")[:2])
    test = write(tmp_path / "test.jsonl", records("test")[:6])
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.path={tiny_model_path}",
            f"data.paths=[{train}]",
            f"data.valid_paths=[{valid}]",
            "data.dedup=none",
            "max_length=1200",
            "train.max_steps=3",
            "train.batch_size=4",
            "train.lr=5e-3",
            "eval_prompts=0",
            f"output_dir={tmp_path / 'sft'}",
        ],
    )
    model = run(cfg)
    s = read_run(model)["summary"]
    assert s["answer_loss"] < s["initial_answer_loss"]  # the tool records were learned from
    out = tmp_path / "ev"
    argv = ["eval", str(model), "bench=[]", f"tools={test}", "tools_max_new_tokens=8"]
    assert cli.main([*argv, f"output_dir={out}"]) == 0
    u = json.loads((out / "eval_report.json").read_text())["tool_use"]
    assert u["n"] == 6 and u["n_tool"] + u["n_no_tool"] == 6
    for key in ("right_tool", "valid_args", "correct_args", "answer_uses_result"):
        assert 0.0 <= u[key] <= 1.0
    assert u["malformed_calls"] >= 0
    assert len((out / "tool_use.jsonl").read_text().splitlines()) == 6
    summary = read_run(out)["summary"]
    assert summary["tools/right_tool"] == u["right_tool"]
    summary_declared(out, absent=["*/accuracy"])  # tools only: no benchmark asked


def test_eval_tools_refuses_a_set_without_tools(tmp_path, tiny_model_path, capsys):
    bad = tmp_path / "plain.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    bad.write_text(json.dumps({"messages": chat}) + "\n")
    argv = ["eval", str(tiny_model_path), "bench=[]", f"tools={bad}"]
    assert cli.main([*argv, f"output_dir={tmp_path / 'o'}"]) != 0
    assert "declares no tools" in capsys.readouterr().err


def test_eval_headline_shows_the_tool_use_figures():
    from hanlm.pipeline.headline_rows import stage_headline

    u = {"n": 200, "n_tool": 175, "n_no_tool": 25, "right_tool": 0.9, "valid_args": 0.95}
    u |= {"correct_args": 0.5, "answer_uses_result": 0.4, "no_tool_direct": 1.0}
    u["malformed_calls"] = 3
    info = {"command": "eval", "status": "complete", "summary": {}, "data": {}}
    h = stage_headline("after", "eval", info, {"eval_report.json": {"tool_use": u}}, None)
    assert h.verdict == (
        "tool use: right tool 0.9, correct arguments 0.5, answers with the result 0.4"
    )
    texts = [f.text() for f in h.figures]
    assert "tool use: call arguments equal the reference: 0.5 (n=175)" in texts
    assert "tool use: answers directly when no tool is needed: 1 (n=25)" in texts
    assert h.warnings == ["tool use: 3 malformed <tool_call> blocks"]


def test_data_check_shows_tool_records(capsys):
    assert cli.main(["data", "check", str(ASSETS / "tools.test.jsonl.gz")]) == 0
    out = capsys.readouterr().out
    assert "records: 200 good, 0 bad" in out
    assert "tools: next_line, idiom_meaning, poet_dynasty, calculator" in out
    assert 'assistant: idiom_meaning({"idiom": "大请大受"})' in out
