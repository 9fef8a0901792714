"""A live `hanlm serve` of a tiny model taught the replies in selfinstruct_script.py."""

from __future__ import annotations

import pytest
from selfinstruct_script import API_KEY, teaching_chats

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@pytest.fixture(scope="session")
def instruct_server(tmp_path_factory):
    import torch

    from hanlm.serve.api import Limits, create_app
    from hanlm.serve.engine import Engine
    from hanlm.serve.server import ServeConfig, load
    from hanlm.testing import ServedApp, teach, tiny_model_dir

    path = tiny_model_dir(tmp_path_factory.mktemp("datagen") / "model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teach(path, teaching_chats(), steps=300)
    finally:
        torch.set_num_threads(threads)
    cfg = ServeConfig()
    cfg.model.path = str(path)
    model, tok = load(cfg)
    engine = Engine(model, tok, max_queue=16)
    app = create_app(engine, model_name="tiny", api_key=API_KEY, limits=Limits(max_tokens=400))
    served = ServedApp(app)
    yield served
    served.close()
    engine.close()
