"""Okapi BM25 over Chinese tokens, and reciprocal rank fusion with the dense ranking.

Tokens: jieba words (its default dictionary; modern words, so names and classical phrases are
often cut into single characters) or character bigrams plus single characters (no dictionary,
robust to classical Chinese and unknown names). Latin words are lower-cased whole words either
way; punctuation and spaces are not tokens. The index keeps its postings in memory and
rebuilds them from the chunk texts on load (seconds for 100k chunks with bigrams).
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterable

_WORD = re.compile(r"[A-Za-z0-9]+|[\u3400-\u9fff\U00020000-\U0002ffff]+")
_CJK = re.compile(r"[\u3400-\u9fff\U00020000-\U0002ffff]")


def tokenize(text: str, kind: str = "jieba") -> list[str]:
    out: list[str] = []
    if kind == "jieba":
        import jieba

        for w in jieba.lcut(text):
            if _WORD.fullmatch(w):
                out.append(w.lower())
        return out
    if kind != "bigram":
        raise ValueError(f"unknown BM25 tokens {kind!r}; choose jieba or bigram")
    for run in _WORD.findall(text):
        if not _CJK.match(run):
            out.append(run.lower())
            continue
        out.extend(run)
        out.extend(run[i : i + 2] for i in range(len(run) - 1))
    return out


class BM25:
    """Okapi BM25 (k1 = 1.5, b = 0.75, Robertson-Sparck Jones idf floored at 0)."""

    def __init__(self, tokens: str = "jieba", k1: float = 1.5, b: float = 0.75) -> None:
        self.kind, self.k1, self.b = tokens, k1, b
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        self.lengths: list[int] = []

    def add(self, texts: Iterable[str]) -> None:
        for text in texts:
            doc = len(self.lengths)
            counts = Counter(tokenize(text, self.kind))
            for term, tf in counts.items():
                self.postings[term].append((doc, tf))
            self.lengths.append(sum(counts.values()))

    def search(self, query: str, k: int = 10) -> list[tuple[int, float]]:
        """(chunk row, score) best first; only chunks sharing a term with the query."""
        n = len(self.lengths)
        if n == 0:
            return []
        avg = sum(self.lengths) / n or 1.0
        scores: dict[int, float] = defaultdict(float)
        for term in set(tokenize(query, self.kind)):
            posting = self.postings.get(term)
            if not posting:
                continue
            df = len(posting)
            idf = max(0.0, math.log((n - df + 0.5) / (df + 0.5) + 1.0))
            for doc, tf in posting:
                norm = self.k1 * (1 - self.b + self.b * self.lengths[doc] / avg)
                scores[doc] += idf * tf * (self.k1 + 1) / (tf + norm)
        best = sorted(scores.items(), key=lambda x: -x[1])
        return best[:k]


def rrf(rankings: list[list[int]], k: int = 60) -> list[tuple[int, float]]:
    """Reciprocal rank fusion (Cormack et al. 2009): score = sum over rankings of 1/(k + rank),
    rank from 1. Scores of different kinds (cosine, BM25) need no calibration this way."""
    fused: dict[int, float] = defaultdict(float)
    for ranking in rankings:
        for rank, row in enumerate(ranking, 1):
            fused[row] += 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda x: -x[1])
