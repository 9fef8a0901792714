"""`hanlm export`: a model directory llama.cpp, Ollama or transformers runs, checked against its
source.

Reads top to bottom: resolve the source (a model, a base + LoRA adapter, or an adapter alone
that names its base) -> load it in fp32 and merge the adapter (checked against the PeftModel's
logits) -> the fp32 model's greedy answers and logits on a prompt set, the reference -> prune the
vocabulary to a corpus if asked (checked: same ids, same logits on the kept ids, same greedy text
on the corpus) -> write the GGUF (f32/f16/q8_0) and/or safetensors (fp32/fp16/bf16) -> load each
back from disk — the GGUF through transformers' own GGUF reader — and compare it with the
reference -> figures, sizes and times in hanlm.json. The GGUF writing and the pruning live in
`hanlm.export.gguf` and `hanlm.export.prune`.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

from hanlm.config import ConfigError, ModelConfig, OutputConfig, TemplateName, opt
from hanlm.data.templates import TemplateError, stop_token_ids
from hanlm.export.gguf import check_architecture, gguf_vocab, source_pre, write_gguf
from hanlm.export.llamacpp import (
    ENV_VAR,
    LLAMACPP_TOLERANCE,
    QUANTIZE_TYPES,
    LlamaServer,
    find_llama_cpp,
    llamacpp_parity,
    quantize_gguf,
)
from hanlm.export.modelfile import write_modelfile
from hanlm.export.parity import (
    TOLERANCE,
    compare,
    compare_token_ids,
    forward_logits,
    greedy_answers,
    judge,
)
from hanlm.export.prune import corpus_texts, plan_keep, prune_model, prune_tokenizer, size_saved
from hanlm.modeling import (
    ModelError,
    load_model,
    load_tokenizer,
    resolve_source,
    torch_dtype,
)
from hanlm.runs import Run
from hanlm.tokenizer.base import PROBE_TEXTS

DEFAULT_PROMPTS = [
    "用一句话介绍长城。",
    "What is the capital of France?",
    "写一首关于春天的短诗，不超过四行。",
    "Translate into English: 床前明月光，疑是地上霜。",
    "1 + 1 等于几？Answer briefly 😀",
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class ExportError(ModelError):
    """An export that cannot be done, or whose output failed its parity check."""


@dataclass
class ExportConfig(OutputConfig):
    UNUSED: ClassVar[dict[str, str]] = {
        "model.dtype": "export always loads fp32; set dtype= (safetensors) or gguf_type=",
        "resume": "an export is redone whole (pass overwrite=true to replace one)",
    }

    model: ModelConfig = opt(
        ModelConfig,
        "the source: a HF dir, a .gguf, a LoRA adapter dir (its base named in"
        " adapter_config.json) or a run dir holding adapter/",
    )
    adapter: str = opt("", "a LoRA adapter directory to merge into model.path")
    format: Literal["safetensors", "gguf", "both"] = opt(
        "safetensors", "safetensors (transformers, vLLM), gguf (llama.cpp, Ollama) or both"
    )
    dtype: Literal["fp32", "fp16", "bf16"] = opt("fp32", "safetensors weight dtype")
    gguf_type: Literal["f32", "f16", "q8_0", "q4_k_m"] = opt(
        "f16", "GGUF tensor type (norms stay f32; q4_k_m: made by llama.cpp's llama-quantize)"
    )
    gguf_name: str = opt("", "the .gguf file's name in output_dir (default model-<gguf_type>.gguf)")
    gguf_pre: str = opt(
        "auto",
        "llama.cpp pre-tokenizer name (auto: read from tokenizer.json, or the source GGUF's)",
    )
    template: TemplateName = opt("auto", "chat template whose end-of-turn token is a stop id")
    prune_vocab: list[str] = opt(
        [], "corpus paths: keep only the tokens it uses (plus specials and bytes), remap ids"
    )
    prune_min_count: int = opt(1, "a corpus token is kept if used at least this often")
    prune_max_records: int = opt(0, "read at most this many corpus records per path (0 = all)")
    prompts: list[str] = opt(
        [], "parity prompts (default: a mixed zh/en set; with prune_vocab, corpus beginnings)"
    )
    max_new_tokens: int = opt(24, "greedy tokens per parity answer")
    parity: Literal["error", "warn", "off"] = opt(
        "error", "a failed parity check: error (exit non-zero), warn, or off (measured only)"
    )
    tolerance: float = opt(0.0, "largest logit error / largest logit (0 = per-type default)")
    judge: Literal["auto", "llama.cpp", "transformers"] = opt(
        "auto",
        "who runs the GGUF for its parity check (auto: llama.cpp's llama-server when found, else"
        " transformers' GGUF reader)",
    )

    def validate(self) -> None:
        if self.gguf_name and not self.gguf_name.endswith(".gguf"):
            raise ConfigError(f"gguf_name={self.gguf_name!r} must end in .gguf")
        if self.gguf_name and "/" in self.gguf_name:
            raise ConfigError("gguf_name is a file name inside output_dir, not a path")
        if self.prune_min_count < 1 or self.max_new_tokens < 1:
            raise ConfigError("prune_min_count and max_new_tokens must be at least 1")
        if self.tolerance < 0:
            raise ConfigError(f"tolerance={self.tolerance} must be >= 0")


# --------------------------------------------------------------------------- the source


def _has_tokenizer(d: Path) -> bool:
    return any((d / n).is_file() for n in TOKENIZER_FILES)


def resolve_inputs(cfg: ExportConfig) -> tuple[str, str | None, str]:
    """(base model path, adapter dir or None, tokenizer path) from what the user named."""
    path = Path(cfg.model.path).expanduser()
    adapter: Path | None = Path(cfg.adapter).expanduser() if cfg.adapter else None
    if adapter is None and path.is_dir() and not (path / "config.json").is_file():
        if (path / "adapter_config.json").is_file():
            adapter = path
        elif (path / "adapter" / "adapter_config.json").is_file():
            adapter = path / "adapter"  # a run saved with lora.merge=false
    if adapter is None:
        return cfg.model.path, None, cfg.model.path
    conf_file = adapter / "adapter_config.json"
    if not conf_file.is_file():
        raise ExportError(
            f"{adapter}: not a LoRA adapter directory (no adapter_config.json); pass the"
            " directory peft's save_pretrained wrote"
        )
    conf = json.loads(conf_file.read_text(encoding="utf-8"))
    if conf.get("peft_type", "LORA") != "LORA":
        raise ExportError(f"{conf_file}: a {conf['peft_type']} adapter; export merges LoRA only")
    if adapter == path or adapter.parent == path:
        base = conf.get("base_model_name_or_path") or ""
        if not base:
            raise ExportError(
                f"{conf_file} names no base model (base_model_name_or_path); pass"
                " model.path=BASE adapter=ADAPTER_DIR"
            )
        if not Path(base).exists() and (adapter / base).exists():
            base = str(adapter / base)
    else:
        base = cfg.model.path
    candidates = [adapter, adapter.parent] if adapter.parent != Path(base) else [adapter]
    tok_dir = next((str(d) for d in candidates if _has_tokenizer(d)), base)
    return base, str(adapter), tok_dir


def _adapter_rows(adapter: str) -> int | None:
    """Embedding rows the adapter was trained with (saved when embed_tokens was trained whole)."""
    from safetensors import safe_open

    f = Path(adapter) / "adapter_model.safetensors"
    if not f.is_file():
        return None
    with safe_open(str(f), framework="pt") as st:
        for key in list(st.keys()):  # safe_open is not iterable
            if "embed_tokens" in key and len(st.get_slice(key).get_shape()) == 2:
                return int(st.get_slice(key).get_shape()[0])
    return None


def _merge(model: Any, tok: Any, adapter: str, probe: list[list[int]]) -> tuple[Any, dict]:
    """The base with the adapter merged in, and how far the merged logits are from peft's."""
    from peft import PeftModel

    rows = _adapter_rows(adapter)
    if rows and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows, mean_resizing=False)
    elif len(tok) > model.get_input_embeddings().weight.shape[0]:
        raise ExportError(
            f"{adapter}: the tokenizer has {len(tok)} tokens but the base model fewer rows and"
            " the adapter carries no embeddings; export the model the adapter was trained on"
        )
    try:
        peft_model = PeftModel.from_pretrained(model, adapter)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ExportError(f"{adapter}: does not fit its base model ({e})") from None
    before = forward_logits(peft_model, probe)
    merged = peft_model.merge_and_unload()
    return merged, compare(before, forward_logits(merged, probe))


