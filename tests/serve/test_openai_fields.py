"""OpenAI's request fields and server behaviours against the live server, through the official
`openai` client: `logit_bias`, fields refused by name, unknown model names (404) and aliases,
`GET /v1/models/{id}`, CORS, Prometheus metrics, the request log line, `Retry-After` on 429,
and answers cut by `max_tokens` inside a character."""

from __future__ import annotations

import logging

import pytest

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "你好"}]
ANSWER = "你好！我是小龙，喜欢写诗。"


def _first_token(live) -> int:
    return live.tok.encode(ANSWER, add_special_tokens=False)[0]


def test_logit_bias_plus_100_forces_a_token_and_minus_100_bans_it(live):
    c = live.client()
    forced = live.tok.encode("A", add_special_tokens=False)
    assert len(forced) == 1
    for temperature in (0, 1.0):
        r = c.chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=4,
            temperature=temperature,
            logit_bias={str(forced[0]): 100},
        )
        assert r.choices[0].message.content == "AAAA"
    plain = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3, temperature=0)
    assert plain.choices[0].message.content.startswith("你")
    first = _first_token(live)
    banned = c.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=3,
        temperature=0,
        logprobs=True,
        logit_bias={str(first): -100},
    )
    from hanlm.serve.text import token_bytes

    chosen = banned.choices[0].logprobs.content[0]  # (log-probs are before the bias)
    assert chosen.bytes is not None and chosen.bytes != token_bytes(live.tok, first)
    assert chosen.top_logprobs == [] and chosen.logprob < 0
    # completions honour it too
    r = c.completions.create(
        model="tiny", prompt="床前", max_tokens=3, temperature=0, logit_bias={str(forced[0]): 100}
    )
    assert r.choices[0].text == "AAA"


def test_logit_bias_outside_the_vocabulary_is_400(live):
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=2, logit_bias={"99999999": 1}
        )
    assert e.value.body["param"] == "logit_bias"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("reasoning_effort", "low"),
        ("service_tier", "flex"),
        ("store", True),
        ("web_search_options", {}),
        ("prompt_cache_key", "k"),
        ("verbosity", "low"),
    ],
)
def test_a_chat_field_this_server_does_not_do_is_400_naming_it(live, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        live.client().chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=2, **{field: value}
        )
    assert e.value.body["param"] == field and f"'{field}'" in e.value.body["message"]
    assert e.value.body["code"] == "unsupported_parameter"


def test_completion_fields_refused_by_name(live):
    c = live.client()
    for field, value in (("suffix", "末尾"), ("best_of", 3)):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="床前", max_tokens=2, **{field: value})
        assert e.value.body["param"] == field
    r = c.completions.create(model="tiny", prompt="床前", max_tokens=2, best_of=2, n=2, seed=1)
    assert len(r.choices) == 2


def test_an_unknown_model_is_404_model_not_found(live):
    c = live.client()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "gpt-4o" in e.value.body["message"]
    for call in (
        lambda: c.completions.create(model="gpt-4o", prompt="x", max_tokens=2),
        lambda: c.embeddings.create(model="gpt-4o", input="x"),
        lambda: c.models.retrieve("gpt-4o"),
    ):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        assert e.value.body["code"] == "model_not_found"
    m = c.models.retrieve("tiny")
    assert (m.id, m.object, m.owned_by) == ("tiny", "model", "hanlm")


