"""The demo recipe end to end, shortened (slow): every stage runs, a second run skips them all,
and a run killed during pretraining resumes to the same final metrics as an uninterrupted one."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from hanlm.pipeline.recipe import RECIPES
from hanlm.runs import read_run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def shortened_demo(tmp_path: Path, name: str) -> Path:
    spec = yaml.safe_load((RECIPES / "demo.yaml").read_text(encoding="utf-8"))
    spec["run_dir"] = str(tmp_path / name)
    spec["report"]["num_prompts"] = 2
    spec["report"]["max_new_tokens"] = 8
    st = spec["stages"]
    st["tokenizer"]["config"].update(vocab_size=3000, character_coverage=0.99)
    st["tokenizer"]["config"]["data"]["max_records"] = 3000
    pt = st["pretrain"]["config"]
    pt.update(preset="test", block_size=64, cache_dir=str(tmp_path / "cache"))
    pt["data"]["max_records"] = 600
    pt["train"].update(max_steps=12, batch_size=4, eval_steps=6, save_steps=6, logging_steps=2)
    sft = st["sft"]["config"]
    sft["data"] = {"max_records": 200, "dedup": "none"}
    sft["train"].update(max_steps=4, batch_size=4, eval_steps=4, save_steps=4)
    sft.update(eval_prompts=4, generation={"max_new_tokens": 8, "temperature": 0.0})
    st["eval"]["config"].update(limit=2, ppl_max_chars=2000)
    for name in ("reward", "gold_reward"):
        st[name]["config"]["train"].update(max_steps=4, batch_size=4, eval_steps=4)
        st[name]["config"]["data"] = {"max_records": 64}
    for name in ("ppo", "ppo_ptx_only"):
        ppo = st[name]["config"]
        ppo.update(max_new_tokens=8, rollout_batch=4, eval_prompts=2, ppo_epochs=1)
        ppo["train"].update(max_steps=2, batch_size=4, eval_steps=2, save_steps=2)
    st["dpo"]["config"].update(eval_pairs=8, ref_cache_dir=str(tmp_path / "refcache"))
    st["dpo"]["config"]["data"] = {"max_records": 32}
    st["dpo"]["config"]["train"].update(max_steps=2, batch_size=4, eval_steps=2)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def hanlm_run(recipe: Path, **kw):
    cmd = [sys.executable, "-m", "hanlm.pipeline.cli", "run", str(recipe)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kw)


def test_demo_end_to_end_skip_and_resume(tmp_path):
    recipe = shortened_demo(tmp_path, "full")
    proc = hanlm_run(recipe)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "full"
    state = json.loads((run_dir / "recipe_state.json").read_text())
    assert all(s["status"] == "complete" for s in state.values()), state
    assert (run_dir / "report.html").is_file() and (run_dir / "eval" / "eval_report.json").is_file()

    started = time.time()
    again = hanlm_run(recipe)
    assert again.returncode == 0 and time.time() - started < 30
    assert again.stdout.count(" skip ") == len(state)

    # Kill the run while pretraining, after its first checkpoint, then run it again.
    killed = shortened_demo(tmp_path, "killed")
    pre = tmp_path / "killed" / "pretrain" / "checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hanlm.pipeline.cli", "run", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while not list(pre.glob("checkpoint-6/hanlm-complete")) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert read_run(tmp_path / "killed" / "pretrain")["status"] == "running"
    resumed = hanlm_run(killed)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert re.search(r"pretrain\s+pretrain\s+resume", resumed.stdout)
    a = read_run(run_dir / "pretrain")["summary"]
    b = read_run(tmp_path / "killed" / "pretrain")["summary"]
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], abs=1e-5)
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4) or b["steps"] == a["steps"]