# --------------------------------------------------------------------------- measurements


def _stops(tok: Any, template: str) -> list[int]:
    try:
        return stop_token_ids(tok, template)
    except TemplateError:
        return [tok.eos_token_id] if tok.eos_token_id is not None else []


def _prompt_ids(tok: Any, prompts: list[str], chat: bool) -> list[list[int]]:
    if chat:
        return [
            list(
                tok.apply_chat_template(
                    [{"role": "user", "content": p}],
                    tokenize=True,
                    add_generation_prompt=True,
                    return_dict=True,
                )["input_ids"]
            )
            for p in prompts
        ]
    return [tok(p)["input_ids"] for p in prompts]


def _dir_bytes(path: str, patterns: tuple[str, ...]) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for pat in patterns for f in p.glob(pat) if f.is_file())


# --------------------------------------------------------------------------- run


def default_output_dir(cfg: ExportConfig) -> Path:
    """Where an export without output_dir writes: beside what the user named (the adapter when
    one is given), as NAME-gguf, NAME-<dtype> or NAME-export; in the working directory for a
    hub id or an installed package's file."""
    named = cfg.adapter or cfg.model.path
    suffix = {"gguf": "gguf", "safetensors": cfg.dtype, "both": "export"}[cfg.format]
    p = Path(named).expanduser()
    if named.startswith("pkg:"):
        return Path.cwd() / f"{Path(named).stem}-{suffix}"
    if not p.exists():  # a hub id
        return Path.cwd() / f"{p.name or 'model'}-{suffix}"
    p = p.resolve()
    return p.parent / f"{p.stem if p.is_file() else p.name}-{suffix}"


