"""`hanlm judge`: chat models judged by a model, MT-bench's way, over OpenAI-compatible endpoints.

Reads top to bottom: questions (the embedded Chinese set in `hanlm/assets/judge/`, or a JSONL
file) -> each answering model's answers, from an endpoint (`hanlm serve` or any other; the
second turn is asked with the first turn's answer in the history, at MT-bench's temperature for
the category) or from a file -> the judge's verdicts -> tables and trust figures.

- `mode=single`: the judge grades each answer 1-10 (`[[7]]`, or `评分：7` on the reply form's
  last line); for math, reasoning and coding it sees the reference answer; for the second turn,
  the whole conversation.
- `mode=pairwise`: the judge compares the answers of `a` and `b` twice, once in each order; a
  model wins only when both orders say so, anything else is a tie (MT-bench). How often the two
  orders disagree is the judge's *position bias*.
- A reply without a verdict in the fixed form is asked once more; if that one has none either it
  is recorded as unparseable (left out of the figures, counted), never guessed.
- Trust: `gold_reward_model=DIR` scores both answers of each pair with a reward model and
  reports how often it prefers what the judge prefers; `labels=rankings.jsonl` (from `hanlm
  label`) has the judge compare the answers people ranked, both orders, and reports its
  agreement with them.

Requests run `concurrency` at once through the `openai` client, which retries 429, 5xx and
timeouts with backoff, waiting what a Retry-After header asks. Answers and verdicts are appended
to answers.jsonl and judgments.jsonl as whole lines (one write, synced) the moment they arrive;
`resume=true` reads them back and asks only for the rest. The tables are printed and written to
judge_report.json; the summary holds the headline figures.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hanlm import ASSETS
from hanlm.config import ConfigError, OutputConfig, opt
from hanlm.data.sources import DataError, read_json_line, read_lines
from hanlm.datagen.selfinstruct import Endpoint
from hanlm.eval import judge_stats as stats
from hanlm.eval.judge_prompts import pair_messages, parse_score, parse_verdict, single_messages
from hanlm.runs import Run, atomic_write_json, atomic_write_text

EMBEDDED = ASSETS.parent / "judge" / "questions.zh.jsonl"
ANSWERS_FILE = "answers.jsonl"
JUDGMENTS_FILE = "judgments.jsonl"
REPORT_FILE = "judge_report.json"
NEEDS_REFERENCE = ("math", "reasoning", "coding")
# MT-bench's answer temperatures by category (others: 0.7)
TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}


@dataclass
class JudgeConfig(OutputConfig):
    mode: Literal["single", "pairwise"] = opt(
        "single", "single: grade each answer 1-10; pairwise: compare a with b in both orders"
    )
    questions: str = opt(
        "embedded",
        "JSONL of {question_id, category, turns: [1-2 questions], reference?: [answers]};"
        " embedded = hanlm's 40 Chinese two-turn questions",
    )
    categories: list[str] = opt([], "judge only these categories (empty = all)")
    max_questions: int = opt(0, "judge only the first N questions of each category (0 = all)")
    a: str = opt("", "model a's answers: an endpoint URL (http://...) or an answers JSONL file")
    a_model: str = opt("", "model name at a's endpoint (default: the first it lists)")
    b: str = opt("", "model b's answers (pairwise; in single mode graded too when given)")
    b_model: str = opt("", "model name at b's endpoint")
    judge: str = opt("http://127.0.0.1:8000/v1", "the judge's OpenAI-compatible base URL")
    judge_model: str = opt("", "model name at the judge's endpoint (default: the first it lists)")
    lang: Literal["zh", "en"] = opt("zh", "language of the judge prompts")
    api_key_env: str = opt(
        "", "environment variable with the API key (default: HANLM_API_KEY, then OPENAI_API_KEY)"
    )
    concurrency: int = opt(4, "requests in flight at once")
    timeout: float = opt(300.0, "seconds per request")
    retries: int = opt(5, "retries of a request on 429, 5xx and timeouts (with backoff)")
    max_tokens: int = opt(1024, "max_tokens of each answer")
    judge_max_tokens: int = opt(1024, "max_tokens of each verdict")
    temperature: float = opt(-1.0, "answer temperature; negative = MT-bench's by category")
    gold_reward_model: str = opt(
        "", "pairwise: a reward model whose preference between a and b is set beside the judge's"
    )
    labels: str = opt(
        "", "rankings.jsonl from `hanlm label`: the judge compares the ranked answers too"
    )
    max_labels: int = opt(0, "judge only the first N ranked prompts of `labels` (0 = all)")

    def validate(self) -> None:
        if self.mode == "pairwise" and not (self.a and self.b):
            raise ConfigError("mode=pairwise compares two models: give a=URL|FILE b=URL|FILE")
        if not self.a and not self.labels:
            raise ConfigError(
                "give the answers to judge: a=URL|FILE (an endpoint or an answers JSONL), or"
                " labels=rankings.jsonl"
            )
        if self.gold_reward_model and self.mode != "pairwise":
            raise ConfigError("gold_reward_model= is set beside pairwise verdicts: mode=pairwise")
        if self.concurrency < 1 or self.retries < 0 or self.max_questions < 0:
            raise ConfigError("concurrency must be >= 1, retries and max_questions >= 0")


# --------------------------------------------------------------------------- inputs


def _jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """A JSON Lines file (gzipped or not) read through the data layer: a damaged archive, bad
    bytes or JSON nested beyond reason are errors naming the file and line."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    rows = []
    for i, line in read_lines(path):
        if not line.strip():
            continue
        rec = read_json_line(line, f"{path}:{i}")
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{i}: expected a JSON object")
        rows.append((i, rec))
    return rows


