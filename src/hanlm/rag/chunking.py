"""Documents -> chunks that point back to their file and position.

Chinese text has no spaces between words, and its sentences end in full-width marks, so a chunk
is built from whole sentences cut after 。！？； (and their ASCII forms before a space, or a line
break), packed up to `max_chars`; a sentence longer than that is cut into windows. Consecutive
chunks share up to `overlap` characters of whole sentences, so a fact that straddles a boundary
is whole in one of them. Each chunk keeps (source, record, start, end): `text[start:end]` of
that record is the chunk, exactly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hanlm.config import ConfigError
from hanlm.data.sources import read_json_line, read_lines, read_text

SUFFIXES = (".txt", ".md", ".jsonl", ".jsonl.gz")
_SENTENCE_END = re.compile(r"(?:[。！？；!?;]+[」』”’）)]*|\.(?=\s))\s*|\n\s*")


@dataclass
class Document:
    source: str  # file path as given
    record: int  # line number in a .jsonl file (1-based); 0 for a whole .txt/.md file
    text: str
    doc_id: str = ""  # the record's own id field, if it has one


@dataclass
class Chunk:
    id: str  # "source:record:start-end" (record 0 for a plain file)
    source: str
    record: int
    start: int
    end: int
    text: str
    doc_id: str = ""

    def cite(self) -> str:
        """Where the chunk came from, for people: file, line and character span."""
        where = f"{self.source}:{self.record}" if self.record else self.source
        return f"{where} [{self.start}:{self.end}]" + (f" ({self.doc_id})" if self.doc_id else "")


def sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) spans covering `text`, each ending after its sentence mark."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        if m.end() > start:
            spans.append((start, m.end()))
            start = m.end()
    if start < len(text):
        spans.append((start, len(text)))
    return spans


def chunk_spans(text: str, max_chars: int = 200, overlap: int = 40) -> list[tuple[int, int]]:
    """Character spans of the chunks of one text (whitespace-only spans are left out)."""
    if max_chars < 1 or not 0 <= overlap < max_chars:
        raise ConfigError(
            f"chunk sizes: need max_chars >= 1 and 0 <= overlap < max_chars, got "
            f"{max_chars} and {overlap}"
        )
    pieces: list[tuple[int, int]] = []
    for s, e in sentences(text):  # sentences longer than max_chars become windows
        step = max_chars - overlap
        while e - s > max_chars:
            pieces.append((s, s + max_chars))
            s += step
        pieces.append((s, e))
    out: list[tuple[int, int]] = []
    i = 0
    while i < len(pieces):
        start, j = pieces[i][0], i
        while j + 1 < len(pieces) and pieces[j + 1][1] - start <= max_chars:
            j += 1
        end = pieces[j][1]
        if text[start:end].strip():
            out.append((start, end))
        if j + 1 >= len(pieces):
            break
        # Next chunk: start at the earliest later piece inside the overlap, always moving on.
        k = j + 1
        while k - 1 > i and end - pieces[k - 1][0] <= overlap:
            k -= 1
        i = max(k, i + 1)
    return out


def chunk_document(doc: Document, max_chars: int = 200, overlap: int = 40) -> list[Chunk]:
    return [
        Chunk(
            id=f"{doc.source}:{doc.record}:{s}-{e}",
            source=doc.source,
            record=doc.record,
            start=s,
            end=e,
            text=doc.text[s:e],
            doc_id=doc.doc_id,
        )
        for s, e in chunk_spans(doc.text, max_chars, overlap)
    ]


def _files(paths: list[str]) -> Iterator[Path]:
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(SUFFIXES))
            if not found:
                raise ConfigError(f"{p}: a directory with no {'/'.join(SUFFIXES)} files")
            yield from found
        elif p.is_file():
            if not p.name.endswith(SUFFIXES):
                raise ConfigError(f"{p}: unsupported file type; use {', '.join(SUFFIXES)}")
            yield p
        else:
            raise FileNotFoundError(f"document {p} does not exist")


def read_documents(paths: list[str], text_field: str = "text") -> Iterator[Document]:
    """Whole .txt/.md files, or one document per .jsonl record (its `text_field`; an `id` field
    is kept). A record without the field is an error naming the file and line."""
    for f in _files(paths):
        if f.name.endswith((".txt", ".md")):
            yield Document(str(f), 0, read_text(f))
            continue
        for n, line in read_lines(f):
            if not line.strip():
                continue
            rec = read_json_line(line, f"{f}:{n}")
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str):
                raise ConfigError(
                    f"{f}:{n}: no string field '{text_field}'; set text_field=<the field>"
                )
            yield Document(str(f), n, text, str(rec.get("id", "")))
