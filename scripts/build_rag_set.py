"""Build the retrieval set of benchmarks/rag.py from the embedded poet biographies.

Documents are the poet biographies embedded in the demo SFT data (the answers of its
`poet_bio` records, one per poet). Poets are split by a stable hash of their key: 30% make the
retrieval set (documents + one query each), 70% make the (query, positive) pairs for
`hanlm embed train`, so nothing of the retrieval set is seen by the embedding fine-tune.

A query asks for the poet by one fact of the biography, in a question template, without the
poet's name: "哪位宋代诗人孝宗隆兴元年进士，调都昌主簿？". The fact is one sentence of the
biography that no other biography also contains (not the first, which names the poet; the
first only when there is no other), with
the name replaced by "此人", the bracketed notes ("（今属江西）", "（一一六三）") removed and the
classical wording of each clause replaced by a modern one from a fixed table (`REWORD`:
"登进士第" -> "考中进士", "迁" -> "升任", "卒" -> "去世", ...). Names, places and titles stay, as
a reader would keep them, so a query still shares some words with its document: lexical
matching (BM25) has an edge here, which the benchmark states.

Usage: python scripts/build_rag_set.py [--out build/rag]  (writes docs.jsonl, queries.jsonl,
train_pairs.jsonl, manifest.json; deterministic), and cite_train.jsonl: the training poets'
questions with their biography and key, from which benchmarks/rag_cite.py makes examples of
grounded answers that cite their source.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
from pathlib import Path

from hanlm import ASSETS

EVAL_FRACTION = 0.3
_NOTE = re.compile(r"（[^（）]*）|\([^()]*\)")
# Classical biography phrasing -> how a modern reader would ask (a fixed table, applied in order;
# names, places and titles stay, as a reader would keep them).
REWORD = [
    (r"举进士不第", "考进士没有考中"),
    (r"(?:登|举)(.{0,6}?)进士第", r"\1考中进士"),
    (r"进士第", "考中进士"),
    (r"擢第", "考中"),
    (r"累官", "多次升迁，官至"),
    (r"累迁", "多次升迁至"),
    (r"累除", "多次被任命为"),
    (r"历官", "先后担任"),
    (r"^历", "先后担任"),
    (r"迁", "升任"),
    (r"^拜", "被任命为"),
    (r"^除", "被任命为"),
    (r"^授", "被授予"),
    (r"贬", "被贬为"),
    (r"终于?", "最后做到"),
    (r"卒$", "去世"),
    (r"卒于", "死于"),
    (r"^知", "担任知"),
    (r"工诗", "擅长写诗"),
    (r"善属文", "擅长写文章"),
    (r"^少", "年轻时"),
    (r"^尝", "曾经"),
    (r"^有(.{1,12})集", r"著有\1集"),
    (r"今存诗", "现存诗作"),
    (r"今录诗", "收录诗作"),
    (r"事见", "生平记载在"),
]


def reword(fact: str) -> str:
    clauses = re.split(r"([，、])", fact)
    out = []
    for c in clauses:
        for pat, rep in REWORD:
            c = re.sub(pat, rep, c)
        out.append(c)
    return "".join(out)


def stable_frac(key: str) -> float:
    return int(hashlib.sha256(f"rag:{key}".encode()).hexdigest()[:8], 16) / 16**8


def bios() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("sft.train.jsonl.gz", "sft.valid.jsonl.gz"):
        with gzip.open(ASSETS / name, "rt", encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if rec["meta"]["task"] != "poet_bio":
                    continue
                key = rec["meta"]["source_key"]
                answer = rec["messages"][-1]["content"]
                # the longest answer (some records cut the biography to fewer sentences)
                if len(answer) > len(out.get(key, "")):
                    out[key] = answer
    return out


def fact_queries(key: str, text: str, rng: random.Random, n: int, others: list[str]) -> list[str]:
    _, dynasty, name = key.split(":", 2)
    sentences = [s for s in re.split(r"(?<=[。；])", text) if s.strip()]
    facts = []
    for i, s in enumerate(sentences):
        fact = _NOTE.sub("", s).replace(name, "此人").strip("。；， ")
        if i == 0:  # the name's own sentence: keep what follows the name
            fact = re.sub(r"^此人[，,]?", "", fact)
        # A fact another biography also states ("诗一卷") would make the query ambiguous.
        if len(fact) >= 8 and fact not in facts and sum(fact in o for o in others) <= 1:
            facts.append((i, fact))
    later = [f for i, f in facts if i > 0] or [f for _, f in facts]
    picked = rng.sample(later, min(n, len(later)))
    return [f"哪位{dynasty}代诗人{reword(fact)[:60]}？" for fact in picked]


def build(out: Path) -> dict[str, int]:
    rng = random.Random(0)
    docs, queries, pairs, cite = [], [], [], []
    all_bios = bios()
    plain = [_NOTE.sub("", t) for t in all_bios.values()]
    for key, text in sorted(all_bios.items()):
        if stable_frac(key) < EVAL_FRACTION:
            qs = fact_queries(key, text, rng, 1, plain)
            if qs:
                docs.append({"id": key, "text": text})
                queries.append({"query": qs[0], "doc_id": key})
        else:
            for q in fact_queries(key, text, rng, 2, plain):
                pairs.append({"query": q, "positive": text})
                cite.append({"query": q, "doc_id": key, "text": text})
    out.mkdir(parents=True, exist_ok=True)
    files = (("docs", docs), ("queries", queries), ("train_pairs", pairs), ("cite_train", cite))
    for name, rows in files:
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    counts = {"docs": len(docs), "queries": len(queries), "train_pairs": len(pairs)}
    train_texts = {p["positive"] for p in pairs}
    assert not train_texts & {d["text"] for d in docs}, "a retrieval document is in the pairs"
    assert not {c["doc_id"] for c in cite} & {d["id"] for d in docs}, "a held-out poet in cite"
    (out / "manifest.json").write_text(json.dumps(counts, indent=1), encoding="utf-8")
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("build/rag"))
    args = ap.parse_args()
    print(build(args.out))


if __name__ == "__main__":
    main()
