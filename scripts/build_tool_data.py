#!/usr/bin/env python3
"""Build the embedded tool-use set (src/hanlm/assets/demo/tools.{train,valid,test}.jsonl.gz) and
the look-up database its tools read (tools_db.json.gz), from the embedded demo data only.

Inputs (nothing else is read; no network): zh_corpus.{train,valid} (poems: title, author,
lines), sft.{train,valid} (idiom explanations from the idiom_explain records, poets' dynasties
from the poet_bio records' source keys `bio:DYNASTY:NAME`, and the chatterbot chats), and
manifest.json's held-out benchmark keys plus bench.*.jsonl, read only to prove that nothing
of the benchmark is used.

The tools are hanlm.datagen.demo_tools' (next_line, idiom_meaning, poet_dynasty,
calculator). Each record declares all four (`tools`, OpenAI function tools) and is one of:
- one call (the user asks what a tool answers, in varied wordings, mostly Chinese, some
  English): the assistant calls the right tool with the right arguments, the tool turn holds
  the result of actually running demo_tools.execute on them, and the final answer relays it;
- two calls: two poets or two idioms at once (one turn with two calls), or a next line and
  then its author's dynasty (two rounds, the second call's argument read from the first result);
- a miss: the asked poem line, idiom or poet is not in the database; the tool says so and the
  answer relays it; calculator records include division by zero;
- no tool: a chatterbot chat answered directly, the tools still declared.

Every source item (poem, idiom, poet, chat, arithmetic expression) belongs to one split, chosen
by a hash of its key with the seed, so the test split shares no item with train or valid.
Records carry meta {derived: true, task, tools_used, source_key, source_keys, lang}. At the end
the output is re-read: loaded through hanlm's data loader with its tool-call checks, split
disjointness checked, and no held-out benchmark key or benchmark text present.

Usage: python scripts/build_tool_data.py [--out DIR] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hanlm.datagen import demo_tools as T  # noqa: E402

DEMO = ROOT / "src" / "hanlm" / "assets" / "demo"
SPLITS = ("train", "valid", "test")
TEST_FRAC, VALID_FRAC = 0.12, 0.12  # of each pool's items, by key hash
COUNTS = {  # records per task: train, valid, test
    "next_line": (700, 45, 45),
    "idiom_meaning": (600, 40, 40),
    "poet_dynasty": (450, 30, 30),
    "calculator": (500, 30, 30),
    "two_calls": (250, 20, 20),
    "miss": (150, 10, 10),
    "no_tool": (300, 25, 25),
}
N_POEMS, N_IDIOMS, MAX_MEANING = 1000, 1200, 40
EN_SHARE = 0.15
HAN_LINE = re.compile(r"^[\u4e00-\u9fff]{4,9}$")


def die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def read(name: str) -> list[dict[str, Any]]:
    data = (DEMO / name).read_bytes()
    if name.endswith(".gz"):
        data = gzip.decompress(data)
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]


def split_of(seed: int, key: str) -> str:
    f = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64
    return "test" if f < TEST_FRAC else "valid" if f < TEST_FRAC + VALID_FRAC else "train"


# ----------------------------------------------------------------------------- sources


def read_sources(rng: random.Random) -> dict[str, Any]:
    held = json.loads((DEMO / "manifest.json").read_text("utf-8"))["held_out_source_keys"]
    held_names = {k.rsplit(":", 1)[1] for k in held if k.startswith(("bio:", "idiom:"))}
    poems, authors = [], set()
    for name in ("zh_corpus.train.jsonl.gz", "zh_corpus.valid.jsonl.gz"):
        for r in read(name):
            m = r["meta"]
            lines = r["text"].split("\n")[1:]
            cs = [c for line in lines for c in T.clauses(line)]
            if m["source"] in ("tang", "song", "tang300", "qianjiashi") and m.get("author"):
                authors.add(m["author"])
                if 4 <= len(cs) <= 16 and all(HAN_LINE.match(c) for c in cs):
                    poems.append(
                        {"key": m["source_key"], "title": m["title"], "author": m["author"]}
                        | {"lines": lines}
                    )
    idioms: dict[str, str] = {}
    poets: dict[str, set[str]] = {}
    chats = []
    for name in ("sft.train.jsonl.gz", "sft.valid.jsonl.gz"):
        for r in read(name):
            m = r["meta"]
            if m["task"] == "idiom_explain":
                idiom, meaning = m["source_key"].split(":", 1)[1], r["messages"][-1]["content"]
                if len(meaning) <= MAX_MEANING and "\n" not in meaning:
                    idioms.setdefault(idiom, meaning)
            elif m["task"] == "poet_bio":
                _, dynasty, poet = m["source_key"].split(":", 2)
                poets.setdefault(poet, set()).add(dynasty)
            elif m["task"] == "chat":
                msgs = [x for x in r["messages"] if x["role"] != "system"][:2]
                chats.append({"key": m["source_key"], "lang": m.get("lang", "en"), "msgs": msgs})
    rng.shuffle(poems)
    # famous collections first, then the rest: the database holds N_POEMS, the misses others
    poems.sort(key=lambda p: p["key"].split(":")[0] not in ("tang300", "qianjiashi"))
    idiom_names = sorted(idioms)
    rng.shuffle(idiom_names)
    return {
        "poems": poems[:N_POEMS],
        "other_poems": poems[N_POEMS:],
        "idioms": {k: idioms[k] for k in sorted(idiom_names[:N_IDIOMS])},
        "other_idioms": [x for x in idiom_names[N_IDIOMS:] if x not in held_names],
        "poets": {k: sorted(v) for k, v in sorted(poets.items())},
        "other_poets": sorted(
            a for a in authors if a not in poets and a not in held_names and 2 <= len(a) <= 3
        ),
        "chats": chats,
    }


# ----------------------------------------------------------------------------- records

Q = {
    "next_line": (
        "「{x}」的下一句是什么？", "{x}，下一句是？", "帮我查一下「{x}」后面一句。",
        "「{x}」下一句怎么接？", "请问{x}的下一句？", "{x}——后面是哪一句？",
    ),
    "idiom_meaning": (
        "成语「{x}」是什么意思？", "{x}是什么意思？", "帮我查查「{x}」的意思。",
        "「{x}」这个成语怎么解释？", "请解释成语{x}。",
    ),
    "poet_dynasty": (
        "{x}是哪个朝代的诗人？", "{x}是什么朝代的？", "请问{x}生活在哪个朝代？",
        "查一下{x}的朝代。", "诗人{x}属于哪个朝代？",
    ),
    "calculator": (
        "{x} 等于多少？", "帮我算一下 {x}", "计算：{x}", "{x} = ?", "请算出 {x} 的结果。",
    ),
}  # fmt: skip
Q_EN = {
    "next_line": ("What line comes after “{x}”?", "What is the next line of the poem after {x}?"),
    "idiom_meaning": ("What does the idiom {x} mean?", "Explain the Chinese idiom “{x}”."),
    "poet_dynasty": ("Which dynasty was the poet {x} from?", "When did {x} live (dynasty)?"),
    "calculator": ("What is {x}?", "Please calculate {x}."),
}


def answer(name: str, res: dict[str, Any], en: bool) -> str:
    """The final answer relaying one result (it always contains T.result_key(res))."""
    if "error" in res:
        return f"Sorry, the tool says: {res['error']}." if en else f"抱歉，{res['error']}。"
    if name == "next_line":
        if en:
            return f"The next line is “{res['next']}” ({res['author']}, 《{res['title']}》)."
        where = f"出自{res['author']}的《{res['title']}》"
        return f"「{res['line']}」的下一句是「{res['next']}」，{where}。"
    if name == "idiom_meaning":
        if en:
            return f"“{res['idiom']}” means: {res['meaning']}"
        return f"「{res['idiom']}」的意思是：{res['meaning']}"
    if name == "poet_dynasty":
        if en:
            return f"{res['poet']} was a poet of the {res['dynasty']} dynasty."
        return f"{res['poet']}是{res['dynasty']}代诗人。"
    if en:
        return f"{res['expression']} = {res['result']}."
    return f"{res['expression']} 的结果是 {res['result']}。"


class Builder:
    def __init__(self, src: dict[str, Any], db: T.Database, seed: int) -> None:
        self.src, self.db, self.seed = src, db, seed
        self.rng = random.Random(seed)
        self.n_calls = 0

    def call(self, name: str, arg: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """A call and its tool turn, the result from running the tool."""
        cid = f"call_{self.n_calls}"
        self.n_calls += 1
        res = T.execute(name, {T.ARG[name]: arg}, self.db)
        function = {"name": name, "arguments": {T.ARG[name]: arg}}
        call = {"id": cid, "type": "function", "function": function}
        turn = {"role": "tool", "content": T.result_text(res), "tool_call_id": cid, "res": res}
        return call, turn

    def record(
        self,
        task: str,
        question: str,
        rounds: list[list[tuple[str, str]]],
        final: Any,
        keys: list[str],
        en: bool,
    ) -> dict[str, Any]:
        msgs: list[dict[str, Any]] = [{"role": "user", "content": question}]
        self.n_calls = 0  # call ids count within a record: call_0, call_1, ...
        results, used = [], []
        for calls in rounds:
            pairs = [self.call(n, a) for n, a in calls]
            msgs.append({"role": "assistant", "content": "", "tool_calls": [c for c, _ in pairs]})
            for c, t in pairs:
                results.append((c["function"]["name"], t.pop("res")))
                msgs.append(t)
                used.append(c["function"]["name"])
        text = final(results) if callable(final) else final
        msgs.append({"role": "assistant", "content": text})
        meta = {"derived": True, "task": task, "tools_used": used, "source_key": keys[0]}
        meta |= {"source_keys": keys, "lang": "en" if en else "zh"}
        return {"tools": T.TOOLS, "messages": msgs, "meta": meta}

    def ask(self, task: str, arg: str, en: bool) -> str:
        return self.rng.choice(Q_EN[task] if en else Q[task]).format(x=arg)

    def one(self, name: str, arg: str, key: str, task: str | None = None) -> dict[str, Any]:
        en = self.rng.random() < EN_SHARE
        q = self.ask(name, arg, en)
        fin = lambda rs: answer(name, rs[0][1], en)  # noqa: E731
        return self.record(task or name, q, [[(name, arg)]], fin, [key], en)


def poem_item(db: T.Database, rng: random.Random, poem: dict[str, Any]) -> str | None:
    """A clause of the poem that has a next clause and occurs once in the database."""
    cs = [c for line in poem["lines"] for c in T.clauses(line)][:-1]
    cs = [c for c in cs if db.clause_count.get(T.norm(c)) == 1]
    return rng.choice(cs) if cs else None


def expression(rng: random.Random) -> str:
    n = lambda lo=1, hi=99: rng.randint(lo, hi)  # noqa: E731
    forms = (
        lambda: f"{n(10, 999)}+{n(10, 999)}", lambda: f"{n(100, 999)}-{n(1, 999)}",
        lambda: f"{n(2, 99)}*{n(2, 99)}", lambda: f"{n(2, 999)}/{n(2, 20)}",
        lambda: f"{n()}+{n()}*{n(2, 20)}", lambda: f"({n()}+{n()})*{n(2, 20)}",
        lambda: f"{n(2, 20)}**{n(2, 4)}", lambda: f"({n(10, 99)}-{n(1, 9)})/({n(1, 9)}+{n(1, 9)})",
        lambda: f"{n(1, 99)}.{n(1, 9)}*{n(2, 9)}", lambda: f"-{n()}*{n(2, 9)}+{n()}",
        lambda: f"{n(2, 99)}/0", lambda: f"{n()}/({n(1, 9)}-{n(1, 9)})",
    )  # fmt: skip
    return rng.choice(forms)()


def build_split(b: Builder, split: str, pools: dict[str, list[Any]]) -> list[dict[str, Any]]:
    rng, want = b.rng, {t: c[SPLITS.index(split)] for t, c in COUNTS.items()}
    out: list[dict[str, Any]] = []
    poems, idioms, poets = pools["poems"], pools["idioms"], pools["poets"]

    for i in range(want["next_line"]):
        p = poems[i % len(poems)]
        if (line := poem_item(b.db, rng, p)) is not None:
            out.append(b.one("next_line", line, p["key"]))
    for i in range(want["idiom_meaning"]):
        x = idioms[i % len(idioms)]
        out.append(b.one("idiom_meaning", x, f"idiom:{x}"))
    for i in range(want["poet_dynasty"]):
        x = poets[i % len(poets)]
        out.append(b.one("poet_dynasty", x, f"bio:{b.db.poets[x][0]}:{x}"))
    exprs: set[str] = set()
    while len(exprs) < want["calculator"]:
        e = expression(rng)
        if split_of(b.seed, f"calc:{e}") == split and e not in exprs:
            exprs.add(e)
            out.append(b.one("calculator", e, f"calc:{e}"))
    out += two_calls(b, want["two_calls"], pools)
    out += misses(b, want["miss"], pools)
    zh = [c for c in pools["chats"] if c["lang"] == "zh"]
    en = [c for c in pools["chats"] if c["lang"] != "zh"]
    n_zh = round(want["no_tool"] * 0.7)
    for c in zh[:n_zh] + en[: want["no_tool"] - min(n_zh, len(zh))]:
        msgs = [{"role": m["role"], "content": m["content"]} for m in c["msgs"]]
        meta = {"derived": True, "task": "no_tool", "tools_used": [], "source_key": c["key"]}
        meta |= {"source_keys": [c["key"]], "lang": c["lang"]}
        out.append({"tools": T.TOOLS, "messages": msgs, "meta": meta})
    rng.shuffle(out)
    return out


def dynasties(rs: list[tuple[str, dict[str, Any]]]) -> str:
    return "；".join(answer("poet_dynasty", r, False).rstrip("。") for _, r in rs) + "。"


def two_calls(b: Builder, n: int, pools: dict[str, list[Any]]) -> list[dict[str, Any]]:
    rng, out = b.rng, []
    poets, idioms = pools["poets"], pools["idioms"]
    with_author = [p for p in pools["poems"] if p["author"] in b.db.poets and p["author"] in poets]
    for i in range(n):
        kind = ("poets", "idioms", "chain")[i % 3]
        if kind == "poets":
            x, y = rng.sample(poets, 2)
            q = rng.choice(("{x}和{y}分别是哪个朝代的？", "{x}、{y}各是什么朝代的诗人？"))
            q = q.format(x=x, y=y)
            keys = [f"bio:{b.db.poets[v][0]}:{v}" for v in (x, y)]
            calls = [("poet_dynasty", x), ("poet_dynasty", y)]
            out.append(b.record("two_calls", q, [calls], dynasties, keys, False))
        elif kind == "idioms":
            x, y = rng.sample(idioms, 2)
            q = rng.choice(("「{x}」和「{y}」分别是什么意思？", "解释一下{x}和{y}。"))
            q = q.format(x=x, y=y)
            fin = lambda rs: "\n".join(answer("idiom_meaning", r, False) for _, r in rs)  # noqa: E731
            calls = [("idiom_meaning", x), ("idiom_meaning", y)]
            keys = [f"idiom:{x}", f"idiom:{y}"]
            out.append(b.record("two_calls", q, [calls], fin, keys, False))
        elif with_author:
            p = with_author[i % len(with_author)]
            if (line := poem_item(b.db, rng, p)) is None:
                continue
            q = f"「{line}」的下一句是什么？作者是哪个朝代的？"
            res = T.execute("next_line", {"line": line}, b.db)
            author = res["author"]

            def fin(rs: list[tuple[str, dict[str, Any]]]) -> str:
                nl, dy = rs[0][1], rs[1][1]
                return f"下一句是「{nl['next']}」，作者{nl['author']}是{dy['dynasty']}代诗人。"

            keys = [p["key"], f"bio:{b.db.poets[author][0]}:{author}"]
            rounds = [[("next_line", line)], [("poet_dynasty", author)]]
            out.append(b.record("two_calls", q, rounds, fin, keys, False))
    return out


def misses(b: Builder, n: int, pools: dict[str, list[Any]]) -> list[dict[str, Any]]:
    rng, out = b.rng, []
    for i in range(n):
        kind = ("next_line", "idiom_meaning", "poet_dynasty")[i % 3]
        if kind == "next_line":
            p = pools["other_poems"][i % len(pools["other_poems"])]
            cs = [c for line in p["lines"] for c in T.clauses(line)][:-1]
            cs = [c for c in cs if T.norm(c) not in b.db.next]
            if not cs:
                continue
            arg, key = rng.choice(cs), p["key"]
        elif kind == "idiom_meaning":
            arg = pools["other_idioms"][i % len(pools["other_idioms"])]
            key = f"idiom:{arg}"
        else:
            arg = pools["other_poets"][i % len(pools["other_poets"])]
            key = f"poet:{arg}"
        out.append(b.one(kind, arg, key, task="miss"))
    return out


# ----------------------------------------------------------------------------- checks


def check(out: Path, seed: int) -> dict[str, Any]:
    """Re-read the output: hanlm's loader (tool calls checked), split disjointness, no benchmark
    key or text used. Returns the manifest entries."""
    from hanlm.config import DataConfig
    from hanlm.data import load

    manifest = json.loads((DEMO / "manifest.json").read_text("utf-8"))
    held = set(manifest["held_out_source_keys"])
    keys: dict[str, set[str]] = {}
    texts: list[str] = []
    entries = {}
    for split in SPLITS:
        path = out / f"tools.{split}.jsonl.gz"
        with gzip.open(path, "rt", encoding="utf-8") as f:
            recs = [json.loads(x) for x in f]
        loaded = load(DataConfig(paths=[str(path)], dedup="none"), kind="chat").train
        if len(loaded) != len(recs):
            die(f"{path}: the loader kept {len(loaded)} of {len(recs)} records")
        keys[split] = {k for r in recs for k in r["meta"]["source_keys"]}
        if leaked := keys[split] & held:
            die(f"{path}: uses held-out benchmark sources {sorted(leaked)[:5]}")
        texts += [m["content"] for r in recs for m in r["messages"]]
        chars = sum(len(m["content"]) for r in recs for m in r["messages"])
        tasks = Counter(r["meta"]["task"] for r in recs)
        entries[path.name] = {"records": len(recs), "chars": chars, "bytes": path.stat().st_size}
        entries[path.name]["by_task"] = dict(sorted(tasks.items()))
    if shared := keys["test"] & (keys["train"] | keys["valid"]):
        die(f"the test split shares source items with train/valid: {sorted(shared)[:5]}")
    needles = set()
    for name in ("bench.dev.jsonl", "bench.test.jsonl"):
        for r in read(name):
            needles |= {T.norm(x) for x in (r[r["answer"]], r["meta"]["stem"], r["question"])}
    needles = {x for x in needles if len(x) >= 5}
    joined = "\n".join(T.norm(t) for t in texts)
    if found := [x for x in needles if x in joined]:
        die(f"benchmark text found in the tool data: {found[:5]}")
    return entries


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DEMO))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out, rng = Path(args.out), random.Random(args.seed)
    src = read_sources(rng)
    db_data = {"poems": src["poems"], "idioms": src["idioms"], "poets": src["poets"]}
    out.mkdir(parents=True, exist_ok=True)
    db_path = out / "tools_db.json.gz"
    tmp = db_path.with_suffix(".tmp")
    with gzip.GzipFile(tmp, "wb", mtime=0) as f:
        f.write(json.dumps(db_data, ensure_ascii=False, separators=(",", ":")).encode())
    tmp.replace(db_path)
    db = T.load_db(db_path)
    b = Builder(src, db, args.seed)
    for split in SPLITS:

        def keyed(xs: list[Any], key: Any, split: str = split) -> list[Any]:
            return [x for x in xs if split_of(args.seed, key(x)) == split]

        def bio(x: str) -> str:
            return f"bio:{src['poets'][x][0]}:{x}"

        pools = {
            "poems": keyed(src["poems"], lambda p: p["key"]),
            "other_poems": keyed(src["other_poems"], lambda p: p["key"]),
            "idioms": keyed(sorted(src["idioms"]), lambda x: f"idiom:{x}"),
            "other_idioms": keyed(src["other_idioms"], lambda x: f"idiom:{x}"),
            "poets": [x for x in keyed(sorted(src["poets"]), bio) if len(src["poets"][x]) == 1],
            "other_poets": keyed(src["other_poets"], lambda x: f"poet:{x}"),
            "chats": keyed(src["chats"], lambda c: c["key"]),
        }
        for k in ("poems", "idioms", "poets"):
            b.rng.shuffle(pools[k])
        recs = build_split(b, split, pools)
        path = out / f"tools.{split}.jsonl.gz"
        tmp = path.with_suffix(".tmp")
        with gzip.GzipFile(tmp, "wb", mtime=0) as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode())
        tmp.replace(path)
        print(f"{path.name}: {len(recs)} records, {path.stat().st_size} bytes", file=sys.stderr)
    entries = check(out, args.seed)
    entries["tools_db.json.gz"] = {
        "poems": len(db.poems), "idioms": len(db.idioms), "poets": len(db.poets),
        "bytes": db_path.stat().st_size,
    }  # fmt: skip
    if out.resolve() == DEMO.resolve():
        man_path = DEMO / "manifest.json"
        manifest = json.loads(man_path.read_text("utf-8"))
        manifest["tools"] = {"builder": "scripts/build_tool_data.py", "seed": args.seed}
        manifest["tools"]["files"] = entries
        man_path.write_text(json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", "utf-8")
    print(json.dumps(entries, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()
