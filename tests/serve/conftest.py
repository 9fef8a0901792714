"""A live `hanlm serve` app for the tests: a tiny model taught one Chinese answer (so greedy
output is known text whose characters span several byte tokens), served by uvicorn in a thread
on a free port, with an API key."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY = "test-key"
QUESTION = "你好"
ANSWER = "你好！我是小龙，喜欢写诗。"  # 龙/喜/欢/写/诗 are split into byte tokens by the tiny BPE


def _teach(model_dir: Path) -> None:
    """Fit the random tiny model to answer QUESTION with ANSWER (a few seconds on CPU)."""
    from hanlm.testing import teach

    teach(
        model_dir,
        [
            [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
            [
                {"role": "system", "content": "你是助手"},
                {"role": "user", "content": "第二个问题"},
                {"role": "assistant", "content": "好的，第二个回答。"},
            ],
        ],
    )


@pytest.fixture(scope="session")
def taught_model_dir(tmp_path_factory) -> Path:
    from hanlm.testing import tiny_model_dir

    path = tiny_model_dir(tmp_path_factory.mktemp("serve") / "model")
    _teach(path)
    return path


class Live:
    """The running server: its URL, engine (model, tokenizer) and key."""

    def __init__(self, url: str, engine, key: str) -> None:
        self.url, self.engine, self.key = url, engine, key
        self.model, self.tok = engine.model, engine.tok
        self.answer = ANSWER
        self.chat = [{"role": "user", "content": QUESTION}]

    def client(self, key: str | None = None):
        import openai

        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=key or self.key, max_retries=0, timeout=60
        )


@pytest.fixture(scope="session")
def live(taught_model_dir):
    from hanlm.serve.api import Limits, create_app
    from hanlm.serve.engine import Engine
    from hanlm.serve.server import ServeConfig, load
    from hanlm.testing import ServedApp

    cfg = ServeConfig()
    cfg.model.path = str(taught_model_dir)
    model, tok = load(cfg)
    engine = Engine(model, tok, max_queue=16)
    app = create_app(
        engine,
        model_name="tiny",
        api_key=API_KEY,
        limits=Limits(max_tokens=400, max_body_bytes=200_000),
    )
    served = ServedApp(app)
    yield Live(served.url, engine, API_KEY)
    served.close()
    engine.close()


@contextmanager
def random_server(path: Path, seed: int, **model_kw) -> Iterator[tuple]:
    """A random (untrained) tiny model at `path`, served with continuous batching: yields an
    `openai` client for it and its engine."""
    import openai

    from hanlm.serve.api import create_app
    from hanlm.serve.engine import Engine
    from hanlm.serve.server import ServeConfig, load
    from hanlm.testing import ServedApp, tiny_model_dir

    cfg = ServeConfig()
    cfg.model.path = str(tiny_model_dir(path, seed=seed, **model_kw))
    model, tok = load(cfg)
    engine = Engine(model, tok, max_queue=8)
    served = ServedApp(create_app(engine, model_name="tiny"))
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0, timeout=120)
    try:
        yield client, engine
    finally:
        served.close()
        engine.close()


@pytest.fixture(scope="session")
def serve_random():
    """`random_server`, for module fixtures that serve a random tiny model of their own."""
    return random_server
