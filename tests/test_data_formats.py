"""Each format with good and bad records; errors name file:line and what was expected."""

import csv
import gzip
import json

import pytest

from hanlm.config import DataConfig
from hanlm.data import DataError, load
from hanlm.data.formats import RecordError, convert, detect


def jsonl(path, records):
    path.write_text(
        "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in records
        ),
        encoding="utf-8",
    )
    return str(path)


def cfg(*paths, **kw):
    return DataConfig(paths=list(paths), **kw)


ALPACA = {
    "instruction": "把这句话翻译成英文",
    "input": "床前明月光",
    "output": "Moonlight before my bed 🌙",
}
SHAREGPT = {
    "system": "你是诗人。",
    "conversations": [
        {"from": "human", "value": "写一句诗"},
        {"from": "gpt", "value": "白日依山尽，"},
        {"from": "human", "value": "下一句？"},
        {"from": "gpt", "value": "黄河入海流。"},
    ],
}
MESSAGES = {
    "messages": [
        {"role": "user", "content": "Hi，你好"},
        {"role": "assistant", "content": "你好！"},
    ]
}
PREF = {"prompt": "静夜思的下一句？", "chosen": "疑是地上霜。", "rejected": "春眠不觉晓。"}


def test_detect_each_format():
    assert detect(ALPACA) == "alpaca"
    assert detect(SHAREGPT) == "sharegpt"
    assert detect(MESSAGES) == "messages"
    assert detect(PREF) == "preference"
    assert detect({"text": "x"}) == "text"
    assert detect({"content": "x"}, text_field="content") == "text"
    with pytest.raises(RecordError, match=r"cannot tell the format from the keys \['foo'\]"):
        detect({"foo": 1})


