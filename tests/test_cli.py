import subprocess
import sys

import pytest

from hanlm.config import describe
from hanlm.pipeline import cli


def test_main_help_lists_every_command_once(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    width = max(len(n) for n in cli.COMMANDS) + 2
    for name, cmd in cli.COMMANDS.items():
        lines = [line for line in out.splitlines() if line[2 : 2 + width].strip() == name]
        assert len(lines) == 1 and cmd.help in lines[0]


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_each_command_has_run_config_and_full_help(name, capsys):
    module = __import__(cli.COMMANDS[name].module, fromlist=["run"])
    assert callable(getattr(module, cli.COMMANDS[name].func))
    cls = cli.config_class(name)
    assert cli.main([*name.split(), "--help"]) == 0
    out = capsys.readouterr().out
    for key, tp, default, help_ in describe(cls):
        assert f"  {key}  {tp}  = {default}" in out
        assert help_.split()[0] in out
    if cli.COMMANDS[name].positional:
        assert cli.COMMANDS[name].positional in [r[0] for r in describe(cls)]


def test_help_does_not_import_heavy_libraries():
    code = (
        "import sys; from hanlm.pipeline import cli; cli.main(['--help']);"
        "[cli.main([*name.split(), '--help']) for name in cli.COMMANDS];"
        "heavy = [m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_unknown_command_suggests(capsys):
    assert cli.main(["data", "chek"]) == 2
    assert "did you mean 'hanlm data check'" in capsys.readouterr().err


def test_parse_args_splits_yaml_bare_overrides_and_flags():
    path, ov = cli.parse_args(
        "data prepare",
        ["cfg.yaml", "a.jsonl", "--overwrite", "b.txt=1", "--output-dir", "o", "data.seed=3"],
    )
    assert path == "cfg.yaml"
    assert ov[0] == ("data.paths", ["a.jsonl"])
    assert "b.txt=1" in ov  # an override after a bare flag is not taken as the flag's value
    assert "data.seed=3" in ov and ("overwrite", True) in ov and ("output_dir", "o") in ov


def test_bad_override_is_usage_error(capsys):
    assert cli.main(["data", "check", "x.jsonl", "formt=text"]) == 2
    assert "did you mean 'format'" in capsys.readouterr().err
    assert cli.main(["data", "check", "x.jsonl", "samples=lots"]) == 2
    assert "'samples': expected int" in capsys.readouterr().err


def test_console_script_runs():
    exe = __import__("shutil").which("hanlm") or str(
        __import__("pathlib").Path(sys.executable).parent / "hanlm"
    )
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("hanlm ")


def test_settings_that_cannot_work_together_fail_before_anything_runs(tmp_path, capsys):
    code = cli.main(["pretrain", "data.paths=[x.jsonl]", f"output_dir={tmp_path / 'o'}"])
    err = capsys.readouterr().err
    assert code == 2 and "needs tokenizer=DIR" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # checked before the run directory is made
