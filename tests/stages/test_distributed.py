"""hanlm ppo on DeepSpeed ZeRO-2/3 and multi-node launches, on CPU with gloo.

ZeRO-2 and ZeRO-3 (`train.deepspeed=`) give the metrics of the DDP path (fp32, 2 processes),
the same weights in both processes, and a resume that repeats the interrupted step exactly.
`frozen=partition` (ZeRO-3 only) holds the reference, reward and gold models as inference-only
ZeRO-3 engines: each process stores half their weights, and the run's figures are those of the
replicated frozen models.
Two `torchrun --nnodes 2` launches on 127.0.0.1 (one process each, c10d rendezvous) train as
one job: `pretrain` gives the losses of one process with the same global batch; `ppo` those of
the same two processes launched on one node (each process samples with its own seed, so PPO
has no one-process twin)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import test_alignment
import test_pretrain

from hanlm.runs import read_metrics, read_run

# the sibling modules' data fixtures, shared rather than copied
pref, corpus, tok_dir = test_alignment.pref, test_pretrain.corpus, test_pretrain.tok_dir
POEMS, _data = test_alignment.POEMS, test_alignment._data

ROOT = Path(__file__).resolve().parents[2]
DS = ROOT / "configs" / "deepspeed"
COMPARED = ("loss", "pg_loss", "ptx_loss", "value_loss", "kl", "score", "entropy", "approx_kl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _torchrun(launch, command, argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "hanlm.pipeline.cli"]
    return subprocess.Popen(
        [*cmd, command, *argv],
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait(*procs, timeout=300):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, out[-2000:] + err[-4000:]
        outs.append(out + err)
    return outs


def _two_nodes(command, argv):
    """Two launches as two nodes of one job: one process each, rendezvous on 127.0.0.1."""
    port = _free_port()
    procs = [
        _torchrun(
            [
                *("--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1"),
                *("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"),
            ],
            command,
            argv,
        )
        for rank in (0, 1)
    ]
    return _wait(*procs)


def _ppo_2proc(model, pref, out, *extra):
    launch = ["--standalone", "--nproc_per_node", "2"]
    return _wait(_torchrun(launch, "ppo", test_alignment.ppo_argv(model, pref, out, *extra)))[0]


def _rows(out):
    return {r["step"]: r for r in read_metrics(out) if "loss" in r}


def _assert_same_metrics(a, b, rel=1e-5, abs_=1e-6):
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        for key in COMPARED:
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=rel, abs=abs_), (step, key)


def _weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model.safetensors"))


def test_one_process_on_zero2_equals_the_plain_loop(tmp_path, tiny_model_path, pref):
    """Fast: one process without torchrun (DeepSpeed gets a group of one), in a subprocess so
    this one keeps no process group; the engine's micro-batch boundaries, loss scaling, clipping
    and steps give the plain loop's figures."""
    pytest.importorskip("deepspeed")
    from hanlm.pipeline import cli

    plain, zero = tmp_path / "plain", tmp_path / "zero2"
    fast = ["train.max_steps=2", "train.save_steps=0", "train.eval_steps=0", "eval_prompts=0"]
    assert cli.main(["ppo", *test_alignment.ppo_argv(tiny_model_path, pref, plain, *fast)]) == 0
    ds = f"train.deepspeed={DS / 'zero2.json'}"
    cmd = [
        sys.executable,
        "-m",
        "hanlm.pipeline.cli",
        "ppo",
        *test_alignment.ppo_argv(tiny_model_path, pref, zero, *fast, ds),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _rows(plain), _rows(zero)
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        for key in COMPARED:
            if key in a[step]:
                assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.fixture(scope="module")
def ddp_ppo(tmp_path_factory, tiny_model_path, pref):
    out = tmp_path_factory.mktemp("ddp") / "ppo"
    _ppo_2proc(tiny_model_path, pref, out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_ppo_on_deepspeed_equals_ddp_and_resumes_exactly(
    tmp_path,
    tiny_model_path,
    pref,
    ddp_ppo,
    zero,
):
    import torch

    pytest.importorskip("deepspeed")
    out = tmp_path / zero
    ds = f"train.deepspeed={DS / f'{zero}.json'}"
    _ppo_2proc(tiny_model_path, pref, out, ds)
    s = read_run(out)["summary"]
    assert s["deepspeed"].endswith(f"{zero}.json") and s["world_size"] == 2
    assert s["weights_equal_across_processes"] is True
    _assert_same_metrics(_rows(ddp_ppo), _rows(out))
    mine, ddp = _weights(out), _weights(ddp_ppo)
    assert mine.keys() == ddp.keys()
    for name in ddp:  # the saved policy: ZeRO-3's gathered from its partitions
        assert torch.allclose(mine[name], ddp[name], rtol=1e-4, atol=1e-6), name
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert (ckpt / "hanlm-complete").is_file() and (ckpt / "policy").is_dir()

    # resume from step 2 (engine states + the loop's state.pt) repeats step 3 exactly
    first = _rows(out)[3]
    _ppo_2proc(tiny_model_path, pref, out, ds, "resume=true")
    again = [r for r in read_metrics(out) if r["step"] == 3 and "loss" in r]
    assert len(again) == 2
    for key in COMPARED:
        if key in first:
            assert again[1][key] == pytest.approx(first[key], rel=1e-6, abs=1e-8), key


@pytest.mark.slow
def test_two_nodes_on_one_machine_train_as_one_job(
    tmp_path, corpus, tok_dir, tiny_model_path, pref, ddp_ppo
):
    common = [
        f"tokenizer={tok_dir}",
        "preset=test",
        f"data.paths=[{corpus}]",
        "block_size=32",
        "train.max_steps=4",
        "train.eval_steps=0",
        "train.logging_steps=1",
        "train.lr=3e-3",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    one = tmp_path / "one"
    launch = ["--standalone", "--nproc_per_node", "1"]
    _wait(_torchrun(launch, "pretrain", [*common, "train.batch_size=4", f"output_dir={one}"]))
    two = tmp_path / "two"
    logs = _two_nodes("pretrain", [*common, "train.batch_size=2", f"output_dir={two}"])
    assert sum(log.count("hanlm pretrain: done ->") for log in logs) == 1  # one job, one writer
    a = [r["loss"] for r in read_metrics(one) if "loss" in r]
    b = [r["loss"] for r in read_metrics(two) if "loss" in r]
    assert len(a) == len(b) == 4 and b == pytest.approx(a, rel=1e-5)

    out = tmp_path / "ppo"
    logs = _two_nodes("ppo", test_alignment.ppo_argv(tiny_model_path, pref, out))
    assert sum(log.count("hanlm ppo: done ->") for log in logs) == 1
    s = read_run(out)["summary"]
    assert s["world_size"] == 2 and s["weights_equal_across_processes"] is True
    _assert_same_metrics(_rows(ddp_ppo), _rows(out))
    assert json.loads((out / "hanlm.json").read_text())["status"] == "complete"


def test_partitioned_frozen_models_without_zero3_are_refused_before_loading(tmp_path, capsys):
    """Fast: `frozen=partition` needs ZeRO-3 engines; said at the config, with the fix."""
    pytest.importorskip("deepspeed")
    from hanlm.align.ppo import PPOConfig
    from hanlm.config import ConfigError, load_config
    from hanlm.pipeline import cli

    base = [f"model.path={tmp_path / 'no-model'}", f"output_dir={tmp_path / 'out'}"]
    argv = ["ppo", *base, "frozen=partition"]
    assert cli.main(argv) == 2  # a config error: nothing loaded (the model does not exist)
    err = capsys.readouterr().err
    assert "frozen=partition needs DeepSpeed ZeRO-3" in err
    assert "train.deepspeed=configs/deepspeed/zero3.json" in err and "frozen=replicate" in err
    with pytest.raises(ConfigError, match=r"zero2\.json is ZeRO stage 2\): set train\.deepspeed="):
        load_config(
            PPOConfig, None, [*base, "frozen=partition", f"train.deepspeed={DS / 'zero2.json'}"]
        )
    zero3 = f"train.deepspeed={DS / 'zero3.json'}"
    assert load_config(PPOConfig, None, [*base, "frozen=partition", zero3]).frozen == "partition"
    assert load_config(PPOConfig, None, base).frozen == "replicate"  # the default
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_partitioned_frozen_models_give_the_replicated_figures(tmp_path, tiny_model_path, pref):
    """ZeRO-3 with a reward model and a gold judge (the tiny model with a seeded score head) and
    the reference: `frozen=partition` gives the figures of `frozen=replicate` (training, scores
    and evaluations), while each of the 2 processes stores half the frozen weights rather than
    all of them. The DeepSpeed file is zero3.json with no persistence threshold, so that the tiny
    model's small tensors are partitioned too (the default keeps tensors under 1e5 whole)."""
    pytest.importorskip("deepspeed")
    cfg = json.loads((DS / "zero3.json").read_text())
    cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (ds := tmp_path / "zero3_no_persistence.json").write_text(json.dumps(cfg))
    judges = [f"reward_model={tiny_model_path}", f"gold_reward_model={tiny_model_path}"]
    common = [f"train.deepspeed={ds}", *judges, "train.save_steps=0"]
    rep, part = tmp_path / "replicate", tmp_path / "partition"
    _ppo_2proc(tiny_model_path, pref, rep, *common)
    _ppo_2proc(tiny_model_path, pref, part, *common, "frozen=partition")

    a, b = _rows(rep), _rows(part)
    _assert_same_metrics(a, b)
    for step in a:  # the reward model's score and the evaluations (steps 2 and 3) too
        for key in [k for k in a[step] if k == "rm_score" or k.startswith("eval_")]:
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-5, abs=1e-6), (step, key)
    assert "rm_score" in a[1] and "eval_gold_score" in a[3]
    sa, sb = read_run(rep)["summary"], read_run(part)["summary"]
    for key in ("initial_eval_score", "initial_eval_gold_score", "eval_gold_score"):
        assert sb[key] == pytest.approx(sa[key], rel=1e-5, abs=1e-6), key
    assert sb["weights_equal_across_processes"] is True

    whole, split = sa["frozen_models"], sb["frozen_models"]
    print(f"frozen weights held per process: replicate {whole}, partition {split}")
    assert whole["mode"] == "replicate" and split["mode"] == "partition"
    assert whole["models"] == split["models"] == 3  # reference, reward model, gold judge
    total = whole["weights"]
    assert split["weights"] == total > 0
    assert whole["held_per_process"] == [total, total]
    held = split["held_per_process"]
    assert len(held) == 2 and sum(held) >= total  # every weight somewhere
    assert all(h <= 0.51 * total for h in held), held  # about half in each, not all
