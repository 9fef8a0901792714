"""The embedded demo tools: four functions a chat model can call, over a lookup database built
from the embedded data (`scripts/build_tool_data.py` writes it to `assets/demo/tools_db.json.gz`).

- `next_line(line)`: the line that follows a poem's line (one clause, e.g. 床前明月光), with the
  poem's title and author;
- `idiom_meaning(idiom)`: an idiom's explanation;
- `poet_dynasty(poet)`: the dynasty a poet is filed under in chinese-poetry's biographies;
- `calculator(expression)`: an arithmetic expression (+ - * / ** and parentheses over numbers),
  evaluated exactly (fractions) by walking its syntax tree — nothing is `eval`'d.

`TOOLS` holds their OpenAI function declarations (JSON schemas). `execute(name, arguments)`
runs one and returns its result as a dict: a look-up that misses returns
{"error": "没有查到「…」"} and a calculation that cannot be done {"error": reason}, so a model can
relay either. `result_key` is the part of a result a final answer should contain.
"""

from __future__ import annotations

import ast
import gzip
import json
import math
import re
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

from hanlm import ASSETS
from hanlm.data.tools import function_tool

DB_PATH = ASSETS / "tools_db.json.gz"


def _tool(name: str, description: str, param: str, about: str) -> dict[str, Any]:
    return function_tool(name, description, {param: {"type": "string", "description": about}})


# Short declarations: they are rendered into every prompt, and the demo model's context is small.
TOOLS: list[dict[str, Any]] = [
    _tool("next_line", "查古诗的下一句", "line", "一句诗，如：床前明月光"),
    _tool("idiom_meaning", "查成语的意思", "idiom", "成语，如：画蛇添足"),
    _tool("poet_dynasty", "查诗人的朝代", "poet", "诗人的名字，如：李白"),
    _tool("calculator", "计算算术式（+ - * / ** 括号）", "expression", "算术式，如：(3+4)*5"),
]
NAMES = tuple(t["function"]["name"] for t in TOOLS)
ARG = {t["function"]["name"]: t["function"]["parameters"]["required"][0] for t in TOOLS}

_PUNCT = re.compile(r"[\s，。？！；：、,.?!;:“”‘’「」『』《》\"'()（）·]+")
_CLAUSE_END = re.compile(r"[，。？！；]")


def norm(text: str) -> str:
    """A line or name without punctuation and spaces, as look-ups compare them."""
    return _PUNCT.sub("", text)


def clauses(line: str) -> list[str]:
    """The clauses of a poem's line: 床前明月光，疑是地上霜。 -> [床前明月光, 疑是地上霜]."""
    return [c.strip() for c in _CLAUSE_END.split(line) if c.strip()]


