"""The console of a command: a progress line instead of the Trainer's raw dicts, library warnings
in the run's log file, everything back with -v; experiment trackers (train.report_to)."""

import io
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from hanlm import console
from hanlm.config import TRACKER_PACKAGES, ConfigError, TrainConfig, load_config
from hanlm.testing import mlflow_file_runs, tensorboard_scalars, wandb_offline_runs

QA = [("床前明月光的下一句是什么？", "疑是地上霜。"), ("Say hello.", "Hello, world!")]
# what the libraries print that says nothing to a user, as seen on a verbose console
NOISE = ("_pytree", "FutureWarning", "DeprecationWarning", "Failed to load", "[WARNING]")
PROGRESS = re.compile(r"^\[sft\] step (\d+)/6  loss [\d.]+  lr [\d.e+-]+  .* ETA \d+s$", re.M)


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    d = tmp_path_factory.mktemp("chats")
    with open(d / "train.jsonl", "w", encoding="utf-8") as f:
        for i in range(32):
            q, a = QA[i % 2]
            rec = {"instruction": q, "input": "", "output": a, "system": f"#{i}"}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    with open(d / "valid.jsonl", "w", encoding="utf-8") as f:
        for q, a in QA:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    return d


def sft_args(model, chats, out, *extra):
    return [
        f"model.path={model}",
        f"data.paths=[{chats / 'train.jsonl'}]",
        f"data.valid_paths=[{chats / 'valid.jsonl'}]",
        "data.dedup=none",
        "train.max_steps=6",
        "train.batch_size=8",
        "train.logging_steps=2",
        "train.eval_steps=3",
        "generation.max_new_tokens=4",
        "eval_prompts=2",
        f"output_dir={out}",
        *extra,
    ]


def hanlm(args, verbose=False):
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    src = str(Path(console.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, "-m", "hanlm", *args, *(["-v"] if verbose else [])]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def consoles(tmp_path_factory, tiny_model_path, chats):
    """The same tiny sft through the command line, quiet and verbose: (output, run dir) each."""
    out = {}
    for verbose in (False, True):
        run_dir = tmp_path_factory.mktemp("sft") / "out"
        p = hanlm(["sft", *sft_args(tiny_model_path, chats, run_dir)], verbose)
        assert p.returncode == 0, p.stderr[-3000:]
        out[verbose] = (p.stdout + p.stderr, run_dir)
    return out


def test_quiet_console_shows_progress_evaluations_and_headline(consoles):
    text, run_dir = consoles[False]
    assert "{'loss'" not in text and "'grad_norm'" not in text
    steps = [int(m) for m in PROGRESS.findall(text)]
    assert steps and steps[-1] == 6, text  # the last step always gets its line
    assert "[sft] eval at step 3/6: loss " in text and "[sft] eval at step 6/6: loss " in text
    assert "[sft] trained 6 steps in " in text
    assert re.search(r"^  headline: answer loss \(held-out chats\): [\d.]+ → [\d.]+", text, re.M)
    assert "\r" not in text  # not a terminal: plain lines, no redrawing
    # metrics.jsonl is unchanged: every logged row is there, raw
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6]
    assert any("eval_loss" in r for r in rows) and any("train_runtime" in r for r in rows)


def test_library_warnings_go_to_the_log_file_and_verbose_brings_everything_back(consoles):
    quiet, run_dir = consoles[False]
    loud, _ = consoles[True]
    seen = [n for n in NOISE if n in loud]
    assert seen, "the libraries printed nothing to route: the test would prove nothing"
    assert "{'loss'" in loud and "'eval_loss'" in loud  # the Trainer's raw dicts
    assert not PROGRESS.search(loud)
    for n in seen:
        assert n not in quiet, n
    log = (run_dir / console.LOG_FILE).read_text(encoding="utf-8")
    for n in seen:
        assert n in log, n
    assert "lines of library warnings were not shown" not in quiet  # they are in the log