def run(cfg: ExportConfig) -> Path:
    t0 = time.time()
    if not cfg.output_dir:
        cfg = replace(cfg, output_dir=str(default_output_dir(cfg)))
        print(f"[hanlm] output_dir not set: writing to {cfg.output_dir}")
    base, adapter, tok_path = resolve_inputs(cfg)
    src = resolve_source(base)
    with Run("export", cfg) as run:
        summary: dict[str, Any] = {"source": base, "adapter": adapter, "format": cfg.format}
        checks = Parity()
        tok = load_tokenizer(tok_path)
        model = load_model(replace(cfg.model, path=base, dtype="float32"))
        if cfg.format != "safetensors":
            check_architecture(model.config)  # before any slow work
        summary["source_bytes"] = _dir_bytes(
            str(Path(src.path) / src.gguf_file) if src.gguf_file else src.path,
            ("*.safetensors", "*.bin"),
        )
        stops = _stops(tok, cfg.template)
        if adapter:
            model = _merge_adapter(cfg, model, tok, adapter, checks)
        summary["seconds_load_merge"] = round(time.time() - t0, 2)
        if cfg.prune_vocab:
            tok, stops, prompts, chat = _prune_vocab(cfg, model, tok, stops, checks)
        else:
            prompts = cfg.prompts or DEFAULT_PROMPTS
            chat = bool(getattr(tok, "chat_template", None))
        ref = _reference(cfg, model, tok, prompts, chat, stops)
        summary["stop_ids"] = stops
        if cfg.format in ("gguf", "both"):
            _export_gguf(cfg, run, model, tok, src, base, stops, ref, checks, summary)
        if cfg.format in ("safetensors", "both"):
            _export_safetensors(cfg, run, model, tok, stops, ref, checks, summary)
        summary["seconds"] = round(time.time() - t0, 2)
        _finish(cfg, run, summary, checks)
    return run.dir


