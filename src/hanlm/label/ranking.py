"""`hanlm label`: K answers per prompt, ranked by people in a browser page (InstructGPT's
labelling; OpenAssistant's and transformers_tasks' ranking pages).

Reads top to bottom: prompts -> K answers each, sampled once from one model at several
temperatures or from several models (answers.jsonl; a restart reuses it) -> a FastAPI app on
the same stack as `hanlm serve` (the page at `/`, a JSON API under `/api`) -> each ranking
appended as one whole line to rankings.jsonl, a `ranked` record `hanlm reward` trains on as is.

Several labellers may work at once: appends hold a lock (in the process and, with flock, across
processes), and a labeller's second ranking of the same prompt is refused (409) rather than
written twice. Answers are shown in a shuffled order without their model, so position and
name do not bias the labeller; rankings.jsonl names the model and temperature of each.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime,
# and `Request` is imported inside `create_app` (fastapi is an optional extra).

import fcntl
import hashlib
import hmac
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

from hanlm.config import ConfigError, ModelConfig, OutputConfig, opt
from hanlm.data.formats import RecordError, parse_ranking
from hanlm.datagen.selfinstruct import seed_texts
from hanlm.generation import GenerationOptions, generate
from hanlm.modeling import load_model, load_tokenizer
from hanlm.runs import Run, atomic_write_text

ANSWERS_FILE = "answers.jsonl"
RANKINGS_FILE = "rankings.jsonl"


@dataclass
class LabelConfig(OutputConfig):
    inputs: list[str] = opt(
        [], "PROMPTS (JSONL or .txt), then MODEL[,MODEL2...] (model directories)"
    )
    k: int = opt(4, "answers per prompt (InstructGPT: 4 to 9; the keys 1-9 pick them, or drag)")
    temperatures: list[float] = field(
        default_factory=lambda: [0.7, 1.0],
        metadata={"help": "sampling temperatures, cycled over the K answers of each model"},
    )
    max_new_tokens: int = opt(256, "most tokens per answer")
    top_p: float = opt(0.95, "nucleus sampling")
    max_prompts: int = opt(0, "label only the first N prompts (0 = all)")
    batch_size: int = opt(8, "prompts answered at once while sampling")
    seed: int = opt(0, "seed of the sampling and of the answer order shown")
    host: str = opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the page to the network")
    port: int = opt(8100, "TCP port")
    api_key: str = opt(
        "",
        "require 'Authorization: Bearer KEY' on the API (the page asks for it); default: the"
        " HANLM_API_KEY environment variable; empty = open",
    )
    log_level: str = opt("warning", "uvicorn log level")

    def validate(self) -> None:
        if len(self.inputs) < 2:
            raise ConfigError(
                "give the prompts and the model(s): hanlm label PROMPTS MODEL[,MODEL2...]"
                " output_dir=OUT"
            )
        if self.k < 2:
            raise ConfigError(f"k={self.k}: ranking needs at least 2 answers per prompt")
        if not self.temperatures:
            raise ConfigError("temperatures: give at least one")


# --------------------------------------------------------------------------- sampling


def slots(models: list[str], temperatures: list[float], k: int) -> list[tuple[str, float]]:
    """(model, temperature) of each of the K answers: models take turns, and each model's
    answers cycle through the temperatures."""
    out = []
    for j in range(k):
        model = models[j % len(models)]
        out.append((model, temperatures[(j // len(models)) % len(temperatures)]))
    return out


def sample_answers(cfg: LabelConfig, prompts: list[str], models: list[str]) -> list[dict[str, Any]]:
    """K answers per prompt, in a shuffled order per prompt, with each one's model and
    temperature."""
    plan = slots(models, cfg.temperatures, cfg.k)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    texts: list[list[str]] = [[""] * cfg.k for _ in prompts]
    for name in dict.fromkeys(models):
        tok = load_tokenizer(name)
        model = load_model(ModelConfig(path=name))
        for j, (m, t) in enumerate(plan):
            if m != name:
                continue
            print(f"[hanlm] answer {j + 1}/{cfg.k}: {name} at temperature {t}", file=sys.stderr)
            opts = GenerationOptions(
                max_new_tokens=cfg.max_new_tokens, temperature=t, top_p=cfg.top_p, seed=cfg.seed + j
            )
            for i, ans in enumerate(generate(model, tok, convs, opts, cfg.batch_size)):
                texts[i][j] = ans["text"].strip()
        del model
    rng = random.Random(cfg.seed)
    items = []
    for i, prompt in enumerate(prompts):
        order = list(range(cfg.k))
        rng.shuffle(order)
        items.append(
            {
                "id": i,
                "prompt": prompt,
                "responses": [texts[i][j] for j in order],
                "models": [plan[j][0] for j in order],
                "temperatures": [plan[j][1] for j in order],
            }
        )
    return items


def _fingerprint(cfg: LabelConfig, prompts: list[str], models: list[str]) -> str:
    what = [prompts, models, cfg.k, cfg.temperatures, cfg.max_new_tokens, cfg.top_p, cfg.seed]
    return hashlib.sha256(json.dumps(what, ensure_ascii=False).encode()).hexdigest()[:16]


def load_or_sample(cfg: LabelConfig, out: Path) -> list[dict[str, Any]]:
    """The answers of an earlier start when they were made from the same prompts, models and
    settings; otherwise sample (a different set in the same directory is an error)."""
    prompts = seed_texts(cfg.inputs[0])
    if cfg.max_prompts > 0:
        prompts = prompts[: cfg.max_prompts]
    # MODEL1,MODEL2 or MODEL1 MODEL2: every input after the prompts names models
    models = [m for arg in cfg.inputs[1:] for m in arg.split(",") if m]
    fp = _fingerprint(cfg, prompts, models)
    path = out / ANSWERS_FILE
    if path.is_file():
        rows = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x]
        if rows and rows[0].get("fingerprint") == fp:
            print(f"[hanlm] reusing the answers in {path}", file=sys.stderr)
            return rows[1:]
        raise ConfigError(
            f"{path} holds answers to other prompts, models or settings; use another output_dir"
            " (or overwrite=true, which also drops its rankings)"
        )
    items = sample_answers(cfg, prompts, models)
    header = {"fingerprint": fp, "models": models, "k": cfg.k}
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in [header, *items])
    atomic_write_text(path, text)
    return items


# --------------------------------------------------------------------------- rankings


class Rankings:
    """rankings.jsonl: read once at start, then appended one whole line per ranking."""

    def __init__(self, path: Path, items: list[dict[str, Any]]) -> None:
        self.path = path
        self.items = {it["id"]: it for it in items}
        self.lock = threading.Lock()
        self.done: dict[str, set[int]] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a crash: that ranking was not confirmed
                self.done.setdefault(rec.get("labeller", ""), set()).add(rec.get("id"))

    def add(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(HTTP status, reply) for one posted ranking."""
        labeller = str(body.get("labeller") or "").strip()
        if not labeller:
            return 400, {"error": "give a labeller name"}
        item = self.items.get(body.get("id"))
        if item is None:
            return 404, {"error": f"no prompt with id {body.get('id')!r}"}
        all_bad = bool(body.get("all_bad"))
        ranking = body.get("ranking")
        if all_bad and not ranking:
            ranking = [list(range(len(item["responses"])))]  # all bad, no order between them
        try:
            groups = parse_ranking(ranking, len(item["responses"]))
        except RecordError as e:
            return 400, {"error": str(e)}
        rec = {
            "id": item["id"],
            "prompt": item["prompt"],
            "responses": item["responses"],
            "ranking": [g[0] if len(g) == 1 else g for g in groups],
            "all_bad": all_bad,
            "comment": str(body.get("comment") or ""),
            "labeller": labeller,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "models": item["models"],
            "temperatures": item["temperatures"],
        }
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            mine = self.done.setdefault(labeller, set())
            if item["id"] in mine:
                return 409, {"error": f"{labeller} has already ranked prompt {item['id']}"}
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # another `hanlm label` on the same file
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            mine.add(item["id"])
            done = len(mine)
        return 200, {"ok": True, "done": done, "total": len(self.items)}


