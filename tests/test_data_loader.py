"""Mixing, splitting, cleaning and dedup counts, streaming, `data check` and `data prepare`."""

import json
import tracemalloc

import pytest

from hanlm.config import DataConfig
from hanlm.data import DataError, load, stream_with_stats
from hanlm.data.check import DataCheckConfig, check
from hanlm.data.quality import clean_text
from hanlm.pipeline import cli
from hanlm.runs import read_run


def jsonl(path, records):
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8"
    )
    return str(path)


def texts(n, prefix):
    return [{"text": f"{prefix} 第{i}篇：春眠不觉晓，处处闻啼鸟。"} for i in range(n)]


def test_mixing_weights_and_fixed_seed_split(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", texts(100, "甲"))
    b = jsonl(tmp_path / "b.jsonl", texts(40, "乙"))
    c = DataConfig(paths=[a, b], weights=[0.5, 2.5], valid_fraction=0.1, seed=7)
    one = load(c)
    assert one.stats.per_path == {a: 100, b: 40}
    assert one.stats.after_mixing == 50 + 100
    assert (one.stats.train, one.stats.valid) == (135, 15)
    assert sum(r["text"].startswith("乙") for r in one.train + one.valid) == 100
    two = load(c)
    assert one.train == two.train and one.valid == two.valid  # same seed, same split
    other = load(DataConfig(paths=[a, b], weights=[0.5, 2.5], valid_fraction=0.1, seed=8))
    assert other.valid != one.valid


def test_weights_must_match_paths(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", texts(3, "甲"))
    with pytest.raises(DataError, match="data.weights has 2 values for 1 data.paths"):
        load(DataConfig(paths=[a], weights=[1, 2]))


def test_cleaning_and_dedup_counts(tmp_path):
    recs = [
        {"text": "春眠不觉晓，\x07处处闻啼鸟。  \r\n\n\n\n夜来风雨声"},
        {"text": "春眠不觉晓，处处闻啼鸟。\n\n夜来风雨声"},  # exact duplicate after cleaning
        {"text": "春眠不觉晓 处处闻啼鸟 夜来风雨声!"},  # duplicate once punctuation is ignored
        {"text": "短"},
        {"text": "Hello　World"},  # ideographic space
    ]
    p = jsonl(tmp_path / "t.jsonl", recs)
    loaded = load(DataConfig(paths=[p], min_chars=2))
    s = loaded.stats
    assert (s.read, s.kept, s.duplicates, s.too_short) == (5, 2, 2, 1)
    assert loaded.train[0]["text"] == "春眠不觉晓，处处闻啼鸟。\n\n夜来风雨声"
    assert loaded.train[1]["text"] == "Hello World"
    exact = load(DataConfig(paths=[p], min_chars=2, dedup="exact")).stats
    assert (exact.kept, exact.duplicates) == (3, 1)
    assert load(DataConfig(paths=[p], dedup="none", min_chars=0)).stats.kept == 5


def test_nfkc_is_opt_in_because_it_changes_chinese_punctuation():
    assert clean_text("你好，世界") == "你好，世界"
    from hanlm.data.quality import normalize

    assert normalize("你好，世界", "nfc") == "你好，世界"
    assert normalize("你好，世界", "nfkc") == "你好,世界"


def test_streaming_stays_within_a_small_memory_budget(tmp_path):
    # ~24 MB of text on disk, read under a 6 MB tracemalloc budget (dedup keys included).
    p = tmp_path / "big.txt"
    line = "长风破浪会有时，直挂云帆济沧海。" * 40
    with open(p, "w", encoding="utf-8") as f:
        for i in range(12_000):
            f.write(f"{i} {line}\n")
    assert p.stat().st_size > 20_000_000
    records, stats = stream_with_stats(DataConfig(paths=[str(p)], txt_unit="line"))
    tracemalloc.start()
    n = sum(1 for _ in records)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 12_000 and stats.kept == 12_000
    assert peak < 6_000_000, f"peak {peak / 1e6:.1f} MB"


def test_streaming_refuses_what_needs_the_whole_set(tmp_path):
    p = jsonl(tmp_path / "a.jsonl", texts(3, "甲"))
    with pytest.raises(DataError, match="use data.valid_paths instead"):
        stream_with_stats(DataConfig(paths=[p], valid_fraction=0.1))


def test_data_check_reports_format_counts_bad_records_and_samples(tmp_path, capsys):
    good = jsonl(tmp_path / "good.jsonl", [{"instruction": "你好", "output": "你好！"}] * 3)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n{oops\n', encoding="utf-8"
    )
    code = cli.main(["data", "check", good, str(bad), "samples=1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "format: alpaca (detected) -> chat" in out
    assert "records: 3 good, 0 bad" in out and "records: 1 good, 2 bad" in out
    assert f"{bad}:2: missing field 'output'" in out
    assert f"{bad}:3: malformed JSON" in out
    assert "assistant: 你好！" in out
    assert "characters per record: min 6" in out
    assert "4 good records, 2 bad" in out and "PROBLEMS FOUND" in out
    assert cli.main(["data", "check", good]) == 0


def test_data_check_names_unreadable_file(tmp_path, capsys):
    p = tmp_path / "empty.jsonl"
    p.write_text("")
    res = check(DataCheckConfig(paths=[str(p)]), out=lambda *_: None)
    assert "the file holds no records" in res[str(p)]["error"]


def test_data_check_token_statistics(tmp_path, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(tmp_path / "tok")
    p = jsonl(tmp_path / "t.jsonl", [{"text": "一二三四"}])
    assert cli.main(["data", "check", p, f"tokenizer={tmp_path / 'tok'}"]) == 0
    out = capsys.readouterr().out
    assert "tokens per record" in out and "tokens per character: 1.000" in out


def test_data_prepare_records_skip_counts_in_hanlm_json(tmp_path, capsys):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "一"}\n{"text": 3}\nnot json\n{"text": "二"}\n', encoding="utf-8")
    out_dir = tmp_path / "out"
    args = ["data", "prepare", str(p), f"output_dir={out_dir}"]
    assert cli.main(args) == 1  # stops at the first bad record by default
    assert "a.jsonl:2: field 'text': expected a string" in capsys.readouterr().err
    assert not out_dir.exists()  # a rejected input leaves no output directory behind
    (out_dir / "earlier").mkdir(parents=True)
    assert cli.main([*args, "data.on_bad_record=skip"]) == 1  # refuses the non-empty dir
    assert "overwrite=true" in capsys.readouterr().err
    assert cli.main([*args, "data.on_bad_record=skip", "--overwrite"]) == 0
    assert "bad (skipped) 2" in capsys.readouterr().out
    info = read_run(out_dir)
    assert info["status"] == "complete" and info["data"]["bad"] == 2
    assert info["data"]["bad_records"][1].endswith(
        "a.jsonl:3: malformed JSON (Expecting value at column 1)"
    )
    lines = (out_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["text"] for x in lines] == ["一", "二"]


def test_records_that_teach_nothing_are_kept_counted_and_warned_about(tmp_path, capsys):
    pairs = [{"prompt": f"问{i}", "chosen": f"答{i}", "rejected": f"错{i}"} for i in range(6)]
    pairs[2]["rejected"] = pairs[2]["chosen"]
    pairs[4]["rejected"] = " 答4 "  # the same answer up to surrounding whitespace
    prefs = jsonl(tmp_path / "pairs.jsonl", pairs)
    data = load(DataConfig(paths=[prefs]), kind="preference", split=False)
    assert (data.stats.kept, data.stats.unteachable) == (6, 2)  # kept: nothing dropped silently
    assert data.stats.unteachable_records == [
        f"{prefs}:3: the chosen and rejected answers are the same",
        f"{prefs}:5: the chosen and rejected answers are the same",
    ]
    err = capsys.readouterr().err
    assert "warning: 2 of 6 records are well-formed but teach nothing" in err
    assert "kept but teaching nothing 2" in data.stats.summary()

    chats = [
        {"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": a}]}
        for a in ("答", "  ", "好")
    ]
    ranked = {"prompt": "问", "responses": ["同", "同 "], "ranking": [0, 1]}
    files = [jsonl(tmp_path / "chat.jsonl", chats), jsonl(tmp_path / "ranked.jsonl", [ranked])]
    results = check(DataCheckConfig(paths=files), out=print)
    out = capsys.readouterr().out
    assert [r["unteachable"] for r in results.values()] == [1, 1]
    assert f"{files[0]}:2: the answer (the last assistant turn) is empty" in out
    assert f"{files[1]}:1: all the ranked answers are the same" in out
    assert "(2 of them teach nothing: see the warnings)" in out and "-> OK" in out

    clean = load(DataConfig(paths=[jsonl(tmp_path / "ok.jsonl", pairs[:2])]), kind="preference")
    assert clean.stats.unteachable == 0 and "teach" not in capsys.readouterr().err
