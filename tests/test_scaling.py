"""benchmarks/scaling.py: the formulas of docs/scaling.md against the cases they come from."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scaling():
    spec = importlib.util.spec_from_file_location("scaling", ROOT / "benchmarks" / "scaling.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["scaling"] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_memory_matches_the_zero_paper(scaling):
    # ZeRO (Rajbhandari et al. 2020), figure 1: a 7.5B model on 64 GPUs, K=12: baseline
    # 120 GB, P_os+g 16.6 GB, P_os+g+p 1.9 GB per GPU.
    n = 7.5e9
    assert scaling.memory_bytes("full", n) / 1e9 == pytest.approx(120)
    assert scaling.memory_bytes("zero2", n, 64) / 1e9 == pytest.approx(16.6, abs=0.05)
    assert scaling.memory_bytes("zero3", n, 64) / 1e9 == pytest.approx(1.9, abs=0.05)


def test_parameter_counts_and_time(scaling):
    by_name = {a.name: scaling.params(a) for a in scaling.ARCHS}
    # the published sizes: Qwen2-1.5B 1.54B, LLaMA-2 6.74B / 13.02B / 68.98B
    assert by_name["7B"] == 6_738_415_616
    assert by_name["13B"] == 13_015_864_320
    assert by_name["70B"] / 1e9 == pytest.approx(68.98, abs=0.01)
    assert by_name["1.5B"] / 1e9 == pytest.approx(1.54, abs=0.01)
    # 6ND: 1e9 params x 1e12 tokens on 1000 GPUs of 1 PFLOP/s at 50% MFU = 12,000 s
    assert scaling.train_seconds(1e9, 1e12, 1000, 0.5, 1e15) == pytest.approx(12_000)
    m = scaling.measured_mfu()
    assert m["preset"] == "1b" and m["mfu"] == pytest.approx(0.3023)
