"""`hanlm data self-instruct`: instruction data (Alpaca/BELLE) or dialogues (Baize) written by a
model behind any OpenAI-compatible endpoint (`hanlm serve`, or a larger model elsewhere).

self-instruct (Wang et al. 2022, as Alpaca ran it, in Chinese): show the endpoint a few seed and
already generated tasks, ask for more as a numbered list, parse the list (1. / 1、 / (1) / 一、),
drop what a text model cannot do or what is too short, too long or too close (ROUGE-L ≥ 0.7,
character-level) to anything kept, then ask the endpoint to do each new task (an input when the
task needs one, and the output). Written as alpaca records.

self-chat (Baize): from seed questions the endpoint plays both sides, the assistant and (with the
transcript in front of it) the user, for a fixed number of turns or until the user side ends the
chat. Written as messages records.

Every candidate and why it was dropped is counted in hanlm.json; rejects go to rejected.jsonl
(nothing is dropped silently). Kept records are appended to data.jsonl one whole line per write,
so `resume=true` reads them back, feeds them to the similarity filter and generates only the
rest; nothing kept is generated twice. Requests run concurrently, at most `concurrency` at once.
The built-in prompts and the parsers of the replies are in `hanlm.datagen.prompts`.
"""

from __future__ import annotations

import json
import os
import random
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from hanlm.config import ConfigError, OutputConfig, opt
from hanlm.datagen.prompts import (
    ANSWER_PROMPT,
    INSTRUCTION_PROMPT,
    USER_SIDE_PROMPT,
    parse_answer,
    parse_numbered,
    seed_texts,
)
from hanlm.datagen.rouge import RougePool, tokens
from hanlm.runs import Run, atomic_write_text, read_run

DATA_FILE = "data.jsonl"
REJECTED_FILE = "rejected.jsonl"

# Alpaca's blacklist (things a text-only model cannot do), with the Chinese words for them.
BLACKLIST = [
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
    "图片", "图像", "照片", "画图", "画一", "绘制", "作图", "图表", "视频", "音频", "音乐",
    "录音", "流程图", "示意图", "地图", "文件", "网址", "链接", "上网",
]  # fmt: skip

END_MARK = "[END]"


@dataclass
class SelfInstructConfig(OutputConfig):
    seeds: str = opt("", "seed tasks: JSONL ({instruction}, {prompt} or {question}) or .txt lines")
    mode: Literal["self-instruct", "self-chat"] = opt(
        "self-instruct", "self-instruct: alpaca records; self-chat: Baize-style dialogues"
    )
    endpoint: str = opt(
        "http://127.0.0.1:8000/v1", "OpenAI-compatible base URL (`hanlm serve` prints it)"
    )
    model: str = opt("", "model name at the endpoint (default: the first one it lists)")
    api_key_env: str = opt(
        "", "environment variable with the API key (default: HANLM_API_KEY, then OPENAI_API_KEY)"
    )
    num: int = opt(100, "records to have in data.jsonl when done (kept ones from before count)")
    max_rounds: int = opt(50, "stop after this many rounds of requests even if short of num")
    concurrency: int = opt(4, "requests in flight at once")
    prompt_tasks: int = opt(3, "self-instruct: example tasks shown per request (Alpaca: 3)")
    prompt_generated: int = opt(
        1, "self-instruct: how many of those come from the generated ones (once there are any)"
    )
    new_per_request: int = opt(10, "self-instruct: new instructions asked for per request")
    turns: int = opt(3, "self-chat: most assistant turns per dialogue")
    rouge_threshold: float = opt(0.7, "drop a candidate whose ROUGE-L with a kept one is ≥ this")
    min_tokens: int = opt(4, "drop shorter instructions (CJK characters + Latin words)")
    max_tokens_instruction: int = opt(150, "drop longer instructions (CJK characters + words)")
    blacklist: list[str] = opt(BLACKLIST, "drop instructions containing these (case-insensitive)")
    temperature: float = opt(1.0, "temperature when writing instructions / the user side")
    answer_temperature: float = opt(0.7, "temperature of answers")
    max_tokens: int = opt(512, "max_tokens of each request")
    timeout: float = opt(120.0, "seconds per request")
    retries: int = opt(2, "retries of a failed request (the openai client's backoff)")
    seed: int = opt(42, "seed of the task sampling")
    instruction_prompt: str = opt(
        "",
        "template asking for instructions ({n}, {examples}, {next}), or a file holding it;"
        " empty = the built-in Chinese one",
    )
    answer_prompt: str = opt("", "template asking for an answer ({instruction}), or a file")
    user_prompt: str = opt(
        "", "self-chat: template for the user side ({transcript}, {end}), or a file"
    )

    def template(self, which: str) -> str:
        value = getattr(self, f"{which}_prompt")
        if not value:
            return {"instruction": INSTRUCTION_PROMPT, "answer": ANSWER_PROMPT}.get(
                which, USER_SIDE_PROMPT
            )
        path = Path(value)
        return path.read_text(encoding="utf-8") if path.is_file() else value

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("give a seed file: hanlm data self-instruct SEEDS.jsonl ...")
        if not 0 < self.rouge_threshold <= 1:
            raise ConfigError(f"rouge_threshold={self.rouge_threshold}: must be in (0, 1]")
        for key in ("num", "concurrency", "prompt_tasks", "new_per_request", "turns", "max_rounds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be at least 1")
        fields = {
            "instruction": "{n} {examples} {next}",
            "answer": "{instruction}",
            "user": "{transcript}",
        }
        for which, needed in fields.items():
            text = self.template(which)
            for name in needed.split():
                if name not in text:
                    raise ConfigError(f"{which}_prompt: the template has no {name} placeholder")


