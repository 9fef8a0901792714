"""Pure parts of the server: incremental detokenising, stop strings, request parsing, routing."""

from __future__ import annotations

import pytest

from hanlm.serve.protocol import APIError, Sampling, parse_chat, parse_completion, parse_embedding
from hanlm.serve.text import REPLACEMENT, Detokenizer, token_bytes

TEXT = "你好！我是小龙，喜欢写诗。Hello 😀 世界"


def _stream(tok, ids, stop=None):
    det = Detokenizer(tok, stop)
    pieces = [det.push(t) for t in ids]
    pieces.append(det.finish())
    return pieces, det


def test_streamed_pieces_never_split_a_character(tiny_tokenizer):
    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(ids) > len(TEXT)  # byte tokens: some characters take several
    pieces, _ = _stream(tiny_tokenizer, ids)
    assert all(REPLACEMENT not in p for p in pieces)
    assert "".join(pieces) == tiny_tokenizer.decode(ids) == TEXT
    assert pieces.count("") > 0  # tokens that ended inside a character were held back


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["喜欢"], "你好！我是小龙，"),
        (["！", "小"], "你好"),
        (["Hello 😀"], "你好！我是小龙，喜欢写诗。"),
        (["不在"], TEXT),
    ],
)
def test_stop_strings_cut_the_text_and_never_leak(tiny_tokenizer, stop, expected):
    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    pieces, det = _stream(tiny_tokenizer, ids, stop)
    assert "".join(pieces) == expected
    assert det.stopped == (expected != TEXT)


def test_token_bytes_of_a_byte_token(tiny_tokenizer):
    ids = tiny_tokenizer.encode("龙", add_special_tokens=False)
    assert b"".join(bytes(token_bytes(tiny_tokenizer, t)) for t in ids) == "龙".encode()


def test_routes():
    truncated = Sampling(max_tokens=5, temperature=0.7, top_p=0.9, top_k=20)
    assert truncated.route(truncation=True) == "batch"
    assert truncated.route() == "generate"  # the manager has no top-k/top-p warpers by default
    assert Sampling(max_tokens=5, temperature=0.7).route() == "batch"
    assert Sampling(max_tokens=5, temperature=0, top_p=0.5).route() == "batch"  # greedy
    for extra in (
        {"seed": 1},
        {"n": 2},
        {"logprobs": 0},
        {"guidance_scale": 1.5},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"repetition_penalty": 1.2},
        {"logit_bias": {5: 1.0}},
        {"constraint": object()},
    ):
        assert Sampling(max_tokens=5, **extra).route() == "generate", extra


def test_parse_chat_reads_openai_fields_and_extensions():
    req = parse_chat(
        {
            "messages": [
                {"role": "developer", "content": [{"type": "text", "text": "系统"}]},
                {"role": "user", "content": "问"},
            ],
            "max_completion_tokens": 7,
            "temperature": 0,
            "stop": "。",
            "logprobs": True,
            "top_logprobs": 3,
            "top_k": -1,
            "guidance_scale": 1.5,
            "negative_prompt": "坏",
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "someone",
            "logit_bias": {"5": -100, "7": 2.5},
            "response_format": {"type": "json_object"},
            "store": False,
            "service_tier": "auto",
            "modalities": ["text"],
        },
        max_tokens=100,
        max_n=4,
    )
    assert req.messages[0] == {"role": "system", "content": "系统"}
    s = req.sampling
    assert (s.max_tokens, s.temperature, s.stop, s.logprobs, s.top_k) == (7, 0.0, ["。"], 3, 0)
    assert req.stream and req.include_usage and req.negative_prompt == "坏"
    assert s.logit_bias == {5: -100.0, 7: 2.5} and req.user == "someone"
    assert req.response_format is not None and req.response_format.type == "json_object"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 9}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 1.5}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": [1]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 101}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"a": 1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": [1]}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "some_new_field": 1}, "some_new_field"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
            "response_format.type",
        ),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema"},
            },
            "response_format.json_schema",
        ),
    ],
)
def test_parse_chat_errors_name_the_field(body, param):
    with pytest.raises(APIError) as e:
        parse_chat(body, max_tokens=100, max_n=8)
    assert e.value.status == 400 and e.value.param == param


def test_parse_completion_and_embedding_inputs():
    assert parse_completion({"prompt": "a"}, 100, 1).prompts == ["a"]
    assert parse_completion({"prompt": [1, 2]}, 100, 1).prompts == [[1, 2]]
    assert parse_completion(
        {"prompt": [[1], [2, 3]], "max_tokens": 0, "echo": True}, 100, 1
    ).prompts == [[1], [2, 3]]
    assert parse_embedding({"input": ["a", "b"]}).inputs == ["a", "b"]
    assert (
        parse_embedding({"input": [[5, 6]], "encoding_format": "base64"}).encoding_format
        == "base64"
    )
    for bad in ({"prompt": []}, {"prompt": [[]]}, {"prompt": [1, "a"]}, {"prompt": 3}):
        with pytest.raises(APIError):
            parse_completion(bad, 100, 1)
    with pytest.raises(APIError):
        parse_completion({"prompt": "a", "max_tokens": 0}, 100, 1)


def test_a_vanishing_temperature_is_greedy():
    body = {"messages": [{"role": "user", "content": "x"}], "temperature": 5e-275}
    assert parse_chat(body, max_tokens=10, max_n=1).sampling.temperature == 0


def test_a_job_hands_tokens_to_the_loop_in_batches(tiny_tokenizer):
    """Tokens emitted faster than the stream interval wake the event loop once or twice, not per
    token, arrive in order, and `pieces` sends each batch as one piece (one SSE chunk); with
    log-probs (`merge=False`) every token stays its own piece."""
    import asyncio
    import threading

    from hanlm.serve import streaming
    from hanlm.serve.engine import End, Job, Token

    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)

    async def scenario(merge: bool) -> tuple[list[tuple[str, int]], int]:
        job = Job("j", [1], Sampling(max_tokens=len(ids)), interval=60.0)
        loop, wakes = job.loop, []
        real = loop.call_soon_threadsafe

        def counted(fn, *args):
            wakes.append(fn)
            return real(fn, *args)

        loop.call_soon_threadsafe = counted
        try:
            emitter = threading.Thread(
                target=lambda: [job.emit(Token(0, t)) for t in ids] + [job.emit(End(0, "stop"))]
            )
            emitter.start()
            emitter.join()
            pieces = [
                (text, len(toks))
                async for _, text, toks, _ in streaming.pieces(job, tiny_tokenizer, 1, merge)
            ]
        finally:
            loop.call_soon_threadsafe = real
        return pieces, len(wakes)

    pieces, wakes = asyncio.run(scenario(merge=True))
    assert 1 <= wakes <= 2  # the first token; End (unless the first delivery was still pending)
    assert "".join(p for p, _ in pieces) == TEXT and sum(n for _, n in pieces) == len(ids)
    assert len(pieces) == 2  # every token in one piece, then the end
    pieces, _ = asyncio.run(scenario(merge=False))
    assert "".join(p for p, _ in pieces) == TEXT
    assert [n for _, n in pieces] == [1] * len(ids) + [0]


@pytest.mark.parametrize(("interval", "wakes"), [(60.0, 2), (0.0, 3)])
def test_a_token_waits_for_the_next_event_within_the_interval(interval, wakes):
    import asyncio

    from hanlm.serve.engine import End, Job, Token

    async def scenario() -> tuple[int, int]:
        job = Job("j", [1], Sampling(max_tokens=2), interval=interval)
        loop, count = job.loop, []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda fn, *a: (count.append(fn == job._deliver), real(fn, *a))[
            1
        ]
        try:
            await asyncio.to_thread(job.emit, Token(0, 5))  # the first token: at once
            assert (await asyncio.wait_for(job.events.get(), 5)).id == 5
            await asyncio.to_thread(job.emit, Token(0, 6))  # within the interval: held
            await asyncio.sleep(0.05)
            held = job.events.qsize()
            await asyncio.to_thread(job.emit, End(0, "stop"))  # brings it along
            await asyncio.sleep(0.05)
            assert [e.id for e in [job.events.get_nowait()] if isinstance(e, Token)] == [6]
            assert isinstance(job.events.get_nowait(), End)
        finally:
            loop.call_soon_threadsafe = real
        return sum(count), held

    count, held = asyncio.run(scenario())
    assert count == wakes and held == (0 if interval else 1)


def test_every_openai_field_is_known_and_refused_ones_name_themselves():
    """Each field of the installed `openai` package's create params is either a field of the
    request model (honoured, or refused below when set) — none is left to the unknown-field
    400 — and each refused field, when set, is a 400 naming it."""
    openai = pytest.importorskip("openai")
    from typing import get_type_hints

    from openai.types import completion_create_params as cp
    from openai.types.chat import completion_create_params as ccp

    from hanlm.serve.protocol import (
        REFUSED_CHAT,
        REFUSED_COMPLETION,
        ChatCompletionBody,
        CompletionBody,
    )

    assert openai.__version__
    pairs = [
        (ccp.CompletionCreateParamsBase, ChatCompletionBody),
        (cp.CompletionCreateParamsBase, CompletionBody),
    ]
    for params, body in pairs:
        ours = set(body.model_fields) | {f.alias for f in body.model_fields.values() if f.alias}
        missing = set(get_type_hints(params)) - ours
        assert not missing, f"{body.__name__} does not know {missing}"
    chat = {"messages": [{"role": "user", "content": "x"}]}
    for name in REFUSED_CHAT:
        with pytest.raises(APIError) as e:
            parse_chat({**chat, name: "x"}, max_tokens=10, max_n=4)
        assert e.value.status == 400 and e.value.param == name and f"'{name}'" in e.value.message
    for name, value in {"suffix": "tail", "best_of": 3}.items():
        assert name in REFUSED_COMPLETION
        with pytest.raises(APIError) as e:
            parse_completion({"prompt": "a", name: value}, 10, 4)
        assert e.value.param == name
    # the default values are accepted
    parse_chat({**chat, "store": False, "parallel_tool_calls": None}, max_tokens=10, max_n=4)
    parse_completion({"prompt": "a", "best_of": 2, "n": 2, "suffix": ""}, 10, 4)


@pytest.mark.parametrize("then_eos", [False, True])
def test_an_answer_cut_inside_a_character_ends_at_the_last_whole_one(tiny_tokenizer, then_eos):
    """max_tokens reached after the first byte token of a character, or the end-of-turn token
    right after it: no U+FFFD, streamed or whole (a plain decode of the same tokens ends in
    U+FFFD)."""
    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    cut = next(
        k
        for k in range(1, len(ids))
        if tiny_tokenizer.decode(ids[:k]).endswith(REPLACEMENT)
        and len(tiny_tokenizer.decode(ids[:k])) > 1
    )
    assert tiny_tokenizer.decode(ids[:cut]).endswith(REPLACEMENT)
    eos = [tiny_tokenizer.eos_token_id] if then_eos else []
    pieces, _ = _stream(tiny_tokenizer, ids[:cut] + eos)
    text = "".join(pieces)
    assert REPLACEMENT not in text
    assert text == tiny_tokenizer.decode(ids[:cut]).rstrip(REPLACEMENT)
    assert TEXT.startswith(text) and text


def test_incomplete_utf8():
    from hanlm.serve.text import incomplete_utf8

    whole = "你好😀".encode()
    assert not incomplete_utf8(whole) and not incomplete_utf8(b"") and not incomplete_utf8(b"a")
    assert incomplete_utf8(whole[:-1]) and incomplete_utf8(whole[:-3])
    assert incomplete_utf8("你".encode()[:1]) and incomplete_utf8("你".encode()[:2])
    assert not incomplete_utf8(b"\x80\x80")  # stray continuation bytes: not a cut character
    assert not incomplete_utf8(b"\xff")


def test_stream_obfuscation_is_refused_when_asked_for():
    for parse, body in (
        (parse_chat, {"messages": [{"role": "user", "content": "x"}]}),
        (parse_completion, {"prompt": "x"}),
    ):
        body.update(stream=True, stream_options={"include_obfuscation": True})
        with pytest.raises(APIError) as e:
            parse(body, 10, 1)
        assert e.value.param == "stream_options.include_obfuscation"
        body["stream_options"]["include_obfuscation"] = False
        assert parse(body, 10, 1).stream