def test_aliases_are_accepted_and_listed(live):
    from fastapi.testclient import TestClient

    from hanlm.serve.api import create_app

    app = create_app(live.engine, model_name="tiny", aliases=["gpt-4o-mini", "org/name"])
    client = TestClient(app)
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["tiny", "gpt-4o-mini", "org/name"]
    assert client.get("/v1/models/org/name").json()["id"] == "org/name"
    body = {"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": 2, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["model"] == "gpt-4o-mini"
    assert client.post("/v1/chat/completions", json={**body, "model": "x"}).status_code == 404
    anyone = TestClient(create_app(live.engine, model_name="tiny", aliases=["*"]))
    assert anyone.post("/v1/chat/completions", json={**body, "model": "x"}).status_code == 200


def test_cors_is_an_option(live):
    from fastapi.testclient import TestClient

    from hanlm.serve.api import create_app

    preflight = {
        "Origin": "http://localhost:3000",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    plain = TestClient(create_app(live.engine, model_name="tiny"))
    r = plain.options("/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    app = create_app(live.engine, model_name="tiny", cors_origins=["http://localhost:3000"])
    client = TestClient(app)
    r = client.options("/v1/chat/completions", headers=preflight)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    r = client.get("/v1/models", headers={"Origin": "http://localhost:3000"})
    assert r.headers["access-control-allow-origin"] == "http://localhost:3000"
    r = client.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"})
    assert r.headers.get("access-control-allow-origin") != "http://evil.test"


def _metric(text: str, name: str, **labels: str) -> float:
    for row in text.splitlines():
        if row.startswith(name) and all(f'{k}="{v}"' in row for k, v in labels.items()):
            return float(row.rsplit(" ", 1)[1])
    return 0.0


def _http(live, method: str, path: str, body: dict | None = None) -> tuple[int, dict, str]:
    import http.client
    import json
    from urllib.parse import urlparse

    u = urlparse(live.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    headers = {"Authorization": f"Bearer {live.key}", "Content-Type": "application/json"}
    conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, text


def test_metrics_count_requests_tokens_and_latency(live, caplog):
    c = live.client()

    def get() -> str:
        return _http(live, "GET", "/metrics")[2]

    before = get()
    route = "/v1/chat/completions"
    with caplog.at_level(logging.INFO, logger="hanlm.serve"):
        r = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=5, temperature=0)
        stream = c.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=5, temperature=0, stream=True
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
        with pytest.raises(openai.BadRequestError):
            c.chat.completions.create(model="tiny", messages=CHAT, temperature=9)
    after = get()
    ok = {"route": route, "status": "200"}
    assert _metric(after, "hanlm_requests_total", **ok) - _metric(
        before, "hanlm_requests_total", **ok
    ) == pytest.approx(2)
    bad = {"route": route, "status": "400"}
    assert _metric(after, "hanlm_requests_total", **bad) > _metric(
        before, "hanlm_requests_total", **bad
    )
    spent = _metric(after, "hanlm_completion_tokens_total", route=route) - _metric(
        before, "hanlm_completion_tokens_total", route=route
    )
    assert spent == 2 * r.usage.completion_tokens
    prompt = _metric(after, "hanlm_prompt_tokens_total", route=route) - _metric(
        before, "hanlm_prompt_tokens_total", route=route
    )
    assert prompt == 2 * r.usage.prompt_tokens
    assert _metric(after, "hanlm_request_latency_seconds_count", route=route) >= 3
    assert "hanlm_time_to_first_token_seconds_bucket" in after
    assert "hanlm_requests_in_progress 0.0" in after
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "hanlm.serve"]
    mine = next(m for m in lines if m.startswith(r.id))
    assert f"POST {route} 200" in mine
    assert f"prompt={r.usage.prompt_tokens} completion={r.usage.completion_tokens}" in mine
    assert "ttft=" in mine and "total=" in mine
    assert any(f"POST {route} 400" in m for m in lines)


def test_a_full_queue_is_429_with_retry_after(live):
    import json

    engine = live.engine
    with engine._lock:
        saved, engine.active = engine.active, engine.max_queue
    try:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
        status, headers, text = _http(live, "POST", "/v1/chat/completions", body)
    finally:
        with engine._lock:
            engine.active = saved
    assert status == 429 and json.loads(text)["error"]["code"] == "queue_full"
    assert int(headers["retry-after"]) >= 1


def _cut_inside_a_character(live) -> tuple[int, str]:
    """A max_tokens that ends the taught answer after a character's first byte token, and the
    text up to the last whole character."""
    ids = live.tok.encode(ANSWER, add_special_tokens=False)
    for k in range(1, len(ids)):
        text = live.tok.decode(ids[:k])
        if text.endswith("\ufffd") and len(text.rstrip("\ufffd")) > 2:
            return k, text.rstrip("\ufffd")
    raise AssertionError("no token ends inside a character")


def test_max_tokens_inside_a_character_ends_at_the_last_whole_one(live):
    k, want = _cut_inside_a_character(live)
    c = live.client()
    for extra in ({}, {"seed": 1}):  # the batching path and `generate`
        r = c.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=k, temperature=0, **extra
        )
        assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == k
        chunks = c.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=k, temperature=0, stream=True, **extra
        )
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == want
    from hanlm.data.templates import prompt_ids

    prompt = prompt_ids(live.tok, CHAT)
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=k, temperature=0)
    assert r.choices[0].text == want