# --------------------------------------------------------------------------- filters


_PUNCT = set("，。、；：？！…—·,.;:?!-_*#/\\|~`'\"“”‘’()（）[]【】<>《》")


def instruction_problem(text: str, cfg: SelfInstructConfig) -> str | None:
    """Why a parsed instruction is unusable (a count name), or None."""
    n = len(tokens(text))
    if n < cfg.min_tokens:
        return "too_short"
    if n > cfg.max_tokens_instruction:
        return "too_long"
    low = text.lower()
    if any(word.lower() in low for word in cfg.blacklist):
        return "blacklisted"
    if text[0] in _PUNCT:
        return "starts_with_punctuation"
    return None


# --------------------------------------------------------------------------- the endpoint


class Endpoint:
    """Chat completions at an OpenAI-compatible URL, with errors that say what to do."""

    def __init__(self, cfg: SelfInstructConfig) -> None:
        try:
            import openai
        except ImportError:
            raise ConfigError(
                "hanlm data self-instruct needs the openai client: pip install 'hanlm[datagen]'"
            ) from None

        self.openai = openai
        names = [cfg.api_key_env] if cfg.api_key_env else ["HANLM_API_KEY", "OPENAI_API_KEY"]
        key = next((os.environ[n] for n in names if os.environ.get(n)), "") or "none"
        self.url = _base_url(cfg.endpoint)
        self.client = openai.OpenAI(
            base_url=self.url, api_key=key, timeout=cfg.timeout, max_retries=cfg.retries
        )
        self.key_hint = " or ".join(names)
        self.model = cfg.model or self._first_model()
        self.max_tokens = cfg.max_tokens

    def _first_model(self) -> str:
        try:
            models = self.client.models.list().data
        except Exception as e:
            raise self.explain(e) from None
        if not models:
            raise ConfigError(f"{self.url}: the endpoint lists no model; set model=NAME")
        return models[0].id

    def explain(self, e: Exception) -> Exception:
        if isinstance(e, self.openai.APIConnectionError):
            return ConnectionError(
                f"cannot reach {self.url} ({e}); is `hanlm serve MODEL_DIR` (or another"
                " OpenAI-compatible server) running there? Set endpoint=URL"
            )
        if isinstance(e, self.openai.AuthenticationError):
            return PermissionError(
                f"{self.url} refused the API key (401); put the key in {self.key_hint}"
            )
        return e

    def chat(self, messages: list[dict[str, str]], temperature: float) -> tuple[str, str]:
        """(reply text, finish_reason)."""
        r = self.client.chat.completions.create(
            model=self.model,
            messages=messages,  # type: ignore[arg-type]
            temperature=temperature,
            max_tokens=self.max_tokens,
        )
        choice = r.choices[0]
        return choice.message.content or "", choice.finish_reason or ""


def _base_url(url: str) -> str:
    """A bare http://host:port gets `/v1` (what `hanlm serve` and most servers use)."""
    url = url.rstrip("/")
    if re.fullmatch(r"https?://[^/]+", url):
        url += "/v1"
    return url


# --------------------------------------------------------------------------- the run


class Store:
    """data.jsonl (kept) and rejected.jsonl: whole lines appended by one writer, synced."""

    def __init__(self, out: Path) -> None:
        self.data, self.rejected = out / DATA_FILE, out / REJECTED_FILE

    def load_kept(self) -> tuple[list[dict[str, Any]], int]:
        """Records kept by earlier runs, and how many torn last lines (a crash mid-write) were
        dropped; the file is rewritten without them."""
        if not self.data.is_file():
            return [], 0
        kept, torn = [], 0
        for line in self.data.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                kept.append(json.loads(line))
            except ValueError:
                torn += 1
        if torn:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
            atomic_write_text(self.data, text)
        return kept, torn

    @staticmethod
    def _append(path: Path, rec: dict[str, Any]) -> None:
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write of a whole line: readers never see half a record
            os.fsync(fd)
        finally:
            os.close(fd)

    def keep(self, rec: dict[str, Any]) -> None:
        self._append(self.data, rec)

    def reject(self, reason: str, **fields: Any) -> None:
        self._append(self.rejected, {"reason": reason, **fields})