@dataclass
class Parity:
    """Each merged, pruned or written model's figures against its reference (`results`, by
    name), and the checks they failed."""

    results: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    def record(self, name: str, kind: str, result: dict[str, Any], tol: float) -> None:
        self.results[name.replace(" ", "_")] = result
        self.failures += judge(name, kind, result, tol)


def _merge_adapter(cfg: ExportConfig, model: Any, tok: Any, adapter: str, checks: Parity) -> Any:
    """1. The adapter merged in; the merged model must give the PeftModel's logits."""
    probe = [tok(t)["input_ids"][:128] for t in PROBE_TEXTS]
    model, result = _merge(model, tok, adapter, probe)
    checks.record("merge", "fp32", result, cfg.tolerance or 1e-4)
    print(
        f"[hanlm] merged {adapter}: max logit diff"
        f" {result['max_abs_logit_diff']:.2e} from the PeftModel's"
    )
    return model


def _prune_vocab(
    cfg: ExportConfig, model: Any, tok: Any, stops: list[int], checks: Parity
) -> tuple[Any, list[int], list[str], bool]:
    """2. The vocabulary pruned to a corpus (the model in place): same ids, same logits on the
    kept ids, same greedy text. Returns the pruned tokenizer, the stop ids remapped, the parity
    prompts (default: corpus beginnings) and whether they go through the chat template."""
    t1 = time.time()
    texts = corpus_texts(cfg.prune_vocab, tok, cfg.prune_max_records)
    plan = plan_keep(tok, texts, cfg.prune_min_count)
    sample = [tok(t)["input_ids"][:128] for t in texts[:16]]
    starts = [s[:16] for s in sample[:8]]  # greedy prompts: corpus beginnings, as ids
    ref_logits = forward_logits(model, sample)
    ref_answers = greedy_answers(model, starts, cfg.max_new_tokens, stops)
    rows = model.get_input_embeddings().weight.shape[0]
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    new_tok = prune_tokenizer(tok, plan)
    prune_model(model, plan)
    o2n = plan.old_to_new
    remapped = [[o2n[i] for i in s] for s in sample]
    stops = [o2n[s] for s in stops if s in o2n]
    answers = greedy_answers(
        model, [[o2n[i] for i in s] for s in starts], cfg.max_new_tokens, stops
    )
    answers = [[plan.keep[i] for i in a] for a in answers]  # back to the old ids
    roundtrip = [
        new_tok.decode(new_tok(t)["input_ids"], skip_special_tokens=True) == t for t in PROBE_TEXTS
    ]
    result = {
        **compare(ref_logits, forward_logits(model, remapped), ref_answers, answers, plan.keep),
        "token_ids_equal": [new_tok(t)["input_ids"][:128] for t in texts[:16]] == remapped,
        "probe_roundtrip": all(roundtrip),
        **size_saved(plan, rows, model.config.hidden_size, tied, 4),
        "corpus_texts": len(texts),
        "seconds": round(time.time() - t1, 2),
    }
    checks.record("prune", "prune", result, cfg.tolerance)
    tok = new_tok
    prompts = cfg.prompts or [
        tok.decode([o2n[i] for i in s], skip_special_tokens=True) for s in starts
    ]
    chat = bool(cfg.prompts) and bool(getattr(tok, "chat_template", None))
    print(
        f"[hanlm] pruned the vocabulary {plan.old_size} -> {len(plan.keep)}"
        f" ({result['params_removed']:,} parameters removed)"
    )
    return tok, stops, prompts, chat


@dataclass
class Reference:
    """The fp32 model about to be written, measured: the prompts as ids, the probe (the probe
    texts and the prompts) with its logits, the greedy answers, and the texts whose token ids a
    written tokenizer must reproduce."""

    prompt_ids: list[list[int]]
    probe: list[list[int]]
    logits: list[Any]
    answers: list[list[int]]
    texts: list[str]
    chats: list[list[dict[str, str]]]


