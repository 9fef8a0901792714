"""The run report: `report.html` (self-contained, opens offline) and `report.md` for a recipe run.

It shows a table of stages (status, time, peak memory), each stage's loss and validation curves,
the tokenizer report, evaluation tables, every stage's summary metrics, and the answers of each
model the run produced to the same prompts, side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path
from typing import Any

from hanlm import ASSETS
from hanlm.config import DataConfig, ModelConfig
from hanlm.data import load
from hanlm.data.formats import split_last_answer
from hanlm.infer.engine import GenerationOptions, generate
from hanlm.modeling import load_model, load_tokenizer
from hanlm.runs import atomic_write_json, atomic_write_text, read_metrics, read_run

SAMPLES_FILE = "report_samples.json"
_CSS = """
body{font-family:system-ui,-apple-system,"Noto Sans CJK SC","Microsoft YaHei",sans-serif;
max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#cf222e} img{max-width:100%} pre{white-space:pre-wrap;margin:0}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
"""
# Curves worth a plot, grouped per figure.
_CURVES = {
    "loss": ["loss", "eval_loss"],
    "bits per character": ["eval_bpc"],
    "reward / KL": ["reward", "mean_reward", "kl", "rewards/margins", "rewards/accuracies"],
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)[:200]
    return str(v)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


class _Doc:
    """Builds the HTML and Markdown versions side by side."""

    def __init__(self, title: str, files_dir: Path) -> None:
        self.html = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"]
        self.html.append(f"<style>{_CSS}</style><h1>{html.escape(title)}</h1>")
        self.md = [f"# {title}", ""]
        self.files_dir = files_dir
        self.n_images = 0

    def h2(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>")
        self.md += [f"## {text}", ""]

    def h3(self, text: str) -> None:
        self.html.append(f"<h3>{html.escape(text)}</h3>")
        self.md += [f"### {text}", ""]

    def p(self, text: str) -> None:
        self.html.append(f"<p>{html.escape(text)}</p>")
        self.md += [text, ""]

    def table(self, header: list[str], rows: list[list[Any]]) -> None:
        h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
        body = []
        for row in rows:
            cells = []
            for c in row:
                cls = " class='num'" if isinstance(c, (int, float)) else ""
                if isinstance(c, str) and c in ("complete", "skipped"):
                    cls = " class='ok'"
                elif isinstance(c, str) and c in ("failed", "running", "missing"):
                    cls = " class='bad'"
                cells.append(f"<td{cls}><pre>{html.escape(_fmt(c))}</pre></td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        self.html.append(f"<table><tr>{h}</tr>{''.join(body)}</table>")
        esc = lambda s: _fmt(s).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
        self.md.append("| " + " | ".join(header) + " |")
        self.md.append("|" + "---|" * len(header))
        self.md += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
        self.md.append("")

    def image(self, png: bytes, alt: str) -> None:
        self.n_images += 1
        b64 = base64.b64encode(png).decode()
        self.html.append(f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{b64}'>")
        self.files_dir.mkdir(parents=True, exist_ok=True)
        name = f"plot{self.n_images}.png"
        (self.files_dir / name).write_bytes(png)
        self.md += [f"![{alt}]({self.files_dir.name}/{name})", ""]


def _plot(stage: str, metrics: list[dict[str, Any]]) -> bytes | None:
    groups = []
    for title, keys in _CURVES.items():
        series = {}
        for k in keys:
            pts = [(m["step"], m[k]) for m in metrics if isinstance(m.get(k), (int, float))]
            if len(pts) >= 2 or (pts and k.startswith("eval_")):
                series[k] = pts
        if series:
            groups.append((title, series))
    if not groups:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 3.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], groups):
        for k, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=k)
        ax.set_title(f"{stage}: {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _is_model_dir(path: Path) -> bool:
    """A causal LM that can answer prompts (reward models are classifiers: not these)."""
    cfg = path / "config.json"
    if not cfg.is_file() or not any(path.glob("*.safetensors")):
        return False
    archs = json.loads(cfg.read_text(encoding="utf-8")).get("architectures") or []
    return any(a.endswith("ForCausalLM") for a in archs)


def _prompts(recipe: Any) -> list[dict[str, Any]]:
    """The report's prompts: given in the recipe, or the first records of a chat file."""
    spec = recipe.report
    prompts = [{"prompt": p, "reference": ""} for p in spec.get("prompts", [])]
    source = spec.get("prompts_from")
    if source:
        source = source.replace("${assets}", str(ASSETS))
        recs = load(
            DataConfig(paths=[source], dedup="none", max_records=spec.get("num_prompts", 6)),
            kind="chat",
        ).train
        for rec in recs:
            before, answer = split_last_answer(rec["messages"])
            prompts.append(
                {
                    "messages": before,
                    "prompt": before[-1]["content"],
                    "reference": answer,
                }
            )
    return prompts


def _samples(recipe: Any, state: dict[str, Any], prompts: list[dict[str, Any]]) -> dict[str, Any]:
    """Each model stage's greedy answers to the prompts, cached by the stage's fingerprint."""
    cache_path = recipe.run_dir / SAMPLES_FILE
    cache = json.loads(cache_path.read_text(encoding="utf-8")) if cache_path.is_file() else {}
    key_prompts = json.dumps([p["prompt"] for p in prompts], ensure_ascii=False)
    max_new = int(recipe.report.get("max_new_tokens", 64))
    out: dict[str, Any] = {}
    for stage in recipe.stages:
        d = recipe.run_dir / stage.name
        st = state.get(stage.name, {})
        if st.get("status") != "complete" or not _is_model_dir(d):
            continue
        key = f"{st.get('fingerprint')}:{max_new}:{hash(key_prompts) & 0xFFFFFFFF}"
        cached = cache.get(stage.name)
        if cached and cached.get("key") == key:
            out[stage.name] = cached["answers"]
            continue
        try:
            answers = _generate(d, prompts, max_new)
        except Exception as e:  # a model that cannot chat still gets a report
            answers = [f"(could not generate: {type(e).__name__}: {e})"] * len(prompts)
        cache[stage.name] = {"key": key, "answers": answers}
        out[stage.name] = answers
    atomic_write_json(cache_path, cache)
    return out


def _generate(model_dir: Path, prompts: list[dict[str, Any]], max_new: int) -> list[str]:

    tok = load_tokenizer(str(model_dir))
    model = load_model(ModelConfig(path=str(model_dir)))
    convs = [p.get("messages") or [{"role": "user", "content": p["prompt"]}] for p in prompts]
    opts = GenerationOptions(max_new_tokens=max_new, temperature=0.0)
    res = generate(model, tok, convs, opts)
    return [r["text"] + ("" if r["stopped"] else " …") for r in res]


def write_report(recipe: Any, state: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.html and report.md into the recipe's run directory."""
    run_dir: Path = recipe.run_dir
    doc = _Doc(f"hanlm run: {recipe.name}", run_dir / "report_files")
    doc.p(f"Recipe {recipe.path} — run directory {run_dir}")

    doc.h2("Stages")
    rows = []
    for stage in recipe.stages:
        st = state.get(stage.name, {})
        info = read_run(run_dir / stage.name) or {}
        status = st.get("status", "not run")
        rows.append(
            [
                stage.name,
                stage.command,
                status,
                st.get("seconds", ""),
                st.get("peak_memory_mb", ""),
                info.get("ended") or "",
            ]
        )
    doc.table(["stage", "command", "status", "seconds", "peak memory (MB)", "finished"], rows)

    for stage in recipe.stages:
        d = run_dir / stage.name
        info = read_run(d)
        if not info:
            continue
        doc.h2(f"{stage.name} ({stage.command})")
        png = _plot(stage.name, read_metrics(d))
        if png:
            doc.image(png, f"{stage.name} curves")
        for name, title in (
            ("vocab_report.json", "Tokenizer report"),
            ("eval_report.json", "Evaluation"),
        ):
            p = d / name
            if p.is_file():
                doc.h3(title)
                flat = _flatten(json.loads(p.read_text(encoding="utf-8")))
                flat = {k: v for k, v in flat.items() if v is not None}
                doc.table(["measure", "value"], [[k, v] for k, v in flat.items()][:80])
        summary = {k: v for k, v in _flatten(info.get("summary") or {}).items() if v is not None}
        if summary:
            doc.h3("Summary")
            doc.table(["measure", "value"], [[k, v] for k, v in summary.items()])

    prompts = _prompts(recipe)
    if prompts:
        samples = _samples(recipe, state, prompts)
        if samples:
            doc.h2("The same prompts, answered by each model")
            header = ["prompt", "reference", *samples]
            rows = [
                [p["prompt"], p["reference"], *(samples[s][i] for s in samples)]
                for i, p in enumerate(prompts)
            ]
            doc.table(header, rows)

    html_path = atomic_write_text(run_dir / "report.html", "\n".join(doc.html) + "\n")
    md_path = atomic_write_text(run_dir / "report.md", "\n".join(doc.md) + "\n")
    return html_path, md_path
