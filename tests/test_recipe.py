"""hanlm run: recipe parsing and reference errors, skip logic, dry run, resume, report."""

import json
import random
from pathlib import Path

import pytest
import yaml

from hanlm.pipeline import cli
from hanlm.pipeline.recipe import (
    RECIPES,
    RecipeError,
    RunConfig,
    find_recipe,
    load_recipe,
    plan,
    recipe_names,
)
from hanlm.runs import read_run

LINES = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "白日依山尽，黄河入海流。"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("recipe")
    rng = random.Random(0)
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i in range(80):
            f.write(
                json.dumps(
                    {"text": "".join(rng.choice(LINES) for _ in range(4)) + str(i)},
                    ensure_ascii=False,
                )
                + "\n"
            )
    with open(d / "chat.jsonl", "w", encoding="utf-8") as f:
        for i in range(24):
            f.write(
                json.dumps(
                    {"instruction": LINES[i % 3], "output": LINES[(i + 1) % 3]}, ensure_ascii=False
                )
                + "\n"
            )
    tiny_tokenizer.save_pretrained(d / "tok")
    return d


def recipe(files, tmp_path, **changes):
    stages = {
        "pretrain": {
            "command": "pretrain",
            "config": {
                "tokenizer": str(files / "tok"),
                "preset": "test",
                "block_size": 32,
                "data": {"paths": [str(files / "corpus.jsonl")], "valid_fraction": 0.1},
                "train": {"max_steps": 4, "batch_size": 4, "eval_steps": 2, "save_steps": 2},
                "cache_dir": str(tmp_path / "cache"),
            },
        },
        "sft": {
            "command": "sft",
            "config": {
                "model": {"path": "${stages.pretrain.output}"},
                "data": {
                    "paths": [str(files / "chat.jsonl")],
                    "valid_fraction": 0.2,
                    "dedup": "none",
                },
                "train": {"max_steps": 2, "batch_size": 4},
                "eval_prompts": 2,
                "generation": {"max_new_tokens": 4, "temperature": 0.0},
            },
        },
    }
    for key, value in changes.items():
        stage, _, rest = key.partition("__")
        node = stages[stage]["config"]
        *path, last = rest.split("__")
        for p in path:
            node = node[p]
        node[last] = value
    spec = {
        "name": "t",
        "run_dir": str(tmp_path / "run"),
        "report": {"prompts": ["床前明月光，"], "max_new_tokens": 4},
        "stages": stages,
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    return path


def actions(path, **kw):
    return {s["stage"].name: s["action"] for s in plan(load_recipe(path), RunConfig(**kw))}


def write(tmp_path, spec):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return p


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (
            {"a": {"command": "pretrain", "config": {"tokenizer": "${stages.b.output}"}}},
            "unknown stage 'b'",
        ),
        (
            {"a": {"command": "pretrain", "config": {"tokenizer": "${stages.a.output}"}}},
            "its own output",
        ),
        (
            {
                "a": {"command": "pretrain", "config": {"tokenizer": "${stages.b.output}"}},
                "b": {"command": "pretrain", "config": {}},
            },
            "comes later",
        ),
        ({"a": {"command": "bake"}}, "unknown command 'bake'"),
        ({"a": {"config": {}}}, "needs a 'command'"),
        (
            {"a": {"command": "pretrain", "config": {"x": "${nope}"}}},
            r"unknown reference \$\{nope\}",
        ),
    ],
)
def test_recipe_reference_errors(tmp_path, stages, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, {"stages": stages}))


