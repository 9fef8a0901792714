"""Grounded answers that cite their source: a chat model before and after a short SFT on
grounded examples, judged on questions about poets it was not tuned on.

    python scripts/build_rag_set.py && python benchmarks/rag_cite.py runs/demo/sft

Training examples come from the ~70% of poets that `embed train` uses (never a held-out poet): a
poet's question with its biography and the two biographies BM25 ranks highest for the question
among the other training poets', in random order, as `hanlm rag ask` builds its prompt
(`hanlm.rag.answer.grounded_prompt`); the answer names the poet and cites the biography's number
("是丁仙芝[2]。"). Trained with `hanlm sft` (full weights).

Judged on the 402 held-out questions (judge: the known source biography of each; no model is
the judge, nor was one optimised against it):
- end to end: an index of the held-out biographies, BM25 retrieval (k = 3), `hanlm.rag.answer.ask`
  (greedy): does the answer cite the passage that is the question's biography, only that one, name
  the poet, or cite a number with no source? Citing [1] blindly would score retrieval's recall@1
  on "cites the right source", so the table gives that baseline too;
- shuffled: the biography and two BM25 distractors from the held-out set in random order, so the
  right number is uniform over 1-3 (a model that cites by position scores ~1/3).

Writes benchmarks/results/rag_cite.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hanlm.config import ModelConfig
from hanlm.generation import GenerationOptions
from hanlm.generation import generate as generate_answers
from hanlm.modeling import load_model, load_tokenizer
from hanlm.rag.answer import (
    RagAskConfig,
    RetrievalOptions,
    Retriever,
    ask,
    citation_marks,
    grounded_prompt,
)
from hanlm.rag.bm25 import BM25

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
K = 3
MAX_CHARS = 120  # characters of one source in the prompt (the demo model was trained at 256 tokens)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def _name(doc_id: str) -> str:
    return doc_id.split(":", 2)[2]


def shuffled_sources(
    query: str, gold: str, texts: list[str], bm25: BM25, rng: random.Random
) -> tuple[list[str], int]:
    """The gold text and the two texts BM25 ranks highest (other than it), shuffled; the gold's
    1-based number."""
    others = [texts[i] for i, _ in bm25.search(query, K + 1) if texts[i] != gold][: K - 1]
    sources = [gold, *others]
    rng.shuffle(sources)
    return sources, sources.index(gold) + 1


def training_examples(
    rows: list[dict[str, Any]], max_chars: int = MAX_CHARS, seed: int = 0
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    texts = sorted({r["text"] for r in rows})
    bm25 = BM25("jieba")
    bm25.add(texts)
    out = []
    for r in rows:
        sources, n = shuffled_sources(r["query"], r["text"], texts, bm25, rng)
        prompt = grounded_prompt(r["query"], sources, max_chars)
        answer = f"是{_name(r['doc_id'])}[{n}]。"
        out.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return out


def judge(answer: str, right: int | None, name: str, k: int) -> dict[str, bool]:
    marks = set(citation_marks(answer))
    return {
        "cites_right": right is not None and right in marks,
        "cites_only_right": right is not None and marks == {right},
        "cites_any": bool(marks),
        "names_poet": name in answer,
        "cites_no_source": any(not 1 <= m <= k for m in marks),
    }


def summarise(rows: list[dict[str, bool]]) -> dict[str, float]:
    return {key: round(sum(r[key] for r in rows) / len(rows), 3) for key in rows[0]}


def evaluate(
    model_dir: str, index: Path, docs: list[dict], queries: list[dict], max_chars: int = MAX_CHARS
) -> dict[str, Any]:
    tok = load_tokenizer(model_dir)
    model = load_model(ModelConfig(path=model_dir, dtype="float32")).eval()
    gen = GenerationOptions(temperature=0.0, max_new_tokens=32, repetition_penalty=1.0)
    retriever = Retriever(RetrievalOptions(index=str(index), k=K, mode="bm25", max_chars=max_chars))
    cfg = RagAskConfig(generation=gen)
    t0 = time.perf_counter()
    answers = ask(model, tok, retriever, [q["query"] for q in queries], cfg)
    end_to_end, first_is_gold, samples = [], 0, []
    for q, a in zip(queries, answers):
        ids = [s["doc_id"] for s in a["sources"]]
        right = ids.index(q["doc_id"]) + 1 if q["doc_id"] in ids else None
        first_is_gold += right == 1
        end_to_end.append(judge(a["answer"], right, _name(q["doc_id"]), K))
        if len(samples) < 5:
            samples.append({"question": q["query"], "answer": a["answer"], "right": right})
    seconds = time.perf_counter() - t0
    # shuffled: the right number uniform over 1..K
    rng = random.Random(1)
    texts = [d["text"] for d in docs]
    by_id = {d["id"]: d["text"] for d in docs}
    bm25 = BM25("jieba")
    bm25.add(texts)
    convs, rights = [], []
    for q in queries:
        sources, n = shuffled_sources(q["query"], by_id[q["doc_id"]], texts, bm25, rng)
        prompt = grounded_prompt(q["query"], sources, max_chars)
        convs.append([{"role": "user", "content": prompt}])
        rights.append(n)
    outs = generate_answers(model, tok, convs, gen)
    shuffled = [
        judge(o["text"], n, _name(q["doc_id"]), K) for o, n, q in zip(outs, rights, queries)
    ]
    return {
        "model": model_dir,
        "end_to_end": summarise(end_to_end),
        "cite_first_baseline": round(first_is_gold / len(queries), 3),
        "shuffled": summarise(shuffled),
        "shuffled_cite_first_baseline": round(sum(n == 1 for n in rights) / len(rights), 3),
        "ask_seconds": round(seconds, 1),
        "samples": samples,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="a chat model directory (e.g. runs/demo/sft)")
    ap.add_argument("--set", type=Path, default=ROOT / "build/rag", help="build_rag_set.py output")
    ap.add_argument("--work", type=Path, default=ROOT / "build/rag_cite")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-chars", type=int, default=MAX_CHARS, help="of one source in a prompt")
    ap.add_argument("--examples", type=int, default=0, help="training examples (0 = all)")
    ap.add_argument("--questions", type=int, default=0, help="held-out questions (0 = all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lora-r", type=int, default=0, help="LoRA rank (0 = full fine-tuning)")
    ap.add_argument("--max-length", type=int, default=768)
    ap.add_argument(
        "--template",
        default="chatml",
        help="SFT's chat template: chatml for the demo model; auto for a model with its own (Qwen)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/rag_cite"))
    args = ap.parse_args()
    docs, queries = _read(args.set / "docs.jsonl"), _read(args.set / "queries.jsonl")
    queries = queries[: args.questions or None]
    train = training_examples(_read(args.set / "cite_train.jsonl"), args.max_chars)
    train = random.Random(0).sample(train, args.examples) if args.examples else train
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "cite_sft.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in train), "utf-8")
    hanlm = str(BIN / "hanlm")
    index = args.work / f"index-{Path(args.model).name}"
    if not (index / "index.json").is_file():
        subprocess.run(
            [hanlm, "rag", "index", str(args.set / "docs.jsonl"), f"model.path={args.model}",
             f"output_dir={index}"],
            check=True,
        )  # fmt: skip
    tuned = args.work / f"sft-{Path(args.model).name}"
    t0 = time.perf_counter()
    lora = ["lora.enabled=true", f"lora.r={args.lora_r}", f"lora.alpha={2 * args.lora_r}"]
    subprocess.run(
        [hanlm, "sft", f"model.path={args.model}", f"data.paths=[{data}]",
         f"template={args.template}", f"max_length={args.max_length}", "train.max_steps=0",
         f"train.epochs={args.epochs}",
         f"train.batch_size={args.batch_size}", f"train.lr={args.lr}", "train.eval_steps=0",
         "train.save_steps=0", "train.logging_steps=10", "eval_prompts=0",
         f"output_dir={tuned}", "overwrite=true", *(lora if args.lora_r else [])],
        check=True,
    )  # fmt: skip
    train_s = time.perf_counter() - t0
    before = evaluate(args.model, index, docs, queries, args.max_chars)
    after = evaluate(str(tuned), index, docs, queries, args.max_chars)
    result = {
        "examples": len(train),
        "epochs": args.epochs,
        "lr": args.lr,
        "lora_r": args.lora_r,
        "template": args.template,
        "max_chars": args.max_chars,
        "train_seconds": round(train_s, 1),
        "questions": len(queries),
        "before": before,
        "after": after,
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    md = table(result)
    out.with_suffix(".md").write_text(md)
    print(md)


def table(r: dict[str, Any]) -> str:
    keys = ["cites_right", "cites_only_right", "names_poet", "cites_any", "cites_no_source"]
    lines = [
        f"{r['before']['model']}: {r['questions']} held-out questions; SFT"
        f" ({'LoRA r' + str(r['lora_r']) if r['lora_r'] else 'full'}) on {r['examples']} grounded"
        f" examples of other poets, {r['epochs']} epochs, lr {r['lr']}, {r['train_seconds']:.0f}"
        f" s; sources cut to {r['max_chars']} characters.",
        "",
        "| model | sources | " + " | ".join(keys) + " | citing [1] blindly |",
        "|---|---|" + "---|" * (len(keys) + 1),
    ]
    kinds = (
        ("end_to_end", "cite_first_baseline", "retrieved (BM25, k=3)"),
        ("shuffled", "shuffled_cite_first_baseline", "gold + 2 BM25 distractors, shuffled"),
    )
    for label in ("before", "after"):
        e = r[label]
        for kind, base, where in kinds:
            cells = " | ".join(f"{e[kind][k]:.3f}" for k in keys)
            lines.append(f"| {label} SFT | {where} | {cells} | {e[base]:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