def test_warning_routing_by_origin(tmp_path, capsys):
    """A warning raised in hanlm's code takes the usual way (here: pytest's recorder); a
    library's, a deprecation and a library's logging record go to the log file."""
    import logging

    lib = tmp_path / "site-packages" / "somelib.py"
    own = Path(console.__file__)
    with pytest.warns(UserWarning, match="hanlm says look") as seen, console.quiet_libraries():
        warnings.warn_explicit("library noise", UserWarning, str(lib), 1)
        warnings.warn_explicit("library deprecation", FutureWarning, str(lib), 2)
        warnings.warn_explicit("hanlm says look", UserWarning, str(own), 3)
        warnings.warn_explicit("deprecated via hanlm", DeprecationWarning, str(own), 4)
        logging.getLogger("torchao.somewhere").warning("torchao noise")
        console.attach(tmp_path)
    assert [str(w.message) for w in seen] == ["hanlm says look"]
    log = (tmp_path / console.LOG_FILE).read_text(encoding="utf-8")
    assert "hanlm says look" not in log
    for text in ("library noise", "library deprecation", "deprecated via hanlm", "torchao noise"):
        assert text in log, text
    err = capsys.readouterr().err
    assert "noise" not in err and "not shown" not in err  # attached: nothing held back


def test_held_back_lines_are_counted_when_no_run_directory_opens(tmp_path, capsys):
    lib = tmp_path / "site-packages" / "somelib.py"
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with console.quiet_libraries():
            warnings.warn_explicit("noise", UserWarning, str(lib), 1)
            warnings.warn_explicit("more noise", UserWarning, str(lib), 2)
    err = capsys.readouterr().err
    assert "noise" not in err
    assert "[hanlm] 2 lines of library output were not shown (HANLM_VERBOSE=1 shows them)" in err
    assert not console._LOG.active and console._LOG.held == []


def test_quiet_turns_the_libraries_progress_bars_off_and_back_on(monkeypatch):
    """datasets' bars ("Tokenizing train dataset: 40%|..." while trl prepares DPO pairs) and
    transformers' (loading and writing weights) are off while a command runs quietly."""
    import datasets
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled()
    with console.quiet_libraries(loads_model=True):
        assert not datasets.is_progress_bar_enabled()
        assert not hf_logging.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled()


