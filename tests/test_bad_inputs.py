"""Bad input, never a traceback: every command that reads input, fed the malformed corpus of
tests/bad_input_corpus.py (data files cut short, nested beyond reason, not UTF-8, empty, of the
wrong shape; configs and recipes that are not YAML or not mappings or of the wrong types; model
directories with missing, truncated or junk weights, configs and tokenizers), must exit non-zero
with a message that names the file (or key) at fault, print no "Traceback", and leave no output
directory behind.

Each case runs the command line exactly as `python -m hanlm ARGS` does (`sys.exit(main(ARGS))`,
an escaping exception printing its traceback), in a child process forked from one driver that
has imported torch, transformers and every command module once: a fresh interpreter per case
costs 5-15 s of imports on a 2-core machine, a fork a fraction of a second. The slow variant
(`make test-slow`) runs the first case of every command as a real `python -m hanlm` subprocess,
so the two ways are seen to agree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from bad_input_corpus import build

HERE = Path(__file__).resolve().parent

# (id, argv with {name} for corpus entries, {model} the good tiny model, {out} an output dir,
#  what the message must name: one of these strings)
M, OUT = "{model}", "output_dir={out}"
DATA_FILES = [
    "cut.jsonl.gz",
    "cut.json.gz",
    "notgzip.jsonl.gz",
    "deep.jsonl",
    "deep.json",
    "deepobj.jsonl",
    "latin1.jsonl",
    "latin1.txt",
    "latin1.csv",
    "utf16.jsonl",
    "nul.jsonl",
    "surrogate.jsonl",
    "empty.jsonl",
    "blank.jsonl",
    "empty.json",
    "emptyarray.json",
    "scalar.json",
    "wrongtypes.jsonl",
    "textnull.jsonl",
    "messages_bad.jsonl",
    "pref_bad.jsonl",
    "junk.parquet",
    "cut.parquet",
    "huge_field.csv",
    "dir.jsonl",
    "afile",
]
BAD_MODELS = [
    "m_noweights",
    "m_cutweights",
    "m_cutweights_tail",
    "m_junkweights",
    "m_badconfig",
    "m_listconfig",
    "m_nomodeltype",
    "m_latin1config",
    "m_wrongshape",
    "m_badtokenizer",
    "m_badtokconfig",
    "m_badgenconfig",
    "m_configdir",
    "m_empty",
    "junk.gguf",
    "notgguf.gguf",
    "afile",
]
BAD_CONFIGS = [
    ("notyaml.yaml", "notyaml.yaml"),
    ("list.yaml", "list.yaml"),
    ("scalar.yaml", "scalar.yaml"),
    ("wrongtype.yaml", "wrongtype.yaml"),
    ("section_scalar.yaml", "section_scalar.yaml"),
    ("latin1.yaml", "latin1.yaml"),
    ("tabs.yaml", "tabs.yaml"),
    ("deep.yaml", "deep.yaml"),
    ("dir.yaml", "dir.yaml"),
    ("intkey.yaml", "intkey.yaml"),
    ("selfref.yaml", "selfref.yaml"),
    ("laughs.yaml", "laughs.yaml"),
]
RECIPES = [
    "r_notyaml.yaml",
    "r_list.yaml",
    "r_scalar.yaml",
    "r_stages_list.yaml",
    "r_stage_name_int.yaml",
    "r_config_list.yaml",
    "r_command_list.yaml",
    "r_name_list.yaml",
    "r_run_dir_map.yaml",
    "r_report_list.yaml",
    "r_wrongtype.yaml",
    "r_deep.yaml",
    "r_latin1.yaml",
    "r_selfref.yaml",
]


def _cases() -> list[tuple[str, list[str], list[str]]]:
    cases: list[tuple[str, list[str], list[str]]] = []

    def add(case_id: str, argv: list[str], *names: str) -> None:
        cases.append((case_id, argv, list(names)))

    # every malformed data file through the data layer's own command
    for name in DATA_FILES:
        add(f"data-check-{name}", ["data", "check", f"{{{name}}}"], name)
    add(
        "data-check-bad-tokenizer",
        ["data", "check", "{good.jsonl}", "tokenizer={m_badtokenizer}"],
        "m_badtokenizer",
    )
    # each stage that reads data, with the faults that fail in different places
    data_stages = {
        "data prepare": [OUT, "data.paths={%s}"],
        "vocab": [OUT, "data.paths={%s}", "vocab_size=300"],
        "pretrain": [OUT, f"tokenizer={M}", "data.paths={%s}"],
        "sft": [OUT, f"model.path={M}", "data.paths={%s}"],
        "reward": [OUT, f"model.path={M}", "data.paths={%s}"],
        "dpo": [OUT, f"model.path={M}", "data.paths={%s}"],
        "grpo": [OUT, f"model.path={M}", "rules.funcs=[stop]", "data.paths={%s}"],
        "ppo": [OUT, f"model.path={M}", f"reward_model={M}", "data.paths={%s}"],
        "distill": [OUT, f"model.path={M}", "data.paths={%s}", "context=x"],
        "embed train": [OUT, f"model.path={M}", "data=[{%s}]"],
        "eval contamination": [OUT, "train=[{%s}]"],
        "rag index": [OUT, f"model.path={M}", "{%s}"],
    }
    for command, template in data_stages.items():
        for name in ("cut.jsonl.gz", "deep.jsonl", "latin1.jsonl", "surrogate.jsonl", "empty.json"):
            argv = [a % name if "%s" in a else a for a in template]
            add(f"{command.replace(' ', '-')}-{name}", [*command.split(), *argv], name)
    add(
        "ppo-ptx-cut",
        [
            "ppo",
            OUT,
            f"model.path={M}",
            f"reward_model={M}",
            "ptx_coef=1",
            "ptx_data.paths={cut.jsonl.gz}",
        ],
        "cut.jsonl.gz",
    )
    add("eval-ppl-cut", ["eval", M, OUT, "ppl=[{cut.jsonl.gz}]", "limit=2"], "cut.jsonl.gz")
    add("eval-bench-deep", ["eval", M, OUT, "bench=[jsonl:{deep.jsonl}]"], "deep.jsonl")
    add(
        "eval-prompts-latin1", ["eval", M, OUT, "prompts={latin1.jsonl}", "limit=2"], "latin1.jsonl"
    )
    add("reward-score-file-cut", ["reward", "score", M, "file={cut.jsonl.gz}"], "cut.jsonl.gz")
    add("embed-input-deep", ["embed", M, "input={deep.jsonl}"], "deep.jsonl")
    add("label-prompts-cut", ["label", OUT, "{cut.jsonl.gz}", M], "cut.jsonl.gz")
    for name in ("cut.jsonl.gz", "deep.jsonl", "latin1.jsonl"):
        argv = ["judge", OUT, f"questions={{{name}}}", "a={good.jsonl}"]
        add(f"judge-questions-{name}", argv, name)
    add("judge-answers-cut", ["judge", OUT, "a={cut.jsonl.gz}"], "cut.jsonl.gz")
    add(
        "self-instruct-seeds-cut",
        ["data", "self-instruct", OUT, "{cut.jsonl.gz}", "model=x"],
        "cut.jsonl.gz",
    )
    add(
        "self-instruct-seeds-deep",
        ["data", "self-instruct", OUT, "{deep.jsonl}", "model=x"],
        "deep.jsonl",
    )
    add(
        "data-law-notsqlite",
        ["data", "law", OUT, "source=sqlite:{notsqlite.db}#articles"],
        "notsqlite.db",
    )
    # every damaged model through the commands that load one
    for name in BAD_MODELS:
        add(
            f"sft-model-{name}",
            ["sft", OUT, f"model.path={{{name}}}", "data.paths={good.jsonl}"],
            name,
        )
        add(f"chat-{name}", ["chat", f"{{{name}}}", "--prompt", "hi"], name)
    for command in ("eval", "export", "embed", "reward score", "serve"):
        for name in ("m_cutweights", "m_badconfig", "m_badtokenizer", "m_noweights"):
            extra = {
                "eval": [OUT, "limit=2"],
                "export": [OUT],
                "embed": ["text=[hi]"],
                "reward score": ["prompt=a", "response=b"],
                "serve": ["port=0"],
            }[command]
            add(
                f"{command.replace(' ', '-')}-{name}",
                [*command.split(), f"{{{name}}}", *extra],
                name,
            )
    add(
        "pretrain-tokenizer-bad",
        ["pretrain", OUT, "tokenizer={m_badtokenizer}", "data.paths={good.jsonl}"],
        "m_badtokenizer",
    )
    add(
        "ppo-reward-model-cut",
        ["ppo", OUT, f"model.path={M}", "reward_model={m_cutweights}", "data.paths={good.jsonl}"],
        "m_cutweights",
    )
    add("dpo-model-junk", ["dpo", OUT, "model.path={m_junkweights}"], "m_junkweights")
    add(
        "rag-index-model-cut",
        ["rag", "index", OUT, "model.path={m_cutweights}", "{good.txt}"],
        "m_cutweights",
    )
    add("rag-search-file", ["rag", "search", "{afile}", "q", f"model.path={M}"], "afile")
    add("rag-search-empty-dir", ["rag", "search", "{m_empty}", "q", f"model.path={M}"], "m_empty")
    add("rag-ask-file", ["rag", "ask", "{afile}", M, "q"], "afile")
    add("rag-add-file", ["rag", "add", "index={afile}", f"model.path={M}", "{good.txt}"], "afile")
    # configs
    for name, names in BAD_CONFIGS:
        add(f"sft-config-{name}", ["sft", f"{{{name}}}"], names)
        add(f"eval-config-{name}", ["eval", f"{{{name}}}"], names)
    add(
        "sft-deepspeed-bad",
        ["sft", OUT, f"model.path={M}", "data.paths={good.jsonl}", "train.deepspeed={badds.json}"],
        "badds.json",
    )
    add(
        "sft-output-is-a-file",
        ["sft", "output_dir={afile}", f"model.path={M}", "data.paths={good.jsonl}"],
        "afile",
    )
    add(
        "sft-output-under-a-file",
        ["sft", "output_dir={afile}/run", f"model.path={M}", "data.paths={good.jsonl}"],
        "afile",
    )
    # recipes
    for name in RECIPES:
        add(f"run-{name}", ["run", f"{{{name}}}", "--dry-run"], name)
    add("run-dir-as-recipe", ["run", "{dir.yaml}"], "dir.yaml")
    add("run-damaged-state", ["run", "{r_ok.yaml}", "--dry-run"], "recipe_state.json")
    add(
        "sft-resume-damaged-run",
        [
            "sft",
            "output_dir={stale_run}",
            "resume=true",
            f"model.path={M}",
            "data.paths={good.jsonl}",
        ],
        "hanlm.json",
    )
    add("run-unknown-name", ["run", "nosuch"], "nosuch")
    return cases


CASES = _cases()


def _one_per_command(cases):
    """The first case of each command: what the slow variant runs as real subprocesses."""
    from hanlm.pipeline.cli import _match_command

    seen, out = set(), []
    for case in cases:
        name = _match_command(case[1])[0]
        if name not in seen:
            seen.add(name)
            out.append(case)
    return out


SUBPROCESS_CASES = _one_per_command(CASES)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_path) -> dict[str, Path]:
    return build(tmp_path_factory.mktemp("bad_inputs"), Path(tiny_model_path))


def _argv(argv: list[str], corpus: dict[str, Path], model: Path, out: Path) -> list[str]:
    names = {**{k: str(v) for k, v in corpus.items()}, "model": str(model), "out": str(out)}
    return [re.sub(r"\{([^{}]+)\}", lambda m: names[m.group(1)], a) for a in argv]


def _env() -> dict[str, str]:
    src = str(HERE.parent / "src")
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([src, str(HERE), *([path] if path else [])]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


class Driver:
    """One `python` process with every command module imported; each case forks from it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "import bad_input_corpus as c; c.serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        ready = self.proc.stdout.readline()
        assert ready.strip() == "ready", ready

    def run(self, argv: list[str], cwd: Path) -> tuple[int, str, str]:
        self.proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd)}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        return reply["rc"], reply["stdout"], reply["stderr"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def driver():
    d = Driver()
    yield d
    d.close()


def _check(case_id, names, rc, stdout, stderr, out):
    """Non-zero, no traceback, the culprit named (in the error, or in `data check`'s report on
    stdout), no output directory left."""
    assert "Traceback" not in stderr + stdout, f"{case_id}: a traceback\n{stderr[-4000:]}"
    assert rc not in (0, None), f"{case_id}: exit status 0\n{stderr[-2000:]}"
    assert rc != -9, f"{case_id}: did not finish in time (killed)\n{stderr[-2000:]}"
    assert any(n in stderr + stdout for n in names), (
        f"{case_id}: the message names none of {names}\n{stderr[-2000:]}"
    )
    assert not out.exists(), f"{case_id}: left {out} behind: {sorted(os.listdir(out))}"


@pytest.mark.parametrize(("case_id", "argv", "names"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_answers_with_an_error_not_a_traceback(
    case_id, argv, names, corpus, tiny_model_path, driver, tmp_path
):
    out = tmp_path / "out"
    rc, stdout, stderr = driver.run(_argv(argv, corpus, Path(tiny_model_path), out), tmp_path)
    _check(case_id, names, rc, stdout, stderr, out)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case_id", "argv", "names"), SUBPROCESS_CASES, ids=[c[0] for c in SUBPROCESS_CASES]
)
def test_bad_input_through_python_m_hanlm(case_id, argv, names, corpus, tiny_model_path, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, "-m", "hanlm", *_argv(argv, corpus, Path(tiny_model_path), out)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    _check(case_id, names, res.returncode, res.stdout, res.stderr, out)


def test_every_command_is_fed_bad_input():
    from hanlm.pipeline.cli import _match_command
    from hanlm.pipeline.commands import COMMANDS

    fed = {_match_command(argv)[0] for _, argv, _ in CASES}
    assert fed == set(COMMANDS), f"no bad-input case for {sorted(set(COMMANDS) - fed)}"


def test_the_corpus_is_what_it_claims(corpus):
    """The damaged files are damaged the way their names say (else the cases prove nothing)."""
    import gzip

    with pytest.raises(EOFError):
        gzip.decompress(corpus["cut.jsonl.gz"].read_bytes())
    with pytest.raises(UnicodeDecodeError):
        corpus["latin1.jsonl"].read_bytes().decode("utf-8")
    with pytest.raises(RecursionError):
        json.loads(corpus["deep.json"].read_bytes())
    assert corpus["dir.jsonl"].is_dir() and corpus["afile"].is_file()
    assert not (corpus["m_noweights"] / "model.safetensors").exists()
    assert (corpus["m_cutweights"] / "model.safetensors").stat().st_size == 1000
    import yaml

    laughs = yaml.safe_load(corpus["laughs.yaml"].read_text())["train"]  # 10**9 leaves as a tree
    assert laughs[0][0][0][0][0][0][0][0][0] == "x"
    print(f"bad-input corpus: {len(corpus)} entries, {len(CASES)} cases")
