"""What models produce: answers for chat, evaluation and serving (batched greedy/sampled answers
and streaming), and the scalar scores of reward models.

Prompts are rendered with the model's chat template (`templates.prompt_ids`), and generation
stops at the template's end-of-turn token and EOS — the same ids training taught the model to
emit and that are saved in `generation_config.json`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hanlm.config import ModelConfig, opt
from hanlm.data.templates import prompt_ids, render, stop_token_ids
from hanlm.modeling import (
    ModelError,
    check_model_dir,
    model_config_for,
    pad_batch,
    pick_precision,
    resolve_source,
    torch_dtype,
)


@dataclass
class GenerationOptions:
    max_new_tokens: int = opt(256, "most tokens generated per answer")
    temperature: float = opt(0.7, "sampling temperature (0 = greedy)")
    top_p: float = opt(0.9, "nucleus sampling: keep the smallest set with this probability")
    top_k: int = opt(50, "sample among the k most likely tokens (0 = off)")
    repetition_penalty: float = opt(1.1, "penalise tokens already generated (1 = off)")
    seed: int = opt(0, "sampling seed (answers are repeatable)")
    guidance_scale: float = opt(
        1.0,
        "classifier-free guidance s (Sanchez et al.): log p_uncond + s·(log p - log p_uncond);"
        " 1 = off, 1.5 typical",
    )
    negative_prompt: str = opt(
        "", "with guidance: the unconditional prompt (a user turn); empty = the last prompt token"
    )


def decoding_kwargs(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    guidance_scale: float,
    stop_ids: list[int],
    pad_id: int,
) -> dict[str, Any]:
    """`generate` keyword arguments for one set of decoding settings (chat, eval and serve)."""
    kw: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": stop_ids,
        "pad_token_id": pad_id,
        "repetition_penalty": repetition_penalty,
    }
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
    else:
        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if guidance_scale != 1.0:
        kw["guidance_scale"] = guidance_scale
    return kw


def _generate_kwargs(opts: GenerationOptions, stop_ids: list[int], pad_id: int) -> dict[str, Any]:
    return decoding_kwargs(
        max_new_tokens=opts.max_new_tokens,
        temperature=opts.temperature,
        top_p=opts.top_p,
        top_k=opts.top_k,
        repetition_penalty=opts.repetition_penalty,
        guidance_scale=opts.guidance_scale,
        stop_ids=stop_ids,
        pad_id=pad_id,
    )


def guidance_inputs(tok: Any, opts: GenerationOptions, batch: int, device: Any) -> dict[str, Any]:
    """transformers' CFG inputs for a batch: the negative prompt rendered as a user turn in the
    model's template, one copy per row (nothing when guidance is off or has no negative)."""
    import torch

    if opts.guidance_scale == 1.0 or not opts.negative_prompt:
        return {}
    ids = prompt_ids(tok, [{"role": "user", "content": opts.negative_prompt}])
    neg = torch.tensor([ids] * batch, device=device)
    return {"negative_prompt_ids": neg, "negative_prompt_attention_mask": torch.ones_like(neg)}


def generate(
    model: Any,
    tok: Any,
    conversations: list[list[dict[str, str]]],
    opts: GenerationOptions,
    batch_size: int = 8,
    tools: list[dict[str, Any]] | None = None,
    tools_each: list[list[dict[str, Any]] | None] | None = None,
) -> list[dict[str, Any]]:
    """Answers for each conversation: {"text", "stopped" (ended on a stop token), "tokens"};
    `tools` (OpenAI function tools) are declared to the model through its chat template, the
    same to every conversation, or `tools_each`: one list (or None) per conversation."""
    if tools_each is not None and (tools is not None or len(tools_each) != len(conversations)):
        raise ValueError(
            f"tools_each: {len(tools_each)} tool lists for {len(conversations)} conversations"
            + (", and tools as well: give one or the other" if tools is not None else "")
        )
    import torch

    stop_ids = stop_token_ids(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    results = []
    model.eval()
    torch.manual_seed(opts.seed)
    declared = tools_each if tools_each is not None else [tools] * len(conversations)
    for start in range(0, len(conversations), batch_size):
        convs = conversations[start : start + batch_size]
        batch = [
            prompt_ids(tok, conv, tools=t)
            for conv, t in zip(convs, declared[start : start + batch_size])
        ]
        width = max(len(ids) for ids in batch)
        # Left padding keeps every prompt's last token next to its first generated one.
        input_ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in batch], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                **_generate_kwargs(opts, stop_ids, pad_id),
                **guidance_inputs(tok, opts, len(batch), device),
            )
        for row in out[:, width:].tolist():
            stopped = False
            for i, t in enumerate(row):
                if t in stop_ids:
                    row, stopped = row[:i], True
                    break
            results.append(
                {
                    "text": tok.decode(row, skip_special_tokens=True),
                    "stopped": stopped,
                    "tokens": len(row),
                }
            )
    return results


