"""`hanlm serve` as a command: its config, a LoRA adapter merged at load, and the real CLI
process answering over HTTP with the key from HANLM_API_KEY."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from hanlm.config import ConfigError, ModelConfig, load_config
from hanlm.modeling import load_model
from hanlm.serve.server import ServeConfig, load


def test_config_defaults_and_checks():
    cfg = load_config(ServeConfig, overrides=["model.path=some/dir", "port=9001", "api_key=k"])
    assert (cfg.host, cfg.port, cfg.api_key, cfg.continuous_batching) == (
        "127.0.0.1",
        9001,
        "k",
        True,
    )
    with pytest.raises(ConfigError, match="port"):
        load_config(ServeConfig, overrides=["port=70000"])
    with pytest.raises(ConfigError, match="stream_interval_ms=-1"):
        load_config(ServeConfig, overrides=["stream_interval_ms=-1"])
    with pytest.raises(ConfigError, match="max_queue"):
        load_config(ServeConfig, overrides=["max_queue=0"])
    with pytest.raises(ConfigError, match="unknown config key"):
        load_config(ServeConfig, overrides=["prot=1"])


def test_lora_adapter_is_merged_at_load(taught_model_dir, tmp_path):
    peft = pytest.importorskip("peft")
    base = load_model(ModelConfig(path=str(taught_model_dir)))
    torch.manual_seed(1)
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    for name, p in lora.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapter change something
            torch.nn.init.normal_(p, std=0.5)
    lora.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = lora(ids).logits
        plain = load_model(ModelConfig(path=str(taught_model_dir)))(ids).logits
    cfg = ServeConfig(adapter=str(tmp_path / "adapter"))
    cfg.model.path = str(taught_model_dir)
    model, _ = load(cfg)
    with torch.no_grad():
        got = model(ids).logits
    assert torch.allclose(got, want, atol=1e-4) and not torch.allclose(got, plain, atol=1e-3)
    cfg.adapter = str(tmp_path)
    with pytest.raises(ConfigError, match="adapter_config.json"):
        load(cfg)


def _get(url: str, key: str | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url)
    if key:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_cli_serves_with_the_key_from_the_environment(taught_model_dir):
    pytest.importorskip("uvicorn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HANLM_API_KEY": "env-key", "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "hanlm.pipeline.cli",
        "serve",
        str(taught_model_dir),
        f"port={port}",
    ]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if _get(url + "/health")[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "hanlm serve did not come up"
            time.sleep(0.2)
        status, body = _get(url + "/v1/models")
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        status, body = _get(url + "/v1/models", key="env-key")
        assert status == 200 and body["data"][0]["id"] == taught_model_dir.name
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert "serving" in out and "127.0.0.1" in out


def test_int8_model_serves_on_both_paths_as_generate_answers(taught_model_dir):
    """model.quantize=int8: the batching loop and the generate worker both run the quantized
    weights, and greedy answers equal `generate` on the same quantized model."""
    pytest.importorskip("torchao")
    from fastapi.testclient import TestClient

    from hanlm.data.templates import prompt_ids, stop_token_ids
    from hanlm.serve.api import Limits, create_app
    from hanlm.serve.engine import Engine

    cfg = load_config(
        ServeConfig, overrides=[f"model.path={taught_model_dir}", "model.quantize=int8"]
    )
    model, tok = load(cfg)
    assert "Int8" in type(model.model.layers[0].mlp.up_proj.weight).__name__
    chat = [{"role": "user", "content": "你好"}]
    ids = torch.tensor([prompt_ids(tok, chat)])
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=12, do_sample=False, eos_token_id=stop_token_ids(tok)
        )
    want = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    engine = Engine(model, tok)
    app = create_app(engine, model_name="q", api_key="", limits=Limits(max_tokens=50))
    try:
        with TestClient(app) as client:
            for extra in ({}, {"seed": 3}):  # batching loop; generate worker (seed)
                body = {"messages": chat, "max_tokens": 12, "temperature": 0, **extra}
                r = client.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["message"]["content"] == want
    finally:
        engine.close()
