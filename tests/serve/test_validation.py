"""Request bodies against the live server: a malformed body is OpenAI's 400 naming the field
(never FastAPI's 422), so is an unknown field, and the OpenAPI document lists every endpoint
with its body's schema."""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlparse

import pytest

openai = pytest.importorskip("openai")

CHAT = [{"role": "user", "content": "你好"}]
ANSWER = "你好！我是小龙，喜欢写诗。"


def _bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    assert e.value.status_code == 400
    error = e.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "hot"}, "temperature"),  # wrong type
        ({"temperature": 2.5}, "temperature"),  # out of range
        ({"top_p": -0.1}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),  # past the server's max_n
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"seed": "1"}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stop": [1]}, "stop"),
        ({"stop": ["x"] * 17}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({"stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": []}, "messages"),
    ],
)
def test_a_malformed_chat_body_is_400_naming_the_field(live, fields, param):
    body = {"model": "tiny", "messages": CHAT, **fields}
    error = _bad_request(lambda: live.client().chat.completions.create(**body))
    assert error["param"] == param
    assert f"'{param}'" in error["message"]


def test_a_missing_or_null_field_is_400_naming_it(live):
    c = live.client()
    error = _bad_request(lambda: c.post("/chat/completions", body={"model": "x"}, cast_to=object))
    assert error["param"] == "messages" and "required" in error["message"]
    error = _bad_request(lambda: c.post("/embeddings", body={"model": "x"}, cast_to=object))
    assert error["param"] == "input"
    error = _bad_request(
        lambda: c.chat.completions.create(
            model="tiny", messages=CHAT, extra_body={"messages": None}
        )
    )
    assert error["param"] == "messages"


def test_completion_and_embedding_bodies_are_checked(live):
    c = live.client()
    cases = [
        (lambda: c.completions.create(model="tiny", prompt=3), "prompt"),
        (lambda: c.completions.create(model="tiny", prompt="x", max_tokens=-1), "max_tokens"),
        (lambda: c.completions.create(model="tiny", prompt="x", max_tokens=0), "max_tokens"),
        (lambda: c.completions.create(model="tiny", prompt="x", logprobs=21), "logprobs"),
        (lambda: c.completions.create(model="tiny", prompt="x", echo="no"), "echo"),
        (
            lambda: c.embeddings.create(model="tiny", input="x", encoding_format="hex"),
            "encoding_format",
        ),
        (lambda: c.embeddings.create(model="tiny", input="x", dimensions=0), "dimensions"),
        (lambda: c.embeddings.create(model="tiny", input=[[]]), "input"),
    ]
    for call, param in cases:
        error = _bad_request(call)
        assert error["param"] == param, error


def test_unknown_fields_are_400_naming_them_and_openai_ones_are_accepted(live):
    c = live.client()
    vendor = {"vendor_extension": {"nested": [1, {"x": None}]}}
    error = _bad_request(
        lambda: c.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=2, extra_body=vendor
        )
    )
    assert error["param"] == "vendor_extension" and error["code"] == "unknown_parameter"
    assert "vendor_extension" in error["message"]
    error = _bad_request(
        lambda: c.completions.create(model="tiny", prompt="床前", max_tokens=2, extra_body=vendor)
    )
    assert error["param"] == "vendor_extension"
    error = _bad_request(lambda: c.embeddings.create(model="tiny", input="你", extra_body=vendor))
    assert error["param"] == "vendor_extension"
    error = _bad_request(
        lambda: c.chat.completions.create(
            model="tiny", messages=CHAT, max_tokens=2, stream_options={"extra": 1}
        )
    )
    assert error["param"] == "stream_options.extra"
    r = c.chat.completions.create(
        model="tiny",
        messages=[{**CHAT[0], "name": "小明"}],
        max_tokens=40,
        temperature=0,
        user="someone",
        metadata={"k": "v"},
        store=False,
        stream_options=None,
    )
    assert r.choices[0].message.content == ANSWER
    r = c.completions.create(model="tiny", prompt="床前", max_tokens=2, user="someone")
    assert r.usage.completion_tokens <= 2
    r = c.embeddings.create(model="tiny", input="你好", user="someone")
    assert len(r.data) == 1


def _post(live, path: str, data: bytes) -> tuple[int, dict]:
    u = urlparse(live.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {live.key}"}
    conn.request("POST", path, body=data, headers=headers)
    resp = conn.getresponse()
    status, body = resp.status, json.loads(resp.read())
    conn.close()
    return status, body


@pytest.mark.parametrize(
    ("path", "data", "param"),
    [
        ("/v1/chat/completions", b"[]", None),  # not an object
        ("/v1/chat/completions", b'"hi"', None),
        ("/v1/chat/completions", b'{"messages": [1]}', "messages[0]"),
        ("/v1/chat/completions", b'{"messages": [{"role": "user"}], "top_k": NaN}', "top_k"),
        ("/v1/completions", b'{"prompt": [1, "a"]}', "prompt"),
        ("/tokenize", b'{"prompt": 5}', "prompt"),
        ("/tokenize", b'{"prompt": "x", "add_special_tokens": "no"}', "add_special_tokens"),
        ("/detokenize", b'{"tokens": [1, true]}', "tokens[1]"),
        ("/detokenize", b"{}", "tokens"),
    ],
)
def test_no_body_gets_a_422(live, path, data, param):
    status, body = _post(live, path, data)
    assert status == 400 and body["error"]["param"] == param, body


def test_fastapi_validation_errors_are_openai_shaped(live):
    """A route whose parameters FastAPI itself validates answers 400 in OpenAI's shape too."""
    from fastapi.testclient import TestClient

    from hanlm.serve.api import create_app

    app = create_app(live.engine, model_name="tiny")

    @app.get("/probe")
    async def probe(k: int) -> dict:
        return {"k": k}

    client = TestClient(app)
    assert client.get("/probe?k=3").json() == {"k": 3}
    r = client.get("/probe?k=three")
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "k" and "'k'" in r.json()["error"]["message"]
    assert client.get("/probe").json()["error"]["param"] == "k"


def test_the_openapi_document_lists_every_endpoint(live):
    u = urlparse(live.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    conn.request("GET", "/openapi.json")
    spec = json.loads(conn.getresponse().read())
    paths = spec["paths"]
    assert set(paths) == {
        "/health",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
    }
    assert set(paths["/v1/models"]) == {"get"} and set(paths["/tokenize"]) == {"post"}

    def body(path: str) -> dict:
        return paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    chat = body("/v1/chat/completions")
    assert chat["required"] == ["messages"]
    message = chat["properties"]["messages"]["items"]  # nested models are inlined
    assert "$ref" not in json.dumps(chat)
    assert set(message["properties"]["role"]["enum"]) >= {"system", "user", "assistant"}
    temperature = chat["properties"]["temperature"]["anyOf"][0]
    assert (temperature["minimum"], temperature["maximum"]) == (0, 2)
    assert body("/v1/completions")["required"] == ["prompt"]
    assert body("/v1/embeddings")["required"] == ["input"]
    assert body("/detokenize")["required"] == ["tokens"]
