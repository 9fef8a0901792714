"""Generation for chat, evaluation and serving: batched greedy/sampled answers and streaming.

Prompts are rendered with the model's chat template (`templates.prompt_ids`), and generation
stops at the template's end-of-turn token and EOS — the same ids training taught the model to
emit and that are saved in `generation_config.json`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from hanlm.config import opt
from hanlm.data.templates import prompt_ids, stop_token_ids


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
) -> list[dict[str, Any]]:
    """Answers for each conversation: {"text", "stopped" (ended on a stop token), "tokens"};
    `tools` (OpenAI function tools) are declared to the model through its chat template."""
    import torch

    stop_ids = stop_token_ids(tok)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    results = []
    model.eval()
    torch.manual_seed(opts.seed)
    for start in range(0, len(conversations), batch_size):
        convs = conversations[start : start + batch_size]
        batch = [prompt_ids(tok, conv, tools=tools) for conv in convs]
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
