"""Vocabulary pruning (chatglm-6b-slim): keep only the tokens a corpus uses, remap every id.

What is kept: every token the tokenizer produces on the corpus (and on the chat template's own
text), every added/special token, every byte token (so any text still encodes and round-trips),
single characters when the vocabulary has no byte fallback, and — for BPE — every token a kept
token is merged from. That last closure is what makes the pruned tokenizer give the *same*
segmentation on corpus text: BPE applies, at each step, the best-ranked merge available; every
merge the original applied on a corpus word produces a kept token from kept parts, so it is
still in the pruned list and still the best one available there. (Unigram needs no closure: the
best segmentation over a subset that contains it is unchanged.)

Kept ids keep their original order, so specials usually keep their ids. The embedding and LM-head
rows of the kept ids are copied; the pruned model's logits are the original's restricted to
the kept ids, bit for bit up to matmul blocking.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hanlm.config import DataConfig
from hanlm.data import load
from hanlm.modeling import ModelError


class PruneError(ModelError):
    """A vocabulary that cannot be pruned as asked."""


@dataclass
class KeepPlan:
    keep: list[int]  # old ids, ascending; new id = position
    old_size: int
    counts: dict[str, int] = field(default_factory=dict)  # why tokens were kept

    @property
    def old_to_new(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.keep)}


def corpus_texts(paths: list[str], tok: Any, max_records: int = 0) -> list[str]:
    """The corpus as texts: text records as they are, chat records rendered with the template
    (so its role markers count as used), preference records' prompt and both answers. Each path
    is read on its own, so one corpus may mix text, chat and preference files."""
    records = []
    for path in paths:
        cfg = DataConfig(
            paths=[path], clean=False, dedup="none", normalize="none", max_records=max_records
        )
        records += load(cfg, kind=None, require_answer=False, split=False).train
    texts = []
    for rec in records:
        if "text" in rec:
            texts.append(rec["text"])
        elif "messages" in rec and getattr(tok, "chat_template", None):
            texts.append(tok.apply_chat_template(rec["messages"], tokenize=False))
        elif "messages" in rec:
            texts.append("\n".join(m["content"] for m in rec["messages"]))
        else:  # preference pairs: prompt and both answers
            texts += [str(rec.get(k, "")) for k in ("prompt", "chosen", "rejected") if rec.get(k)]
    if not texts:
        raise PruneError(f"prune_vocab={paths}: the corpus holds no text")
    return texts


def _spec(tok: Any) -> dict[str, Any]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise PruneError(
            f"{type(tok).__name__}: pruning rewrites tokenizer.json; this tokenizer has none"
            " (a slow tokenizer): load or save it as a fast tokenizer first"
        )
    spec = json.loads(backend.to_str())
    mtype = (spec.get("model") or {}).get("type")
    if mtype not in ("BPE", "Unigram"):
        raise PruneError(f"a {mtype} tokenizer model: pruning handles BPE and Unigram vocabularies")
    return spec


def _template_texts(tok: Any) -> list[str]:
    """A rendered conversation per role set the template accepts: its markers must stay whole."""
    if not getattr(tok, "chat_template", None):
        return []
    out = []
    for roles in (("system", "user", "assistant"), ("user", "assistant")):
        msgs = [{"role": r, "content": "x"} for r in roles]
        try:
            out.append(tok.apply_chat_template(msgs, tokenize=False))
            out.append(
                tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            )
        except Exception:  # a template without a system role raises from Jinja
            continue
    return out


def _byte_ids(spec: dict[str, Any], vocab: dict[str, int]) -> set[int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    if "ByteLevel" in json.dumps(spec.get("pre_tokenizer")):
        alphabet = set(bytes_to_unicode().values())
        return {i for t, i in vocab.items() if t in alphabet}
    return {i for t, i in vocab.items() if len(t) == 6 and t.startswith("<0x") and t[-1] == ">"}


def plan_keep(tok: Any, texts: list[str], min_count: int = 1, batch: int = 1000) -> KeepPlan:
    """Which ids to keep for `texts` (see the module docstring for why each is kept)."""
    from tqdm.auto import tqdm

    spec = _spec(tok)
    model = spec["model"]
    backend = tok.backend_tokenizer
    counts: Counter = Counter()
    for start in tqdm(range(0, len(texts), batch), desc="count tokens", leave=False):
        for enc in backend.encode_batch(texts[start : start + batch], add_special_tokens=True):
            counts.update(enc.ids)
    for text in _template_texts(tok):
        counts.update({i: min_count for i in backend.encode(text, add_special_tokens=True).ids})
    vocab = tok.get_vocab()
    size = max(vocab.values()) + 1
    used = {i for i, c in counts.items() if c >= min_count}
    added = set(tok.added_tokens_decoder)
    byte_ids = _byte_ids(spec, vocab)
    fallback = bool(model.get("byte_fallback")) or "ByteLevel" in json.dumps(spec)
    chars = set() if fallback else {i for t, i in vocab.items() if len(t.lstrip("\u2581")) == 1}
    unk = {tok.unk_token_id} if tok.unk_token_id is not None else set()
    keep = used | added | byte_ids | chars | unk

    closure = 0
    if model["type"] == "BPE":
        parents: dict[str, list[tuple[str, str]]] = {}
        for m in model.get("merges") or []:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            parents.setdefault(a + b, []).append((a, b))
        id_to_tok = {i: t for t, i in vocab.items()}
        stack = [id_to_tok[i] for i in keep if i in id_to_tok]
        while stack:
            for a, b in parents.get(stack.pop(), ()):
                for part in (a, b):
                    pid = vocab.get(part)
                    if pid is not None and pid not in keep:
                        keep.add(pid)
                        closure += 1
                        stack.append(part)
    return KeepPlan(
        keep=sorted(keep),
        old_size=size,
        counts={
            "used_by_corpus": len(used),
            "special_or_added": len(added),
            "bytes": len(byte_ids),
            "single_chars": len(chars),
            "merge_parents": closure,
        },
    )


def _remap_post(node: Any, old_to_new: dict[int, int]) -> Any:
    """Token ids inside a post-processor (TemplateProcessing, Bert/Roberta, Sequence)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "ids" and isinstance(v, list):
                out[k] = [old_to_new[i] for i in v]
            elif k in ("sep", "cls") and isinstance(v, list) and len(v) == 2:
                out[k] = [v[0], old_to_new[v[1]]]
            else:
                out[k] = _remap_post(v, old_to_new)
        return out
    if isinstance(node, list):
        return [_remap_post(v, old_to_new) for v in node]
    return node


