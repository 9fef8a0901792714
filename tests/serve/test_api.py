"""`hanlm serve` against the official `openai` client (and raw HTTP where the client hides the
wire format), on a live uvicorn server around a tiny model taught one Chinese answer."""

from __future__ import annotations

import base64
import http.client
import json
import struct
import threading
import time
from urllib.parse import urlparse

import pytest
import torch

from hanlm.data.templates import prompt_ids, stop_token_ids

openai = pytest.importorskip("openai")

# What the conftest's tiny model was taught to answer.
ANSWER = "你好！我是小龙，喜欢写诗。"
CHAT = [{"role": "user", "content": "你好"}]


def _reference(live, messages, max_tokens=20) -> str:
    """Greedy `model.generate` of the same prompt: what the server must answer."""
    ids = torch.tensor([prompt_ids(live.tok, messages)])
    stops = stop_token_ids(live.tok)
    with torch.no_grad():
        out = live.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=live.tok.pad_token_id,
        )
    from hanlm.serve.text import incomplete_utf8, token_bytes

    new = out[0, ids.shape[1] :].tolist()
    text = live.tok.decode(new, skip_special_tokens=True)
    data = b"".join(bytes(token_bytes(live.tok, t) or b"") for t in new)
    # an answer cut inside a character ends at the last whole one (no U+FFFD)
    return text[:-1] if incomplete_utf8(data) else text


def _raw(live, path, body, key=None, read=True):
    """POST with http.client; returns (status, headers, body text) or the open response."""
    u = urlparse(live.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key or live.key}"}
    conn.request("POST", path, body=data, headers=headers)
    resp = conn.getresponse()
    if not read:
        return conn, resp
    text = resp.read().decode("utf-8")
    conn.close()
    return resp.status, resp, text


def test_health_and_models(live):
    assert (live.answer, live.chat) == (ANSWER, CHAT)
    assert live.client().models.list().data[0].id == "tiny"
    u = urlparse(live.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/health")  # open without a key
    assert conn.getresponse().status == 200


def test_chat_answers_the_taught_reply_and_counts_usage(live):
    r = live.client().chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=40, temperature=0
    )
    assert r.choices[0].message.content == ANSWER
    assert r.choices[0].finish_reason == "stop"
    n_prompt = len(prompt_ids(live.tok, CHAT))
    n_answer = len(live.tok.encode(ANSWER, add_special_tokens=False)) + 1  # + end of turn
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_answer)
    assert r.usage.total_tokens == n_prompt + n_answer


def test_greedy_equals_generate_on_both_paths(live):
    messages = [{"role": "user", "content": "The quick brown fox 你说什么"}]
    expected = _reference(live, messages)
    c = live.client()
    batched = c.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0
    )
    # a seed routes the request to `generate` (the batching manager has no per-request seed)
    generated = c.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, seed=3, n=2
    )
    assert batched.choices[0].message.content == expected
    assert [ch.message.content for ch in generated.choices] == [expected, expected]