def test_a_recipe_by_name_by_path_or_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ here: names resolve inside the package
    assert {"demo", "objectives", "legal"} <= set(recipe_names())
    assert find_recipe("demo") == RECIPES / "demo.yaml"
    assert load_recipe("").name == "demo"  # `hanlm run` alone
    own = write(tmp_path, {"stages": {"a": {"command": "pretrain"}}})
    assert find_recipe(str(own)) == own
    (tmp_path / "demo").write_text("name: shadow\nstages: {a: {command: pretrain}}\n")
    assert find_recipe("demo") == Path("demo")  # an existing file is taken as a path
    with pytest.raises(RecipeError, match=r"no recipe 'nosuch'.*\(chinese-llama, demo, .*legal"):
        find_recipe("nosuch")
    with pytest.raises(RecipeError, match="no recipe 'sub/demo'"):
        find_recipe("sub/demo")  # a path is never read as a name
    with pytest.raises(RecipeError, match="is a directory"):
        find_recipe(str(tmp_path))


def test_unknown_recipe_name_lists_the_names_on_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", "demoo"]) == 1
    err = capsys.readouterr().err
    assert "no recipe 'demoo'" in err and "demo, legal, legal-gpu, objectives" in err


def test_unknown_config_key_names_the_stage(tmp_path, files):
    path = recipe(files, tmp_path, sft__train__lrr=1)
    with pytest.raises(
        RecipeError, match=r"stage 'sft': unknown config key 'train.lrr'.*'train.lr'"
    ):
        plan(load_recipe(path), RunConfig())


