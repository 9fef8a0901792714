"""`hanlm export` around its GGUF: the default output directory beside the model, the Modelfile
written beside the GGUF, which judge checked the file and how llama.cpp is found and started.
The checks that run the real llama.cpp are in test_export_llamacpp.py (slow)."""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest

from hanlm.config import load_config
from hanlm.export.export import ExportConfig, ExportError, default_output_dir, run
from hanlm.export.llamacpp import ENV_VAR, LlamaCppError, LlamaServer, find_llama_cpp
from hanlm.runs import OutputDirError


def _cfg(*overrides: str) -> ExportConfig:
    return load_config(ExportConfig, None, list(overrides))


def test_default_output_dir_is_beside_what_was_named(tmp_path, monkeypatch):
    (tmp_path / "runs" / "sft").mkdir(parents=True)
    (tmp_path / "m.gguf").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    sft = tmp_path / "runs" / "sft"
    assert default_output_dir(_cfg(f"model.path={sft}/", "format=gguf")) == sft.parent / "sft-gguf"
    assert default_output_dir(_cfg(f"model.path={sft}", "dtype=fp16")) == sft.parent / "sft-fp16"
    assert default_output_dir(_cfg("model.path=runs/sft", "format=both")).name == "sft-export"
    assert default_output_dir(_cfg(f"model.path={tmp_path}/m.gguf", "format=gguf")) == (
        tmp_path / "m-gguf"
    )
    assert default_output_dir(_cfg("model.path=Qwen/Qwen2.5-0.5B", "format=gguf")) == (
        tmp_path / "Qwen2.5-0.5B-gguf"
    )
    assert default_output_dir(_cfg("model.path=pkg:llm-x/a.Q4.gguf", "format=gguf")) == (
        tmp_path / "a.Q4-gguf"
    )
    adapter = _cfg("model.path=base", f"adapter={sft}", "format=gguf")
    assert default_output_dir(adapter) == sft.parent / "sft-gguf"


def test_export_without_output_dir_writes_beside_the_model_with_a_modelfile(
    tiny_model_path, tmp_path, capsys
):
    src = tmp_path / "tiny"
    shutil.copytree(tiny_model_path, src)
    out = run(_cfg(f"model.path={src}", "format=gguf", "judge=transformers"))
    assert out == tmp_path / "tiny-gguf"
    printed = capsys.readouterr().out
    assert f"writing to {out}" in printed and f"export written to {out}" in printed
    assert "parity judge for model-f16.gguf: transformers' GGUF reader" in printed
    assert (out / "model-f16.gguf").is_file()
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model-f16.gguf" in modelfile and "<|im_start|>assistant" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    report = json.loads((out / "hanlm.json").read_text())
    assert report["summary"]["parity_judge"] == "transformers"
    assert report["summary"]["modelfile_template"] == "chatml"
    assert report["parity"]["gguf_f16"]["judge"] == "transformers"
    assert report["config"]["output_dir"] == str(out)
    # a second export does not write over the first
    with pytest.raises(OutputDirError, match="not empty"):
        run(_cfg(f"model.path={src}", "format=gguf", "judge=transformers"))
    assert (out / "model-f16.gguf").is_file()


def _fake_server(d: Path, script: str) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    f = d / "llama-server"
    f.write_text("#!/bin/sh\n" + script)
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return d


def test_llama_cpp_is_found_from_the_environment_or_refused_clearly(tmp_path, monkeypatch):
    d = _fake_server(tmp_path / "built" / "bin", "exit 0\n")
    monkeypatch.setenv(ENV_VAR, str(d.parent))
    assert find_llama_cpp() == d
    monkeypatch.setenv(ENV_VAR, str(d / "llama-server"))
    assert find_llama_cpp() == d
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(LlamaCppError, match="make llamacpp"):
        find_llama_cpp()


def test_judge_llama_cpp_without_llama_cpp_is_an_error(tiny_model_path, tmp_path, monkeypatch):
    import hanlm.export.export as export

    monkeypatch.setattr(export, "find_llama_cpp", lambda: None)
    with pytest.raises(ExportError, match="make llamacpp"):
        run(
            _cfg(
                f"model.path={tiny_model_path}",
                f"output_dir={tmp_path / 'o'}",
                "format=gguf",
                "judge=llama.cpp",
            )
        )


def test_a_server_that_fails_to_start_is_reported_with_its_output(tmp_path):
    d = _fake_server(tmp_path / "bin", "echo 'error: model file is damaged' >&2\nexit 3\n")
    server = LlamaServer(d, tmp_path / "m.gguf", timeout=20)
    with pytest.raises(LlamaCppError, match="exited with status 3") as e:
        server.__enter__()
    assert "model file is damaged" in str(e.value)


def test_a_server_that_never_answers_is_stopped(tmp_path):
    d = _fake_server(tmp_path / "bin", "exec sleep 60\n")
    server = LlamaServer(d, tmp_path / "m.gguf", timeout=1.5)
    with pytest.raises(LlamaCppError, match="did not answer /health"):
        server.__enter__()
    assert server.proc is None  # killed, not left running