def test_alpaca_to_messages_with_system_and_history():
    rec = dict(ALPACA, system="sys", history=[["q1", "a1"]])
    msgs = convert(rec, "alpaca")["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[3]["content"] == "把这句话翻译成英文\n床前明月光"
    assert msgs[4]["content"] == "Moonlight before my bed 🌙"


def test_sharegpt_roles_and_system_field():
    msgs = convert(SHAREGPT, "sharegpt")["messages"]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant"]


def test_preference_strings_become_message_lists_and_implicit_prompt():
    rec = convert(PREF, "preference")
    assert rec["prompt"] == [{"role": "user", "content": "静夜思的下一句？"}]
    assert rec["chosen"] == [{"role": "assistant", "content": "疑是地上霜。"}]
    hh = {
        "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
        "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}],
    }
    rec = convert(hh, "preference")
    assert rec["prompt"] == [{"role": "user", "content": "q"}]
    assert rec["rejected"] == [{"role": "assistant", "content": "bad"}]


@pytest.mark.parametrize(
    ("fmt", "good", "bad", "message"),
    [
        (
            "text",
            {"text": "春眠不觉晓"},
            {"text": 5},
            r"field 'text': expected a string, found int 5",
        ),
        ("alpaca", ALPACA, {"instruction": "x"}, r"missing field 'output'"),
        (
            "alpaca",
            ALPACA,
            {"instruction": "x", "output": ["a"]},
            r"field 'output': expected a string, found a list",
        ),
        (
            "sharegpt",
            SHAREGPT,
            {"conversations": [{"from": "alien", "value": "x"}]},
            r"conversations\[0\]: unknown speaker 'alien'",
        ),
        ("sharegpt", SHAREGPT, {"conversations": "hi"}, r"field 'conversations': expected a list"),
        (
            "messages",
            MESSAGES,
            {"messages": [{"role": "user", "text": "x"}]},
            r"messages\[0\]: expected keys 'role' and 'content'",
        ),
        (
            "messages",
            MESSAGES,
            {"messages": [{"role": "user", "content": "x"}]},
            r"the conversation has no assistant turn",
        ),
        ("preference", PREF, {"prompt": "p", "chosen": "c"}, r"missing field 'rejected'"),
        (
            "preference",
            PREF,
            {"prompt": "p", "chosen": "", "rejected": "r"},
            r"field 'chosen': expected non-empty",
        ),
    ],
)
def test_good_and_bad_file_per_format(tmp_path, fmt, good, bad, message):
    good_path = jsonl(tmp_path / "good.jsonl", [good, good])
    loaded = load(cfg(good_path, dedup="none"))
    assert loaded.stats.formats[good_path] == fmt
    assert len(loaded.train) == 2
    bad_path = jsonl(tmp_path / "bad.jsonl", [good, good, bad])
    with pytest.raises(DataError, match=rf"bad.jsonl:3: {message}.*on_bad_record=skip"):
        load(cfg(bad_path, dedup="none", format=fmt))
    skipped = load(cfg(bad_path, dedup="none", format=fmt, on_bad_record="skip"))
    assert skipped.stats.bad == 1 and len(skipped.train) == 2
    assert skipped.stats.bad_records[0].startswith(f"{bad_path}:3: ")


def test_malformed_json_line_is_named(tmp_path):
    path = jsonl(tmp_path / "a.jsonl", [MESSAGES, '{"messages": [', MESSAGES])
    with pytest.raises(DataError, match=r"a.jsonl:2: malformed JSON"):
        load(cfg(path))


def test_wrong_kind_for_stage_is_named(tmp_path):
    path = jsonl(tmp_path / "t.jsonl", [{"text": "床前明月光"}])
    with pytest.raises(
        DataError, match=r"t.jsonl: this data is in the text format, but this stage needs alpaca"
    ):
        load(cfg(path), kind="chat")


def test_empty_file_and_missing_path(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="empty.jsonl: the file holds no records"):
        load(cfg(str(empty)))
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        load(cfg(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match="no data given"):
        load(cfg())


def test_invalid_utf8_is_named(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes(b"ok\n" + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="latin.txt:2: not valid UTF-8"):
        load(cfg(str(p), txt_unit="line"))


def test_json_csv_parquet_txt_gz_dirs_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "d"
    d.mkdir()
    (d / "a.json").write_text(
        json.dumps({"data": [ALPACA, dict(ALPACA, output="另一个")]}, ensure_ascii=False)
    )
    with open(d / "b.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["instruction", "input", "output"])
        w.writerow(["问，题", "", "答"])
    pq.write_table(pa.Table.from_pylist([dict(ALPACA, output="parquet答")]), d / "c.parquet")
    with gzip.open(d / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(dict(ALPACA, output="gz答"), ensure_ascii=False) + "\n")
    loaded = load(cfg(str(d)))
    answers = [r["messages"][-1]["content"] for r in loaded.train]
    assert answers == ["Moonlight before my bed 🌙", "另一个", "答", "parquet答", "gz答"]
    assert load(cfg(str(d / "*.json*"))).stats.kept == 3

    (tmp_path / "poem.txt").write_text("床前明月光，\n疑是地上霜。\n\n举头望明月，\n低头思故乡。\n")
    assert [r["text"] for r in load(cfg(str(tmp_path / "poem.txt"))).train] == [
        "床前明月光，\n疑是地上霜。",
        "举头望明月，\n低头思故乡。",
    ]
    assert load(cfg(str(tmp_path / "poem.txt"), txt_unit="line")).stats.kept == 4
    assert load(cfg(str(tmp_path / "poem.txt"), txt_unit="file")).stats.kept == 1


def test_csv_wrong_column_count_is_named(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("text,label\nok,1\nbroken\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"x.csv:3: expected 2 columns"):
        load(cfg(str(p)))


def test_saved_dataset_directory(tmp_path):
    import datasets

    datasets.Dataset.from_list([MESSAGES, PREF | {"x": 1}][:1]).save_to_disk(tmp_path / "ds")
    loaded = load(cfg(str(tmp_path / "ds")))
    assert loaded.kind == "chat" and loaded.train[0]["messages"][1]["content"] == "你好！"
