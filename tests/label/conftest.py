"""A `hanlm label` app over three prompts with K=3 answers sampled from a tiny model, served by
uvicorn in a thread with an API key."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

LABEL_KEY = "label-key"  # the test files repeat these two: they cannot import a conftest
PROMPTS = ["床前明月光的下一句？", "Say hello.", "春眠不觉晓的下一句？"]


@pytest.fixture
def label_app(tmp_path, tiny_model_path):
    """(served app, output dir, items); answers are sampled once per test (about a second)."""
    import torch

    from hanlm.config import load_config
    from hanlm.label.ranking import LabelConfig, create_app, load_or_sample
    from hanlm.testing import ServedApp

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    out = tmp_path / "label"
    out.mkdir()
    cfg = load_config(
        LabelConfig,
        None,
        [f"inputs=[{prompts},{tiny_model_path}]", "k=3", "max_new_tokens=12", f"output_dir={out}"],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        items = load_or_sample(cfg, out)
    finally:
        torch.set_num_threads(threads)
    served = ServedApp(create_app(items, out, api_key=LABEL_KEY, title="test"))
    yield served, out, items, cfg
    served.close()
