"""Writing a Llama, Qwen2 or Qwen3 model and its tokenizer as a GGUF file for llama.cpp / Ollama.

The `gguf` package's writer does the file format; this module decides what goes in it the way
llama.cpp's own converter does: the architecture's tensor names (Qwen2's q/k/v biases and Qwen3's
q/k norms included), a Llama's q/k projections permuted into llama.cpp's rotary layout (Qwen's
are written as they are, as llama.cpp's converter does), 1-D tensors kept in f32, and the
tokenizer as metadata. llama.cpp's converter refuses a tokenizer whose pre-tokenizer it does not
recognise by hash (an expanded vocabulary is always unknown to it); here the pre-tokenizer is read
from `tokenizer.json` itself and named explicitly, so hanlm's expanded byte-level and
SentencePiece vocabularies both export.

Tokenizers: byte-level BPE -> `tokenizer.ggml.model = "gpt2"` with its merges; SentencePiece
(tokenizers' BPE or Unigram behind a Metaspace pre-tokenizer) -> `"llama"` with scores and token
types (BPE scores follow the merge order, which is how llama.cpp's SentencePiece tokenizer picks
merges). Embedding rows beyond the tokenizer (padded to a multiple of 64) become unused
`[PADn]` tokens, as llama.cpp writes them.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hanlm.modeling import ModelError

GGUF_TYPES = ("f32", "f16", "q8_0")
# The model types written, each under llama.cpp's architecture of the same name.
ARCHITECTURES = ("llama", "qwen2", "qwen3")

# gguf TokenType values (kept here so the tokenizer logic needs no heavy import).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class GGUFExportError(ModelError):
    """A model or tokenizer that cannot be written as a GGUF file; says what to do instead."""


@dataclass
class GGUFVocab:
    """The tokenizer as llama.cpp's metadata describes it."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # llama.cpp's pre-tokenizer name
    tokens: list[str]
    types: list[int]
    scores: list[float] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    add_space_prefix: bool = False
    special: dict[str, int] = field(default_factory=dict)  # bos/eos/unk/pad/eot -> id
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None


# --------------------------------------------------------------------------- tokenizer


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """tokenizers writes merges as "a b" strings (older) or [a, b] pairs (newer)."""
    out = []
    for m in model.get("merges") or []:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        out.append((a, b))
    return out


def _types(spec: dict[str, Any]) -> list[str]:
    """Every component `type` in a tokenizer.json section (sequences flattened)."""
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        inner = spec.get("pretokenizers") or spec.get("normalizers") or spec.get("decoders") or []
        return [t for s in inner for t in _types(s)]
    return [spec.get("type", "")]


def _find(spec: dict[str, Any] | None, kind: str) -> list[dict[str, Any]]:
    if not spec:
        return []
    if spec.get("type") == "Sequence":
        inner = spec.get("pretokenizers") or spec.get("normalizers") or spec.get("decoders") or []
        return [x for s in inner for x in _find(s, kind)]
    return [spec] if spec.get("type") == kind else []