def _texts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, str) and t.strip() for t in value)


def load_questions(cfg: JudgeConfig) -> list[dict[str, Any]]:
    """The questions to judge, checked (each problem named by file and line)."""
    path = EMBEDDED if cfg.questions == "embedded" else Path(cfg.questions)
    out, seen = [], set()
    for i, q in _jsonl(path):
        where = f"{path}:{i}"
        if not isinstance(q.get("question_id"), (int, str)) or q["question_id"] in seen:
            raise DataError(f"{where}: needs a question_id (a number or string) seen only once")
        turns, ref = q.get("turns"), q.get("reference")
        if not _texts(turns) or not 1 <= len(turns) <= 2:
            raise DataError(f"{where}: turns must be a list of 1 or 2 non-empty questions")
        if not isinstance(q.get("category"), str):
            raise DataError(f"{where}: needs a category (writing, math, ...)")
        if ref is not None and (not _texts(ref) or len(ref) != len(turns)):
            raise DataError(f"{where}: reference must hold one answer per turn")
        seen.add(q["question_id"])
        out.append(q)
    bare = [
        q["question_id"] for q in out if q["category"] in NEEDS_REFERENCE and not q.get("reference")
    ]
    if bare:
        print(
            f"[hanlm] judge: {len(bare)} {'/'.join(NEEDS_REFERENCE)} questions have no reference"
            f" answer ({bare[:5]}); the judge grades them without one",
            file=sys.stderr,
        )
    if cfg.categories:
        unknown = set(cfg.categories) - {q["category"] for q in out}
        if unknown:
            raise ConfigError(f"categories: {sorted(unknown)} are not in {path}")
        out = [q for q in out if q["category"] in cfg.categories]
    if cfg.max_questions:
        count: dict[str, int] = {}
        kept = []
        for q in out:
            count[q["category"]] = count.get(q["category"], 0) + 1
            if count[q["category"]] <= cfg.max_questions:
                kept.append(q)
        out = kept
    return out


def answers_from_file(path: Path, questions: list[dict[str, Any]]) -> dict[Any, list[str]]:
    """{question_id: answers} from `{question_id, turns}` lines (or MT-bench's `choices`)."""
    found: dict[Any, list[str]] = {}
    for i, rec in _jsonl(path):
        turns = rec.get("turns") or ((rec.get("choices") or [{}])[0].get("turns"))
        if "question_id" not in rec or not isinstance(turns, list):
            raise DataError(f"{path}:{i}: expected {{question_id, turns: [answers]}}")
        found[rec["question_id"]] = [str(t) for t in turns]
    for q in questions:
        got = found.get(q["question_id"])
        if got is None or len(got) < len(q["turns"]):
            raise DataError(
                f"{path}: no answer to every turn of question {q['question_id']!r}; answer it"
                " or leave it out (categories=, max_questions=)"
            )
    return found


