"""`hanlm rag ask IDX MODEL "question"`: answers grounded in retrieved passages, with citations.

The top-k passages go into the user turn as numbered sources ("[1] ...", "[2] ..."), and the
instruction asks the model to cite them as [1], [2]. `citations()` reads those marks back and
maps each to its source; a mark with no such source is reported, never silently kept. The same
`Retriever` serves `hanlm chat` and `hanlm serve` when they are started with an index.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from hanlm.config import ConfigError, InferenceModelConfig, TemplateName, opt
from hanlm.data.templates import require_template
from hanlm.generation import GenerationOptions, generate
from hanlm.modeling import load_model, load_tokenizer
from hanlm.rag.index import Hit, Mode, RagIndex, index_embedder

INSTRUCTION = (
    "请只根据下面编号的资料回答问题，并在用到的资料后标注编号，如[1]、[2]。"
    "资料中没有答案时，请直接说不知道。"
)
_CITE = re.compile(r"\[(\d{1,3})\]")


@dataclass
class RetrievalOptions:
    """Retrieval for chat and serve: passages from an index go into the prompt."""

    index: str = opt("", "a hanlm rag index directory (empty: no retrieval)")
    k: int = opt(3, "passages put into the prompt")
    mode: Mode = opt("auto", "dense, bm25, hybrid, auto (hybrid if the index has BM25)")
    max_chars: int = opt(300, "most characters of one passage in the prompt")
    embed_model: str = opt("", "embedding model (default: the one the index records)")


def grounded_question(question: str, hits: list[Hit], max_chars: int = 300) -> str:
    """The user turn: the instruction, the numbered sources, then the question."""
    return grounded_prompt(question, [h.chunk.text for h in hits], max_chars)


def grounded_prompt(question: str, sources: list[str], max_chars: int = 300) -> str:
    """`grounded_question` over plain texts (also how training examples for citing are made)."""
    lines = [INSTRUCTION, ""]
    for i, text in enumerate(sources, 1):
        lines.append(f"[{i}] {text.strip()[:max_chars]}")
    lines += ["", f"问题：{question}"]
    return "\n".join(lines)


def citation_marks(answer: str) -> list[int]:
    """The numbers cited as [n] in `answer`, in order of first mention, each once."""
    return list(dict.fromkeys(int(m) for m in _CITE.findall(answer)))


def citations(answer: str, hits: list[Hit]) -> tuple[list[dict[str, Any]], list[int]]:
    """(the cited sources in order of first mention, the marks that name no source)."""
    cited: list[dict[str, Any]] = []
    unknown: list[int] = []
    for n in citation_marks(answer):
        if 1 <= n <= len(hits):
            cited.append({"n": n, **source_of(hits[n - 1])})
        else:
            unknown.append(n)
    return cited, unknown


def source_of(hit: Hit) -> dict[str, Any]:
    c = hit.chunk
    return {
        "id": c.id,
        "source": c.source,
        "record": c.record,
        "start": c.start,
        "end": c.end,
        "doc_id": c.doc_id,
        "score": hit.score,
        "text": c.text,
    }


class Retriever:
    """An index and its embedding model, loaded once."""

    def __init__(self, opts: RetrievalOptions) -> None:
        if opts.k < 1:
            raise ConfigError("retrieval k must be at least 1")
        self.opts = opts
        self.index = RagIndex.load(opts.index)
        mode = opts.mode
        if mode == "auto":
            mode = "hybrid" if self.index.meta.get("bm25") else "dense"
        self.mode = mode
        model = InferenceModelConfig(path=opts.embed_model)
        self.embedder = None if mode == "bm25" else index_embedder(self.index, model)

    def retrieve(self, question: str) -> list[Hit]:
        return self.index.search([question], self.embedder, self.opts.k, self.mode)[0]

    def prompt(self, question: str) -> tuple[str, list[Hit]]:
        hits = self.retrieve(question)
        return grounded_question(question, hits, self.opts.max_chars), hits

    def sources(self, hits: list[Hit], answer: str) -> dict[str, Any]:
        cited, unknown = citations(answer, hits)
        return {
            "sources": [{"n": i, **source_of(h)} for i, h in enumerate(hits, 1)],
            "cited": [c["n"] for c in cited],
            "unknown_citations": unknown,
        }


@dataclass
class RagAskConfig:
    args: list[str] = opt([], "the index directory, the chat model, then one or more questions")
    retrieval: RetrievalOptions = opt(RetrievalOptions, "k, mode, passage length")
    model: InferenceModelConfig = opt(InferenceModelConfig, "chat model options (path: from args)")
    template: TemplateName = opt("auto", "chat template if the model has none")
    system: str = opt("", "system prompt")
    generation: GenerationOptions = field(
        default_factory=lambda: GenerationOptions(temperature=0.0, max_new_tokens=200),
        metadata={"help": "decoding (greedy by default: answers are repeatable)"},
    )
    json: bool = opt(False, "print one JSON line per question (answer, sources, citations)")

    def validate(self) -> None:
        if len(self.args) < 3:
            raise ConfigError('usage: hanlm rag ask IDX MODEL_DIR "question" ["question" ...]')


def ask(
    model: Any, tok: Any, retriever: Retriever, questions: list[str], cfg: RagAskConfig
) -> list[dict[str, Any]]:
    convs, all_hits = [], []
    for q in questions:
        text, hits = retriever.prompt(q)
        head = [{"role": "system", "content": cfg.system}] if cfg.system else []
        convs.append([*head, {"role": "user", "content": text}])
        all_hits.append(hits)
    answers = generate(model, tok, convs, cfg.generation)
    return [
        {"question": q, "answer": a["text"], **retriever.sources(h, a["text"])}
        for q, a, h in zip(questions, answers, all_hits)
    ]


def run(cfg: RagAskConfig) -> int:
    from dataclasses import replace

    idx_dir, model_path, questions = cfg.args[0], cfg.args[1], cfg.args[2:]
    retriever = Retriever(replace(cfg.retrieval, index=idx_dir))
    tok = load_tokenizer(model_path)
    require_template(tok, cfg.template, model_path, "rag ask")
    model = load_model(replace(cfg.model, path=model_path)).eval()
    for r in ask(model, tok, retriever, questions, cfg):
        if cfg.json:
            print(json.dumps(r, ensure_ascii=False))
            continue
        print(f"问：{r['question']}\n答：{r['answer']}\n")
        for s in r["sources"]:
            mark = "*" if s["n"] in r["cited"] else " "
            snippet = " ".join(s["text"].split())[:80]
            print(f" {mark}[{s['n']}] {s['id']}  {snippet}")
        if not r["cited"]:
            print("  (the answer cites no source)")
        if r["unknown_citations"]:
            print(f"  (cites sources that were not given: {r['unknown_citations']})")
        print()
    sys.stdout.flush()
    return 0
