"""Checks of the embedded demo data (src/hanlm/assets/demo), built by scripts/build_demo_data.py.

Only the shipped files are read (plain json/gzip, no network, no hanlm imports): the manifest
matches the files, every record has the fields of its format, benchmark items are well formed,
and no benchmark source or text leaked into a training split.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

DEMO = Path(__file__).resolve().parents[1] / "src" / "hanlm" / "assets" / "demo"
SPLITS = ("train", "valid")
CORPORA = [f"{n}.{s}.jsonl.gz" for n in ("zh_corpus", "en_corpus") for s in SPLITS]
SFT = [f"sft.{s}.jsonl.gz" for s in SPLITS]
PREF = [f"preference.{s}.jsonl.gz" for s in SPLITS]
BENCH = ["bench.dev.jsonl", "bench.test.jsonl"]
TRAIN = ["zh_corpus.train.jsonl.gz", "sft.train.jsonl.gz", "preference.train.jsonl.gz"]
TOOLS = [f"tools.{s}.jsonl.gz" for s in ("train", "valid", "test")]  # scripts/build_tool_data.py


@cache
def records(name: str) -> list[dict[str, Any]]:
    data = (DEMO / name).read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


@cache
def manifest() -> dict[str, Any]:
    return json.loads((DEMO / "manifest.json").read_text("utf-8"))


def texts(rec: dict[str, Any]) -> list[str]:
    if "text" in rec:
        return [rec["text"]]
    if "messages" in rec:
        return [m["content"] for m in rec["messages"]]
    return [rec["prompt"], rec["chosen"], rec["rejected"]]


def keys(rec: dict[str, Any]) -> set[str]:
    return {rec["meta"]["source_key"], *rec["meta"].get("source_keys", [])}


def present(needles: Iterable[str], haystacks: Iterable[str], k: int = 5) -> set[str]:
    """Needles of k+ characters found in any haystack: index needles by their first k characters
    and scan each haystack once (a plain `in` per needle over megabytes is too slow)."""
    by_head: dict[str, list[str]] = defaultdict(list)
    for n in set(needles):
        if len(n) >= k:
            by_head[n[:k]].append(n)
    found: set[str] = set()
    for t in haystacks:
        for i in range(len(t) - k + 1):
            if heads := by_head.get(t[i : i + k]):
                found.update(n for n in heads if t.startswith(n, i))
    return found


def test_manifest_matches_files() -> None:
    files = manifest()["files"]
    assert sorted(files) == sorted(CORPORA + SFT + PREF + BENCH)
    for name, info in files.items():
        recs = records(name)
        assert info["records"] == len(recs), name
        assert info["bytes"] == (DEMO / name).stat().st_size, name
        if name.startswith("bench"):
            chars = sum(len(r[k]) for r in recs for k in ("question", "A", "B", "C", "D"))
        else:
            chars = sum(len(t) for r in recs for t in texts(r))
        assert info["chars"] == chars, name
        assert recs, f"{name} is empty"
    tools = manifest()["tools"]["files"]
    assert sorted(tools) == sorted([*TOOLS, "tools_db.json.gz"])
    for name, info in tools.items():
        assert info["bytes"] == (DEMO / name).stat().st_size, name
    total = sum(p.stat().st_size for p in DEMO.iterdir() if p.is_file())
    assert total < 9_000_000, "the embedded demo data should stay small"
    assert (DEMO / "LICENSES.md").read_text("utf-8").count("Licence:") >= 4


@pytest.mark.parametrize("name", CORPORA)
def test_corpus_records(name: str) -> None:
    for r in records(name):
        assert set(r) == {"text", "meta"}
        assert isinstance(r["text"], str) and r["text"].strip()
        assert r["meta"]["source"] and r["meta"]["id"] and r["meta"]["source_key"]
        assert r["meta"]["derived"] is False


@pytest.mark.parametrize("name", SFT)
def test_sft_records(name: str) -> None:
    tasks = Counter()
    for r in records(name):
        assert set(r) == {"messages", "meta"}
        roles = [m["role"] for m in r["messages"]]
        if roles[0] == "system":
            roles = roles[1:]
        assert len(roles) >= 2 and len(roles) % 2 == 0, r
        assert roles == ["user", "assistant"] * (len(roles) // 2), r
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in r["messages"])
        meta = r["meta"]
        assert isinstance(meta["derived"], bool) and meta["task"] and meta["source_key"]
        assert meta["derived"] == (meta["task"] != "chat")
        tasks[meta["task"]] += 1
    assert {"chat", "next_line", "idiom_explain", "poem_recite", "multi_turn"} <= set(tasks)


@pytest.mark.parametrize("name", PREF)
def test_preference_records(name: str) -> None:
    defects: Counter = Counter()
    for r in records(name):
        assert set(r) == {"prompt", "chosen", "rejected", "meta"}
        assert all(isinstance(r[k], str) and r[k].strip() for k in ("prompt", "chosen", "rejected"))
        assert r["chosen"] != r["rejected"]
        assert r["meta"]["derived"] is True and r["meta"]["task"] and r["meta"]["source_key"]
        defects[(r["meta"]["task"], r["meta"]["defect"])] += 1
        if r["meta"]["defect"] == "truncated":  # a strict prefix of the inner answer
            assert len(r["rejected"]) < len(r["chosen"])
        if r["meta"]["defect"] == "scrambled":  # the same characters in another order
            assert sorted(r["chosen"]) == sorted(r["rejected"])
    # every defect kind of every task is there, in roughly equal shares within a task
    expected = {
        ("next_line", d)
        for d in ("other_poem", "echo", "truncated", "looping", "scrambled", "off_topic")
    } | {("idiom_explain", d) for d in ("other_idiom", "truncated", "looping", "echo")}
    assert set(defects) == expected
    for task in ("next_line", "idiom_explain"):
        counts = [n for (t, _), n in defects.items() if t == task]
        assert max(counts) - min(counts) <= max(counts) * 0.1 + 1, defects


@pytest.mark.parametrize("name", BENCH)
def test_bench_records(name: str) -> None:
    fields = {"id", "subject", "subject_zh", "category", "question", "A", "B", "C", "D"}
    recs = records(name)
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert set(r) == fields | {"answer", "meta"}
        assert r["answer"] in ("A", "B", "C", "D")
        options = [r[k] for k in "ABCD"]
        assert all(isinstance(o, str) and o.strip() for o in options)
        assert len(set(options)) == 4, r
        assert r["meta"]["derived"] is True and r["meta"]["source_key"] and r["meta"]["stem"]
    per_subject = Counter(r["subject"] for r in recs)
    assert len(per_subject) >= 5
    if name == "bench.dev.jsonl":
        assert set(per_subject.values()) == {5}
    else:
        assert min(per_subject.values()) >= 100
        letters = Counter(r["answer"] for r in recs)
        assert max(letters.values()) - min(letters.values()) <= len(per_subject)


def test_holdout_source_keys() -> None:
    bench = {k for name in BENCH for r in records(name) for k in keys(r)}
    held = set(manifest()["held_out_source_keys"])
    assert bench <= held
    for name in TRAIN + [n.replace("train", "valid") for n in TRAIN] + TOOLS:
        leaked = held & {k for r in records(name) for k in keys(r)}
        assert not leaked, f"{name} uses held-out sources: {sorted(leaked)[:5]}"


def test_holdout_text() -> None:
    needles: dict[str, str] = {}
    for name in BENCH:
        for r in records(name):
            for text in (r[r["answer"]], r["meta"]["stem"], r["question"]):
                needles[text] = r["id"]
    trained = TRAIN + TOOLS
    found = present(needles, (t for name in trained for r in records(name) for t in texts(r)))
    assert not found, {t: needles[t] for t in sorted(found)[:5]}