def load_labels(path: str, limit: int) -> list[dict[str, Any]]:
    """Ranked records from `hanlm label` ({prompt, responses, ranking}), checked."""
    out = []
    for i, rec in _jsonl(Path(path)):
        prompt, responses, ranking = rec.get("prompt"), rec.get("responses"), rec.get("ranking")
        if isinstance(prompt, list):  # a `ranked` record's prompt as messages
            prompt = next((m.get("content") for m in prompt if m.get("role") == "user"), None)
        if isinstance(responses, list) and responses and isinstance(responses[0], list):
            responses = [r[-1].get("content") for r in responses]
        if not isinstance(prompt, str) or not _texts(responses) or not isinstance(ranking, list):
            raise DataError(
                f"{path}:{i}: expected a `hanlm label` ranking {{prompt, responses, ranking}}"
            )
        out.append({"line": i, "prompt": prompt, "responses": responses, "ranking": ranking})
    return out[:limit] if limit else out


# --------------------------------------------------------------------------- the log files


class Log:
    """A JSONL file of finished work, by key: read back on resume (a torn last line from a
    crash is dropped and the file rewritten without it), appended one whole line per write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.rows: dict[str, dict[str, Any]] = {}
        self.torn = 0
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                    self.rows[rec["key"]] = rec
                except (ValueError, KeyError, TypeError):
                    self.torn += 1
            if self.torn:
                text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows.values())
                atomic_write_text(path, text)

    def add(self, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)  # one write of a whole line
                os.fsync(fd)
            finally:
                os.close(fd)
            self.rows[rec["key"]] = rec


# --------------------------------------------------------------------------- endpoints


@dataclass
class _EndpointSettings:  # what `hanlm.datagen.selfinstruct.Endpoint` reads
    endpoint: str
    model: str
    api_key_env: str
    timeout: float
    retries: int
    max_tokens: int


def connect(cfg: JudgeConfig, url: str, model: str, max_tokens: int) -> Endpoint:
    try:
        import openai  # noqa: F401
    except ImportError:
        raise ConfigError(
            "hanlm judge needs the openai client: pip install 'hanlm[datagen]'"
        ) from None
    settings = _EndpointSettings(url, model, cfg.api_key_env, cfg.timeout, cfg.retries, max_tokens)
    try:
        return Endpoint(settings)  # type: ignore[arg-type]
    except (ConnectionError, PermissionError) as e:
        raise ConfigError(_for_judge(e, url)) from None


def _for_judge(e: Exception, url: str) -> str:
    """The endpoint's error message, naming the settings of `hanlm judge` (a=, b=, judge=)."""
    return str(e).replace("Set endpoint=URL", f"Check a=, b= and judge= ({url})")


def ask(endpoint: Endpoint, messages: list[dict[str, str]], temperature: float) -> tuple[str, str]:
    """(the reply's text, its finish_reason); an unreachable endpoint or a refused key stops
    the run."""
    try:
        return endpoint.chat(messages, temperature)
    except Exception as e:  # the openai client already retried
        err = endpoint.explain(e)
        if isinstance(err, (ConnectionError, PermissionError)):
            raise ConfigError(_for_judge(err, endpoint.url)) from None
        raise


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


# --------------------------------------------------------------------------- answers