def detect_pre(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer, or None if unknown.

    Split regexes are matched against the table transformers' GGUF reader uses, so a name
    written here is one both llama.cpp and transformers rebuild the same split from.
    """
    pre = spec.get("pre_tokenizer") or {}
    levels = _find(pre, "ByteLevel")
    if not levels or any(bl.get("add_prefix_space") for bl in levels):
        return None
    kinds = _types(pre)
    if kinds == ["ByteLevel"] and levels[0].get("use_regex", True):
        return "gpt-2"
    digits = _find(pre, "Digits")
    if kinds == ["Digits", "ByteLevel"] and digits[0].get("individual_digits"):
        return "smollm"
    splits = _find(pre, "Split")
    if len(splits) == 1 and kinds == ["Split", "ByteLevel"]:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )

        regex = (splits[0].get("pattern") or {}).get("Regex")
        preferred = ("llama-bpe", "qwen2", "gpt-4o", "tekken", "qwen35")
        names = [n for n, r in GGUF_PRE_TOKENIZER_SPLITS.items() if r == regex]
        for name in preferred:
            if name in names:
                return name
        return names[0] if names else None
    return None


def _is_sentencepiece(spec: dict[str, Any]) -> bool:
    parts = _types(spec.get("pre_tokenizer") or {}) + _types(spec.get("normalizer") or {})
    if "Metaspace" in parts:
        return True
    replaces = _find(spec.get("normalizer"), "Replace")
    return any(r.get("content") == "\u2581" for r in replaces)


def _space_prefix(spec: dict[str, Any]) -> bool:
    meta = _find(spec.get("pre_tokenizer"), "Metaspace")
    if meta:
        return meta[0].get("prepend_scheme", "always") in ("always", "first")
    return bool(_find(spec.get("normalizer"), "Prepend"))


def _adds(tok: Any, which: str) -> bool:
    """Whether encoding adds the BOS (or EOS) token: what llama.cpp's add_bos_token means."""
    tid = getattr(tok, f"{which}_token_id", None)
    if tid is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and (ids[0] == tid if which == "bos" else ids[-1] == tid)


def gguf_vocab(tok: Any, n_rows: int, pre: str = "auto", eot_id: int | None = None) -> GGUFVocab:
    """The tokenizer `tok` as GGUF metadata for a model with `n_rows` embedding rows."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise GGUFExportError(
            f"{type(tok).__name__}: only tokenizers with a tokenizer.json (a fast tokenizer) can"
            " be written to GGUF; save the tokenizer with a fast tokenizer first"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    vocab = tok.get_vocab()
    if len(vocab) > n_rows:
        raise GGUFExportError(
            f"the tokenizer has {len(vocab)} tokens but the model only {n_rows} embedding rows;"
            " resize the embeddings (as hanlm vocab/sft do) before exporting"
        )
    tokens: list[str | None] = [None] * n_rows
    for text, i in vocab.items():
        tokens[i] = text
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    sentencepiece = _is_sentencepiece(spec)
    kind = "llama" if sentencepiece else "gpt2"
    if kind == "gpt2":
        detected = detect_pre(spec)
        if pre == "auto":
            if detected is None:
                raise GGUFExportError(
                    "the tokenizer's pre-tokenizer"
                    f" {json.dumps(spec.get('pre_tokenizer'))[:200]} is not one llama.cpp names;"
                    " pass gguf_pre=NAME (a llama.cpp pre-tokenizer, e.g. gpt-2, llama-bpe,"
                    " qwen2) that splits text the same way"
                )
            pre = detected
        if model.get("type") != "BPE":
            raise GGUFExportError(f"a byte-level tokenizer with a {model.get('type')} model")
    else:
        pre = "default" if pre == "auto" else pre
        if model.get("type") not in ("BPE", "Unigram"):
            raise GGUFExportError(
                f"a SentencePiece-style tokenizer with a {model.get('type')} model: only BPE and"
                " Unigram SentencePiece vocabularies can be written"
            )
    merges = _merge_pairs(model)
    rank = {a + b: r for r, (a, b) in reversed(list(enumerate(merges)))}
    unigram_scores = {}
    if model.get("type") == "Unigram":
        unigram_scores = {p: float(s) for p, s in model.get("vocab", [])}
    unk = getattr(tok, "unk_token_id", None)

    out_tokens, types, scores = [], [], []
    for i, text in enumerate(tokens):
        score = 0.0
        if text is None:
            text, ttype = f"[PAD{i}]", UNUSED
        elif i in added:
            ttype = CONTROL if added[i].special else USER_DEFINED
            if kind == "llama" and ttype == USER_DEFINED:
                text = text.replace("\u2581", " ")  # llama.cpp expects them pre-normalised
        elif i == unk:
            ttype = UNKNOWN
        elif kind == "llama" and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            ttype = BYTE
        else:
            ttype = NORMAL
            if kind == "llama":
                score = unigram_scores.get(text, -float(rank[text]) if text in rank else 0.0)
        out_tokens.append(text)
        types.append(ttype)
        scores.append(score)

    special = {}
    for name in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{name}_token_id", None)
        if tid is not None:
            special[name] = int(tid)
    if eot_id is not None and eot_id != special.get("eos"):
        special["eot"] = int(eot_id)
    template = getattr(tok, "chat_template", None)
    return GGUFVocab(
        model=kind,
        pre=pre,
        tokens=out_tokens,
        types=types,
        scores=scores if kind == "llama" else [],
        merges=[f"{a} {b}" for a, b in merges],
        add_space_prefix=_space_prefix(spec) if kind == "llama" else False,
        special=special,
        add_bos=_adds(tok, "bos"),
        add_eos=_adds(tok, "eos"),
        chat_template=template if isinstance(template, str) else None,
    )


def source_pre(path: str | Path) -> str | None:
    """The pre-tokenizer name a GGUF file states (to carry it over from a GGUF source)."""
    from gguf import GGUFReader

    field_ = GGUFReader(str(path)).fields.get("tokenizer.ggml.pre")
    return str(field_.contents()) if field_ is not None else None


# --------------------------------------------------------------------------- tensors


def check_architecture(config: Any) -> str:
    """llama.cpp's name for the model's architecture; refuses, before any slow work, what that
    architecture cannot hold."""
    mtype = getattr(config, "model_type", "")
    if mtype not in ARCHITECTURES:
        raise GGUFExportError(
            f"GGUF export writes the {', '.join(ARCHITECTURES)} architectures; this model is"
            f" '{mtype}'. Export safetensors (format=safetensors) and convert it with llama.cpp's"
            " convert_hf_to_gguf.py"
        )
    if mtype == "llama" and (
        getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False)
    ):
        raise GGUFExportError("a Llama with attention/MLP biases: llama.cpp's llama has none")
    if mtype == "qwen3" and getattr(config, "attention_bias", False):
        raise GGUFExportError("a Qwen3 with attention biases: llama.cpp's qwen3 has none")
    if getattr(config, "use_sliding_window", False):
        raise GGUFExportError(
            f"a {mtype} model with sliding-window attention: llama.cpp's {mtype} attends to the"
            " whole context, so its answers would differ; export as safetensors"
        )
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rtype = rope.get("rope_type", "default")
    if rtype not in ("default", "linear", "yarn"):
        raise GGUFExportError(
            f"RoPE scaling '{rtype}' has no GGUF metadata llama.cpp reads for a {mtype} model;"
            " export without it (model.rope.type=none) or as safetensors"
        )
    return mtype


def _permute(w: Any, n_head: int) -> Any:
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), as its converter does."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tensor_type(arr: Any, gtype: str) -> Any:
    from gguf import GGMLQuantizationType as Q

    if arr.ndim == 1 or gtype == "f32":
        return Q.F32
    if gtype == "q8_0" and arr.shape[-1] % 32 == 0:
        return Q.Q8_0
    return Q.F16  # f16, and q8_0's fallback for rows not a multiple of its 32-value block


def write_gguf(
    model: Any,
    vocab: GGUFVocab,
    path: str | Path,
    gtype: str = "f16",
    name: str = "",
    progress: bool = True,
) -> dict[str, Any]:
    """Write `model` (an HF Llama, Qwen2 or Qwen3 causal LM, any dtype) and `vocab` to `path`,
    atomically.

    Returns what was written: size, tensor count and the count per GGML type.
    """
    import gguf
    import numpy as np
    from tqdm.auto import tqdm

    if gtype not in GGUF_TYPES:
        raise GGUFExportError(f"gguf_type={gtype!r}: choose one of {', '.join(GGUF_TYPES)}")
    config = model.config
    arch = check_architecture(config)
    permute = arch == "llama"  # only Llama's q/k go into llama.cpp's rotary layout
    n_layers = config.num_hidden_layers
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    rope = dict(getattr(config, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    ftype = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[gtype]

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        writer.add_name(name or path.stem)
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        writer.add_block_count(int(n_layers))
        writer.add_feed_forward_length(int(config.intermediate_size))
        writer.add_head_count(int(n_head))
        writer.add_head_count_kv(int(n_kv))
        writer.add_rope_freq_base(float(theta))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(len(vocab.tokens))
        writer.add_rope_dimension_count(int(head_dim))
        # as llama.cpp's converter: whenever the config names head_dim (Qwen3's readers
        # otherwise assume its default of 128), or it differs from hidden_size / heads
        if config.to_dict().get("head_dim") or head_dim * n_head != config.hidden_size:
            writer.add_key_length(int(head_dim))
            writer.add_value_length(int(head_dim))
        rtype = rope.get("rope_type", "default")
        if rtype in ("linear", "yarn"):
            scaling = (
                gguf.RopeScalingType.LINEAR if rtype == "linear" else gguf.RopeScalingType.YARN
            )
            writer.add_rope_scaling_type(scaling)
            writer.add_rope_scaling_factor(float(rope["factor"]))
            if "original_max_position_embeddings" in rope:
                writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_vocab(writer, vocab)

        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        names = gguf.get_tensor_name_map(arch_id, n_layers)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        state = model.state_dict()
        counts: dict[str, int] = {}
        items = [(k, v) for k, v in state.items() if not (tied and k == "lm_head.weight")]
        for key, value in tqdm(items, desc=f"gguf {gtype}", leave=False, disable=not progress):
            gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise GGUFExportError(f"tensor {key} has no llama.cpp name in its {arch}")
            arr = value.detach().float().cpu().numpy()
            if permute and key.endswith("q_proj.weight"):
                arr = _permute(arr, n_head)
            elif permute and key.endswith("k_proj.weight"):
                arr = _permute(arr, n_kv)
            qtype = _tensor_type(arr, gtype)
            data = gguf.quants.quantize(np.ascontiguousarray(arr), qtype)
            writer.add_tensor(gname, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        Path(tmp).unlink(missing_ok=True)
        raise
    return {"file": path.name, "bytes": path.stat().st_size, "tensors": counts}


def _add_vocab(writer: Any, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        # llama.cpp reads merges for byte-level BPE only; transformers' reader rebuilds a
        # SentencePiece-BPE vocabulary exactly from them instead of guessing from scores.
        writer.add_token_merges(vocab.merges)
    adders = {
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "eot": writer.add_eot_token_id,
    }
    for name, tid in vocab.special.items():
        adders[name](tid)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.model == "llama":
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def read_gguf_types(path: str | Path) -> dict[str, int]:
    """Tensor count per GGML type in a GGUF file (a quick check of what a file holds)."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for t in GGUFReader(str(path)).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts
