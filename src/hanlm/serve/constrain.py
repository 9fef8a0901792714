"""Constrained decoding: output that follows a JSON schema, through xgrammar.

`Grammars` (one per served tokenizer) compiles a JSON schema into an xgrammar grammar for the
model's vocabulary; `Grammars.constraint(schema)` gives a `Constraint`, which `generate` uses
through `Constraint.processor(rows, max_tokens)`: a logits processor (`GrammarProcessor`) that
masks every token the grammar forbids, row by row. `json_schema_processor` does both for a
plain `model.generate` call. A forced tool call reuses the same machinery: its JSON (with the
template's literal text around it, `prefix` and `suffix`) is one more schema.

A budget: a grammar alone lets a model (a random one, say) write a string or a number that never
ends, so `max_tokens` would cut the JSON. When the tokens left come within `SLACK` of what the
shortest way to finish the JSON needs (`closing_tokens`, worked out on a copy of the matcher),
the processor stops sampling and writes that shortest completion, then the stop token. The
closing path is found greedily: close a string or container when the grammar allows it (`"`, `}`,
`]`), write `0` where a number is wanted, follow text the grammar forces (a required key), and
otherwise take the lowest token id the grammar allows (a single byte in a byte-level BPE).
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any

from hanlm.serve.errors import APIError

log = logging.getLogger("hanlm.serve")

# Tried first when closing: each ends a string, object, array or number, or moves on. Inside a
# string (where PROBE is accepted too) '"' comes first; elsewhere '}' and ']' do.
CLOSERS = ("}", "]", '"', "0", ",", ":", "1", "{", "[", "n", "t", "f", "-", ".")
PROBE = "~"
SLACK = 8  # close when the tokens left are within this many of the shortest completion
LOOKAHEAD = 48  # ... measured every token once within this many tokens of it (else every 8)
MAX_CLOSING = 512  # a completion longer than this is not looked for (the budget may cut it)
MAX_WHITESPACE = 32  # longest whitespace run the grammar allows between JSON tokens


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise APIError(
            "'response_format' needs the xgrammar package on the server:"
            " pip install 'hanlm[serve]'",
            param="response_format",
        ) from None
    return xgrammar


class Grammars:
    """Compiles JSON schemas for one tokenizer and vocabulary (`vocab_size`: the model's logits
    width, which may pad the tokenizer). The tokenizer's tables are built on first use; compiled
    grammars are cached by xgrammar."""

    def __init__(self, tok: Any, stop_ids: list[int], vocab_size: int) -> None:
        self.tok, self.stop_ids, self.vocab_size = tok, list(stop_ids), vocab_size
        self._compiler: Any = None
        self._lock = threading.Lock()
        self._closers: dict[str, int] = {}  # token ids of CLOSERS and PROBE

    def compiler(self) -> Any:
        xgr = _xgrammar()
        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self.tok, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids
                )
                self._compiler = xgr.GrammarCompiler(info)
                self._closers = self._closer_ids()
        return self._compiler

    def _closer_ids(self) -> dict[str, int]:
        """Token ids of the `CLOSERS` characters and `PROBE`, where one token is exactly that
        character."""
        out = {}
        for c in (*CLOSERS, PROBE):
            ids = self.tok.encode(c, add_special_tokens=False)
            if len(ids) == 1 and self.tok.decode(ids) == c and ids[0] < self.vocab_size:
                out[c] = ids[0]
        return out

    def constraint(
        self,
        schema: dict[str, Any] | None,
        strict: bool = True,
        prefix: str = "",
        suffix: str = "",
        param: str = "response_format",
    ) -> Constraint:
        """A compiled constraint: JSON following `schema` (None: any JSON object), with literal
        `prefix` and `suffix` text around it. `strict`: no properties beyond the schema's. A
        schema xgrammar cannot compile is a 400 naming `param`."""
        xgr = _xgrammar()
        compiler = self.compiler()
        text = json.dumps({"type": "object"} if schema is None else schema)
        try:
            body = xgr.Grammar.from_json_schema(
                text,
                any_whitespace=True,
                strict_mode=strict and schema is not None,
                max_whitespace_cnt=MAX_WHITESPACE,
            )
            if prefix or suffix:
                parts = [_literal(xgr, prefix), body, _literal(xgr, suffix)]
                body = xgr.Grammar.concat(*[p for p in parts if p is not None])
            compiled = compiler.compile_grammar(body)
        except (RuntimeError, ValueError, TypeError) as e:
            raise APIError(f"'{param}': the JSON schema cannot be used: {e}", param=param) from None
        return Constraint(compiled, self.stop_ids, dict(self._closers))


def _literal(xgr: Any, text: str) -> Any:
    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}") if text else None


@dataclass
class Constraint:
    """A compiled grammar; `processor` makes the per-request logits processor."""

    compiled: Any
    stop_ids: list[int]
    closers: dict[str, int]  # token ids of CLOSERS and PROBE

    def processor(self, rows: int, max_tokens: int, prompt_len: int) -> GrammarProcessor:
        return GrammarProcessor(self, rows, max_tokens, prompt_len)


class GrammarProcessor:
    """A logits processor for `generate`: each row's tokens follow the grammar, and a row whose
    budget (`max_tokens`) is running out writes the shortest completion of its JSON (see the
    module's docstring). One per request: it keeps one matcher per row."""

    def __init__(self, c: Constraint, rows: int, max_tokens: int, prompt_len: int) -> None:
        xgr = _xgrammar()
        self.c, self.max_tokens, self.prompt_len = c, max_tokens, prompt_len
        self.vocab = c.compiled.tokenizer_info.vocab_size
        self.matchers = [xgr.GrammarMatcher(c.compiled) for _ in range(rows)]
        self.mask = xgr.allocate_token_bitmask(rows, self.vocab)
        self.plans: list[list[int] | None] = [None] * rows  # forced closing tokens, per row
        self.need = [0] * rows  # the last measured length of each row's shortest completion
        self.steps = 0
        self.failed = [False] * rows  # a token the grammar refused (not expected to happen)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        xgr = _xgrammar()
        generated = input_ids.shape[1] - self.prompt_len
        if generated > 0:
            self._accept(input_ids[:, -1].tolist())
        left = self.max_tokens - generated
        forced: dict[int, int] = {}
        for row, m in enumerate(self.matchers):
            if m.is_terminated() or self.failed[row]:
                self.mask[row].fill_(-1)  # finished: `generate` pads it anyway
                continue
            token = self._closing(row, m, left)
            if token is not None:
                forced[row] = token  # (its mask row is overwritten below: not filled)
                continue
            m.fill_next_token_bitmask(self.mask, row)
        xgr.apply_token_bitmask_inplace(scores, self.mask.to(scores.device))
        for row, token in forced.items():
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        self.steps += 1
        return scores

    def _accept(self, tokens: list[int]) -> None:
        for row, (m, t) in enumerate(zip(self.matchers, tokens)):
            if m.is_terminated() or self.failed[row]:
                continue
            plan = self.plans[row]
            if plan:
                plan.pop(0)  # (forced: it is the token just accepted)
            if not m.accept_token(int(t)):  # only a masked token was sampled: a bug
                self.failed[row] = True
                log.warning("the grammar refused token %d it allowed; row %d unconstrained", t, row)

    def _closing(self, row: int, m: Any, left: int) -> int | None:
        """The token row `row` must write now to finish its JSON within `left` tokens, if any.
        The shortest completion is measured every 8 tokens, and every token once the budget
        comes within LOOKAHEAD tokens of the last measure."""
        plan = self.plans[row]
        if plan is None:
            if self.steps % 8 and left > self.need[row] + 1 + SLACK + LOOKAHEAD:
                return None
            plan = closing_tokens(m, self.c.closers, self.vocab, self.c.stop_ids)
            if plan is None:
                return None
            self.need[row] = len(plan)
            if len(plan) + 1 + SLACK < left:
                return None
            self.plans[row] = plan
        return plan[0] if plan else self.c.stop_ids[0]


def closing_tokens(
    matcher: Any, closers: dict[str, int], vocab: int, stop_ids: list[int]
) -> list[int] | None:
    """The tokens that complete the grammar from `matcher`'s state, chosen greedily (see the
    module's docstring) on a copy of it; None when no completion is found within MAX_CLOSING."""
    xgr = _xgrammar()
    m = matcher.fork()
    out: list[int] = []
    mask = None
    stops = set(stop_ids)
    outside = [closers[c] for c in CLOSERS if c in closers]
    inside = sorted(outside, key=lambda t: t != closers.get('"'))
    probe = closers.get(PROBE)
    while not m.is_completed():
        if len(out) >= MAX_CLOSING:
            return None
        order = outside
        if probe is not None and m.accept_token(probe):  # free text: in a string, '"' ends it
            m.rollback(1)
            order = inside
        step = next((t for t in order if m.accept_token(t)), None)
        if step is not None:
            out.append(step)
            continue
        forced = m.find_jump_forward_tokens()
        if forced:
            for t in forced:
                m.accept_token(t)
            out += forced
            continue
        if mask is None:
            mask = xgr.allocate_token_bitmask(1, vocab)
        m.fill_next_token_bitmask(mask, 0)
        allowed = _first_allowed(mask[0], stops)
        if allowed is None or not m.accept_token(allowed):
            return None
        out.append(allowed)
    return out


def _first_allowed(bits: Any, skip: set[int]) -> int | None:
    """The lowest token id set in an xgrammar bitmask row, other than `skip`."""
    words = bits.tolist()
    for w, word in enumerate(words):
        word &= 0xFFFFFFFF
        while word:
            low = word & -word
            token = w * 32 + low.bit_length() - 1
            if token not in skip:
                return token
            word ^= low
    return None


def json_schema_processor(
    tok: Any,
    schema: dict[str, Any] | None,
    stop_ids: list[int],
    vocab_size: int,
    max_tokens: int,
    prompt_len: int,
    rows: int = 1,
    strict: bool = True,
) -> GrammarProcessor:
    """A logits processor for `model.generate(..., logits_processor=[it])` whose output is JSON
    following `schema` (None: any JSON object), finished within `max_tokens` new tokens where the
    budget allows. `prompt_len`: the prompt's length in tokens (the processor counts what follows);
    `vocab_size`: the model's logits width. One processor per `generate` call."""
    grammars = Grammars(tok, stop_ids, vocab_size)
    return grammars.constraint(schema, strict).processor(rows, max_tokens, prompt_len)
