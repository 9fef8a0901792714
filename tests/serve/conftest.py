"""A live `hanlm serve` app for the tests: a tiny model taught one Chinese answer (so greedy
output is known text whose characters span several byte tokens), served by uvicorn in a thread
on a free port, with an API key."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

API_KEY = "test-key"
QUESTION = "你好"
ANSWER = "你好！我是小龙，喜欢写诗。"  # 龙/喜/欢/写/诗 are split into byte tokens by the tiny BPE


def _teach(model_dir: Path) -> None:
    """Fit the random tiny model to answer QUESTION with ANSWER (a few seconds on CPU)."""
    import torch

    from hanlm.config import ModelConfig
    from hanlm.data.templates import render
    from hanlm.modeling import load_model, load_tokenizer, save_model

    tok = load_tokenizer(str(model_dir))
    model = load_model(ModelConfig(path=str(model_dir)))
    chats = [
        [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}],
        [
            {"role": "system", "content": "你是助手"},
            {"role": "user", "content": "第二个问题"},
            {"role": "assistant", "content": "好的，第二个回答。"},
        ],
    ]
    batch = [render(tok, c) for c in chats]
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(120):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.01:
            break
    save_model(model.eval(), tok, model_dir)


@pytest.fixture(scope="session")
def taught_model_dir(tmp_path_factory) -> Path:
    from hanlm.testing import tiny_model_dir

    path = tiny_model_dir(tmp_path_factory.mktemp("serve") / "model")
    _teach(path)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    import uvicorn

    from hanlm.serve.api import Limits, create_app
    from hanlm.serve.engine import Engine
    from hanlm.serve.server import ServeConfig, load

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
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield Live(f"http://127.0.0.1:{port}", engine, API_KEY)
    server.should_exit = True
    thread.join(timeout=10)
    engine.close()
