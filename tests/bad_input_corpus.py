"""A corpus of malformed inputs, generated (no committed binaries): data files, configs, recipes
and model directories damaged the ways real ones get damaged. `build(root, model)` writes it
under `root` (the good tiny model `model` is copied and damaged) and returns the paths by name.

tests/test_bad_inputs.py feeds it to every command that reads input.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import sys
from pathlib import Path

DEPTH = 100_000  # nesting of the "JSON nested beyond reason" files

SFT = [
    {"instruction": f"问题{i}：床前明月光的下一句？", "output": "疑是地上霜。"} for i in range(200)
]


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()


def _cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _data(d: Path) -> dict[str, Path]:
    files: dict[str, bytes] = {
        # compressed files cut short (a download or copy that stopped)
        "cut.jsonl.gz": _cut(gzip.compress(_jsonl(SFT))),
        "cut.json.gz": _cut(gzip.compress(json.dumps(SFT, ensure_ascii=False).encode())),
        "notgzip.jsonl.gz": _jsonl(SFT[:3]),  # named .gz, not compressed
        # JSON nested beyond reason
        "deep.jsonl": b"[" * DEPTH + b"]" * DEPTH + b"\n",
        "deep.json": b"[" * DEPTH + b"]" * DEPTH,
        "deepobj.jsonl": b'{"text": ' + b'{"a":' * DEPTH + b"1" + b"}" * DEPTH + b"}\n",
        # text that is not valid UTF-8
        "latin1.jsonl": '{"instruction": "café", "output": "crème"}\n'.encode("latin-1"),
        "latin1.txt": "Schöne Grüße\n\nnoch ein Absatz\n".encode("latin-1"),
        "latin1.csv": "instruction,output\ncafé,crème\n".encode("latin-1"),
        "utf16.jsonl": '{"instruction": "你好", "output": "好"}\n'.encode("utf-16"),
        "nul.jsonl": b"\x00" * 64,
        # JSON that decodes, with strings Python cannot encode back (a lone surrogate)
        "surrogate.jsonl": b'{"instruction": "\\ud800\\u4f60", "output": "\\udfff"}\n' * 4,
        "surrogate.txt.jsonl": b'{"text": "\\ud800\\u4f60\\u597d"}\n' * 4,
        # empty and nearly empty
        "empty.jsonl": b"",
        "blank.jsonl": b"\n  \n\t\n",
        "empty.json": b"",
        "emptyarray.json": b"[]",
        # well-formed JSON of the wrong shape
        "scalar.json": b"42",
        "wrongtypes.jsonl": b'{"instruction": 5, "output": ["a"]}\n[1, 2]\n"text"\nnull\n',
        "textnull.jsonl": b'{"text": null}\n{"text": 5}\n{"text": ["a"]}\n',
        "messages_bad.jsonl": (
            b'{"messages": [{"role": "wizard", "content": "x"}]}\n'
            b'{"messages": "not a list"}\n{"messages": [{"content": 3}]}\n'
        ),
        "pref_bad.jsonl": b'{"prompt": "p", "chosen": 1, "rejected": null}\n' * 3,
        # other containers
        "junk.parquet": b"PAR1 this is not parquet PAR1",
        "huge_field.csv": b"text\n" + b'"' + b"x" * 200_000 + b'"\n',
        "notsqlite.db": b"SQLite format 2\x00 but not really" * 10,
    }
    out = {}
    for name, data in files.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"text": [f"第{i}行" * 20 for i in range(2000)]}), buf)
    (d / "cut.parquet").write_bytes(_cut(buf.getvalue()))
    out["cut.parquet"] = d / "cut.parquet"
    (d / "dir.jsonl").mkdir()  # a directory where a file belongs
    out["dir.jsonl"] = d / "dir.jsonl"
    (d / "afile").write_text("not a directory\n")  # a file where a directory belongs
    out["afile"] = d / "afile"
    out["good.jsonl"] = d / "good.jsonl"
    out["good.jsonl"].write_bytes(_jsonl(SFT[:40]))
    out["good.txt"] = d / "good.txt"
    out["good.txt"].write_text(
        "床前明月光，疑是地上霜。\n\n举头望明月，低头思故乡。\n", encoding="utf-8"
    )
    return out


def _configs(d: Path) -> dict[str, Path]:
    texts: dict[str, bytes] = {
        "notyaml.yaml": b"train: [unclosed\n  lr: : :\n",
        "list.yaml": b"- a\n- b\n",
        "scalar.yaml": b"just some text\n",
        "wrongtype.yaml": b"train:\n  lr: fast\n",
        "section_scalar.yaml": b"train: 5\n",
        "latin1.yaml": "output_dir: café\n".encode("latin-1"),
        "tabs.yaml": b"train:\n\tlr: 1\n",
        "deep.yaml": b"a: " + b"[" * 20_000 + b"]" * 20_000 + b"\n",
        "badds.json": b"{zero_optimization",
        "intkey.yaml": b"1: 2\n",
        "selfref.yaml": b"train: &t {lr: 1.0, inner: *t}\n",
        "laughs.yaml": b"a: &a [x, x, x, x, x, x, x, x, x, x]\n"
        + b"".join(
            f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n".encode()
            for p, n in zip("abcdefgh", "bcdefghi")
        )
        + b"train: *i\n",
    }
    out = {}
    for name, data in texts.items():
        (d / name).write_bytes(data)
        out[name] = d / name
    (d / "dir.yaml").mkdir()
    out["dir.yaml"] = d / "dir.yaml"
    return out


def _recipes(d: Path) -> dict[str, Path]:
    texts: dict[str, str] = {
        "r_notyaml.yaml": "stages: {a: [\n",
        "r_list.yaml": "- tokenizer\n- pretrain\n",
        "r_scalar.yaml": "demo\n",
        "r_stages_list.yaml": "stages: [tokenizer, pretrain]\n",
        "r_stage_name_int.yaml": "stages:\n  1: {command: pretrain}\n",
        "r_config_list.yaml": "stages:\n  a: {command: pretrain, config: [1, 2]}\n",
        "r_command_list.yaml": "stages:\n  a: {command: [pretrain]}\n",
        "r_name_list.yaml": "name: [x]\nstages:\n  a: {command: pretrain}\n",
        "r_run_dir_map.yaml": "run_dir: {a: 1}\nstages:\n  a: {command: pretrain}\n",
        "r_report_list.yaml": "report: [1]\nstages:\n  a: {command: pretrain}\n",
        "r_wrongtype.yaml": "stages:\n  a: {command: pretrain, config: {train: {lr: fast}}}\n",
        "r_deep.yaml": "stages: " + "[" * 20_000 + "]" * 20_000 + "\n",
        "r_selfref.yaml": "stages:\n  a:\n    command: pretrain\n    config: &c {x: *c}\n",
    }
    out = {}
    for name, text in texts.items():
        (d / name).write_text(text, encoding="utf-8")
        out[name] = d / name
    (d / "r_latin1.yaml").write_bytes("name: café\nstages: {}\n".encode("latin-1"))
    out["r_latin1.yaml"] = d / "r_latin1.yaml"
    # a good recipe whose run directory holds a damaged state file
    run_dir = d / "stale_recipe_run"
    run_dir.mkdir()
    (run_dir / "recipe_state.json").write_text('{"pretrain": {"fingerp', encoding="utf-8")
    (d / "r_ok.yaml").write_text(
        f"run_dir: {run_dir}\nstages:\n  pretrain: {{command: pretrain, config: {{preset: test}}}}\n",
        encoding="utf-8",
    )
    out["r_ok.yaml"], out["stale_recipe_run"] = d / "r_ok.yaml", run_dir
    # an earlier run whose hanlm.json was cut short, resumed
    stale = d / "stale_run"
    stale.mkdir()
    (stale / "hanlm.json").write_text('{"command": "sft", "sta', encoding="utf-8")
    out["stale_run"] = stale
    return out


def _models(d: Path, model: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}

    def copy(name: str) -> Path:
        target = d / name
        shutil.copytree(model, target)
        out[name] = target
        return target

    (copy("m_noweights") / "model.safetensors").unlink()
    w = copy("m_cutweights") / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    w = copy("m_cutweights_tail") / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size - 100])
    (copy("m_junkweights") / "model.safetensors").write_bytes(b"\xff" * 4096)
    (copy("m_badconfig") / "config.json").write_text("{not json", encoding="utf-8")
    (copy("m_listconfig") / "config.json").write_text("[1, 2]", encoding="utf-8")
    (copy("m_nomodeltype") / "config.json").write_text("{}", encoding="utf-8")
    (copy("m_latin1config") / "config.json").write_bytes(b'{"model_type": "llama\xe9"}')
    cfg = json.loads((model / "config.json").read_text(encoding="utf-8"))
    (copy("m_wrongshape") / "config.json").write_text(
        json.dumps({**cfg, "hidden_size": cfg["hidden_size"] * 2}), encoding="utf-8"
    )
    t = copy("m_badtokenizer") / "tokenizer.json"
    t.write_bytes(t.read_bytes()[:200])
    (copy("m_badtokconfig") / "tokenizer_config.json").write_text("{", encoding="utf-8")
    gen = copy("m_badgenconfig") / "generation_config.json"
    gen.write_text("{not json", encoding="utf-8")
    c = copy("m_configdir") / "config.json"
    c.unlink()
    c.mkdir()
    (d / "m_empty").mkdir()
    out["m_empty"] = d / "m_empty"
    (d / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 60)
    out["junk.gguf"] = d / "junk.gguf"
    (d / "notgguf.gguf").write_bytes(b"hello, not a model\n")
    out["notgguf.gguf"] = d / "notgguf.gguf"
    return out


def build(root: Path, model: Path) -> dict[str, Path]:
    """Write the corpus under `root`; returns every entry by name."""
    root.mkdir(parents=True, exist_ok=True)
    return {**_data(root), **_configs(root), **_recipes(root), **_models(root, model)}


def _child(argv: list[str], cwd: str, err_path: str) -> None:
    """In a forked child: what `python -m hanlm ARGV` does, stderr to `err_path`, stdout to
    `err_path`.out."""
    import traceback

    from hanlm.pipeline.cli import main

    os.chdir(cwd)
    fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    out = os.open(err_path + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(out, 1)
    os.dup2(fd, 2)
    sys.stdin = open(os.devnull)  # noqa: SIM115 (the process ends below)
    sys.argv = ["hanlm", *argv]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def serve(timeout: float = 180) -> None:
    """The driver: import every command module once, then fork one child per case read from
    stdin (a JSON line {argv, cwd}); answer {rc, stdout, stderr} on stdout."""
    import importlib
    import tempfile
    import time

    from hanlm.pipeline.commands import COMMANDS

    for cmd in COMMANDS.values():
        importlib.import_module(cmd.module)
    # the libraries the stages import inside their functions (so that `hanlm --help` is fast)
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import trl  # noqa: F401
    from transformers import (  # noqa: F401
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
    )

    print("ready", flush=True)
    for line in sys.stdin:
        case = json.loads(line)
        with tempfile.NamedTemporaryFile(suffix=".err", delete=False) as f:
            err_path = f.name
        pid = os.fork()
        if pid == 0:
            _child(case["argv"], case["cwd"], err_path)
        deadline = time.time() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.time() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                rc = -9
                break
            time.sleep(0.05)
        stderr = Path(err_path).read_text(encoding="utf-8", errors="replace")
        stdout = Path(err_path + ".out").read_text(encoding="utf-8", errors="replace")
        os.unlink(err_path)
        os.unlink(err_path + ".out")
        print(json.dumps({"rc": rc, "stdout": stdout, "stderr": stderr}), flush=True)