def _reference(
    cfg: ExportConfig, model: Any, tok: Any, prompts: list[str], chat: bool, stops: list[int]
) -> Reference:
    """3. The reference: the fp32 model about to be written."""
    p_ids = _prompt_ids(tok, prompts, chat)
    probe = [tok(t)["input_ids"][:128] for t in PROBE_TEXTS] + p_ids
    ref_logits = forward_logits(model, probe)
    ref_answers = greedy_answers(model, p_ids, cfg.max_new_tokens, stops)
    check_texts = [*PROBE_TEXTS, *prompts]
    chats: list[list[dict[str, str]]] = []
    if chat:
        check_texts += [tok.decode(p) for p in p_ids]
        chats = [[{"role": "user", "content": p}] for p in prompts] + [
            [
                {"role": "user", "content": prompts[0]},
                {"role": "assistant", "content": prompts[-1]},
                {"role": "user", "content": prompts[-1]},
            ]
        ]
    return Reference(p_ids, probe, ref_logits, ref_answers, check_texts, chats)


def _export_gguf(
    cfg: ExportConfig,
    run: Run,
    model: Any,
    tok: Any,
    src: Any,
    base: str,
    stops: list[int],
    ref: Reference,
    checks: Parity,
    summary: dict[str, Any],
) -> None:
    """4. The GGUF and its Ollama Modelfile, judged against the reference by llama.cpp when it
    is present (`judge=auto`), else by transformers' GGUF reader."""
    gguf_name = cfg.gguf_name or f"model-{cfg.gguf_type}.gguf"
    t2 = time.time()
    pre = cfg.gguf_pre
    if pre == "auto" and src.gguf_file and not cfg.prune_vocab:
        pre = source_pre(Path(src.path) / src.gguf_file) or "auto"
    rows = model.get_input_embeddings().weight.shape[0]
    vocab = gguf_vocab(tok, rows, pre, stops[0] if stops else None)
    if cfg.gguf_type in QUANTIZE_TYPES:
        write = lambda p: write_gguf(model, vocab, p, "f32", Path(base).stem)  # noqa: E731
        info = quantize_gguf(find_llama_cpp(), write, run.dir / gguf_name, cfg.gguf_type)
    else:
        info = write_gguf(model, vocab, run.dir / gguf_name, cfg.gguf_type, Path(base).stem)
    written = time.time() - t2
    bin_dir = _llama_cpp(cfg.judge)
    if bin_dir is not None:
        limit = cfg.tolerance or LLAMACPP_TOLERANCE.get(cfg.gguf_type, TOLERANCE[cfg.gguf_type])
        with LlamaServer(bin_dir, run.dir / gguf_name) as server:
            result = llamacpp_parity(
                server,
                tok,
                ref.texts,
                ref.chats,
                ref.prompt_ids,
                ref.answers,
                max(float(x.abs().max()) for x in ref.logits),
                lambda ids: forward_logits(model, [ids])[0],
                cfg.max_new_tokens,
                limit,
            )
        judge_name = f"llama.cpp ({bin_dir / 'llama-server'})"
    else:
        limit = cfg.tolerance
        result = _transformers_check(cfg, run.dir / gguf_name, vocab, tok, ref, stops)
        judge_name = "transformers' GGUF reader"
    result.update(
        info,
        tokenizer_model=vocab.model,
        pre_tokenizer=vocab.pre,
        seconds_write=round(written, 2),
    )
    checks.record(f"gguf {cfg.gguf_type}", cfg.gguf_type, result, limit)
    summary["gguf_file"], summary["gguf_bytes"] = gguf_name, info["bytes"]
    summary["parity_judge"] = result["judge"]
    modelfile = write_modelfile(run.dir, gguf_name, tok, stops, vocab.add_bos, model)
    summary["modelfile_template"] = modelfile.family or None
    print(f"[hanlm] wrote {gguf_name} ({info['bytes'] / 1e6:.1f} MB) and an Ollama Modelfile")
    for w in modelfile.warnings:
        print(f"[hanlm] WARNING: Modelfile: {w}")
    print(f"[hanlm] parity judge for {gguf_name}: {judge_name}")