def prune_tokenizer(tok: Any, plan: KeepPlan) -> Any:
    """A new HF fast tokenizer holding only `plan.keep`, ids renumbered in order."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = _spec(tok)
    o2n = plan.old_to_new
    model = spec["model"]
    if model["type"] == "BPE":
        vocab = {t: o2n[i] for t, i in model["vocab"].items() if i in o2n}
        merges = []
        for m in model.get("merges") or []:
            a, b = m.split(" ", 1) if isinstance(m, str) else m
            if a in vocab and b in vocab and a + b in vocab:
                merges.append(m)
        model.update(vocab=vocab, merges=merges)
    else:  # Unigram: ids are list positions
        pieces = model["vocab"]
        model["vocab"] = [p for i, p in enumerate(pieces) if i in o2n]
        if model.get("unk_id") is not None:
            model["unk_id"] = o2n[model["unk_id"]]
    spec["added_tokens"] = [
        {**t, "id": o2n[t["id"]]} for t in spec.get("added_tokens") or [] if t["id"] in o2n
    ]
    try:
        spec["post_processor"] = _remap_post(spec.get("post_processor"), o2n)
    except KeyError as e:
        raise PruneError(f"the post-processor adds token id {e}, which pruning dropped") from None
    backend = Tokenizer.from_str(json.dumps(spec, ensure_ascii=False))
    special = {
        k: str(getattr(tok, k))
        for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        if getattr(tok, k, None) is not None
    }
    extra = [str(t) for t in (getattr(tok, "extra_special_tokens", None) or [])]
    new = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=tok.model_max_length,
        padding_side=tok.padding_side,
        extra_special_tokens=[t for t in extra if t not in special.values()],
        **special,
    )
    new.chat_template = tok.chat_template
    return new


def prune_model(model: Any, plan: KeepPlan) -> None:
    """Keep only the embedding and LM-head rows of `plan.keep` (tied weights stay tied), and
    remap the token ids in the model's config and generation config."""
    import torch

    keep = torch.tensor(plan.keep, dtype=torch.long)
    emb = model.get_input_embeddings()
    if emb.weight.shape[0] < plan.old_size:
        raise PruneError(
            f"the tokenizer has {plan.old_size} ids but the model only {emb.weight.shape[0]}"
            " embedding rows; resize the embeddings first"
        )
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    new_emb = torch.nn.Embedding(len(keep), emb.weight.shape[1], dtype=emb.weight.dtype)
    with torch.no_grad():
        new_emb.weight.copy_(emb.weight[keep])
    model.set_input_embeddings(new_emb)
    if head is not None:
        new_head = torch.nn.Linear(head.in_features, len(keep), bias=False, dtype=head.weight.dtype)
        if tied:
            new_head.weight = new_emb.weight
        else:
            with torch.no_grad():
                new_head.weight.copy_(head.weight[keep])
        model.set_output_embeddings(new_head)
    model.config.vocab_size = len(keep)
    o2n = plan.old_to_new

    def remap(v: Any) -> Any:
        if isinstance(v, list):
            return [o2n[i] for i in v if i in o2n]
        return o2n.get(v) if v is not None else None

    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is None:
            continue
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(cfg, key, None) is not None:
                setattr(cfg, key, remap(getattr(cfg, key)))


def size_saved(
    plan: KeepPlan, old_rows: int, hidden: int, tied: bool, bytes_per_param: int
) -> dict[str, Any]:
    """Rows, parameters and bytes the pruning removed (padding rows past the tokenizer too)."""
    rows = old_rows - len(plan.keep)
    params = rows * hidden * (1 if tied else 2)
    return {
        "vocab_before": plan.old_size,
        "rows_before": old_rows,
        "vocab_after": len(plan.keep),
        "rows_removed": rows,
        "params_removed": params,
        "bytes_saved": params * bytes_per_param,
        "keep_reasons": plan.counts,
    }