def stream(
    model: Any, tok: Any, messages: list[dict[str, str]], opts: GenerationOptions
) -> Iterator[str]:
    """Yield the answer's text piece by piece as it is generated."""
    import torch
    from transformers import TextIteratorStreamer

    stop_ids = stop_token_ids(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids(tok, messages)], device=device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    torch.manual_seed(opts.seed)
    kwargs = dict(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        streamer=streamer,
        **_generate_kwargs(opts, stop_ids, pad_id),
        **guidance_inputs(tok, opts, 1, device),
    )
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with torch.no_grad():
                model.generate(**kwargs)
        except BaseException as e:  # surfaced in the caller's thread below
            errors.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if errors:
        raise errors[0]


# Conversations longer than this are cut from the left when a reward model's own training length
# is unknown (not made by `hanlm reward`).
DEFAULT_MAX_LENGTH = 1024

# --------------------------------------------------------------------------- reward models
# A reward model is a `hanlm reward` output (or any one-output sequence classifier). It scores a
# whole re-rendered conversation with its own tokenizer, at most the `max_length` it was trained
# with (read from its `hanlm.json`).


def load_reward_model(cfg: ModelConfig, **kw: Any) -> Any:
    """A one-output sequence-classification model (a fresh `score` head on a causal LM dir), with
    `cfg`'s attention kernel as `load_model` gives it."""
    from transformers import AutoModelForSequenceClassification

    src = resolve_source(cfg.path)
    check_model_dir(src, weights=True)
    dtype = torch_dtype(pick_precision() if cfg.dtype == "auto" else cfg.dtype)
    if cfg.attn_implementation != "auto":
        kw.setdefault("attn_implementation", cfg.attn_implementation)
    if cfg.rope.type != "none":  # the scaled config; a causal LM's gets its one-output head
        config = model_config_for(cfg, src)
        if not any("SequenceClassification" in a for a in config.architectures or []):
            config.num_labels = 1
        kw["config"] = config
    else:
        kw["num_labels"] = 1
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            src.path,
            gguf_file=src.gguf_file,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            **kw,
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{cfg.path}: cannot load as a reward model ({e})") from None
    if model.config.num_labels != 1:
        raise ModelError(f"{cfg.path}: has {model.config.num_labels} outputs; a reward model has 1")
    return model


def score_ids(
    model: Any, id_lists: list[list[int]], pad_id: int, batch_size: int = 16
) -> list[float]:
    """The scalar reward of each token sequence (right-padded; read at the last real token)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for start in range(0, len(id_lists), batch_size):
            batch = id_lists[start : start + batch_size]
            ids, mask = pad_batch(batch, pad_id, "right", device)
            logits = model(input_ids=ids, attention_mask=mask).logits
            out += logits[:, 0].float().tolist()
    return out


def conversation_ids(tok: Any, messages: list[dict[str, str]], max_length: int) -> list[int]:
    """Ids of a whole conversation as the reward model saw them in training (last tokens kept)."""
    ids, _ = render(tok, messages)
    return ids[-max_length:]


def score_conversations(
    model: Any,
    tok: Any,
    conversations: list[list[dict[str, str]]],
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> list[float]:
    """Rewards of whole conversations (each ending with the assistant answer to judge)."""
    ids = [conversation_ids(tok, c, max_length) for c in conversations]
    return score_ids(model, ids, tok.pad_token_id, batch_size)


def trained_max_length(path: str) -> int:
    """The `max_length` a reward model was trained with (its `hanlm.json`), else the default."""
    info = Path(path) / "hanlm.json"
    if info.is_file():
        try:
            value = json.loads(info.read_text(encoding="utf-8"))["config"]["max_length"]
        except (ValueError, KeyError, TypeError):
            value = None
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH
