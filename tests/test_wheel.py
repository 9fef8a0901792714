"""The installed package, not the clone: the sdist and the wheel carry every file hanlm reads (the
recipes, the embedded data, the pages), and a wheel installed into a fresh virtual environment
runs `hanlm --version`, `python -m hanlm` and a recipe by name from an empty directory.

The environment is honest about what it proves. It is a new venv (`python -m venv
--without-pip`), so it starts with none of this clone's packages; the wheel goes into it with
`pip install --no-deps --no-index`, from the sdist built first (`python -m build`). hanlm's
dependencies (torch, transformers, ...) are not downloaded again: a `.pth` file adds a directory
of links to this environment's installed distributions, every one except hanlm's own (its
editable-install hook and metadata are left out), so the only hanlm the new venv can import is
the wheel's, and a file the wheel lacks is missing there. A check asserts that much before the
commands run: without the wheel, `import hanlm` fails in the new venv.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import hanlm
from hanlm.pipeline.recipe import RECIPES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "hanlm"
WHEEL_MB_LIMIT = 20  # the embedded data is ~7 MB compressed; a jump means something leaked in


def _package_files() -> set[str]:
    """Every file of the package in the clone, as `hanlm/...` (bytecode caches left out)."""
    return {
        "hanlm/" + p.relative_to(PACKAGE).as_posix()
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300):
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    """`python -m build` of this clone: the sdist, then the wheel built from that sdist."""
    out = tmp_path_factory.mktemp("dist")
    res = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return out


def _dependencies_dir(target: Path) -> Path:
    """Links to every distribution installed here except hanlm itself."""
    target.mkdir()
    sites = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    for site in sites:
        for entry in Path(site).iterdir():
            name = entry.name.lower()
            if name.startswith(("hanlm", "__editable__")) or (target / entry.name).exists():
                continue
            (target / entry.name).symlink_to(entry)
    return target


@pytest.fixture(scope="module")
def venv(dist, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A fresh venv with the wheel installed and the dependencies linked in (not hanlm)."""
    root = tmp_path_factory.mktemp("venv")
    env_dir = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    py = env_dir / "bin" / "python"
    site = Path(
        _run(
            [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            root,
            {},
        ).stdout.strip()
    )
    deps = _dependencies_dir(root / "deps")
    (site / "hanlm-test-deps.pth").write_text(f"import site; site.addsitedir({str(deps)!r})\n")
    env = {
        k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")
    }
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1")
    absent = _run([str(py), "-c", "import hanlm"], root, env)
    assert absent.returncode != 0 and "No module named 'hanlm'" in absent.stderr, (
        "the fresh venv sees a hanlm before the wheel is installed: the check would prove nothing"
    )
    (wheel,) = dist.glob("hanlm-*.whl")
    install = [str(py), "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", str(wheel)]
    res = _run(install, root, env)
    assert res.returncode == 0, res.stderr[-3000:]
    return env_dir, env


def test_sdist_and_wheel_carry_every_package_file(dist):
    (wheel,) = dist.glob("hanlm-*.whl")
    (sdist,) = dist.glob("hanlm-*.tar.gz")
    expected = _package_files()
    assert {f"hanlm/recipes/{p.name}" for p in RECIPES.glob("*.yaml")} <= expected
    assert {"hanlm/assets/demo/sft.train.jsonl.gz", "hanlm/serve/page.html"} <= expected
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("hanlm/")}
    assert expected - in_wheel == set(), "missing from the wheel"
    with tarfile.open(sdist) as tar:
        prefix = tar.getnames()[0].split("/")[0] + "/src/"
        in_sdist = {n[len(prefix) :] for n in tar.getnames() if n.startswith(prefix + "hanlm/")}
    assert expected - in_sdist == set(), "missing from the sdist"
    size_mb = wheel.stat().st_size / 1e6
    print(f"wheel {wheel.name}: {size_mb:.2f} MB, sdist {sdist.stat().st_size / 1e6:.2f} MB")
    assert size_mb < WHEEL_MB_LIMIT


def test_installed_wheel_runs_from_an_empty_directory(venv, tmp_path):
    env_dir, env = venv
    work = tmp_path / "empty"
    work.mkdir()
    hanlm_bin, py = str(env_dir / "bin" / "hanlm"), str(env_dir / "bin" / "python")

    where = _run([py, "-c", "import hanlm; print(hanlm.__file__)"], work, env)
    assert Path(where.stdout.strip()).is_relative_to(env_dir), where.stdout + where.stderr

    version = _run([hanlm_bin, "--version"], work, env)
    assert (version.returncode, version.stdout.strip()) == (0, f"hanlm {hanlm.__version__}")

    usage = _run([py, "-m", "hanlm", "--help"], work, env)
    assert usage.returncode == 0 and "hanlm run" not in usage.stderr
    assert "commands:" in usage.stdout and "  run " in usage.stdout

    # The demo by name: its plan resolves every stage's config against the installed package.
    plan = _run([hanlm_bin, "run", "demo", "--dry-run"], work, env)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert f"({env_dir}" in plan.stdout.splitlines()[0]  # the recipe file the wheel installed
    assert list(work.iterdir()) == [], "a dry run wrote files"

    # Every embedded file the shipped recipes name exists in the installed package.
    probe = (
        "from hanlm import ASSETS\n"
        "from hanlm.pipeline.recipe import RECIPES, load_recipe, resolve_config\n"
        "import json\n"
        "named = []\n"
        "def walk(v):\n"
        "    if isinstance(v, str) and v.startswith(str(ASSETS)): named.append(v)\n"
        "    elif isinstance(v, dict): [walk(x) for x in v.values()]\n"
        "    elif isinstance(v, list): [walk(x) for x in v]\n"
        "for path in sorted(RECIPES.glob('*.yaml')):\n"
        "    r = load_recipe(path)\n"
        "    walk(r.report)\n"
        "    for s in r.stages:\n"
        "        walk(resolve_config(r, s))\n"
        "import os\n"
        "print(json.dumps({'named': sorted(set(named)),"
        " 'missing': sorted({p for p in named if not os.path.isfile(p)})}))\n"
    )
    res = _run([py, "-c", probe], work, env)
    assert res.returncode == 0, res.stderr[-3000:]
    found = __import__("json").loads(res.stdout)
    assert len(found["named"]) >= 5 and found["missing"] == []
    assert all(Path(p).is_relative_to(env_dir) for p in found["named"])

    # One stage of the demo, for real: the contamination audit reads the embedded training
    # data and benchmark from the installed package and writes runs/demo/ here.
    audit = _run([hanlm_bin, "run", "demo", "--only", "audit"], work, env)
    assert audit.returncode == 0, audit.stdout[-2000:] + audit.stderr[-3000:]
    assert "Traceback" not in audit.stderr
    assert (work / "runs" / "demo" / "audit" / "hanlm.json").is_file()
    assert (work / "runs" / "demo" / "report.html").is_file()

    unknown = _run([hanlm_bin, "run", "nosuch"], work, env)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr
    assert "demo" in unknown.stderr and "legal" in unknown.stderr  # the names to choose from
