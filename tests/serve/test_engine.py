"""The engine's paths agree with `generate`: a request alone runs on `generate`; when a second
arrives it hands off to the batching loop, continuing from what it has sent, and both answers
are still exactly greedy `generate`'s."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from hanlm.config import ModelConfig
from hanlm.data.templates import prompt_ids, stop_token_ids
from hanlm.modeling import load_model, load_tokenizer
from hanlm.serve.engine import GREEDY_TEMPERATURE, End, Engine, Failed, Token
from hanlm.serve.processors import InverseCdfSampler
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


def test_serial_threads_run_in_order_on_one_thread_that_ends_when_told():
    # One OpenMP team at a time: the worker's thread (and so its team) must end when the
    # batching loop needs the CPU, and not before (a new thread's first task is slower).
    from hanlm.serve.threads import SerialThreads

    keep = threading.Event()
    keep.set()
    workers = SerialThreads("test-worker", keep=keep.is_set)
    seen: list[tuple[int, threading.Thread]] = []

    def task(i: int) -> int:
        time.sleep(0.01)
        seen.append((i, threading.current_thread()))
        return i * 2

    futures = [workers.submit(task, i) for i in range(3)]
    assert [f.result(timeout=10) for f in futures] == [0, 2, 4]
    assert [i for i, _ in seen] == [0, 1, 2]
    first = seen[0][1]
    assert all(t is first for _, t in seen) and first.is_alive()
    keep.clear()
    workers.retire()
    first.join(timeout=10)
    assert not first.is_alive()  # idle and told to go: ended
    assert workers.submit(task, 3).result(timeout=10) == 6
    second = seen[-1][1]
    assert second is not first
    second.join(timeout=10)
    assert not second.is_alive()  # keep() is false: it ends after its task
    keep.set()
    failing = workers.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failing.result(timeout=10)
    workers.shutdown()


def _engine(taught_model_dir, **kw):
    tok = load_tokenizer(str(taught_model_dir))
    model = load_model(ModelConfig(path=str(taught_model_dir)), attn_implementation="sdpa")
    torch.manual_seed(0)
    for p in model.parameters():  # untaught: long answers, no early end-of-turn
        p.data.normal_(0, 0.3)
    return model, tok, Engine(model, tok, **kw)


def test_the_batching_loop_runs_only_while_requests_are_batched(taught_model_dir):
    model, tok, engine = _engine(taught_model_dir)
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("问一", "问二", "问三")]
    want = [_greedy(model, tok, p, 10) for p in prompts]

    async def together() -> list[list[int]]:
        jobs = [engine.submit(p, Sampling(max_tokens=10, temperature=0)) for p in prompts]
        return list(await asyncio.gather(*(_collect(j) for j in jobs)))

    async def one_after_another() -> list[list[int]]:
        return [
            await _collect(engine.submit(p, Sampling(max_tokens=10, temperature=0)))
            for p in prompts
        ]

    def wait_stopped() -> None:
        deadline = time.time() + 30
        while engine.batching and time.time() < deadline:
            time.sleep(0.05)

    try:
        assert not engine.manager.is_running()  # nothing batched yet
        for _ in range(2):  # stopped after a batch, and started again for the next one
            assert asyncio.run(together()) == want  # greedy under batching = generate
            wait_stopped()
            assert not engine.batching and not engine.manager.is_running()
        handoffs = engine.handoffs
        # a client sending one request after another stays on the solo path
        assert asyncio.run(one_after_another()) == want
        assert not engine.manager.is_running() and engine.handoffs == handoffs
    finally:
        engine.close()


def test_top_k_and_top_p_are_batched_when_asked(taught_model_dir):
    model, tok, engine = _engine(taught_model_dir, batch_top_p=True)
    prompt = prompt_ids(tok, [{"role": "user", "content": "问一"}])
    want = _greedy(model, tok, prompt, 10)
    top1 = Sampling(max_tokens=10, temperature=1.5, top_k=1)  # top-k 1: the arg-max, sampled
    assert engine.route(top1) == "batch"

    async def two() -> list[list[int]]:
        jobs = [engine.submit(prompt, top1) for _ in range(2)]
        return list(await asyncio.gather(*(_collect(j) for j in jobs)))

    try:
        assert asyncio.run(two()) == [want, want]
    finally:
        engine.close()
    plain = Engine(model, tok, continuous_batching=False)
    try:
        assert plain.route(Sampling(max_tokens=5, temperature=0)) == "generate"
    finally:
        plain.close()


def test_inverse_cdf_sampler_draws_from_the_softmax():
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 2.0, 0.5, float("-inf"), 3.0, -1.0])
    rows = 40_000
    scores = InverseCdfSampler()(None, logits.repeat(rows, 1))
    assert (scores == 0).sum(dim=1).eq(1).all()  # one token per row, the rest -inf
    assert torch.isinf(scores).sum() == rows * (len(logits) - 1)
    drawn = scores.argmax(dim=1)
    freq = torch.bincount(drawn, minlength=len(logits)).float() / rows
    want = torch.softmax(logits, dim=0)
    assert freq[3] == 0  # probability 0 is never drawn
    assert torch.allclose(freq, want, atol=0.01), (freq, want)
    # at the greedy temperature the softmax is one-hot: always the arg-max, ties aside
    greedy = InverseCdfSampler()(None, torch.randn(500, 8064) / GREEDY_TEMPERATURE)
    assert torch.equal(greedy.argmax(dim=1), (greedy == 0).float().argmax(dim=1))


def test_batched_sampling_follows_the_models_distribution(taught_model_dir):
    """256 one-token requests at temperature 0.1 (not the manager's default), batched: their first
    tokens are draws from the model's softmax at that temperature (chi-square over the 5 likeliest
    tokens and the rest; greedy, or the default temperature, would fail it)."""
    model, tok, engine = _engine(taught_model_dir)
    prompt = prompt_ids(tok, [{"role": "user", "content": "问一"}])
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / 0.1, dim=-1)
    top = probs.topk(5).indices.tolist()
    expected = [*probs[top].tolist(), 1 - float(probs[top].sum())]
    assert max(expected) < 0.8, expected  # a spread distribution, or the test proves little

    async def many() -> list[list[int]]:
        jobs = [engine.submit(prompt, Sampling(max_tokens=1, temperature=0.1)) for _ in range(256)]
        return list(await asyncio.gather(*(_collect(j) for j in jobs)))

    try:
        firsts = [t[0] for t in asyncio.run(many())]
    finally:
        engine.close()
    assert engine.handoffs <= 1  # (the first request may start alone on `generate`)
    counts = [firsts.count(t) for t in top] + [sum(t not in top for t in firsts)]
    chi2 = sum((c - 256 * e) ** 2 / (256 * e) for c, e in zip(counts, expected) if e > 0)
    assert chi2 < 25, (counts, [round(256 * e, 1) for e in expected])  # 5 df: p < 1e-4


def test_the_batching_processors_shim_checks_what_it_relies_on(taught_model_dir):

    from transformers import GenerationConfig

    from hanlm.compat import CB_CHECKED, batching_logits_processors, installed_within

    assert installed_within("transformers", CB_CHECKED), (
        "transformers outside the versions compat.batching_logits_processors was read on"
    )
    _, _, engine = _engine(taught_model_dir)
    try:  # the engine's manager runs hanlm's processors, ending with the sampler
        assert isinstance(engine.manager.logit_processor.logits_processor[-1], InverseCdfSampler)
        with pytest.raises(RuntimeError, match="started already"):
            batching_logits_processors(engine.manager, [InverseCdfSampler()])
    finally:
        engine.close()
    fresh = load_model(ModelConfig(path=str(taught_model_dir)), attn_implementation="sdpa")
    sampling = fresh.init_continuous_batching(generation_config=GenerationConfig(do_sample=True))
    with pytest.raises(ValueError, match="do_sample=False"):
        batching_logits_processors(sampling, [InverseCdfSampler()])