def _llama_cpp(judge: str) -> Path | None:
    """llama.cpp's binary directory if it judges the GGUF (`judge`: auto, llama.cpp or
    transformers)."""
    if judge == "transformers":
        return None
    found = find_llama_cpp()
    if found is None and judge == "llama.cpp":
        raise ExportError(
            "judge=llama.cpp but no llama-server was found: run `make llamacpp`, set"
            f" ${ENV_VAR} to its directory, or pass judge=auto"
        )
    return found


def _transformers_check(
    cfg: ExportConfig, gguf: Path, vocab: Any, tok: Any, ref: Reference, stops: list[int]
) -> dict[str, Any]:
    """The GGUF loaded back through transformers' GGUF reader (from a directory holding only
    it) and compared with the reference."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix=".reload.", dir=gguf.parent) as d:
        (Path(d) / gguf.name).symlink_to(gguf.resolve())
        g_model = load_model(ModelConfig(path=str(Path(d) / gguf.name), dtype="float32"))
        g_tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf.name)
    reader_space = vocab.model == "llama" and not vocab.add_space_prefix
    result = compare(
        ref.logits,
        forward_logits(g_model, ref.probe),
        ref.answers,
        greedy_answers(g_model, ref.prompt_ids, cfg.max_new_tokens, stops),
    )
    result.update(compare_token_ids(tok, g_tok, ref.texts, reader_space))
    result.update(
        judge="transformers", chat_template_equal=g_tok.chat_template == tok.chat_template
    )
    return result


def _export_safetensors(
    cfg: ExportConfig,
    run: Run,
    model: Any,
    tok: Any,
    stops: list[int],
    ref: Reference,
    checks: Parity,
    summary: dict[str, Any],
) -> None:
    """5. Safetensors in `dtype`, with tokenizer, chat template and stop ids; loaded back and
    compared with the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t3 = time.time()
    model = model.to(torch_dtype(cfg.dtype))
    run.save_model(model, tok, None, stops)
    written = time.time() - t3
    s_model = AutoModelForCausalLM.from_pretrained(run.dir, dtype=torch_dtype(cfg.dtype))
    s_tok = AutoTokenizer.from_pretrained(run.dir)
    result = compare(
        ref.logits,
        forward_logits(s_model, ref.probe),
        ref.answers,
        greedy_answers(s_model, ref.prompt_ids, cfg.max_new_tokens, stops),
    )
    result.update(compare_token_ids(tok, s_tok, ref.texts), seconds_write=round(written, 2))
    checks.record(f"safetensors {cfg.dtype}", cfg.dtype, result, cfg.tolerance)
    summary["safetensors_bytes"] = _dir_bytes(str(run.dir), ("*.safetensors",))


def _finish(cfg: ExportConfig, run: Run, summary: dict[str, Any], checks: Parity) -> None:
    """The parity figures in hanlm.json and printed; a failed check is an error (parity=error)
    or a warning (parity=warn)."""
    failures = checks.failures
    summary["parity_failures"] = failures
    run.set("parity", checks.results)
    for name, r in checks.results.items():
        print(
            f"[hanlm] {name}: rel logit diff {r['rel_logit_diff']:.2e}, top-1"
            f" {r['top1_agreement']:.1%}, greedy identical {r.get('greedy_identical', '-')}"
            + (f", stops equal {r['stops_equal']}" if "stops_equal" in r else "")
            + (f" (judge: {r['judge']})" if "judge" in r else "")
            + ("" if r.get("passed", True) else "  FAILED")
        )
    if failures and cfg.parity == "error":
        run.finish(summary, status="failed")
        raise ExportError(
            "parity check failed: " + "; ".join(failures) + f". The files are in {run.dir}"
            " (see hanlm.json 'parity'); pass parity=warn to accept them, or tolerance= to"
            " change the limit"
        )
    if failures and cfg.parity == "warn":
        print("[hanlm] WARNING: parity check failed: " + "; ".join(failures))
    run.finish(summary)
    print(f"[hanlm] export written to {run.dir}")