def create_app(items: list[dict[str, Any]], out: Path, api_key: str = "", title: str = "") -> Any:
    """The labelling app: the page at `/`, items and rankings under `/api`."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse

    rankings = Rankings(out / RANKINGS_FILE, items)
    app = FastAPI(title="hanlm label", version="1")
    shown = [{"id": it["id"], "prompt": it["prompt"], "responses": it["responses"]} for it in items]

    def denied(request: Request) -> JSONResponse | None:
        if not api_key:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip(), api_key):
            return None
        return JSONResponse(
            {"error": "invalid or missing API key: send 'Authorization: Bearer KEY'"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = (resources.files("hanlm.label") / "page.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{TITLE}}", escape(title or out.name)))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "prompts": len(items)}

    @app.get("/api/items")
    def get_items(request: Request, labeller: str = "") -> Any:
        if (err := denied(request)) is not None:
            return err
        with rankings.lock:
            done = sorted(rankings.done.get(labeller.strip(), set()))
        return {"items": shown, "done": done, "total": len(items), "needs_key": bool(api_key)}

    @app.post("/api/rank")
    async def rank(request: Request) -> Any:
        if (err := denied(request)) is not None:
            return err
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "expected a JSON object"}, status_code=400)
        status, reply = rankings.add(body)  # a short locked append: fine on the event loop
        return JSONResponse(reply, status_code=status)

    return app


def run(cfg: LabelConfig) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ConfigError("hanlm label needs the serve extra: pip install 'hanlm[serve]'") from None
    cfg.validate()
    # a restart continues: the answers and rankings already there are kept
    with Run("label", cfg, resume=not cfg.overwrite, seed=cfg.seed) as run:
        items = load_or_sample(cfg, run.dir)
        api_key = cfg.api_key or os.environ.get("HANLM_API_KEY", "")
        app = create_app(items, run.dir, api_key)
        ranked = sum(len(v) for v in Rankings(run.dir / RANKINGS_FILE, items).done.values())
        print(
            f"[hanlm] {len(items)} prompts x {cfg.k} answers; {ranked} rankings so far in"
            f" {run.dir / RANKINGS_FILE}\n[hanlm] open http://{cfg.host}:{cfg.port}/ to rank;"
            f" API key {'required' if api_key else 'off'}",
            file=sys.stderr,
        )
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level)
        run.finish({"prompts": len(items), "rankings_at_start": ranked})
    return 0