class Counts(dict):
    def add(self, name: str, n: int = 1) -> None:
        self[name] = self.get(name, 0) + n


def _key_of(rec: dict[str, Any]) -> str:
    """The text of a kept record the similarity filter compares: the instruction, or the
    dialogue's opening question."""
    if "instruction" in rec:
        return rec["instruction"]
    return next(m["content"] for m in rec["messages"] if m["role"] == "user")


def run(cfg: SelfInstructConfig) -> int:
    from tqdm import tqdm

    cfg.validate()
    seeds = seed_texts(cfg.seeds)
    rng = random.Random(cfg.seed)
    # counts of earlier runs carry on (read before Run starts a fresh hanlm.json)
    before = read_run(cfg.output_dir) if cfg.resume and cfg.output_dir else None
    previous = (before or {}).get("summary", {}).get("counts", {})
    with Run("data self-instruct", cfg, seed=cfg.seed) as run:
        store = Store(run.dir)
        kept, torn = store.load_kept()
        counts = Counts({k: v for k, v in previous.items() if isinstance(v, int)})
        if torn:
            counts.add("torn_lines_dropped_on_resume", torn)
        counts["kept"] = len(kept)
        endpoint = Endpoint(cfg)
        print(
            f"[hanlm] {cfg.mode} with {endpoint.model} at {endpoint.url}: {len(seeds)} seeds,"
            f" {len(kept)} kept before, aiming at {cfg.num}",
            file=sys.stderr,
        )
        # the similarity filter compares with the seeds (self-instruct) and everything kept
        pool = RougePool(
            (seeds if cfg.mode == "self-instruct" else []) + [_key_of(r) for r in kept]
        )
        generated = [_key_of(r) for r in kept]
        used_seeds = set(generated) if cfg.mode == "self-chat" else set()
        bar = tqdm(total=cfg.num, initial=min(len(kept), cfg.num), desc=cfg.mode, unit="rec")

        def save() -> None:
            run.info["summary"]["counts"] = dict(counts)
            run.save()

        with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool_exec:
            for _ in range(cfg.max_rounds):
                if counts["kept"] >= cfg.num:
                    break
                counts.add("rounds")
                if cfg.mode == "self-instruct":
                    new = _self_instruct_round(
                        cfg, endpoint, pool_exec, rng, seeds, generated, pool, counts, store
                    )
                else:
                    fresh = [s for s in seeds if s not in used_seeds]
                    if not fresh:
                        print("[hanlm] every seed question has been used", file=sys.stderr)
                        break
                    new = _self_chat_round(
                        cfg, endpoint, pool_exec, fresh, used_seeds, pool, counts, store
                    )
                for rec in new:
                    if counts["kept"] >= cfg.num:
                        counts.add("surplus_not_written")
                        continue
                    store.keep(rec)
                    generated.append(_key_of(rec))
                    counts.add("kept")
                    bar.update(1)
                bar.set_postfix({k: v for k, v in counts.items() if k not in ("kept",)})
                save()
        bar.close()
        done = counts["kept"] >= cfg.num
        run.finish({"counts": dict(counts), "done": done})
        summary = ", ".join(f"{k} {v}" for k, v in counts.items())
        print(f"[hanlm] {run.dir / DATA_FILE}: {summary}", file=sys.stderr)
        if not done:
            print(
                f"[hanlm] stopped after max_rounds={cfg.max_rounds} short of num={cfg.num};"
                " rerun with resume=true to continue",
                file=sys.stderr,
            )
    return 0


def _call(endpoint: Endpoint, counts: Counts, messages: list[dict[str, str]], t: float) -> Any:
    """A reply, or the exception (counted) so one failed request does not end the run."""
    try:
        return endpoint.chat(messages, t)
    except Exception as e:  # the openai client already retried
        err = endpoint.explain(e)
        if isinstance(err, (ConnectionError, PermissionError)):
            raise err from None
        counts.add("request_errors")
        return e