class Database:
    """The look-up tables: poems (title, author, lines), idioms -> explanation, poets ->
    dynasties. A clause found in several poems answers with the first poem's next clause."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.poems: list[dict[str, Any]] = data["poems"]
        self.idioms: dict[str, str] = data["idioms"]
        self.poets: dict[str, list[str]] = data["poets"]
        self.next: dict[str, tuple[str, str | None, int]] = {}
        self.clause_count: dict[str, int] = {}
        for i, poem in enumerate(self.poems):
            cs = [c for line in poem["lines"] for c in clauses(line)]
            for j, c in enumerate(cs):
                key = norm(c)
                self.clause_count[key] = self.clause_count.get(key, 0) + 1
                self.next.setdefault(key, (c, cs[j + 1] if j + 1 < len(cs) else None, i))
        self._idioms = {norm(k): k for k in self.idioms}
        self._poets = {norm(k): k for k in self.poets}


def load_db(path: str | Path | None = None) -> Database:
    """The database at `path` (default: the embedded one), read once per path."""
    return _load(str(path or DB_PATH))


@cache
def _load(path: str) -> Database:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return Database(json.load(f))


def _missing(what: str) -> dict[str, Any]:
    return {"error": f"没有查到「{what}」"}


def next_line(db: Database, line: str) -> dict[str, Any]:
    parts = [norm(c) for c in clauses(line) if norm(c)]
    key = parts[-1] if parts else ""
    hit = db.next.get(key) if key else None
    if hit is None:
        return _missing(line.strip())
    clause, following, i = hit
    poem = db.poems[i]
    if following is None:
        return {"error": f"「{clause}」是{poem['author']}《{poem['title']}》的最后一句"}
    return {"line": clause, "next": following, "title": poem["title"], "author": poem["author"]}


def idiom_meaning(db: Database, idiom: str) -> dict[str, Any]:
    name = db._idioms.get(norm(idiom))
    if name is None:
        return _missing(idiom.strip())
    return {"idiom": name, "meaning": db.idioms[name]}


def poet_dynasty(db: Database, poet: str) -> dict[str, Any]:
    name = db._poets.get(norm(poet))
    if name is None:
        return _missing(poet.strip())
    return {"poet": name, "dynasty": "、".join(db.poets[name])}


# --------------------------------------------------------------------------- calculator

MAX_EXPRESSION = 200  # characters
MAX_EXPONENT = 64
MAX_DIGITS = 30  # a result (or intermediate) past 10**30 is refused
_WIDE = str.maketrans("（）＋－×÷＊／＾．０１２３４５６７８９", "()+-*/*/^.0123456789")


class CalcError(ValueError):
    pass


def _value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _value(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise CalcError("数太大")
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(
        node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)
    ):
        a, b = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Add):
            v = a + b
        elif isinstance(node.op, ast.Sub):
            v = a - b
        elif isinstance(node.op, ast.Mult):
            v = a * b
        elif isinstance(node.op, ast.Div):
            if b == 0:
                raise CalcError("除数不能为零")
            v = a / b
        else:
            v = _power(a, b)
        if abs(v) >= 10**MAX_DIGITS:
            raise CalcError("数太大")
        return v
    raise CalcError("只能计算数字、+ - * / ** 和括号")


def _power(a: Fraction, b: Fraction) -> Fraction:
    if b.denominator != 1:
        raise CalcError("指数必须是整数")
    if abs(b) > MAX_EXPONENT:
        raise CalcError(f"指数不能超过 {MAX_EXPONENT}")
    if a == 0 and b < 0:
        raise CalcError("除数不能为零")
    return a ** int(b)


def calculate(expression: str) -> Fraction:
    """The exact value of an arithmetic expression; CalcError says why there is none."""
    text = expression.translate(_WIDE).replace("^", "**").strip()
    if not text:
        raise CalcError("算式是空的")
    if len(text) > MAX_EXPRESSION:
        raise CalcError(f"算式太长（最多 {MAX_EXPRESSION} 个字符）")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalcError("算式写得不对") from None
    return _value(tree)


def format_number(v: Fraction) -> str:
    """An integer as itself; anything else to at most 6 decimal places, zeros trimmed."""
    if v.denominator == 1:
        return str(v.numerator)
    text = f"{float(v):.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def calculator(expression: str) -> dict[str, Any]:
    try:
        value = calculate(expression)
    except CalcError as e:
        return {"error": str(e)}
    return {"expression": expression.strip(), "result": format_number(value)}


# --------------------------------------------------------------------------- dispatch


def execute(name: str, arguments: dict[str, Any], db: Database | None = None) -> dict[str, Any]:
    """Run tool `name` on `arguments`; an unknown tool or wrong arguments is an error result."""
    if name not in NAMES:
        return {"error": f"没有这个工具：{name}"}
    param = ARG[name]
    extra = sorted(set(arguments) - {param})
    if not isinstance(arguments.get(param), str) or extra:
        return {"error": f"{name} 需要一个字符串参数 {param}"}
    arg = arguments[param]
    if name == "calculator":
        return calculator(arg)
    db = db or load_db()
    if name == "next_line":
        return next_line(db, arg)
    if name == "idiom_meaning":
        return idiom_meaning(db, arg)
    return poet_dynasty(db, arg)


def result_text(result: dict[str, Any]) -> str:
    """A result as the tool turn's content."""
    return json.dumps(result, ensure_ascii=False)


def result_key(result: dict[str, Any]) -> str:
    """What a final answer relaying this result must contain: the next line, the meaning, the
    dynasty, the number, or the error message."""
    for k in ("error", "next", "meaning", "dynasty", "result"):
        if k in result:
            return str(result[k])
    raise ValueError(f"not a demo tool result: {result}")
