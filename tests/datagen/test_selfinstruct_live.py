"""`hanlm data self-instruct` against a live `hanlm serve` of a tiny taught model: the numbered
list is parsed, every filter counts what it drops, kept records are alpaca / messages records,
and a resumed run reads them back instead of generating them again."""

from __future__ import annotations

import json

import pytest
from selfinstruct_script import (
    ANSWER_PROMPT,
    API_KEY,
    INSTRUCTION_PROMPT,
    KEPT,
    QUESTIONS,
    SEEDS,
    USER_PROMPT,
)

from hanlm.pipeline import cli
from hanlm.runs import read_run


def _lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _args(server, seeds, out, *extra):
    return [
        "data",
        "self-instruct",
        str(seeds),
        f"output_dir={out}",
        f"endpoint={server.url}",
        f"instruction_prompt={INSTRUCTION_PROMPT}",
        f"answer_prompt={ANSWER_PROMPT}",
        f"user_prompt={USER_PROMPT}",
        "prompt_tasks=2",
        "prompt_generated=0",
        "new_per_request=5",
        "temperature=0",
        "answer_temperature=0",
        "max_tokens=300",
        "concurrency=2",
        *extra,
    ]


@pytest.fixture
def seeds(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text(
        "".join(
            json.dumps({"instruction": s, "input": "", "output": "-"}, ensure_ascii=False) + "\n"
            for s in SEEDS
        ),
        encoding="utf-8",
    )
    return path


def test_self_instruct_filters_counts_and_resume(instruct_server, seeds, tmp_path, monkeypatch):
    monkeypatch.setenv("HANLM_API_KEY", API_KEY)
    out = tmp_path / "out"
    assert cli.main(_args(instruct_server, seeds, out, "num=10", "max_rounds=1")) == 0
    kept = _lines(out / "data.jsonl")
    assert kept == [
        {"instruction": KEPT[0], "input": "", "output": "春风吹绿柳。"},
        {"instruction": KEPT[1], "input": "我爱北京", "output": "I love Beijing."},
    ]
    c = read_run(out)["summary"]["counts"]
    # two requests, each the same 5-item list: 画 blacklisted and 好的 too short twice; the
    # near duplicate (ROUGE-L 0.96) twice, and the second reply's two good ones once each
    assert c["instruction_requests"] == 2 and c["candidates"] == 10
    assert (c["blacklisted"], c["too_short"], c["similar"], c["kept"]) == (2, 2, 4, 2)
    assert c["answer_requests"] == 2 and "request_errors" not in c
    rejected = _lines(out / "rejected.jsonl")
    assert sorted(r["reason"] for r in rejected) == sorted(
        ["blacklisted"] * 2 + ["too_short"] * 2 + ["similar"] * 4
    )
    near = next(r for r in rejected if r["text"] == "写一首关于春天的五言诗歌。")
    assert near["similar_to"] == KEPT[0] and near["rouge_l"] == pytest.approx(2 * 11 / 23, abs=1e-4)

    # a crash mid-append leaves half a line; the resumed run drops it, keeps the two records,
    # and asks for no answer again: everything new is a near duplicate of what is kept
    with open(out / "data.jsonl", "a", encoding="utf-8") as f:
        f.write('{"instruction": "半')
    assert cli.main(_args(instruct_server, seeds, out, "num=10", "max_rounds=1")) != 0  # no resume
    assert (
        cli.main(_args(instruct_server, seeds, out, "num=10", "max_rounds=1", "resume=true")) == 0
    )
    assert _lines(out / "data.jsonl") == kept
    c2 = read_run(out)["summary"]["counts"]
    assert c2["torn_lines_dropped_on_resume"] == 1 and c2["rounds"] == 2
    assert c2["instruction_requests"] == 4 and c2["answer_requests"] == 2  # none regenerated
    assert c2["similar"] == 4 + 6 and c2["kept"] == 2


def test_self_chat_writes_dialogues(instruct_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HANLM_API_KEY", API_KEY)
    seeds = tmp_path / "questions.txt"
    seeds.write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    out = tmp_path / "chat"
    argv = _args(instruct_server, seeds, out, "mode=self-chat", "num=5", "turns=3", "concurrency=3")
    assert cli.main(argv) == 0
    got = {
        d["messages"][0]["content"]: [m["content"] for m in d["messages"]]
        for d in _lines(out / "data.jsonl")
    }
    assert got == {
        "你好吗？": ["你好吗？", "我很好，谢谢！", "你喜欢诗吗？", "喜欢，尤其是唐诗。"],
        "今天天气怎么样？": ["今天天气怎么样？", "今天是晴天。"],
    }
    c = read_run(out)["summary"]["counts"]
    assert c["similar"] == 1 and c["ended_by_user_side"] == 2 and c["kept"] == 2
    # every seed used: a second run has nothing left to ask, and keeps what it had
    assert cli.main([*argv, "resume=true"]) == 0
    assert len(_lines(out / "data.jsonl")) == 2


def test_a_wrong_key_or_no_server_is_a_clear_error(instruct_server, seeds, tmp_path, monkeypatch):
    monkeypatch.setenv("HANLM_API_KEY", "wrong")
    with pytest.raises(PermissionError, match="HANLM_API_KEY"):
        cli.main(_args(instruct_server, seeds, tmp_path / "a", "num=1"))
    with pytest.raises(ConnectionError, match="hanlm serve"):
        cli.main(
            _args(
                instruct_server,
                seeds,
                tmp_path / "b",
                "num=1",
                "endpoint=http://127.0.0.1:9",
                "retries=0",
            )
        )
