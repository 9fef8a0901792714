"""The engine's paths agree with `generate`: a request alone runs on `generate`; when a second
arrives it hands off to the batching loop, continuing from what it has sent, and both answers
are still exactly greedy `generate`'s."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from hanlm.config import ModelConfig
from hanlm.data.templates import prompt_ids, stop_token_ids
from hanlm.modeling import load_model, load_tokenizer
from hanlm.serve.engine import End, Engine, Failed, Token
from hanlm.serve.protocol import Sampling


def _greedy(model, tok, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=stop_token_ids(tok),
            pad_token_id=tok.pad_token_id,
        )
    return out[0, len(ids) :].tolist()


async def _collect(job) -> list[int]:
    tokens = []
    while True:
        event = await asyncio.wait_for(job.events.get(), 60)
        if isinstance(event, Failed):
            raise AssertionError(event.message)
        if isinstance(event, End):
            return tokens
        assert isinstance(event, Token)
        tokens.append(event.id)


def test_a_solo_request_hands_off_to_the_batch_loop_and_stays_greedy(taught_model_dir):
    tok = load_tokenizer(str(taught_model_dir))
    model = load_model(ModelConfig(path=str(taught_model_dir)), attn_implementation="sdpa")
    torch.manual_seed(0)
    for p in model.parameters():  # untaught: long answers, no early end-of-turn
        p.data.normal_(0, 0.3)
    first = prompt_ids(tok, [{"role": "user", "content": "写一首很长的诗"}])
    second = prompt_ids(tok, [{"role": "user", "content": "第二个问题"}])
    want = (_greedy(model, tok, first, 40), _greedy(model, tok, second, 12))
    if len(want[0]) < 20:
        pytest.skip("the random model ended its answer early")
    engine = Engine(model, tok)
    slow = model.register_forward_hook(lambda *_: time.sleep(0.01))

    async def scenario() -> tuple[list[int], list[int]]:
        a = engine.submit(first, Sampling(max_tokens=40, temperature=0))
        got_a: list[int] = []
        while len(got_a) < 5:  # let it run alone for a few tokens
            event = await asyncio.wait_for(a.events.get(), 60)
            assert isinstance(event, Token)
            got_a.append(event.id)
        b = engine.submit(second, Sampling(max_tokens=12, temperature=0))
        rest_a, got_b = await asyncio.gather(_collect(a), _collect(b))
        return got_a + rest_a, got_b

    try:
        got = asyncio.run(scenario())
    finally:
        slow.remove()
        engine.close()
    assert engine.handoffs == 1
    assert got == (list(want[0]), list(want[1]))
