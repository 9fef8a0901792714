"""`make bench` machinery: ratios point the right way, and hanlm's side and its peer train the
same thing (the same first losses from the same start, data and seed), so a speed ratio compares
like with like."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("hanlm_bench", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hanlm_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


def _side(bench, name: str, value: float):
    write = f"import json,sys; json.dump({{'t': {value}}}, open(sys.argv[1], 'w'))"
    return bench.Side(
        name,
        lambda d: [sys.executable, "-c", write, str(d / "r.json")],
        lambda d: json.loads((d / "r.json").read_text()),
    )


def test_ratios_point_the_right_way(bench, tmp_path):
    fast, slow = _side(bench, "fast", 1.0), _side(bench, "slow", 3.0)
    rate = bench.Pair("x", "m", "t", "per s", slow, fast, goal=2.0)  # higher is better
    r = bench.measure(rate, 2, tmp_path)
    assert r["ratio"] == 3.0 and r["ratios"] == [3.0, 3.0] and r["met"]
    time = bench.Pair("x", "m", "t", "s", fast, slow, goal=2.0, lower_is_better=True)
    r = bench.measure(time, 1, tmp_path)
    assert r["ratio"] == 3.0 and r["met"]
    r = bench.measure(
        bench.Pair("x", "m", "t", "s", slow, fast, goal=2.0, lower_is_better=True), 1, tmp_path
    )
    assert r["ratio"] == pytest.approx(1 / 3, abs=1e-3) and not r["met"]


def test_who_runs_first_alternates_between_rounds(bench, tmp_path):
    # a round's first run may pay for cold caches: A B, then B A, so neither side always does
    log = tmp_path / "order.txt"

    def side(name: str):
        write = (
            f"import json,sys; open({str(log)!r}, 'a').write({name!r});"
            " json.dump({'t': 1.0}, open(sys.argv[1], 'w'))"
        )
        return bench.Side(
            name,
            lambda d: [sys.executable, "-c", write, str(d / "r.json")],
            lambda d: json.loads((d / "r.json").read_text()),
        )

    bench.measure(bench.Pair("x", "m", "t", "per s", side("A"), side("B")), 3, tmp_path)
    assert log.read_text() == "ABBAAB"


@pytest.mark.slow
def test_pretrain_and_sft_peers_train_the_same_thing(bench, tiny_model_path, tmp_path):
    texts = [
        {"text": f"第{i}行：床前明月光，疑是地上霜。The moon is bright {i}."} for i in range(60)
    ]
    chats = [
        {
            "messages": [
                {"role": "user", "content": f"问题{i}"},
                {"role": "assistant", "content": f"回答{i}。"},
            ]
        }
        for i in range(40)
    ]
    pre = bench.write_jsonl(tmp_path / "pre.jsonl", texts)
    sft = bench.write_jsonl(tmp_path / "sft.jsonl", chats)
    size = {"steps": 3, "batch": 2, "block": 32, "lr": 1e-3, "tol": 1e-4}
    r = bench.measure(bench.pretrain_pair("tiny", tiny_model_path, pre, size), 1, tmp_path)
    assert r["check"]["same_curve"], r["check"]
    assert len(r["check"]["first_losses_hanlm"]) == 3
    size = {"steps": 3, "batch": 2, "lr": 1e-3, "max_length": 64, "tol": 1e-4}
    # random batches, as trl's: hanlm renders and masks conversations itself, trl's
    # assistant_only_loss must agree on the same batches
    pair = bench.sft_pair("tiny", tiny_model_path, sft, size, batching="random")
    r = bench.measure(pair, 1, tmp_path)
    assert r["check"]["same_curve"], r["check"]