def test_per_request_temperature_is_honoured_in_one_batch(live):
    """Hot requests sent first must not make the greedy ones sample (transformers serve
    applies the first request's temperature to all)."""
    messages = [{"role": "user", "content": "Hello, world! 今天"}]
    expected = _reference(live, messages, 30)
    c = live.client()
    results: dict[str, list[str]] = {"hot": [], "greedy": []}

    def ask(kind: str, temperature: float) -> None:
        r = c.chat.completions.create(
            model="tiny", messages=messages, max_tokens=30, temperature=temperature
        )
        results[kind].append(r.choices[0].message.content)

    threads = [threading.Thread(target=ask, args=("hot", 2.0)) for _ in range(4)]
    threads += [threading.Thread(target=ask, args=("greedy", 0.0)) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join()
    assert results["greedy"] == [expected] * 3
    assert len(set(results["hot"])) > 1 and expected not in results["hot"]


def test_stream_sends_usage_and_done(live):
    chunks = list(
        live.client().chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=40,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ANSWER
    assert chunks[-1].usage.completion_tokens == len(live.tok.encode(ANSWER)) + 1
    status, resp, body = _raw(
        live,
        "/v1/chat/completions",
        {
            "messages": CHAT,
            "max_tokens": 40,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["total_tokens"] > 0


def test_streamed_chinese_is_never_split_inside_a_character(live):
    _, _, body = _raw(
        live,
        "/v1/chat/completions",
        {"messages": CHAT, "max_tokens": 40, "temperature": 0, "stream": True},
    )
    deltas = [
        json.loads(e[6:])["choices"][0]["delta"].get("content")
        for e in body.split("\n\n")
        if e.startswith("data: {")
    ]
    pieces = [d for d in deltas if d]
    assert "".join(pieces) == ANSWER
    assert all("\ufffd" not in p for p in pieces)
    n_tokens = len(live.tok.encode(ANSWER, add_special_tokens=False))
    assert len(pieces) < n_tokens  # byte tokens were held back until their character was whole


def test_stop_strings_and_extensions(live):
    r = live.client().chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=40,
        temperature=0,
        stop=["喜欢"],
        extra_body={"top_k": 5, "repetition_penalty": 1.0},
    )
    assert r.choices[0].message.content == "你好！我是小龙，"
    assert r.choices[0].finish_reason == "stop"


def test_guidance_and_penalties_are_accepted(live):
    r = live.client().chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=8,
        temperature=0,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        extra_body={"guidance_scale": 1.5, "negative_prompt": "坏回答", "repetition_penalty": 1.2},
    )
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens <= 8


def test_chat_logprobs(live):
    r = live.client().chat.completions.create(
        model="tiny", messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    for entry in content:  # greedy: the chosen token is the most likely one
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_completions_echo_logprobs_score_the_prompt(live):
    """What lm-evaluation-harness's local-completions sends to score multiple choice."""
    ids = live.tok.encode("床前明月光，疑是地上霜。", add_special_tokens=False)
    r = live.client().completions.create(
        model="tiny", prompt=[ids, ids[:3]], max_tokens=1, echo=True, logprobs=1, temperature=0
    )
    first = r.choices[0].logprobs
    assert len(first.tokens) == len(ids) + 1 and first.token_logprobs[0] is None
    with torch.no_grad():
        logits = live.model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert first.token_logprobs[1 : len(ids)] == pytest.approx(lp.tolist(), abs=1e-4)
    assert all(len(t) == 1 for t in first.top_logprobs[1:])
    assert r.choices[0].text.startswith(live.tok.decode(ids))
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.prompt_tokens == len(ids) + 3


def test_completions_string_prompt_and_stream(live):
    c = live.client()
    r = c.completions.create(model="tiny", prompt="床前", max_tokens=5, temperature=0)
    chunks = list(
        c.completions.create(model="tiny", prompt="床前", max_tokens=5, temperature=0, stream=True)
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == r.choices[0].text
    assert r.usage.completion_tokens <= 5


def _pooled_by_hand(live, ids):
    with torch.no_grad():
        h = live.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
    w = torch.arange(1, len(ids) + 1, dtype=torch.float32)
    v = (h * (w / w.sum())[:, None]).sum(0)
    return (v / v.norm()).tolist()


def test_embeddings_are_position_weighted_means(live):
    texts = ["你好", "床前明月光，疑是地上霜。"]
    c = live.client()
    r = c.embeddings.create(model="tiny", input=texts)  # the client asks for base64
    for text, item in zip(texts, r.data):
        ids = live.tok(text)["input_ids"]
        assert item.embedding == pytest.approx(_pooled_by_hand(live, ids), abs=1e-4)
    ids = live.tok(texts[1])["input_ids"]
    by_ids = c.embeddings.create(model="tiny", input=[ids], encoding_format="float")
    assert by_ids.data[0].embedding == pytest.approx(r.data[1].embedding, abs=1e-5)
    assert r.usage.prompt_tokens == sum(len(live.tok(t)["input_ids"]) for t in texts)
    _, _, body = _raw(live, "/v1/embeddings", {"input": "你好", "encoding_format": "base64"})
    raw = base64.b64decode(json.loads(body)["data"][0]["embedding"])
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(
        r.data[0].embedding, abs=1e-6
    )


def test_tokenize_detokenize_and_tokenizer_info(live):
    status, _, body = _raw(live, "/tokenize", {"prompt": "你好世界"})
    tokens = json.loads(body)["tokens"]
    assert status == 200 and tokens == live.tok("你好世界")["input_ids"]
    _, _, body = _raw(live, "/detokenize", {"tokens": tokens})
    assert json.loads(body)["prompt"] == "你好世界"
    _, _, body = _raw(live, "/tokenize", {"messages": CHAT})
    assert json.loads(body)["tokens"] == prompt_ids(live.tok, CHAT)
    u = urlparse(live.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/tokenizer_info", headers={"Authorization": f"Bearer {live.key}"})
    info = json.loads(conn.getresponse().read())
    assert info["eos_token"] == live.tok.eos_token and info["model_max_length"] == 512


def test_wrong_key_is_401(live):
    with pytest.raises(openai.AuthenticationError) as e:
        live.client(key="wrong").chat.completions.create(model="tiny", messages=CHAT)
    assert e.value.body["code"] == "invalid_api_key"
    status, _, body = _raw(live, "/tokenize", {"prompt": "x"}, key="wrong")
    assert status == 401 and json.loads(body)["error"]["type"] == "invalid_request_error"


def test_too_long_prompt_is_400(live):
    c = live.client()
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="tiny", prompt=[[5] * 513], max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "字" * 600}])
    with pytest.raises(openai.BadRequestError):
        c.embeddings.create(model="tiny", input=[[5] * 513])


def test_errors_are_openai_shaped(live):
    cases = [
        ("/v1/chat/completions", {"messages": CHAT, "temperature": "hot"}, 400, "temperature"),
        ("/v1/chat/completions", b"{not json", 400, None),
        ("/v1/completions", {"prompt": [[10**9]]}, 400, "prompt"),
        ("/v1/chat/completions", {"messages": CHAT, "x": "a" * 300_000}, 413, None),
        ("/v1/nothing", {}, 404, None),
    ]
    for path, body, status, param in cases:
        got, _, text = _raw(live, path, body)
        error = json.loads(text)["error"]
        assert got == status, (path, text)
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
        assert error["param"] == param


def test_full_queue_is_429(live, monkeypatch):
    monkeypatch.setattr(live.engine, "max_queue", 0)
    with pytest.raises(openai.RateLimitError):
        live.client().chat.completions.create(model="tiny", messages=CHAT)


def test_client_disconnect_cancels_generation(live, monkeypatch):
    jobs = []
    submit = live.engine.submit

    def spy(*a, **kw):
        jobs.append(submit(*a, **kw))
        return jobs[-1]

    monkeypatch.setattr(live.engine, "submit", spy)
    for body in (  # the batching path, then the generate path (a seed)
        {"prompt": [5, 6, 7], "max_tokens": 400, "temperature": 1.0, "stream": True},
        {"prompt": [5, 6, 7], "max_tokens": 400, "temperature": 1.0, "seed": 1, "stream": True},
    ):
        conn, resp = _raw(live, "/v1/completions", body, read=False)
        assert resp.status == 200
        resp.fp.readline()  # the first event has started to arrive
        conn.sock.close()
        conn.close()
        deadline = time.time() + 10
        while not jobs[-1].cancelled.is_set() and not jobs[-1].finished:
            assert time.time() < deadline, "generation went on after the client left"
            time.sleep(0.02)
    deadline = time.time() + 10
    while live.engine.active:
        assert time.time() < deadline
        time.sleep(0.02)
