import json
from dataclasses import dataclass

import pytest

from hanlm.config import OutputConfig
from hanlm.data.sources import DataError
from hanlm.runs import (
    CHECKPOINTS,
    OutputDirError,
    Run,
    atomic_dir,
    atomic_write_json,
    last_checkpoint,
    prepare_output_dir,
    read_metrics,
    read_run,
)


@dataclass
class Cfg(OutputConfig):
    x: int = 1


def test_refuses_non_empty_dir_unless_overwrite_or_resume(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "model.bin").write_text("old")
    with pytest.raises(OutputDirError, match="not empty; pass overwrite=true"):
        prepare_output_dir(d)
    assert (d / "model.bin").read_text() == "old"  # nothing touched
    assert prepare_output_dir(d, resume=True) == d
    assert (d / "model.bin").exists()
    prepare_output_dir(d, overwrite=True)
    assert d.is_dir() and not any(d.iterdir())


def test_empty_or_missing_dir_is_fine_and_unset_is_error(tmp_path):
    assert prepare_output_dir(tmp_path / "new" / "deep").is_dir()
    with pytest.raises(OutputDirError, match="output_dir is not set"):
        prepare_output_dir("")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputDirError, match="not a directory"):
        prepare_output_dir(f)


def test_run_writes_config_versions_metrics_and_status(tmp_path):
    cfg = Cfg(output_dir=str(tmp_path / "r"), x=7)
    with Run("demo", cfg, seed=3) as run:
        info = read_run(run.dir)
        assert info["status"] == "running"
        run.log(1, loss=2.5, note="中文")
        run.log(2, loss=2.0)
        run.finish({"final_loss": 2.0})
    info = read_run(run.dir)
    assert info["status"] == "complete" and info["ended"]
    assert info["config"]["x"] == 7 and info["seed"] == 3
    assert info["versions"]["hanlm"] and "torch" in info["versions"]
    assert info["summary"]["final_loss"] == 2.0 and info["summary"]["seconds"] >= 0
    assert [m["loss"] for m in read_metrics(run.dir)] == [2.5, 2.0]
    assert read_metrics(run.dir)[0]["note"] == "中文"
    assert "x: 7" in (run.dir / "config.yaml").read_text()


def test_run_records_failure(tmp_path):
    cfg = Cfg(output_dir=str(tmp_path / "r"))
    with pytest.raises(RuntimeError), Run("demo", cfg, cfg.output_dir):
        raise RuntimeError("boom")
    info = read_run(tmp_path / "r")
    assert info["status"] == "failed" and "boom" in info["error"]


def test_a_run_rejecting_its_input_leaves_no_directory_unless_it_wrote_more(tmp_path):
    def fail(cfg, before=None, **kw):
        with pytest.raises(DataError), Run("demo", cfg, cfg.output_dir, **kw) as run:
            run.log(1, loss=1.0)  # its own records are not results
            if before:
                before(run.dir)
            raise DataError("x.jsonl:3: malformed JSON")

    fresh = Cfg(output_dir=str(tmp_path / "new" / "run"))
    fail(fresh)
    assert not (tmp_path / "new" / "run").exists()  # nothing half-written
    fail(fresh, before=lambda d: (d / "part.bin").write_text("written"))
    assert read_run(fresh.output_dir)["status"] == "failed"  # a result kept, and the failure
    fail(fresh, resume=True)  # continuing an existing run never removes it
    assert (tmp_path / "new" / "run" / "part.bin").is_file()
    fail(Cfg(output_dir=fresh.output_dir, overwrite=True))  # the old run was replaced: no trace
    assert not (tmp_path / "new" / "run").exists()
    with pytest.raises(RuntimeError), Run("demo", fresh, fresh.output_dir):
        raise RuntimeError("a bug, not bad input")
    assert read_run(fresh.output_dir)["status"] == "failed"


def test_atomic_write_keeps_old_file_on_crash(tmp_path, monkeypatch):
    p = tmp_path / "a.json"
    atomic_write_json(p, {"v": 1})

    class Boom:
        def __str__(self):
            raise RuntimeError("crash while serialising")

    with pytest.raises(RuntimeError):
        atomic_write_json(p, {"v": Boom()})
    assert json.loads(p.read_text()) == {"v": 1}
    assert [q.name for q in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "checkpoint-10"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    assert (target / "weights").read_text() == "v1"
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "weights").write_text("half")
        raise KeyboardInterrupt
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]


def test_checkpoints_are_whole_or_absent_and_pruned(tmp_path):
    cfg = Cfg(output_dir=str(tmp_path / "r"))
    with Run("demo", cfg) as run:
        for step in (1, 2, 3):
            with run.checkpoint(step, keep=2) as d:
                (d / "state.txt").write_text(str(step))
        with pytest.raises(RuntimeError), run.checkpoint(4, keep=2) as d:
            (d / "state.txt").write_text("4")
            raise RuntimeError("crash mid-save")
    root = run.dir / CHECKPOINTS
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "checkpoint-3"]
    # a partial directory (as a Trainer crash leaves one) is removed, never resumed from
    (root / "checkpoint-9").mkdir()
    assert last_checkpoint(run.dir) == root / "checkpoint-3"
    assert not (root / "checkpoint-9").exists()
    resumed = Run("demo", Cfg(output_dir=str(run.dir), resume=True))
    assert resumed.resume_from() == str(root / "checkpoint-3")
    assert Run("demo", Cfg(output_dir=str(tmp_path / "fresh"))).resume_from() is None


def test_save_model_merges_lora_and_writes_stop_tokens(tmp_path, tiny_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from hanlm.config import LoraConfig
    from hanlm.trainer import apply_lora

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = apply_lora(
        AutoModelForCausalLM.from_pretrained(tiny_model_path), LoraConfig(enabled=True, r=2)
    )
    lora = LoraConfig(enabled=True, r=2, keep_adapter=True)
    with Run("demo", Cfg(output_dir=str(tmp_path / "r"))) as run:
        merged = run.save_model(model, tok, lora, stops=[2, 5])
    assert not hasattr(merged, "peft_config")  # merged into a plain model
    assert (run.dir / "adapter" / "adapter_config.json").is_file()
    assert GenerationConfig.from_pretrained(run.dir).eos_token_id == [2, 5]
    assert AutoModelForCausalLM.from_pretrained(run.dir).num_parameters() == merged.num_parameters()
