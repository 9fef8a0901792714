"""`hanlm judge` against real endpoints on 127.0.0.1: a live `hanlm serve` on a tiny model for the
answering side (through the real `openai` client), and a scripted judge (a small FastAPI app in
this file) whose verdicts are read from markers in the answers it is shown: grades, malformed
replies, both-order agreement, position bias, a 429 with Retry-After and a 500, a run killed
after N verdicts and resumed."""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.

import asyncio
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hanlm.eval import judge_prompts, judge_stats
from hanlm.eval.judge import EMBEDDED, JudgeConfig, load_questions, run
from hanlm.eval.judge_prompts import pair_messages, parse_score, parse_verdict, single_messages
from hanlm.testing import ServedApp

ROOT = Path(__file__).resolve().parents[2]
MARK = re.compile(r"<<t(\d):([\w-]+)(?:=(\d+))?>>")


class Script:
    """The scripted judge's behaviour and what it was asked."""

    def __init__(self, faults: tuple[int, ...] = (), hang_after: int | None = None) -> None:
        self.faults = list(faults)  # HTTP statuses answered to the first requests
        self.hang_after = hang_after  # requests after this many are never answered
        self.requests: list[tuple[float, str]] = []
        self.seen: set[str] = set()

    def reply(self, text: str) -> str:
        turn = 2 if "第二个问题" in text.split("\n")[0] else 1
        marks = [(kind, val) for t, kind, val in MARK.findall(text) if int(t) == turn]
        if not marks:
            return "回答尚可。[[5]]"
        kinds = [k for k, _ in marks]
        if kinds[0] == "s":
            return f"评语：还行。评分：[[{marks[0][1]}]]"
        if kinds[0] == "garbled":
            return "这个回答不错，我给八分。"
        if kinds[0] == "garbled-once":
            if text in self.seen:
                return "重新按格式给出：[[6]]"
            self.seen.add(text)
            return "评分：六分"
        if kinds[0] == "two":
            return "可以是[[3]]，也可以是[[8]]。"
        if "first" in kinds:
            return "第一个更好。[[A]]"
        qa, qb = int(marks[0][1]), int(marks[1][1])
        return "比较之后：" + ("[[A]]" if qa > qb else "[[B]]" if qb > qa else "[[C]]")


