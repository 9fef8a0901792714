"""The run report: `report.html` (self-contained, opens offline) and `report.md` for a recipe run.

It opens with the headline table (`hanlm.pipeline.headline_rows`): per stage, the figure that
matters before -> after, a plain-language verdict and warnings (over-optimisation, collapse,
contamination) in red. Then the gold and proxy score of each PPO/GRPO run over KL, a table of stages
(status, time, peak memory), each stage's loss and validation curves, the tokenizer report,
evaluation tables, every stage's summary metrics under readable names (raw keys in a collapsed
details section), and the answers of each model the run produced to the same prompts, side by side.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

from hanlm import ASSETS
from hanlm.config import DataConfig, ModelConfig
from hanlm.data import load
from hanlm.data.formats import split_last_answer
from hanlm.generation import GenerationOptions, generate
from hanlm.headline import Headline, display_name
from hanlm.modeling import load_model, load_tokenizer
from hanlm.pipeline.commands import COMMANDS
from hanlm.pipeline.headline_rows import load_reports, stage_headline
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
h1{margin:.2em 0 .3em} h2.first{margin-top:.5em}
"""
# Curves worth a plot, grouped per figure.
_CURVES = {
    "loss": ["loss", "eval_loss"],
    "bits per character": ["eval_bpc"],
    "reward / KL": ["reward", "mean_reward", "kl", "rewards/margins", "rewards/accuracies"],
    "held-out score": ["eval_score", "eval_rm_score", "eval_gold_score"],
    "held-out answers": ["eval_distinct_answers", "eval_top_answer_share", "eval_defect_rate"],
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


_HEADLINE_CSS = """
table.headline{font-size:13px;margin-top:.3em;width:100%}
table.headline td:first-child{width:8%} table.headline td:nth-child(2){width:46%}
table.headline td{padding:3px 8px} table.headline ul{margin:0;padding-left:1.1em}
.verdict.good{color:#1a7f37}.verdict.bad{color:#9a6700}
.warn{color:#cf222e;font-weight:600;margin-top:2px}
details{margin:.3em 0 1.2em} summary{cursor:pointer;color:#555;font-size:13px}
"""


def _plots_over_kl(command: str) -> bool:
    cmd = COMMANDS.get(command)
    return bool(cmd and cmd.plot_over_kl)


def _headline_html(rows: list[Headline]) -> str:
    """The headline table (id `headline`) with its raw keys in a collapsed details section."""
    esc = html.escape
    body = []
    for h in rows:
        figs = "".join(f"<li>{esc(f.text())}</li>" for f in h.figures)
        warns = "".join(f"<div class='warn'>⚠ {esc(w)}</div>" for w in h.warnings)
        body.append(
            f"<tr><td><b>{esc(h.stage)}</b><br><small>{esc(h.command)}</small></td>"
            f"<td>{f'<ul>{figs}</ul>' if figs else '—'}</td>"
            f"<td><span class='verdict {h.tone}'>{esc(h.verdict)}</span>{warns}</td></tr>"
        )
    raw = [
        f"<tr><td>{esc(h.stage)}</td><td>{esc(f.name)}</td><td><code>{esc(k)}</code></td></tr>"
        for h in rows
        for f in h.figures
        for k in f.keys
    ]
    out = (
        "<table id='headline' class='headline'><tr><th>stage</th><th>before → after</th>"
        f"<th>verdict</th></tr>{''.join(body)}</table>"
    )
    if raw:
        out += (
            "<details><summary>raw keys behind these figures</summary><table><tr><th>stage</th>"
            f"<th>measure</th><th>key in hanlm.json</th></tr>{''.join(raw)}</table></details>"
        )
    return out


def _headline_md(rows: list[Headline]) -> list[str]:
    """The headline table as Markdown lines (warnings marked ⚠ in bold: Markdown has no red)."""

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| stage | before → after | verdict |", "|---|---|---|"]
    for h in rows:
        figs = "<br>".join(cell(f.text()) for f in h.figures) or "—"
        verdict = cell(h.verdict) + "".join(f"<br>**⚠ {cell(w)}**" for w in h.warnings)
        lines.append(f"| **{cell(h.stage)}** ({cell(h.command)}) | {figs} | {verdict} |")
    raw = [f"| {h.stage} | {f.name} | `{k}` |" for h in rows for f in h.figures for k in f.keys]
    if raw:
        lines += ["", "<details><summary>raw keys behind these figures</summary>", ""]
        lines += ["| stage | measure | key in hanlm.json |", "|---|---|---|", *raw]
        lines += ["", "</details>"]
    return [*lines, ""]


class _Doc:
    """Builds the HTML and Markdown versions side by side."""

    def __init__(self, title: str, files_dir: Path) -> None:
        self.html = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>"]
        self.html.append(f"<style>{_CSS}{_HEADLINE_CSS}</style><h1>{html.escape(title)}</h1>")
        self.md = [f"# {title}", ""]
        self.files_dir = files_dir
        self.n_images = 0

    def h2(self, text: str, cls: str = "") -> None:
        attr = f" class='{cls}'" if cls else ""
        self.html.append(f"<h2{attr}>{html.escape(text)}</h2>")
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

    def measures(self, values: dict[str, Any]) -> None:
        """Measures under readable names; the raw keys in a collapsed details section."""
        rows = list(values.items())
        self.table(["measure", "value"], [[display_name(k), v] for k, v in rows])
        self.html.append("<details><summary>raw keys</summary>")
        self.md += ["<details><summary>raw keys</summary>", ""]
        self.table(["key", "value"], [[k, v] for k, v in rows])
        self.html.append("</details>")
        self.md += ["</details>", ""]

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
            ax.plot(xs, ys, marker="o" if len(pts) < 30 else None, ms=3, label=display_name(k))
        ax.set_title(f"{stage}: {title}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _kl_points(metrics: list[dict[str, Any]], key: str) -> list[tuple[float, float]]:
    """(KL, held-out `key`) at each evaluation; the evaluation before training is at KL 0."""
    pts = []
    for m in metrics:
        kl = m.get("kl", 0.0 if m.get("step") == 0 else None)
        if isinstance(kl, (int, float)) and isinstance(m.get(key), (int, float)):
            pts.append((float(kl), float(m[key])))
    return pts


def _kl_plot(runs: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """Proxy and gold score against KL, a curve per run (Gao et al. 2022's picture)."""
    curves: dict[str, dict[str, list[tuple[float, float]]]] = {"proxy": {}, "gold": {}}
    for name, metrics in runs.items():
        gold = _kl_points(metrics, "eval_gold_score")
        rm = "eval_rm_score" if any("eval_rm_score" in m for m in metrics) else "eval_score"
        proxy = _kl_points(metrics, rm)
        if len(gold) >= 2 and len(proxy) >= 2:
            curves["gold"][name], curves["proxy"][name] = gold, proxy
    if not curves["gold"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    titles = {
        "proxy": "proxy RM score (held out; the target)",
        "gold": "gold RM score (held out; not the target)",
    }
    for ax, (which, series) in zip(axes, curves.items()):
        for name, pts in series.items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.set_title(titles[which], fontsize=10)
        ax.set_xlabel("KL to the reference (nats)")
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
        source = source.replace("${assets}", str(ASSETS)).replace("${run_dir}", str(recipe.run_dir))
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


def _acc_cell(g: dict[str, Any] | None) -> str:
    if not g or not g.get("n"):
        return "-"
    return f"{g['accuracy']:.3f} (n={g['n']})"


def _letter_shares(predictions: Path) -> tuple[str, str]:
    """("always-X accuracy", "most common prediction and its share") from a predictions file."""
    if not predictions.is_file():
        return "-", "-"
    rows = [json.loads(x) for x in predictions.read_text(encoding="utf-8").splitlines() if x]
    if not rows:
        return "-", "-"
    answers = Counter(r["answer"] for r in rows).most_common(1)[0]
    preds = Counter(r["pred"] for r in rows).most_common(1)[0]
    return (
        f"{answers[1] / len(rows):.3f} ({answers[0]})",
        f"{preds[0]} {preds[1] / len(rows):.0%}",
    )


def _eval_tables(doc: _Doc, recipe: Any, run_dir: Path) -> None:
    """Every eval stage side by side: benchmark accuracy against chance and against the first
    stage that scored the same benchmark the same way (the base), by contamination group;
    bits per character per text file; the recitation probe per contamination group."""
    reports = {}
    for stage in recipe.stages:
        p = run_dir / stage.name / "eval_report.json"
        if stage.command == "eval" and p.is_file():
            reports[stage.name] = json.loads(p.read_text(encoding="utf-8"))
    if not reports:
        return
    doc.h2("Benchmarks across stages")
    rows, base = [], {}
    for name, rep in reports.items():
        for bench, b in rep.get("benchmarks", {}).items():
            letters = _letter_shares(run_dir / name / str(b.get("predictions", "")))
            key = (bench, b.get("shots"), b.get("n"))
            first = base.setdefault(key, (name, b["accuracy"]))
            delta = b["accuracy"] - first[1] if first[0] != name else None
            c = b.get("contamination") or {}
            rows.append(
                [
                    name,
                    bench,
                    b.get("shots", 0),
                    b["n"],
                    round(b["accuracy"], 4),
                    round(b.get("chance", 0.25), 4),
                    letters[0],
                    letters[1],
                    f"{delta:+.4f} vs {first[0]}" if delta is not None else "(base)",
                    _acc_cell(c.get("contaminated")),
                    _acc_cell(c.get("partial")),
                    _acc_cell(c.get("clean")),
                ]
            )
    if rows:
        doc.p(
            "Accuracy (letter scoring) per stage; the change is against the first stage that scored"
            " the same benchmark with the same shots and items. Always-X: the accuracy of always"
            " answering the scored items' most common letter (a model stuck on one letter gets"
            " it, so accuracy below it is no evidence of knowledge); answered: the model's most"
            " common answer and its share. Contaminated / partial / clean: accuracy on the items"
            " the contamination audit put in each group."
        )
        head = ["stage", "benchmark", "shots", "n", "accuracy", "chance", "always-X", "answered"]
        head.append("change")
        doc.table([*head, "contaminated", "partial", "clean"], rows)
    rows, base_bpc = [], {}
    for name, rep in reports.items():
        for path, v in rep.get("perplexity", {}).items():
            first = base_bpc.setdefault(path, (name, v["bpc"]))
            delta = f"{v['bpc'] - first[1]:+.4f} vs {first[0]}" if first[0] != name else "(base)"
            ppl = round(v["ppl"], 3) if "ppl" in v else "-"  # reports before ppl was recorded
            rows.append([name, Path(path).name, round(v["bpc"], 4), ppl, delta])
    if rows:
        doc.p("Bits per character (comparable across tokenizers; lower is better).")
        doc.table(["stage", "text", "bits/char", "perplexity", "change"], rows)
    rows = []
    for name, rep in reports.items():
        for bench, v in rep.get("recite", {}).items():
            groups = v.get("groups", {})
            cells = [
                f"{groups[g]['bpc']} (n={groups[g]['n']})" if g in groups else "-"
                for g in ("contaminated", "partial", "clean")
            ]
            rows.append([name, bench, v["bpc"], *cells])
    if rows:
        doc.p(
            "Recitation probe: bits per character of each reference answer after its question"
            " (lower = closer to memorised), by the audit's contamination group."
        )
        doc.table(["stage", "benchmark", "bits/char", "contaminated", "partial", "clean"], rows)


def write_report(recipe: Any, state: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.html and report.md into the recipe's run directory."""
    run_dir: Path = recipe.run_dir
    doc = _Doc(f"hanlm run: {recipe.name}", run_dir / "report_files")
    infos = {s.name: read_run(run_dir / s.name) for s in recipe.stages}
    metrics = {s.name: read_metrics(run_dir / s.name) for s in recipe.stages}
    heads = [
        stage_headline(
            s.name,
            s.command,
            infos[s.name],
            load_reports(run_dir / s.name, s.command),
            metrics[s.name],
            state.get(s.name, {}).get("status", ""),
        )
        for s in recipe.stages
    ]
    doc.h2("What the run achieved", cls="first")
    doc.html.append(_headline_html(heads))
    doc.md += _headline_md(heads)
    doc.p(f"Recipe {recipe.path} — run directory {run_dir}")
    png = _kl_plot({s.name: metrics[s.name] for s in recipe.stages if _plots_over_kl(s.command)})
    if png:
        doc.h2("Gold and proxy score over KL")
        doc.image(png, "gold and proxy score over KL")

    doc.h2("Stages")
    rows = []
    for stage in recipe.stages:
        st = state.get(stage.name, {})
        info = infos[stage.name] or {}
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

    _eval_tables(doc, recipe, run_dir)

    for stage in recipe.stages:
        d = run_dir / stage.name
        info = infos[stage.name]
        if not info:
            continue
        doc.h2(f"{stage.name} ({stage.command})")
        png = _plot(stage.name, metrics[stage.name])
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
                doc.measures(dict(list(flat.items())[:80]))
        summary = {k: v for k, v in _flatten(info.get("summary") or {}).items() if v is not None}
        if summary:
            doc.h3("Summary")
            doc.measures(summary)

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