def test_run_skip_change_and_report(tmp_path, files, capsys):
    path = recipe(files, tmp_path)
    assert actions(path) == {"pretrain": "run", "sft": "run"}
    assert cli.main(["run", str(path), "--dry-run"]) == 0
    assert "never run" in capsys.readouterr().out
    assert not (tmp_path / "run" / "pretrain").exists()  # a dry run runs nothing

    assert cli.main(["run", str(path)]) == 0
    run_dir = tmp_path / "run"
    assert read_run(run_dir / "sft")["status"] == "complete"
    state = json.loads((run_dir / "recipe_state.json").read_text())
    assert state["pretrain"]["seconds"] > 0 and state["pretrain"]["peak_memory_mb"] > 50
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "<table>" in html and "data:image/png;base64," in html
    assert "The same prompts, answered by each model" in html and "床前明月光" in html
    assert "http://" not in html and "https://" not in html  # opens offline
    assert (run_dir / "report.md").read_text(encoding="utf-8").startswith("# hanlm run: t")

    assert actions(path) == {"pretrain": "skip", "sft": "skip"}
    # changing one sft key reruns only sft; changing pretrain reruns its dependant too
    assert actions(recipe(files, tmp_path, sft__train__lr=5e-4)) == {
        "pretrain": "skip",
        "sft": "rerun",
    }
    assert actions(recipe(files, tmp_path, pretrain__train__lr=5e-4)) == {
        "pretrain": "rerun",
        "sft": "rerun",
    }
    # changing an input file's contents counts as a change
    path = recipe(files, tmp_path)
    chat = files / "chat.jsonl"
    old = chat.read_text(encoding="utf-8")
    chat.write_text(
        old + json.dumps({"instruction": "新", "output": "的"}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    try:
        assert actions(path) == {"pretrain": "skip", "sft": "rerun"}
    finally:
        chat.write_text(old, encoding="utf-8")
    assert actions(path, only="sft") == {"pretrain": "skip", "sft": "rerun"}
    assert actions(path, from_stage="pretrain") == {"pretrain": "rerun", "sft": "rerun"}

    # an interrupted stage resumes from its checkpoint
    info = json.loads((run_dir / "sft" / "hanlm.json").read_text())
    info["status"] = "interrupted"
    (run_dir / "sft" / "hanlm.json").write_text(json.dumps(info))
    assert actions(path) == {"pretrain": "skip", "sft": "resume"}

    # a second full run skips what is complete and finishes the interrupted stage
    capsys.readouterr()
    assert cli.main(["run", str(path)]) == 0
    out = capsys.readouterr().out
    assert "pretrain  pretrain  skip" in out and "sft       sft       resume" in out
    assert read_run(run_dir / "sft")["status"] == "complete"


def test_only_a_stage_whose_input_was_never_made_is_an_error(tmp_path, files):
    path = recipe(files, tmp_path)
    with pytest.raises(
        RecipeError, match="needs the output of 'pretrain', which has no complete run"
    ):
        plan(load_recipe(path), RunConfig(only="sft"))
    with pytest.raises(RecipeError, match="--only nope: no such stage"):
        plan(load_recipe(path), RunConfig(only="nope"))


def test_failed_stage_stops_the_run_and_keeps_earlier_ones(tmp_path, files, capsys):
    path = recipe(files, tmp_path, sft__model={"path": str(tmp_path / "missing")})
    # sft now reads a missing model: pretrain completes, sft fails, the run exits 1
    assert cli.main(["run", str(path), "report=false"]) == 1
    state = json.loads((tmp_path / "run" / "recipe_state.json").read_text())
    assert state["pretrain"]["status"] == "complete" and state["sft"]["status"] == "failed"
    assert "stage 'sft' failed" in capsys.readouterr().err


def test_report_to_in_a_stage_or_for_every_stage_without_rerunning(tmp_path, files):
    """train.report_to is a stage key like any other, `hanlm run report_to=...` sets it for every
    training stage that does not set its own, and it does not change a stage's fingerprint."""
    path = recipe(files, tmp_path, sft__train__report_to="tensorboard")
    rec = load_recipe(path)
    steps = {s["stage"].name: s for s in plan(rec, RunConfig())}
    assert steps["sft"]["config"]["train"]["report_to"] == ["tensorboard"]
    assert steps["pretrain"]["config"]["train"]["report_to"] == []
    rec.report_to = ["tensorboard"]
    every = {s["stage"].name: s for s in plan(rec, RunConfig())}
    assert every["pretrain"]["config"]["train"]["report_to"] == ["tensorboard"]
    plain = {s["stage"].name: s for s in plan(load_recipe(recipe(files, tmp_path)), RunConfig())}
    for name in ("pretrain", "sft"):
        assert every[name]["fingerprint"] == plain[name]["fingerprint"], name
    with pytest.raises(RecipeError, match="'comet' is not allowed"):
        plan(load_recipe(recipe(files, tmp_path, sft__train__report_to="comet")), RunConfig())
    assert cli.main(["run", str(path), "report_to=[nope]", "--dry-run"]) == 2


def test_a_stage_runs_only_where_its_package_is_installed(tmp_path, files, capsys):
    """`if_installed:` skips a stage (saying why) where a package is missing, runs it where the
    package is there, and a stage that reads a skipped one is an error naming the package."""
    path = recipe(files, tmp_path)
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    spec["stages"]["pretrain"]["if_installed"] = "no-such-package-hanlm"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RecipeError, match="'pretrain', which runs only with no-such-package-hanlm"):
        plan(load_recipe(path), RunConfig())

    del spec["stages"]["sft"]
    spec["stages"]["other"] = {**spec["stages"]["pretrain"], "if_installed": ["pytest"]}
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    steps = {s["stage"].name: s for s in plan(load_recipe(path), RunConfig())}
    assert steps["pretrain"]["action"] == "skip"
    assert steps["pretrain"]["why"] == (
        "needs no-such-package-hanlm, not installed (pip install --no-deps no-such-package-hanlm)"
    )
    assert steps["other"]["action"] == "run"
    assert cli.main(["run", str(path), "report=false"]) == 0
    assert "needs no-such-package-hanlm, not installed" in capsys.readouterr().out
    assert not (tmp_path / "run" / "pretrain").exists()
    assert read_run(tmp_path / "run" / "other")["status"] == "complete"

    spec["stages"]["other"]["if_installed"] = {"package": "pytest"}
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    with pytest.raises(RecipeError, match="'if_installed' is a package name or a list of them"):
        load_recipe(path)