def scripted_app(script: Script):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "scripted", "object": "model", "created": 0,
                                            "owned_by": "test"}]}  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        text = body["messages"][-1]["content"]
        script.requests.append((time.monotonic(), text))
        if script.faults:
            status = script.faults.pop(0)
            headers = {"Retry-After": "1"} if status == 429 else {}
            return JSONResponse({"error": {"message": "scripted"}}, status, headers=headers)
        if script.hang_after is not None and len(script.requests) > script.hang_after:
            await asyncio.sleep(120)
        content = script.reply(text)
        return {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": content}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}  # fmt: skip

    return app


@pytest.fixture
def judge_server():
    servers = []

    def start(script: Script) -> str:
        served = ServedApp(scripted_app(script))
        servers.append(served)
        return served.url + "/v1"

    yield start
    for s in servers:
        s.close()


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


QUESTIONS = [
    {"question_id": 1, "category": "math", "turns": ["一加一等于几？", "再加一呢？"],
     "reference": ["2", "3"]},
    {"question_id": 2, "category": "writing", "turns": ["写一句问候。", "改短一点。"]},
    {"question_id": 3, "category": "writing", "turns": ["写一句诗。", "再写一句。"]},
]  # fmt: skip


def _cfg(tmp_path: Path, **kw) -> JudgeConfig:
    cfg = JudgeConfig(output_dir=str(tmp_path / "out"), concurrency=2, retries=3, timeout=30)
    cfg.questions = str(_write(tmp_path / "q.jsonl", QUESTIONS))
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def _read(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]


def _headline(out: Path):
    """The report's headline row of a judge run, as `hanlm run` builds it."""
    from hanlm.pipeline.headline_rows import load_reports, stage_headline

    info = json.loads((out / "hanlm.json").read_text())
    return stage_headline("judge", "judge", info, load_reports(out, "judge"))


# --------------------------------------------------------------------------- parsing


def test_verdict_parsers_take_only_one_clear_verdict():
    assert parse_score("好。[[7]]") == 7.0
    assert parse_score("[[ 8.5 ]] 再说一次 [[8.5]]") == 8.5
    assert parse_score("我给它7分。") is None  # prose: not the form
    assert parse_score("[[3]] 或 [[8]]") is None  # two different grades: never guessed
    assert parse_score("[[11]]") is None and parse_score("[[0]]") is None
    assert parse_verdict("A更好 [[A]]") == "A"
    assert parse_verdict("[[C]]") == "tie"
    assert parse_verdict("[[A]] 不，[[B]]") is None
    assert parse_verdict("A更好") is None
    assert parse_verdict("Therefore, the verdict is A.") is None


def test_the_reply_forms_last_line_counts_and_an_echo_of_the_form_does_not():
    """The prompts end with the reply's form; a judge that fills it in (brackets or not) gives
    a verdict, one that copies the form back gives none."""
    assert parse_score("评语：切题，但有错。\n评分：7") == 7.0
    assert parse_score("Comment: fine.\n\nGrade: [[9]]") == 9.0
    assert parse_score("评语：好。评分：[7]。") == 7.0
    assert parse_score("评语：好。\n评分：7 或 8") is None
    assert parse_verdict("比较：A对B错。\n结论：A") == "A"
    assert parse_verdict("比较：都对。结论：B（助手B更好）") == "B"
    assert parse_verdict("结论：A、B、C 三者选一") is None and parse_verdict("x结论：A") is None
    assert parse_verdict("Comparison: both wrong.\n\nVerdict: C") == "tie"
    assert parse_verdict("结论：[[B]]") == "B"
    pair_form = pair_messages("zh", ["问"], ["甲"], ["乙"], 1)[1]["content"].splitlines()[-1]
    single_form = single_messages("en", ["q"], ["a"], 1)[1]["content"].splitlines()[-1]
    assert pair_form.startswith("结论") and parse_verdict(pair_form) is None
    assert single_form.startswith("Grade") and parse_score(single_form) is None
    for lang, mode in judge_prompts.REPLY_FORM:  # a form copied back is no verdict
        form = judge_prompts.REPLY_FORM[lang, mode]
        assert parse_verdict(form) is None and parse_score(form) is None
    for lang in ("zh", "en"):  # the material comes before the form
        text = pair_messages(lang, ["问"], ["甲的回答"], ["乙的回答"], 1)[1]["content"]
        assert text.index("乙的回答") < text.rindex("[[X]]")


def test_both_orders_must_agree_for_a_win():
    assert judge_stats.combine("a", "a") == ("a", True)
    assert judge_stats.combine("a", "b") == ("tie", False)
    assert judge_stats.combine("a", "tie") == ("tie", False)
    assert judge_stats.combine("tie", "tie") == ("tie", True)
    assert judge_stats.combine(None, "a") == (None, None)


def test_the_embedded_questions():
    qs = load_questions(JudgeConfig())
    assert len(qs) == 40
    cats = {q["category"] for q in qs}
    assert cats == {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                    "humanities"}  # fmt: skip
    assert all(len(q["turns"]) == 2 for q in qs)
    refs = {q["category"] for q in qs if q.get("reference")}
    assert refs == {"math", "reasoning", "coding"}
    assert all(len(q["reference"]) == 2 for q in qs if q["category"] in refs)
    assert (EMBEDDED.parent / "README.md").is_file()


# --------------------------------------------------------------------------- single grades


def test_single_grades_with_malformed_replies_429_and_500(tmp_path, judge_server, summary_declared):
    script = Script(faults=(429, 500))
    answers = [
        {"question_id": 1, "turns": ["<<t1:s=8>>", "<<t2:s=6>>"]},
        {"question_id": 2, "turns": ["<<t1:garbled-once>>", "<<t2:garbled>>"]},
        {"question_id": 3, "turns": ["<<t1:two>>", "<<t2:s=3>>"]},
    ]
    cfg = _cfg(tmp_path, a=str(_write(tmp_path / "a.jsonl", answers)), concurrency=1)
    cfg.judge = judge_server(script)
    assert run(cfg) == 0
    t = script.requests
    assert t[1][0] - t[0][0] >= 0.95  # the 429's Retry-After: 1 was waited for
    assert len(t) == 2 + 6 + 3  # two faults retried, 6 verdicts, 3 unparseable asked again
    rows = {(r["question_id"], r["turn"]): r for r in _read(tmp_path / "out/judgments.jsonl")}
    assert rows[1, 1]["score"] == 8 and rows[1, 2]["score"] == 6
    assert rows[2, 1]["score"] == 6 and len(rows[2, 1]["replies"]) == 2  # retried once, parsed
    assert rows[2, 2]["score"] is None and len(rows[2, 2]["replies"]) == 2  # recorded, not guessed
    assert rows[3, 1]["score"] is None
    # the reference answer is shown for math, and turn 2 is judged on the whole conversation
    first = next(text for _, text in t if "<<t1:s=8>>" in text and "<<t2:s=6>>" not in text)
    assert "[参考答案开始]\n2\n[参考答案结束]" in first
    second = next(text for _, text in t if "<<t2:s=6>>" in text)
    assert all(
        s in second for s in ("一加一等于几？", "<<t1:s=8>>", "再加一呢？", "第2个问题的参考答案")
    )
    writing = next(text for _, text in t if "<<t2:s=3>>" in text)
    assert "参考答案" not in writing
    info = json.loads((tmp_path / "out/hanlm.json").read_text())
    s = info["summary"]
    assert s["a/score"] == pytest.approx((8 + 6 + 6 + 3) / 4)
    assert s["a/score_se"] == pytest.approx(judge_stats.mean_se([8, 6, 6, 3])[1])
    assert s["unparsed"] == 2
    report = json.loads((tmp_path / "out/judge_report.json").read_text())
    assert report["single"]["a"]["math"] == {"mean": 7.0, "se": 1.0, "n": 2, "unparsed": 0}
    assert report["single"]["a"]["writing"]["unparsed"] == 2
    summary_declared(tmp_path / "out", absent=("win_rate", "win_rate_se", "position_bias",
                                               "gold_agreement", "label_agreement"))  # fmt: skip
    h = _headline(tmp_path / "out")
    assert h.verdict.startswith("mean grade by the judge: a 5.75")
    assert any("math: mean grade (n=2)" in f.text() for f in h.figures)
    assert any(w.startswith("2 verdicts unparseable") for w in h.warnings)


# --------------------------------------------------------------------------- pairs


A = [
    {"question_id": 1, "turns": ["<<t1:q=9>>", "<<t2:q=9>>"]},
    {"question_id": 2, "turns": ["<<t1:first>>", "<<t2:first>>"]},
    {"question_id": 3, "turns": ["<<t1:q=5>>", "<<t2:q=2>>"]},
]
B = [
    {"question_id": 1, "turns": ["<<t1:q=1>>", "<<t2:q=1>>"]},
    {"question_id": 2, "turns": ["<<t1:q=1>>", "<<t2:q=1>>"]},
    {"question_id": 3, "turns": ["<<t1:q=5>>", "<<t2:q=7>>"]},
]


def _pair_cfg(tmp_path: Path, **kw) -> JudgeConfig:
    a, b = _write(tmp_path / "a.jsonl", A), _write(tmp_path / "b.jsonl", B)
    return _cfg(tmp_path, mode="pairwise", a=str(a), b=str(b), **kw)


def test_pairwise_both_orders_position_bias_and_people(tmp_path, judge_server, summary_declared):
    """Question 1: a wins in both orders; question 2: the judge always picks the first answer
    (position bias: a tie); question 3: a tie, then b wins. People ranked three answers."""
    labels = [
        {"prompt": "问", "responses": ["<<t1:q=3>>", "<<t1:q=1>>", "<<t1:q=2>>"],
         "ranking": [0, 2, 1]},  # agrees with the judge on all three pairs
        {"prompt": "问", "responses": ["<<t1:q=1>>", "<<t1:first>>"], "ranking": [0, 1]},
        {"prompt": "问", "responses": ["<<t1:q=1>>", "<<t1:q=3>>"], "ranking": [0, 1]},
        {"prompt": "问", "responses": ["<<t1:q=2>>", "<<t1:q=2>>"], "ranking": [[0, 1]]},
    ]  # fmt: skip
    script = Script()
    cfg = _pair_cfg(tmp_path, labels=str(_write(tmp_path / "rankings.jsonl", labels)))
    cfg.judge = judge_server(script)
    assert run(cfg) == 0
    assert len(script.requests) == 12 + 2 * 5  # 6 pairs and 5 ranked-apart pairs, both orders
    report = json.loads((tmp_path / "out/judge_report.json").read_text())
    overall = report["pairwise"]["overall"]
    assert (overall["a_wins"], overall["b_wins"], overall["ties"], overall["n"]) == (2, 1, 3, 6)
    assert overall["inconsistent"] == 2 and overall["position_bias"] == pytest.approx(2 / 6)
    assert overall["win_rate"] == pytest.approx(3.5 / 6)
    assert overall["se"] == pytest.approx(judge_stats.mean_se([1, 1, 0.5, 0.5, 0.5, 0])[1])
    assert report["pairwise"]["math"]["a_wins"] == 2
    assert report["pairwise"]["turn 2"]["b_wins"] == 1
    people = report["labels"]
    # 3 agreeing pairs in record 1; record 2: order changed -> judge tie; record 3: disagree
    assert (people["agree"], people["disagree"], people["judge_ties"]) == (3, 1, 1)
    assert people["agreement"] == pytest.approx(3 / 4)
    assert people["position_bias"] == pytest.approx(1 / 5)
    s = json.loads((tmp_path / "out/hanlm.json").read_text())["summary"]
    assert s["win_rate"] == pytest.approx(3.5 / 6) and s["label_agreement"] == pytest.approx(0.75)
    assert s["position_bias"] == pytest.approx(2 / 6)
    summary_declared(tmp_path / "out", absent=("*/score", "*/score_se", "gold_agreement"))
    h = _headline(tmp_path / "out")
    assert h.verdict.startswith("no clear winner") and "agrees with people on 75%" in h.verdict
    assert any(w.startswith("position bias") and "33%" in w for w in h.warnings)
    # the order is really swapped: in "ba" the judge is shown b's answer first
    shown = [t for _, t in script.requests if "<<t1:q=9>>" in t and "<<t2" not in t]
    assert sorted(t.index("<<t1:q=9>>") < t.index("<<t1:q=1>>") for t in shown) == [False, True]


def test_gold_reward_model_agreement(tmp_path, judge_server):
    import torch
    from transformers import AutoModelForSequenceClassification

    from hanlm.generation import score_conversations
    from hanlm.modeling import load_tokenizer
    from hanlm.testing import tiny_model_dir

    base = tiny_model_dir(tmp_path / "base")
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    rm.save_pretrained(tmp_path / "rm")
    load_tokenizer(str(base)).save_pretrained(tmp_path / "rm")
    cfg = _pair_cfg(tmp_path, gold_reward_model=str(tmp_path / "rm"))
    cfg.judge = judge_server(Script())
    assert run(cfg) == 0
    # the expected preferences, by hanlm's own reward-model scoring
    tok = load_tokenizer(str(tmp_path / "rm"))
    rm.config.pad_token_id = tok.pad_token_id
    judge = {"1/1": "a", "1/2": "a", "2/1": "tie", "2/2": "tie", "3/1": "tie", "3/2": "b"}
    agree = disagree = 0
    for q, a, b in zip(QUESTIONS, A, B):
        for turn in (1, 2):
            convs = []
            for ans in (a, b):
                conv = []
                for k in range(turn):
                    conv += [{"role": "user", "content": q["turns"][k]},
                             {"role": "assistant", "content": ans["turns"][k]}]  # fmt: skip
                convs.append(conv)
            sa, sb = score_conversations(rm, tok, convs)
            gold = "a" if sa > sb else "b" if sb > sa else "tie"
            j = judge[f"{q['question_id']}/{turn}"]
            if j != "tie" and gold != "tie":
                agree += j == gold
                disagree += j != gold
    report = json.loads((tmp_path / "out/judge_report.json").read_text())
    assert (report["gold"]["agree"], report["gold"]["disagree"]) == (agree, disagree)
    s = json.loads((tmp_path / "out/hanlm.json").read_text())["summary"]
    want = agree / (agree + disagree) if agree + disagree else math.nan
    assert s["gold_agreement"] == pytest.approx(want, nan_ok=True)


# --------------------------------------------------------------------------- resuming


def test_killed_after_n_verdicts_resumes_without_redoing_them(tmp_path, judge_server):
    script = Script(hang_after=5)
    url = judge_server(script)
    cfg = _pair_cfg(tmp_path, concurrency=1)
    out, log = tmp_path / "out", tmp_path / "out" / "judgments.jsonl"
    args = [sys.executable, "-m", "hanlm", "judge", "mode=pairwise", f"a={cfg.a}", f"b={cfg.b}",
            f"questions={cfg.questions}", f"judge={url}", f"output_dir={out}", "concurrency=1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (log.is_file() and len(_read(log)) == 5):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    done = {r["key"] for r in _read(log)}
    with open(log, "a", encoding="utf-8") as f:
        f.write('{"key": "pair/3/2/ab", "kind": "pa')  # a line torn by a crash mid-write
    script.hang_after, script.requests = None, []
    cfg.output_dir, cfg.resume, cfg.judge = str(out), True, url
    assert run(cfg) == 0
    assert len(script.requests) == 12 - 5  # only what was not done
    rows = _read(log)
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == 12 and done <= set(keys)
    report = json.loads((out / "judge_report.json").read_text())
    assert report["torn_lines_dropped"] == 1
    assert report["pairwise"]["overall"]["n"] == 6


def test_a_different_judge_in_the_same_output_dir_is_refused(tmp_path, judge_server):
    cfg = _pair_cfg(tmp_path)
    cfg.judge = judge_server(Script())
    assert run(cfg) == 0
    cfg.judge, cfg.resume = judge_server(Script()), True
    with pytest.raises(Exception, match="holds verdicts of"):
        run(cfg)


def test_bad_inputs_are_named(tmp_path):
    from hanlm.config import ConfigError
    from hanlm.data.sources import DataError

    bad = _write(tmp_path / "q.jsonl", [{"question_id": 1, "category": "math", "turns": []}])
    with pytest.raises(DataError, match=r"q.jsonl:1: turns"):
        load_questions(JudgeConfig(questions=str(bad)))
    with pytest.raises(ConfigError, match="mode=pairwise compares two models"):
        JudgeConfig(mode="pairwise", a="x.jsonl").validate()
    cfg = _cfg(tmp_path, a=str(_write(tmp_path / "a.jsonl", A[:1])), judge="http://127.0.0.1:9")
    with pytest.raises(DataError, match="no answer to every turn of question 2"):
        run(cfg)
    cfg = _cfg(tmp_path, a=str(_write(tmp_path / "a.jsonl", A)), judge="http://127.0.0.1:9")
    cfg.overwrite, cfg.retries = True, 0
    with pytest.raises(ConfigError, match=r"cannot reach http://127.0.0.1:9/v1.*judge="):
        run(cfg)


# --------------------------------------------------------------------------- hanlm serve answers


def test_answers_from_hanlm_serve_carry_the_history(tmp_path, live, judge_server, monkeypatch):
    """The answering side is a real `hanlm serve`: turn 2 is asked with turn 1's answer in the
    history (its reply equals a direct request with that history), and the judge sees the whole
    conversation."""
    monkeypatch.setenv("HANLM_API_KEY", live.key)
    questions = [{"question_id": "hi", "category": "math", "turns": ["你好", "第二个问题"],
                  "reference": ["你好", "好的"]}]  # fmt: skip
    script = Script()
    cfg = JudgeConfig(output_dir=str(tmp_path / "out"), a=live.url, max_tokens=48)
    cfg.questions = str(_write(tmp_path / "q.jsonl", questions))
    cfg.judge = judge_server(script)
    assert run(cfg) == 0
    (ans,) = _read(tmp_path / "out/answers.jsonl")
    assert ans["turns"][0] == live.answer and ans["temperature"] == 0.0
    assert ans["finish_reasons"][0] == "stop" and len(ans["finish_reasons"]) == 2
    client = live.client()
    history = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": live.answer},
               {"role": "user", "content": "第二个问题"}]  # fmt: skip
    direct = client.chat.completions.create(
        model="tiny", messages=history, temperature=0, max_tokens=48
    )
    assert ans["turns"][1] == direct.choices[0].message.content
    second = [t for _, t in script.requests if "第二个问题" in t.split("\n")[0]]
    assert len(second) == 1 and live.answer in second[0] and ans["turns"][1] in second[0]
    s = json.loads((tmp_path / "out/hanlm.json").read_text())["summary"]
    assert s["a/score"] == 5.0
