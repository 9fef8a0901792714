"""Sentence embeddings from a decoder LM (SGPT, Muennighoff 2022): one model for chat and search.

`pool()` turns the last hidden states into one vector per text: `weighted_mean` (SGPT: token i
of the n non-pad tokens weighs i / sum(1..n), because in a causal model later tokens have seen
more of the text), `mean` or `last_token`. The weights count positions among the non-pad tokens,
so left and right padding give the same vector. `Embedder` tokenises, batches (longest first, so
little padding is computed), brackets queries and documents with SGPT's asymmetric markers when
asked and L2-normalises. `hanlm serve` (`/v1/embeddings`), `hanlm rag` and `hanlm embed train`
all use this module; `hanlm embed MODEL_DIR` is its command.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from hanlm.config import ConfigError, InferenceModelConfig, opt
from hanlm.data.sources import read_json_line, read_lines
from hanlm.modeling import load_model, load_tokenizer, pad_batch
from hanlm.runs import atomic_write_text

if TYPE_CHECKING:
    import numpy as np
    import torch

Pooling = Literal["weighted_mean", "mean", "last_token"]
Kind = Literal["query", "document"]

# SGPT-BE's asymmetric search brackets: a query as "[...]", a document as "{...}" (the paper
# used these as special tokens on the bracket characters; plain text here, so any tokenizer has
# them and no embedding row is new).
MARKERS = {"query": ("[", "]"), "document": ("{", "}")}


@dataclass
class EmbedOptions:
    """How text becomes a vector; recorded with every index, so a query must match it."""

    pooling: Pooling = opt(
        "weighted_mean",
        "weighted_mean (SGPT: later tokens weigh more), mean, or last_token (the final hidden"
        " state)",
    )
    asymmetric: bool = opt(
        False, "bracket queries as [..] and documents as {..} (SGPT-BE's asymmetric search)"
    )
    max_length: int = opt(512, "most tokens per text (longer ones are truncated, and counted)")
    batch_size: int = opt(16, "texts per forward pass")

    def validate(self) -> None:
        if self.max_length < 1 or self.batch_size < 1:
            raise ConfigError("embed.max_length and embed.batch_size must be at least 1")


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str = "weighted_mean") -> torch.Tensor:
    """[B, T, H] hidden states and a [B, T] 0/1 mask (padding on either side) -> [B, H],
    not normalised. Computed in float32."""
    import torch

    h = hidden.float()
    m = mask.to(h.dtype)
    if pooling == "weighted_mean":
        # Position among the row's own tokens (1, 2, ... n), wherever the padding is.
        w = torch.cumsum(m, dim=1) * m
        return (h * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1e-9)
    if pooling == "mean":
        return (h * m.unsqueeze(-1)).sum(1) / m.sum(1, keepdim=True).clamp_min(1e-9)
    if pooling == "last_token":
        # The last position whose mask is 1 (right padding: n-1; left padding: T-1).
        positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
        last = (positions * m.long()).max(dim=1).values
        return h[torch.arange(h.shape[0], device=h.device), last]
    raise ValueError(f"unknown pooling {pooling!r}; choose weighted_mean, mean or last_token")


def decoder_of(model: Any) -> Any:
    """The transformer body that returns hidden states (no LM head: it is not needed)."""
    get = getattr(model, "get_decoder", None)
    body = get() if callable(get) else None
    return body if body is not None else model.base_model


def hidden_states(body: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return body(input_ids=ids, attention_mask=mask).last_hidden_state


def embed_ids(
    model: Any,
    batch: list[list[int]],
    pad_id: int,
    pooling: str = "weighted_mean",
    batch_size: int = 16,
    progress: bool = False,
) -> list[list[float]]:
    """L2-normalised embeddings of token-id lists, in order (the API's token-id inputs)."""
    return _embed(model, batch, pad_id, pooling, batch_size, progress).tolist()


def _embed(
    model: Any,
    batch: list[list[int]],
    pad_id: int,
    pooling: str,
    batch_size: int,
    progress: bool,
) -> np.ndarray:
    import numpy as np
    import torch
    from tqdm.auto import tqdm

    body = decoder_of(model)
    device = next(model.parameters()).device
    dim = int(model.config.hidden_size)
    out = np.zeros((len(batch), dim), dtype=np.float32)
    order = sorted(range(len(batch)), key=lambda i: -len(batch[i]))  # little padding per batch
    starts = range(0, len(order), batch_size)
    bar = tqdm(starts, desc="embedding", unit="batch", disable=not progress, mininterval=1.0)
    with torch.no_grad():
        for start in bar:
            rows = order[start : start + batch_size]
            ids, mask = pad_batch([batch[i] for i in rows], pad_id, "right", device)
            pooled = pool(hidden_states(body, ids, mask), mask, pooling)
            out[rows] = torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
    return out


def model_fingerprint(model: Any) -> str:
    """A short hash of the weights' values (a few slices of every tensor): the same weights
    give the same fingerprint wherever they were loaded from; a fine-tuned copy does not."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            pick = torch.cat([flat[:64], flat[-64:], flat[:: max(1, flat.numel() // 64)][:64]])
            h.update(name.encode())
            h.update(str(tuple(p.shape)).encode())
            h.update(pick.float().cpu().numpy().round(5).tobytes())
    return h.hexdigest()[:16]


class Embedder:
    """A loaded model and tokenizer that embed texts with fixed `EmbedOptions`."""

    def __init__(self, model: Any, tok: Any, opts: EmbedOptions | None = None, path: str = ""):
        self.model, self.tok = model.eval(), tok
        self.opts = opts or EmbedOptions()
        self.path = path
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.dim = int(model.config.hidden_size)
        self.truncated = 0  # texts cut at max_length so far (reported, never silent)
        self._fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def settings(self) -> dict[str, Any]:
        """What an index records: a query is refused unless these match."""
        return {
            "model_path": self.path,
            "model_fingerprint": self.fingerprint,
            "dim": self.dim,
            "tokenizer_size": len(self.tok),
            **asdict(self.opts),
        }

    def ids(self, texts: list[str], kind: Kind = "document") -> list[list[int]]:
        if self.opts.asymmetric:
            left, right = MARKERS[kind]
            texts = [left + t + right for t in texts]
        out = []
        for t in texts:
            ids = self.tok(t)["input_ids"]
            if len(ids) > self.opts.max_length:
                self.truncated += 1
                ids = ids[: self.opts.max_length]
            out.append(ids or [self.pad_id])
        return out

    def encode(self, texts: list[str], kind: Kind = "document", progress: bool = False) -> Any:
        """[N, dim] float32 numpy array, rows L2-normalised."""
        ids = self.ids(list(texts), kind)
        o = self.opts
        return _embed(self.model, ids, self.pad_id, o.pooling, o.batch_size, progress)

    def train_forward(self, texts: list[str], kind: Kind) -> torch.Tensor:
        """Normalised embeddings with gradients (for `hanlm embed train`)."""
        import torch

        device = next(self.model.parameters()).device
        ids, mask = pad_batch(self.ids(texts, kind), self.pad_id, "right", device)
        pooled = pool(hidden_states(decoder_of(self.model), ids, mask), mask, self.opts.pooling)
        return torch.nn.functional.normalize(pooled, dim=-1)


def load_embedder(model_cfg: Any, opts: EmbedOptions | None = None) -> Embedder:
    tok = load_tokenizer(model_cfg.path)
    model = load_model(model_cfg)
    return Embedder(model, tok, opts, path=model_cfg.path)


# --------------------------------------------------------------------------- hanlm embed


@dataclass
class EmbedConfig:
    model: InferenceModelConfig = opt(InferenceModelConfig, "the model whose hidden states embed")
    embed: EmbedOptions = opt(EmbedOptions, "pooling, markers, lengths")
    text: list[str] = opt([], "texts to embed (printed as JSON lines: text, dim, embedding)")
    input: str = opt("", "a file of texts: .txt (one per line) or .jsonl (the text_field)")
    text_field: str = opt("text", "field of a .jsonl input holding the text")
    kind: Kind = opt("document", "query or document (matters with embed.asymmetric)")
    output: str = opt("", "write the vectors here: .npy (float32 [N, dim]) or .jsonl")

    def validate(self) -> None:
        if not self.model.path:
            raise ConfigError("model.path is required: hanlm embed MODEL_DIR --text '...'")
        if not self.text and not self.input:
            raise ConfigError("nothing to embed: give text=... (or --text) or input=FILE")
        if self.output and not self.output.endswith((".npy", ".jsonl")):
            raise ConfigError(f"output={self.output}: must end in .npy or .jsonl")


def read_texts(path: str, text_field: str = "text") -> list[str]:
    """Lines of a .txt file, or one field of each .jsonl record (a missing field is an error
    naming the line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"input {p} does not exist")
    lines = list(read_lines(p))
    if p.suffix != ".jsonl":
        return [x for _, x in lines if x.strip()]
    out = []
    for n, line in lines:
        if not line.strip():
            continue
        rec = read_json_line(line, f"{p}:{n}")
        if not isinstance(rec, dict) or not isinstance(rec.get(text_field), str):
            raise ConfigError(f"{p}:{n}: no string field '{text_field}' (set text_field=...)")
        out.append(rec[text_field])
    return out


def run(cfg: EmbedConfig) -> int:
    import numpy as np

    texts = list(cfg.text) + (read_texts(cfg.input, cfg.text_field) if cfg.input else [])
    emb = load_embedder(cfg.model, cfg.embed)
    vectors = emb.encode(texts, cfg.kind, progress=len(texts) > cfg.embed.batch_size)
    if emb.truncated:
        print(
            f"[hanlm] {emb.truncated} texts cut to {cfg.embed.max_length} tokens", file=sys.stderr
        )
    if cfg.output.endswith(".npy"):
        tmp = Path(cfg.output + ".tmp.npy")
        np.save(tmp, vectors)
        tmp.replace(cfg.output)
    lines = [
        json.dumps(
            {"text": t, "dim": emb.dim, "embedding": [round(float(x), 6) for x in v]},
            ensure_ascii=False,
        )
        for t, v in zip(texts, vectors)
    ]
    if cfg.output.endswith(".jsonl"):
        atomic_write_text(cfg.output, "\n".join(lines) + "\n")
    if cfg.output:
        print(f"[hanlm] embed: {len(texts)} vectors of {emb.dim} -> {cfg.output}", file=sys.stderr)
    else:
        print("\n".join(lines))
    return 0