def _self_instruct_round(
    cfg: SelfInstructConfig,
    endpoint: Endpoint,
    executor: ThreadPoolExecutor,
    rng: random.Random,
    seeds: list[str],
    generated: list[str],
    pool: RougePool,
    counts: Counts,
    store: Store,
) -> list[dict[str, Any]]:
    prompts = []
    for _ in range(cfg.concurrency):
        k_gen = min(cfg.prompt_generated, len(generated), cfg.prompt_tasks)
        examples = rng.sample(generated, k_gen) + rng.sample(
            seeds, min(cfg.prompt_tasks - k_gen, len(seeds))
        )
        rng.shuffle(examples)
        listed = "\n".join(f"{i}. {t}" for i, t in enumerate(examples, 1))
        text = cfg.template("instruction").format(
            n=cfg.new_per_request, examples=listed, next=len(examples) + 1
        )
        prompts.append([{"role": "user", "content": text}])
    replies = list(executor.map(lambda m: _call(endpoint, counts, m, cfg.temperature), prompts))
    counts.add("instruction_requests", len(prompts))
    candidates = []
    for reply in replies:
        if isinstance(reply, Exception):
            continue
        items = parse_numbered(reply[0])
        if not items:
            counts.add("replies_without_a_numbered_list")
            store.reject("no_numbered_list", reply=reply[0])
            continue
        if reply[1] == "length":  # the last item may be cut off mid-sentence (as Alpaca)
            counts.add("cut_off_last_item")
            store.reject("cut_off_last_item", text=items[-1])
            items = items[:-1]
        candidates += items
    counts.add("candidates", len(candidates))

    passed = []
    for text in candidates:
        problem, why = instruction_problem(text, cfg), {}
        if problem is None:
            score, near = pool.max_score(text)
            if score >= cfg.rouge_threshold:
                problem, why = "similar", {"rouge_l": round(score, 4), "similar_to": near}
        if problem:
            counts.add(problem)
            store.reject(problem, text=text, **why)
            continue
        pool.add(text)  # later candidates of this round are compared with it too
        passed.append(text)

    asks = [
        [{"role": "user", "content": cfg.template("answer").format(instruction=t)}] for t in passed
    ]
    answers = list(executor.map(lambda m: _call(endpoint, counts, m, cfg.answer_temperature), asks))
    counts.add("answer_requests", len(asks))
    out = []
    for text, answer in zip(passed, answers):
        if isinstance(answer, Exception):
            continue
        reply, finish = answer
        extra, output = parse_answer(reply)
        if finish == "length":
            counts.add("answer_cut_off")
            store.reject("answer_cut_off", text=text, reply=reply)
        elif not output.strip():
            counts.add("empty_answer")
            store.reject("empty_answer", text=text, reply=reply)
        else:
            out.append({"instruction": text, "input": extra, "output": output})
    return out


def _self_chat_round(
    cfg: SelfInstructConfig,
    endpoint: Endpoint,
    executor: ThreadPoolExecutor,
    fresh: list[str],
    used: set[str],
    pool: RougePool,
    counts: Counts,
    store: Store,
) -> list[dict[str, Any]]:
    questions = []
    for q in fresh:  # in the file's order: a rerun asks the same questions
        if len(questions) == cfg.concurrency:
            break
        used.add(q)
        score, near = pool.max_score(q)
        if score >= cfg.rouge_threshold:
            counts.add("similar")
            store.reject("similar", text=q, rouge_l=round(score, 4), similar_to=near)
            continue
        pool.add(q)
        questions.append(q)
    dialogues = list(executor.map(lambda q: _dialogue(cfg, endpoint, counts, q), questions))
    out = []
    for q, (messages, why) in zip(questions, dialogues):
        counts.add(f"ended_{why}")
        if why in ("empty_answer", "request_error"):
            store.reject(why, text=q, messages=messages)
            continue
        out.append({"messages": messages})
    return out


def _dialogue(
    cfg: SelfInstructConfig, endpoint: Endpoint, counts: Counts, question: str
) -> tuple[list[dict[str, str]], str]:
    """Baize's self-chat: (the dialogue, why it ended)."""
    messages = [{"role": "user", "content": question}]
    for turn in range(cfg.turns):
        reply = _call(endpoint, counts, messages, cfg.answer_temperature)
        if isinstance(reply, Exception):
            return messages, "request_error"
        text, finish = reply
        if not text.strip() or finish == "length":
            # a cut or empty answer: keep the dialogue up to the last whole turn, if any
            if turn == 0:
                return messages, "empty_answer"
            return messages[:-1], "cut_off_answer"
        messages.append({"role": "assistant", "content": text.strip()})
        if turn == cfg.turns - 1:
            return messages, "max_turns"
        names = {"user": "用户", "assistant": "助手"}
        transcript = "\n".join(f"{names[m['role']]}：{m['content']}" for m in messages)
        ask = cfg.template("user").format(end=END_MARK, transcript=transcript)
        nxt = _call(endpoint, counts, [{"role": "user", "content": ask}], cfg.temperature)
        if isinstance(nxt, Exception):
            return messages, "request_error"
        line = nxt[0].strip()
        if not line or END_MARK in line or nxt[1] == "length":
            return messages, "by_user_side"
        if any(m["content"] == line for m in messages):  # an echo: the user side is stuck
            return messages, "repeated_turn"
        messages.append({"role": "user", "content": line})
    return messages, "max_turns"
