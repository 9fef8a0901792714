"""What JSON-schema constrained decoding costs per token, and which library to use for it.

    python benchmarks/constrained_decoding.py [--gguf FILE.gguf] [--out results/FILE.json]

1. The candidate libraries on transformers' logits-processor interface, each fed the tokens of
   one valid answer (teacher forcing), on hanlm's tiny byte-level BPE tokenizers and, with
   `--gguf`, on Qwen2.5's 151,665-token tokenizer read from a GGUF file: compile time, mask time
   per token, and whether every token of the valid answer stayed allowed. xgrammar
   (`hanlm[serve]`); outlines-core and lm-format-enforcer only if installed (pip install
   outlines lm-format-enforcer). lm-format-enforcer's transformers integration does not import
   with transformers 5, so its tokenizer data is built here from the tokenizer directly.
2. hanlm's `GrammarProcessor` (xgrammar's mask plus the closing budget) on the same answer.
3. End to end on a random tiny model: `generate` of the same number of tokens with and without
   the json_object constraint, ms per generated token; with `--model-gguf`, a real chat model's
   greedy answer with and without a json_schema constraint (each answer printed).

This measures libraries, so it is a benchmark, not product code.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "dynasty": {"enum": ["唐", "宋", "元"]},
        "works": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "age", "dynasty", "works"],
    "additionalProperties": False,
}
ANSWER = '{"name": "李白 (Li Bai)", "age": 61, "dynasty": "唐", "works": ["静夜思", "将进酒"]}'


def teacher_forced(proc: Any, tok: Any, width: int) -> tuple[float, bool]:
    """Mean ms per token of `proc` over ANSWER's tokens (the first call excluded), and whether
    every one of them stayed allowed."""
    import torch

    ids = tok.encode(ANSWER, add_special_tokens=False)
    seq = torch.tensor([[0]])
    times, ok = [], True
    for t in ids:
        start = time.perf_counter()
        scores = proc(seq, torch.zeros(1, width))
        times.append(time.perf_counter() - start)
        ok = ok and bool(torch.isfinite(scores[0, t]))
        seq = torch.cat([seq, torch.tensor([[t]])], 1)
    return sum(times[1:]) / (len(times) - 1) * 1000, ok


def xgrammar_proc(tok: Any, width: int) -> Any:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(
        tok, vocab_size=width, stop_token_ids=[tok.eos_token_id]
    )
    grammar = xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(json.dumps(SCHEMA))
    return xgr.contrib.hf.LogitsProcessor(grammar)


def _masking(allowed_of: Any) -> Any:
    import torch

    def proc(seq: Any, scores: Any) -> Any:
        mask = torch.full_like(scores, float("-inf"))
        mask[0, allowed_of(seq)] = 0
        return scores + mask

    return proc


def outlines_proc(tok: Any, width: int) -> Any:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    from hanlm.serve.text import token_bytes

    special = set(tok.all_special_ids)
    vocab: dict[bytes, list[int]] = {}
    for i in range(len(tok)):
        b = token_bytes(tok, i) if i not in special else None
        if b is not None:
            vocab.setdefault(bytes(b), []).append(i)
    guide = Guide(
        Index(build_regex_from_schema(json.dumps(SCHEMA)), Vocabulary(tok.eos_token_id, vocab))
    )
    state = {"steps": 0}

    def allowed(seq: Any) -> Any:
        if state["steps"]:
            guide.advance(int(seq[0, -1]))
        state["steps"] += 1
        return guide.get_tokens()

    return _masking(allowed)


def lmfe_proc(tok: Any, width: int) -> Any:
    from lmformatenforcer import JsonSchemaParser, TokenEnforcer
    from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

    special = set(tok.all_special_ids)
    zero = tok.decode([0])
    regular = [
        (i, tok.decode([0, i])[len(zero) :], False) for i in range(len(tok)) if i not in special
    ]
    data = TokenEnforcerTokenizerData(regular, tok.decode, tok.eos_token_id, False, width)
    enforcer = TokenEnforcer(data, JsonSchemaParser(SCHEMA))
    return _masking(lambda seq: enforcer.get_allowed_tokens(seq[0, 1:].tolist()).allowed_tokens)


def hanlm_proc(tok: Any, width: int) -> Any:
    from hanlm.serve.constrain import LOOKAHEAD, SLACK, Grammars

    n = len(tok.encode(ANSWER, add_special_tokens=False))
    # a budget a little above the answer: the closing check runs at nearly every token, and the
    # answer's own ending is found before the budget would force one
    budget = n + SLACK + LOOKAHEAD // 2
    return Grammars(tok, [tok.eos_token_id], width).constraint(SCHEMA).processor(1, budget, 1)


LIBRARIES = {
    "xgrammar": xgrammar_proc,
    "outlines-core": outlines_proc,
    "lm-format-enforcer": lmfe_proc,
    "hanlm GrammarProcessor (xgrammar + closing)": hanlm_proc,
}


def tokenizers(gguf: str) -> dict[str, Any]:
    from hanlm.testing import qwen_tokenizer, tiny_tokenizer

    out = {"tiny byte-level BPE": tiny_tokenizer(), "qwen-like byte-level BPE": qwen_tokenizer()}
    if gguf:
        from transformers import AutoTokenizer

        path = Path(gguf)
        out["Qwen2.5 (GGUF)"] = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return out


def end_to_end(tokens: int = 96, rounds: int = 7) -> dict[str, float]:
    """Median ms per generated token of a random tiny model, with and without json_object."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM

    from hanlm.data.templates import prompt_ids, stop_token_ids
    from hanlm.modeling import load_tokenizer
    from hanlm.serve.constrain import json_schema_processor
    from hanlm.testing import tiny_model_dir

    path = tiny_model_dir(Path(tempfile.mkdtemp()) / "m", seed=3)
    tok, model = load_tokenizer(str(path)), AutoModelForCausalLM.from_pretrained(path).eval()
    stops = stop_token_ids(tok)
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": "JSON"}])])
    width = model.get_output_embeddings().weight.shape[0]
    runs: dict[str, list[float]] = {"plain": [], "json_object": []}
    for seed in range(rounds):  # A B A B ...: the machine's load hits both alike
        for name in runs:
            torch.manual_seed(seed)
            procs = []
            if name != "plain":
                procs = [json_schema_processor(tok, None, stops, width, tokens, ids.shape[1])]
            start = time.perf_counter()
            with torch.no_grad():
                got = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    logits_processor=procs,
                    max_new_tokens=tokens,
                    min_new_tokens=0 if procs else tokens,
                    do_sample=True,
                    eos_token_id=stops,
                    pad_token_id=tok.pad_token_id,
                )
            spent = (time.perf_counter() - start) * 1000
            runs[name].append(spent / (got.shape[1] - ids.shape[1]))
    return {name: round(sorted(v)[len(v) // 2], 3) for name, v in runs.items()}


def real_model(gguf: str, tokens: int = 48, rounds: int = 2) -> dict[str, list[float]]:
    """ms per generated token of a GGUF chat model's greedy answer (a poet as JSON), with and
    without a json_schema constraint, alternating; prints each answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hanlm.serve.constrain import json_schema_processor

    path = Path(gguf)
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    messages = [
        {"role": "user", "content": "用 JSON 介绍李白，包括 name, dynasty, works 三个字段。"}
    ]
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    stops = [tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id]
    width = model.get_output_embeddings().weight.shape[0]
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "dynasty": {"type": "string"},
            "works": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "dynasty", "works"],
        "additionalProperties": False,
    }
    runs: dict[str, list[float]] = {"plain": [], "json_schema": []}
    for _ in range(rounds):
        for name in runs:
            procs = []
            if name != "plain":
                procs = [json_schema_processor(tok, schema, stops, width, tokens, ids.shape[1])]
            start = time.perf_counter()
            with torch.no_grad():
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    logits_processor=procs,
                    max_new_tokens=tokens,
                    min_new_tokens=0 if procs else tokens,
                    do_sample=False,
                    eos_token_id=stops,
                    pad_token_id=tok.pad_token_id or stops[0],
                )
            n = out.shape[1] - ids.shape[1]
            runs[name].append(round((time.perf_counter() - start) * 1000 / n, 1))
            text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            print(json.dumps({name: runs[name][-1], "answer": text}, ensure_ascii=False))
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", default="", help="a GGUF file whose tokenizer to measure too")
    ap.add_argument("--out", default="", help="save the figures here as JSON")
    ap.add_argument("--e2e-only", action="store_true", help="only the end-to-end figures")
    ap.add_argument("--model-gguf", default="", help="also time a GGUF chat model's answers")
    args = ap.parse_args()
    rows = []
    for tname, tok in {} if args.e2e_only else tokenizers(args.gguf).items():
        width = len(tok)
        for lname, make in LIBRARIES.items():
            row: dict[str, Any] = {"tokenizer": tname, "vocab": width, "library": lname}
            try:
                start = time.perf_counter()
                proc = make(tok, width)
                row["compile_ms"] = round((time.perf_counter() - start) * 1000, 1)
                ms, ok = teacher_forced(proc, tok, width)
                row.update(mask_ms_per_token=round(ms, 3), valid_answer_allowed=ok)
            except ImportError as e:
                row["error"] = f"not installed: {e.name}"
            except Exception as e:  # a library failing on a tokenizer is a result here
                row["error"] = f"{type(e).__name__}: {e}"[:200]
            rows.append(row)
            print(json.dumps(row, ensure_ascii=False), flush=True)
    e2e: dict[str, Any] = dict(end_to_end())
    print(json.dumps({"end_to_end_ms_per_token": e2e}), flush=True)
    if args.model_gguf:
        e2e[Path(args.model_gguf).name] = real_model(args.model_gguf)
    if args.out:
        Path(args.out).write_text(
            json.dumps({"libraries": rows, "end_to_end_ms_per_token": e2e}, indent=1) + "\n"
        )


if __name__ == "__main__":
    main()
