"""`hanlm rag index | add | search`: a faiss index of a model's own embeddings, plus BM25.

An index directory holds `index.faiss` (inner product over L2-normalised vectors = cosine;
flat, IVF or HNSW), `chunks.jsonl` (each chunk's id, file, record, span and text, in faiss row
order), and `index.json`: the embedding model's fingerprint and the pooling/marker settings,
the chunking and the BM25 tokens. A query embedded with another model or other settings would
land in a different vector space and return confident nonsense, so it is refused. `add` embeds
more documents with the recorded model and settings. Every file is replaced atomically.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from hanlm.config import ConfigError, InferenceModelConfig, OutputConfig, opt
from hanlm.embed.pooling import Embedder, EmbedOptions, load_embedder
from hanlm.rag.bm25 import BM25, rrf
from hanlm.rag.chunking import Chunk, chunk_document, read_documents
from hanlm.runs import Run, atomic_write_json, atomic_write_text

INDEX_FILE, CHUNKS_FILE, META_FILE = "index.faiss", "chunks.jsonl", "index.json"
FaissKind = Literal["flat", "ivf", "hnsw"]
Mode = Literal["auto", "dense", "bm25", "hybrid"]


class IndexMismatch(ConfigError):
    """A query or addition with an embedding model or settings the index was not built with."""


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise ConfigError("hanlm rag needs faiss: pip install 'hanlm[rag]'") from None
    return faiss


@dataclass
class Hit:
    chunk: Chunk
    score: float  # cosine (dense), BM25 score, or fused RRF score (hybrid)
    rank: int

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": self.score, **asdict(self.chunk)}


class RagIndex:
    def __init__(self, meta: dict[str, Any], index: Any, chunks: list[Chunk]) -> None:
        self.meta, self.index, self.chunks = meta, index, chunks
        self._bm25: BM25 | None = None

    # ------------------------------------------------------------------ build, load, save

    @classmethod
    def create(
        cls,
        embedder: Embedder,
        kind: str = "flat",
        bm25: str = "jieba",
        chunking: dict[str, Any] | None = None,
        nlist: int = 0,
        hnsw_m: int = 32,
    ) -> RagIndex:
        meta = {
            "version": 1,
            "embedding": embedder.settings(),
            "faiss": {"kind": kind, "nlist": nlist, "hnsw_m": hnsw_m, "nprobe": 16},
            "bm25": bm25,
            "chunking": chunking or {},
            "count": 0,
            "sources": {},
            "history": [],
        }
        return cls(meta, None, [])

    @classmethod
    def load(cls, path: str | Path) -> RagIndex:
        d = Path(path)
        if not (d / META_FILE).is_file():
            raise FileNotFoundError(
                f"{d} is not a hanlm rag index (no {META_FILE}); build one"
                " with: hanlm rag index DOCS... model.path=DIR output_dir=IDX"
            )
        meta = json.loads((d / META_FILE).read_text(encoding="utf-8"))
        index = _faiss().read_index(str(d / INDEX_FILE)) if (d / INDEX_FILE).is_file() else None
        with open(d / CHUNKS_FILE, encoding="utf-8") as f:
            chunks = [Chunk(**json.loads(line)) for line in f if line.strip()]
        n = index.ntotal if index is not None else 0
        if n != len(chunks) or n != meta["count"]:
            raise ConfigError(
                f"{d}: {n} vectors but {len(chunks)} chunks ({meta['count']} in"
                f" {META_FILE}); the index is damaged: rebuild it"
            )
        return cls(meta, index, chunks)

    def save(self, path: str | Path) -> None:
        """Vectors and chunks first, `index.json` (with the count they must agree on) last."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        if self.index is not None:
            tmp = d / f".{INDEX_FILE}.tmp"
            _faiss().write_index(self.index, str(tmp))
            os.replace(tmp, d / INDEX_FILE)
        lines = [json.dumps(asdict(c), ensure_ascii=False) for c in self.chunks]
        atomic_write_text(d / CHUNKS_FILE, "\n".join(lines) + ("\n" if lines else ""))
        atomic_write_json(d / META_FILE, self.meta)

    # ------------------------------------------------------------------ checks

    def check(self, embedder: Embedder) -> None:
        """Refuse an embedder whose model or settings differ from the index's."""
        want, have = self.meta["embedding"], embedder.settings()
        keys = ["model_fingerprint", "dim", "pooling", "asymmetric", "max_length"]
        diff = [k for k in keys if want.get(k) != have.get(k)]
        if diff:
            said = "; ".join(f"{k}: index {want.get(k)!r}, query {have.get(k)!r}" for k in diff)
            raise IndexMismatch(
                f"this index was built with the embedding model at {want.get('model_path')!r}"
                f" (fingerprint {want.get('model_fingerprint')}) and other settings than the"
                f" query's ({said}). Query with that model and settings, or rebuild the index"
                " with hanlm rag index."
            )

    # ------------------------------------------------------------------ add, search

    def _new_faiss(self, dim: int, vectors: Any) -> Any:
        faiss = _faiss()
        f = self.meta["faiss"]
        if f["kind"] == "flat":
            return faiss.IndexFlatIP(dim)
        if f["kind"] == "hnsw":
            index = faiss.IndexHNSWFlat(dim, f["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 80
            return index
        # IVF: k-means cells trained on the first batch; ~39 points per cell is faiss's minimum.
        nlist = f["nlist"] or max(1, int(4 * len(vectors) ** 0.5))
        nlist = max(1, min(nlist, len(vectors) // 39))
        f["nlist"] = nlist
        self._quantizer = faiss.IndexFlatIP(dim)  # kept alive as long as the index
        index = faiss.IndexIVFFlat(self._quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        return index

    def add(self, chunks: list[Chunk], embedder: Embedder, vectors: Any = None) -> None:
        """Embed (unless `vectors` are given, e.g. for a synthetic benchmark) and append."""
        import numpy as np

        self.check(embedder)
        if not chunks:
            return
        if vectors is None:
            vectors = embedder.encode([c.text for c in chunks], "document", progress=True)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if self.index is None:
            self.index = self._new_faiss(vectors.shape[1], vectors)
        self.index.add(vectors)
        self.chunks.extend(chunks)
        if self._bm25 is not None:
            self._bm25.add(c.text for c in chunks)
        self.meta["count"] = len(self.chunks)
        for c in chunks:
            self.meta["sources"][c.source] = self.meta["sources"].get(c.source, 0) + 1

    def bm25(self) -> BM25:
        if not self.meta.get("bm25"):
            raise ConfigError("this index has no BM25 side (built with bm25=none); use mode=dense")
        if self._bm25 is None:
            self._bm25 = BM25(self.meta["bm25"])
            self._bm25.add(c.text for c in self.chunks)
        return self._bm25

    def dense(self, vectors: Any, k: int) -> list[list[tuple[int, float]]]:
        """(row, cosine) lists for a batch of query vectors."""
        import numpy as np

        if self.index is None:
            return [[] for _ in range(len(vectors))]
        if hasattr(self.index, "nprobe"):
            self.index.nprobe = self.meta["faiss"]["nprobe"]
        if hasattr(self.index, "hnsw"):
            self.index.hnsw.efSearch = max(64, k)
        scores, rows = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        return [
            [(int(r), float(s)) for r, s in zip(rr, ss) if r >= 0] for rr, ss in zip(rows, scores)
        ]

    def search(
        self, queries: list[str], embedder: Embedder | None, k: int = 5, mode: str = "auto"
    ) -> list[list[Hit]]:
        """Ranked hits per query. hybrid = reciprocal rank fusion of the dense and BM25 top
        `max(4k, 50)`."""
        if mode == "auto":
            mode = "hybrid" if self.meta.get("bm25") else "dense"
        if mode != "bm25" and embedder is None:
            raise ConfigError(f"mode={mode} needs the embedding model")
        deep = max(4 * k, 50)
        dense: list[list[tuple[int, float]]] = [[] for _ in queries]
        if mode in ("dense", "hybrid"):
            assert embedder is not None
            self.check(embedder)
            dense = self.dense(embedder.encode(queries, "query"), deep if mode == "hybrid" else k)
        out = []
        for q, d in zip(queries, dense):
            if mode == "dense":
                ranked = d[:k]
            elif mode == "bm25":
                ranked = self.bm25().search(q, k)
            else:
                lexical = self.bm25().search(q, deep)
                ranked = rrf([[r for r, _ in d], [r for r, _ in lexical]])[:k]
            out.append([Hit(self.chunks[r], s, i + 1) for i, (r, s) in enumerate(ranked)])
        return out


# --------------------------------------------------------------------------- commands


@dataclass
class ChunkOptions:
    max_chars: int = opt(200, "most characters per chunk (whole sentences where they fit)")
    overlap: int = opt(40, "characters of whole sentences shared by consecutive chunks")
    text_field: str = opt("text", "field of a .jsonl record that holds the document text")


@dataclass
class RagIndexConfig(OutputConfig):
    docs: list[str] = opt(
        [],
        "documents: .txt/.md files (one document each), .jsonl(.gz)"
        " (one per record), or directories of them",
    )
    model: InferenceModelConfig = opt(InferenceModelConfig, "the embedding model (an HF dir)")
    embed: EmbedOptions = opt(EmbedOptions, "pooling and markers (recorded in the index)")
    chunk: ChunkOptions = opt(ChunkOptions, "how documents are cut")
    faiss: FaissKind = opt(
        "flat", "flat (exact; up to ~1M chunks), ivf (k-means cells), hnsw (graph)"
    )
    nlist: int = opt(0, "ivf: number of cells (0 = 4*sqrt(chunks))")
    bm25: Literal["jieba", "bigram", "none"] = opt(
        "jieba", "tokens of the BM25 side used by hybrid search (none: dense only)"
    )

    def validate(self) -> None:
        if not self.docs:
            raise ConfigError("no documents: hanlm rag index DOCS... model.path=DIR output_dir=IDX")
        if not self.model.path:
            raise ConfigError("model.path is required: the model whose embeddings index the docs")
        if not self.output_dir:
            raise ConfigError("output_dir is required: where the index is written")


def collect_chunks(docs: list[str], chunk: ChunkOptions) -> list[Chunk]:
    from tqdm.auto import tqdm

    out: list[Chunk] = []
    for doc in tqdm(read_documents(docs, chunk.text_field), desc="chunking", mininterval=1.0):
        out.extend(chunk_document(doc, chunk.max_chars, chunk.overlap))
    return out


def run_index(cfg: RagIndexConfig) -> Path:
    with Run("rag index", cfg, seed=0) as run:
        t0 = time.time()
        chunks = collect_chunks(cfg.docs, cfg.chunk)
        if not chunks:
            raise ConfigError(f"no text in {cfg.docs}: every document was empty")
        emb = load_embedder(cfg.model, cfg.embed)
        bm25 = "" if cfg.bm25 == "none" else cfg.bm25
        idx = RagIndex.create(emb, cfg.faiss, bm25, asdict(cfg.chunk), cfg.nlist)
        idx.add(chunks, emb)
        idx.meta["history"].append(
            {"added": len(chunks), "docs": list(cfg.docs), "at": time.time()}
        )
        idx.save(run.dir)
        summary = {
            "chunks": len(chunks),
            "sources": len(idx.meta["sources"]),
            "truncated": emb.truncated,
            "seconds": time.time() - t0,
        }
        print(
            f"[hanlm] rag index: {len(chunks)} chunks from {summary['sources']} files"
            f" ({emb.truncated} cut at {cfg.embed.max_length} tokens)",
            file=sys.stderr,
        )
        run.finish(summary)
    return run.dir


@dataclass
class RagAddConfig:
    docs: list[str] = opt([], "documents to add (same kinds as rag index)")
    index: str = opt("", "the index directory to add to")
    model: InferenceModelConfig = opt(
        InferenceModelConfig, "embedding model (default: the one the index records)"
    )
    text_field: str = opt("", "jsonl text field (default: the index's)")

    def validate(self) -> None:
        if not self.docs or not self.index:
            raise ConfigError("usage: hanlm rag add DOCS... index=IDX")


def index_embedder(idx: RagIndex, model: Any) -> Embedder:
    """The embedder an index asks for: its recorded model and settings (or `model.path`,
    checked against the fingerprint)."""
    from dataclasses import replace

    rec = idx.meta["embedding"]
    path = model.path or rec["model_path"]
    opts = EmbedOptions(rec["pooling"], rec["asymmetric"], rec["max_length"], rec["batch_size"])
    emb = load_embedder(replace(model, path=path), opts)
    idx.check(emb)
    return emb


def run_add(cfg: RagAddConfig) -> Path:
    idx = RagIndex.load(cfg.index)
    emb = index_embedder(idx, cfg.model)
    chunking = ChunkOptions(**idx.meta["chunking"])
    if cfg.text_field:
        chunking.text_field = cfg.text_field
    already = {c.id for c in idx.chunks}
    chunks = collect_chunks(cfg.docs, chunking)
    fresh = [c for c in chunks if c.id not in already]
    if len(fresh) < len(chunks):
        print(
            f"[hanlm] rag add: {len(chunks) - len(fresh)} chunks already in the index"
            " (same file and span) were not added again",
            file=sys.stderr,
        )
    idx.add(fresh, emb)
    idx.meta["history"].append({"added": len(fresh), "docs": list(cfg.docs), "at": time.time()})
    idx.save(cfg.index)
    print(f"[hanlm] rag add: +{len(fresh)} chunks, {idx.meta['count']} in all", file=sys.stderr)
    return Path(cfg.index)


@dataclass
class RagSearchConfig:
    args: list[str] = opt([], "the index directory, then one or more queries")
    model: InferenceModelConfig = opt(
        InferenceModelConfig, "embedding model (default: the one the index records)"
    )
    k: int = opt(5, "passages per query")
    mode: Mode = opt(
        "auto", "dense, bm25, hybrid (RRF of both), auto = hybrid if the index has BM25"
    )
    json: bool = opt(False, "print JSON lines instead of text")

    def validate(self) -> None:
        if len(self.args) < 2:
            raise ConfigError('usage: hanlm rag search IDX "query" ["query" ...]')
        if self.k < 1:
            raise ConfigError("k must be at least 1")


def run_search(cfg: RagSearchConfig) -> int:
    idx = RagIndex.load(cfg.args[0])
    mode = cfg.mode
    emb = None if mode == "bm25" else index_embedder(idx, cfg.model)
    for q, hits in zip(cfg.args[1:], idx.search(cfg.args[1:], emb, cfg.k, mode)):
        if cfg.json:
            print(json.dumps({"query": q, "hits": [h.as_dict() for h in hits]}, ensure_ascii=False))
            continue
        print(f"# {q}")
        for h in hits:
            text = h.chunk.text.replace("\n", " ")
            print(f"[{h.rank}] {h.score:.4f}  {h.chunk.cite()}\n    {text[:300]}")
    return 0