def test_verbose_turns_quieting_off(monkeypatch):
    import logging

    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    before = warnings.showwarning
    with console.quiet_libraries():
        assert warnings.showwarning is before
        assert not any(
            h.stream is console._LOG for h in logging.root.handlers if hasattr(h, "stream")
        )
        assert not console._LOG.active


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_plain_lines_are_throttled_with_eta(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(console.time, "time", clock)
    out = io.StringIO()
    p = console.Progress("sft", 100, stream=out, interval=10)
    for step in range(1, 101):
        clock.now += 0.5  # 0.5 s a step
        p.tick(step)
        if step % 5 == 0:
            p.update(step, loss=5.0 - step / 100, lr=3e-3)
    p.note("eval at step 100/100: loss 4.2")
    p.close("trained 100 steps in 50s")
    lines = out.getvalue().splitlines()
    assert lines[0] == "[sft] step 5/100  loss 4.95  lr 3.00e-03  0.50s/step  ETA 48s"
    assert lines[1] == "[sft] step 25/100  loss 4.75  lr 3.00e-03  0.50s/step  ETA 38s"
    assert lines[-3] == "[sft] step 100/100  loss 4  lr 3.00e-03  0.50s/step  ETA 0s"
    assert lines[-2:] == ["[sft] eval at step 100/100: loss 4.2", "[sft] trained 100 steps in 50s"]
    # the first, then every 10 s (20 steps: 25, 45, 65, 85) and the last; eval; close
    assert [int(x.split()[2].split("/")[0]) for x in lines[:-2]] == [5, 25, 45, 65, 85, 100]


def test_progress_redraws_one_line_on_a_terminal(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(console.time, "time", clock)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    p = console.Progress("ppo", 4, first=1, stream=out)
    for step in (2, 3, 4):
        clock.now += 60
        p.update(step, score=0.5, lr=1e-4)
        if step == 3:
            p.note("eval at step 3/4: score 0.6")
    p.close("trained 3 steps in 3m00s")
    text = out.getvalue()
    assert "\n" not in text.split("[ppo] eval")[0]  # one line redrawn until the evaluation
    assert "\r[ppo] step 2/4  score 0.5  lr 1.00e-04  1m00s/step  ETA 2m00s\x1b[K" in text
    assert "\r\x1b[K[ppo] eval at step 3/4: score 0.6\n\r[ppo] step 3/4" in text
    last = "\r[ppo] step 4/4  score 0.5  lr 1.00e-04  1m00s/step  ETA 0s\x1b[K"
    assert text.endswith(last + "\n[ppo] trained 3 steps in 3m00s\n")  # the last state stays


def test_evaluation_line_puts_the_loss_first_and_hides_timings():
    m = {"eval_runtime": 0.1, "eval_margin": 2.0, "eval_accuracy": 0.75, "eval_loss": 0.5}
    m |= {"epoch": 1.0}
    m |= {"eval_samples_per_second": 90.0, "eval_num_tokens": 100}
    m |= {"eval_model_preparation_time": 0.01}
    line = "eval at step 3/6: loss 0.5  accuracy 0.75  margin 2"
    assert console.evaluation_line("at step 3/6", m) == line


# --------------------------------------------------------------------------- trackers


def test_report_to_is_checked_before_anything_loads(monkeypatch):
    cfg = load_config(TrainConfig, None, ["report_to=tensorboard"])
    assert cfg.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="'comet' is not allowed; choose one of 'none',"):
        load_config(TrainConfig, None, ["report_to=comet"])
    with pytest.raises(ConfigError, match="'none' cannot be combined"):
        load_config(TrainConfig, None, ["report_to=[none, tensorboard]"])
    monkeypatch.setitem(TRACKER_PACKAGES, "wandb", ("no_such_module_wandb_x", "wandb"))
    with pytest.raises(ConfigError, match="needs the wandb package.*pip install wandb"):
        load_config(TrainConfig, None, ["report_to=[tensorboard, wandb]"])


def test_trackers_reach_transformers_and_accelerate(tmp_path):
    """What reaches the libraries for each tracker (swanlab, which is not installed here, included)."""
    from hanlm.trainer import tracker_list, training_args

    train = TrainConfig(max_steps=2, report_to=["wandb", "swanlab", "mlflow"])
    args = training_args(train, tmp_path / "my-run", has_eval=False)
    assert args.report_to == ["wandb", "swanlab", "mlflow"] and args.run_name == "my-run"
    assert training_args(TrainConfig(), tmp_path, has_eval=False).report_to == []
    got = tracker_list(["tensorboard", "wandb", "mlflow"], tmp_path)
    assert got[1:] == ["wandb", "mlflow"]
    assert got[0].name == "tensorboard" and got[0].run_name == "tensorboard"
    assert got[0].logging_dir_param == str(tmp_path)


def test_sft_writes_tensorboard_curves(tmp_path, tiny_model_path, chats):
    from hanlm.train.sft import SFTConfig, run

    out = tmp_path / "sft"
    args = sft_args(tiny_model_path, chats, out, "train.report_to=tensorboard")
    run(load_config(SFTConfig, None, [*args, "train.logging_steps=1", "train.lr=5e-3"]))
    scalars = tensorboard_scalars(out / "tensorboard")
    loss = scalars["train/loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert len({v for _, v in loss}) > 1  # the curve moves
    assert [s for s, _ in scalars["eval/loss"]] == [3, 6]
    assert "train/learning_rate" in scalars


def test_a_training_that_fails_keeps_its_tensorboard_curve_so_far(tmp_path, tiny_model_path, chats):
    """A stage that fails mid-training (here: at the end of step 4, before that step is logged)
    leaves the curve of every step logged before the failure on disk (transformers' TensorBoard
    callback flushes each logged row), and its hanlm.json says it failed."""
    from transformers import TrainerCallback

    import hanlm.train.sft as sft

    class Fail(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 4:
                raise RuntimeError("planted failure at step 4")

    out = tmp_path / "sft"
    args = sft_args(tiny_model_path, chats, out, "train.report_to=tensorboard")
    cfg = load_config(sft.SFTConfig, None, [*args, "train.logging_steps=1"])
    real = sft.run_trainer

    def failing(trainer, checkpoint):
        trainer.add_callback(Fail())
        return real(trainer, checkpoint)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sft, "run_trainer", failing)
        with pytest.raises(RuntimeError, match="planted failure"):
            sft.run(cfg)
    steps = [s for s, _ in tensorboard_scalars(out / "tensorboard")["train/loss"]]
    assert steps == [1, 2, 3]
    info = json.loads((out / "hanlm.json").read_text(encoding="utf-8"))
    assert info["status"] == "failed" and "planted failure" in info["error"]


def test_pretrain_shows_its_measurement_before_training_as_a_line(tmp_path, tiny_tokenizer, capfd):
    from hanlm.pipeline import cli
    from hanlm.testing import SAMPLE_TEXT

    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    corpus = tmp_path / "corpus.jsonl"
    rows = [{"text": t + str(i)} for i in range(20) for t in SAMPLE_TEXT]
    corpus.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    args = [f"tokenizer={tmp_path / 'tok'}", "preset=test", "block_size=32"]
    args += [f"data.paths=[{corpus}]", "data.valid_fraction=0.1", "data.dedup=none"]
    args += ["train.max_steps=4", "train.batch_size=4", "train.eval_steps=2"]
    assert cli.main(["pretrain", *args, f"output_dir={tmp_path / 'out'}"]) == 0
    out = capfd.readouterr().out
    assert "{'eval_loss'" not in out and "{'loss'" not in out
    assert re.search(r"^\[pretrain\] eval before training: loss [\d.]+", out, re.M), out
    assert "[pretrain] eval at step 2/4: loss " in out and "[pretrain] trained 4 steps in " in out
    assert out.count("[pretrain] eval") == 3  # before, at 2 and at 4; not the final re-measure


def test_sft_reports_to_wandb_and_mlflow_offline(offline_trackers, tiny_model_path, chats):
    """transformers' wandb and mlflow callbacks get each step's loss and each evaluation; two
    stages in one process (as in a recipe) are two runs in each tracker, both ended."""
    from hanlm.train.sft import SFTConfig, run

    root = offline_trackers
    args = sft_args(tiny_model_path, chats, root / "first", "train.report_to=[wandb, mlflow]")
    run(load_config(SFTConfig, None, [*args, "train.logging_steps=1", "train.lr=5e-3"]))
    args = sft_args(tiny_model_path, chats, root / "second", "train.report_to=[wandb, mlflow]")
    run(load_config(SFTConfig, None, [*args, "train.max_steps=2", "train.eval_steps=2"]))

    (first, code1), (second, code2) = wandb_offline_runs(root / "wandb-dir")  # two runs, both ended
    assert (code1, code2) == (0, 0)
    wb_loss = [(r["train/global_step"], r["train/loss"]) for r in first if "train/loss" in r]
    assert [s for s, _ in wb_loss] == [1, 2, 3, 4, 5, 6]
    assert [r["train/global_step"] for r in first if "eval/loss" in r] == [3, 6]
    assert max(r.get("train/global_step", 0) for r in second) == 2
    runs = mlflow_file_runs(root / "mlruns", "loss")
    assert [(name, status) for name, status, _ in runs] == [
        ("first", "FINISHED"),
        ("second", "FINISHED"),
    ]
    loss = runs[0][2]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6] and len({v for _, v in loss}) > 1
    assert [v for _, v in wb_loss] == pytest.approx([v for _, v in loss])  # one curve, twice
    assert [s for s, _ in mlflow_file_runs(root / "mlruns", "eval_loss")[0][2]] == [3, 6]


def test_sft_reports_to_swanlab_offline(tmp_path, monkeypatch, tiny_model_path, chats):
    """Where swanlab is installed (not in the dev extra: it requires protobuf < 7): two stages in
    one process are two offline SwanLab runs, each with its own stage's config."""
    pytest.importorskip("swanlab", reason="swanlab is not installed (it requires protobuf < 7)")
    import yaml

    from hanlm.train.sft import SFTConfig, run

    monkeypatch.setenv("SWANLAB_MODE", "offline")
    monkeypatch.setenv("SWANLAB_LOG_DIR", str(tmp_path / "swanlog"))
    for name, steps in (("first", 4), ("second", 2)):
        args = sft_args(tiny_model_path, chats, tmp_path / name, "train.report_to=swanlab")
        run(load_config(SFTConfig, None, [*args, f"train.max_steps={steps}"]))
    runs = sorted((tmp_path / "swanlog").glob("run-*"))
    configs = [yaml.safe_load((r / "files" / "config.yaml").read_text()) for r in runs]
    names = [
        c["run_name"]["value"] if isinstance(c["run_name"], dict) else c["run_name"]
        for c in configs
    ]
    assert names == ["first", "second"]  # one run: the second stage logged into the first
    assert all(list(r.glob("run-*.swanlab")) for r in runs)
