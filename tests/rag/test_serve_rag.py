"""`hanlm serve` with an index: answers grounded in passages, sources in an extra field."""

import json
import urllib.request

import pytest


@pytest.fixture(scope="module")
def served(tiny_model_path, bigram_index):
    pytest.importorskip("fastapi")
    from hanlm.rag.answer import RetrievalOptions, Retriever
    from hanlm.serve.api import Limits, create_app
    from hanlm.serve.engine import Engine
    from hanlm.serve.server import ServeConfig, load
    from hanlm.testing import ServedApp

    idx = bigram_index
    cfg = ServeConfig()
    cfg.model.path = str(tiny_model_path)
    model, tok = load(cfg)
    engine = Engine(model, tok, continuous_batching=False, max_queue=4)
    retriever = Retriever(RetrievalOptions(index=str(idx), k=2))
    app = create_app(engine, model_name="tiny", limits=Limits(max_tokens=8), retriever=retriever)
    s = ServedApp(app)
    yield s
    s.close()
    engine.close()


def _post(url, body):
    req = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read().decode()


def test_chat_returns_sources(served):
    body = {"messages": [{"role": "user", "content": "王阮字什么？"}], "max_tokens": 4}
    r = json.loads(_post(served.url + "/v1/chat/completions", body))
    assert r["choices"][0]["message"]["role"] == "assistant"
    assert [s["n"] for s in r["sources"]] == [1, 2]
    assert r["sources"][0]["doc_id"] == "bio:王阮"
    assert set(r["cited"]) <= {1, 2}
    # Streaming: a first event with the sources and no choices, then the usual chunks.
    raw = _post(served.url + "/v1/chat/completions", {**body, "stream": True})
    events = [json.loads(x[6:]) for x in raw.split("\n\n") if x.startswith("data: {")]
    assert events[0]["choices"] == [] and events[0]["sources"][0]["doc_id"] == "bio:王阮"
    assert all(e["object"] == "chat.completion.chunk" for e in events)