def collect_answers(
    cfg: JudgeConfig,
    questions: list[dict[str, Any]],
    log: Log,
    pool: ThreadPoolExecutor,
) -> dict[str, dict[Any, list[str]]]:
    """{"a": {question_id: answers}, "b": ...}: read from a file, or asked of an endpoint (turn
    by turn, each with the conversation so far) and logged; logged ones are not asked again."""
    out: dict[str, dict[Any, list[str]]] = {}
    for name, source, model in (("a", cfg.a, cfg.a_model), ("b", cfg.b, cfg.b_model)):
        if not source:
            continue
        if not _is_url(source):
            out[name] = answers_from_file(Path(source), questions)
            continue
        endpoint = connect(cfg, source, model, cfg.max_tokens)
        origin = f"{endpoint.url} {endpoint.model}"
        for rec in log.rows.values():
            if rec["model"] == name and rec["source"] != origin:
                raise ConfigError(
                    f"{log.path} holds answers of {name} from {rec['source']}, not {origin};"
                    " use another output_dir"
                )
        todo = [q for q in questions if f"{name}/{q['question_id']}" not in log.rows]
        print(
            f"[hanlm] judge: answers of {name} from {origin}: {len(questions) - len(todo)} done"
            f" before, {len(todo)} to ask",
            file=sys.stderr,
        )

        def answer(
            q: dict[str, Any], name: str = name, ep: Endpoint = endpoint, src: str = origin
        ) -> None:
            t = cfg.temperature if cfg.temperature >= 0 else TEMPERATURES.get(q["category"], 0.7)
            history: list[dict[str, str]] = []
            turns, finish = [], []
            for text in q["turns"]:
                history.append({"role": "user", "content": text})
                reply, why = ask(ep, history, t)
                history.append({"role": "assistant", "content": reply})
                turns.append(reply)
                finish.append(why)
            key = f"{name}/{q['question_id']}"
            rec = {"key": key, "model": name, "source": src, "question_id": q["question_id"]}
            log.add({**rec, "temperature": t, "turns": turns, "finish_reasons": finish})

        _run_all(pool, [lambda q=q: answer(q) for q in todo], "answers")
        got = {r["question_id"]: r["turns"] for r in log.rows.values() if r["model"] == name}
        missing = [q["question_id"] for q in questions if q["question_id"] not in got]
        if missing:
            raise ConfigError(
                f"{len(missing)} answers of {name} failed ({missing[:5]}...); rerun with"
                " resume=true to ask for them again"
            )
        out[name] = got
    return out


def _run_all(pool: ThreadPoolExecutor, jobs: list[Callable[[], None]], what: str) -> int:
    """Run the jobs concurrently; a job whose request failed after its retries is reported and
    left undone (a rerun with resume=true asks again). Returns how many failed."""
    failed = 0
    futures = [pool.submit(job) for job in jobs]
    for i, f in enumerate(futures, 1):
        try:
            f.result()
        except ConfigError:
            for other in futures:
                other.cancel()
            raise
        except Exception as e:
            failed += 1
            print(f"[hanlm] judge: a request for {what} failed: {e}", file=sys.stderr)
        if i % 10 == 0 or i == len(futures):
            print(f"[hanlm] judge: {what} {i}/{len(futures)}", file=sys.stderr)
    return failed


# --------------------------------------------------------------------------- verdicts


def verdict(
    judge: Endpoint, messages: list[dict[str, str]], parse: Callable[[str], Any]
) -> tuple[Any, list[str]]:
    """(parsed verdict or None, the replies): an unparseable reply is asked once more."""
    replies = []
    for _ in range(2):
        replies.append(ask(judge, messages, 0.0)[0])
        value = parse(replies[-1])
        if value is not None:
            return value, replies
    return None, replies


def judge_jobs(
    cfg: JudgeConfig,
    questions: list[dict[str, Any]],
    answers: dict[str, dict[Any, list[str]]],
    labels: list[dict[str, Any]],
    judge: Endpoint,
    log: Log,
) -> list[Callable[[], None]]:
    """One job per verdict not yet in the log."""
    jobs: list[Callable[[], None]] = []
    base = {"judge": f"{judge.url} {judge.model}", "lang": cfg.lang}

    def single(key: str, model: str, q: dict[str, Any], turn: int) -> None:
        ref = q.get("reference")
        ans = answers[model][q["question_id"]]
        msgs = single_messages(cfg.lang, q["turns"], ans, turn, ref)
        score, replies = verdict(judge, msgs, parse_score)
        rec = {"key": key, "kind": "single", **base, "model": model, "turn": turn}
        rec.update(question_id=q["question_id"], category=q["category"])
        log.add({**rec, "score": score, "replies": replies})

    def pair(
        key: str,
        pid: str,
        order: str,
        turns: list[str],
        x: list[str],
        y: list[str],
        turn: int,
        ref: list[str] | None,
        extra: dict[str, Any],
    ) -> None:
        first, second = (x, y) if order == "ab" else (y, x)
        msgs = pair_messages(cfg.lang, turns, first, second, turn, ref)
        shown, replies = verdict(judge, msgs, parse_verdict)
        position = {"A": "first", "B": "second", "tie": "tie"}.get(shown)
        winner = {"A": order[0], "B": order[1], "tie": "tie"}.get(shown)
        rec = {"key": key, "kind": "pair", **base, "pair": pid, "order": order, "turn": turn}
        rec.update(verdict=shown, position=position, winner=winner, replies=replies)
        log.add({**rec, **extra})

    for q in questions:
        qid, ref = q["question_id"], q.get("reference")
        for turn in range(1, len(q["turns"]) + 1):
            if cfg.mode == "single":
                for model in answers:
                    key = f"single/{model}/{qid}/{turn}"
                    if key not in log.rows:
                        jobs.append(lambda k=key, m=model, q=q, t=turn: single(k, m, q, t))
                continue
            extra = {"question_id": qid, "category": q["category"]}
            for order in ("ab", "ba"):
                key = f"pair/{qid}/{turn}/{order}"
                if key not in log.rows:
                    x, y = answers["a"][qid], answers["b"][qid]
                    args = (key, f"{qid}/{turn}", order, q["turns"], x, y, turn, ref, extra)
                    jobs.append(lambda args=args: pair(*args))
    for rec in labels:
        for i, j in label_pairs(rec["ranking"]):
            extra = {"category": "labels", "line": rec["line"], "answers": [i, j]}
            for order in ("ab", "ba"):
                key = f"label/{rec['line']}/{i}/{j}/{order}"
                if key not in log.rows:
                    x, y = [rec["responses"][i]], [rec["responses"][j]]
                    pid = f"label/{rec['line']}/{i}/{j}"
                    args = (key, pid, order, [rec["prompt"]], x, y, 1, None, extra)
                    jobs.append(lambda args=args: pair(*args))
    return jobs


def label_pairs(ranking: list[Any]) -> list[tuple[int, int]]:
    """The answer pairs (i < j) that people ranked apart (different tie groups)."""
    return sorted({(min(w, lose), max(w, lose)) for w, lose in stats.ranked_pairs(ranking)})


# --------------------------------------------------------------------------- the run


def run(cfg: JudgeConfig) -> int:
    cfg.validate()
    questions = load_questions(cfg) if cfg.a else []
    labels = load_labels(cfg.labels, cfg.max_labels) if cfg.labels else []
    with Run("judge", cfg) as run:
        answer_log, judgments = Log(run.dir / ANSWERS_FILE), Log(run.dir / JUDGMENTS_FILE)
        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
            answers = collect_answers(cfg, questions, answer_log, pool)
            judge = connect(cfg, cfg.judge, cfg.judge_model, cfg.judge_max_tokens)
            who = f"{judge.url} {judge.model}"
            other = next((r["judge"] for r in judgments.rows.values() if r["judge"] != who), None)
            if other:
                raise ConfigError(
                    f"{judgments.path} holds verdicts of {other}, not {who}; use another output_dir"
                )
            jobs = judge_jobs(cfg, questions, answers, labels, judge, judgments)
            print(
                f"[hanlm] judge: {who}: {len(judgments.rows)} verdicts done before,"
                f" {len(jobs)} to ask",
                file=sys.stderr,
            )
            failed = _run_all(pool, jobs, "verdicts")
        records = list(judgments.rows.values())
        gold = cfg.gold_reward_model
        report = stats.figures(cfg.mode, questions, answers, labels, records, gold, cfg.labels)
        cut: dict[str, int] = {}
        for r in answer_log.rows.values():  # answers that reached max_tokens (judged as cut)
            cut[r["model"]] = cut.get(r["model"], 0) + r.get("finish_reasons", []).count("length")
        report["answers_cut_off"] = cut
        report["torn_lines_dropped"] = answer_log.torn + judgments.torn
        report["failed_requests"] = failed
        atomic_write_json(run.dir / REPORT_FILE, report)
        stats.print_report(report)
        summary = stats.summary_of(report)
        if failed:
            run.info["error"] = f"{failed} judge requests failed; rerun with resume=true"
            print(f"[hanlm] judge: {run.info['error']}", file=sys.stderr)
        run.finish(summary, status="failed" if failed else "complete")
    return 1 if failed else 0
