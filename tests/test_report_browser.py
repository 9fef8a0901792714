"""The run report as a reader sees it: built from fake stage directories (one per command, with a
PPO run whose proxy score rose while the gold judge fell) and rendered in headless Chromium.

Chromium comes from scripts/setup.sh (`apt-get install chromium` as root); without it the browser
test is skipped with its reason, and the report is still checked as text."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from hanlm.pipeline.recipe import Recipe, Stage
from hanlm.pipeline.report import write_report

WIDTH, HEIGHT = 1280, 900
RED = (207, 34, 46)  # .warn{color:#cf222e}

OVER_OPT = "over-optimisation: the proxy score rose by 0.950 while the gold judge fell by 0.300"


def _ppo_metrics(proxy: list[float], gold: list[float], kls: list[float]) -> list[dict]:
    rows = [{"step": 0, "eval_rm_score": proxy[0], "eval_gold_score": gold[0]}]
    for i, (p, g, kl) in enumerate(zip(proxy[1:], gold[1:], kls), start=1):
        rows.append(
            {"step": i * 10, "kl": kl, "reward": p, "eval_rm_score": p, "eval_gold_score": g}
        )
    return rows


# stage name -> (command, summary, data, metrics rows, {report file: content})
STAGES: dict[str, tuple] = {
    "tokenizer": (
        "vocab",
        {
            "vocab_size": 8000,
            "chinese_held_out_tokens_per_char": 0.62,
            "english_tokens_per_char": 0.31,
        },
        {},
        [],
        {
            "vocab_report.json": {
                "mode": "expand sentencepiece base",
                "vocab_size": 8000,
                "eval": {
                    "chinese_held_out": {
                        "base": {
                            "tokens_per_char": 0.91,
                            "byte_fallback_rate": 0.02,
                            "chars": 50000,
                        },
                        "merged": {
                            "tokens_per_char": 0.62,
                            "byte_fallback_rate": 0.0,
                            "chars": 50000,
                        },
                        "ratio": 0.681,
                    },
                    "english": {
                        "base": {"tokens_per_char": 0.30},
                        "merged": {"tokens_per_char": 0.31},
                        "ratio": 1.03,
                    },
                },
            }
        },
    ),
    "pretrain": (
        "pretrain",
        {"initial_eval_loss": 9.0, "eval_loss": 4.1, "initial_eval_bpc": 9.13, "eval_bpc": 4.27},
        {},
        [{"step": s, "loss": 9 - s / 60, "eval_loss": 9 - s / 70} for s in range(0, 401, 100)],
        {},
    ),
    "sft": (
        "sft",
        {
            "initial_answer_loss": 3.2,
            "answer_loss": 1.41,
            "initial_stop_rate": 0.0,
            "stop_rate": 0.95,
        },
        {},
        [{"step": s, "loss": 3 - s / 200} for s in range(0, 401, 50)],
        {},
    ),
    "reward": (
        "reward",
        {
            "initial_accuracy": 0.5,
            "accuracy": 0.81,
            "reward_gap": 1.9,
            "gold_split": {"proxy_pairs": 900, "gold_pairs": 900},
        },
        {"valid_pairs": 200},
        [],
        {},
    ),
    "ppo": (
        "ppo",
        {
            "initial_eval_rm_score": 1.64,
            "eval_rm_score": 2.59,
            "initial_eval_gold_score": 0.40,
            "eval_gold_score": 0.10,
            "final_kl": 4.5,
            "initial_eval_distinct_answers": 0.23,
            "eval_distinct_answers": 0.14,
            "eval_top_answer_share": 0.31,
            "initial_eval_defect_rate": 0.30,
            "eval_defect_rate": 0.55,
            "warnings": [OVER_OPT],
        },
        {},
        _ppo_metrics([1.64, 2.0, 2.4, 2.59], [0.40, 0.35, 0.2, 0.10], [1.1, 2.9, 4.5]),
        {},
    ),
    "ppo_kl": (
        "ppo",
        {
            "initial_eval_rm_score": 1.64,
            "eval_rm_score": 1.90,
            "initial_eval_gold_score": 0.40,
            "eval_gold_score": 0.61,
            "final_kl": 3.1,
            "initial_eval_distinct_answers": 0.23,
            "eval_distinct_answers": 0.25,
        },
        {},
        _ppo_metrics([1.64, 1.75, 1.9], [0.40, 0.52, 0.61], [1.4, 3.1]),
        {},
    ),
    "dpo": (
        "dpo",
        {"initial_reward_accuracy": 0.5, "reward_accuracy": 0.53, "reward_margin": 0.04},
        {"valid": 100},
        [],
        {},
    ),
    "audit": (
        "eval contamination",
        {"demo/contaminated": 3},
        {},
        [],
        {"contamination.json": {"benchmarks": {"demo": {"contaminated": 3, "items": 200}}}},
    ),
    "eval": (
        "eval",
        {"demo/accuracy": 0.27},
        {},
        [],
        {
            "eval_report.json": {
                "benchmarks": {
                    "demo": {
                        "accuracy": 0.27,
                        "n": 200,
                        "chance": 0.25,
                        "contamination": {
                            "clean": {"n": 197, "correct": 53, "accuracy": 0.269},
                            "contaminated": {"n": 3, "correct": 1, "accuracy": 0.333},
                        },
                    }
                },
                "perplexity": {"/data/zh_corpus.valid.jsonl.gz": {"bpc": 4.4}},
            }
        },
    ),
}


def build_run(root: Path) -> Recipe:
    """Stage directories as the commands write them, and the recipe that names them."""
    stages = []
    for name, (command, summary, data, metrics, reports) in STAGES.items():
        d = root / name
        d.mkdir(parents=True)
        info = {"command": command, "status": "complete", "summary": summary, "data": data}
        (d / "hanlm.json").write_text(json.dumps(info, ensure_ascii=False), encoding="utf-8")
        (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        for file, content in reports.items():
            (d / file).write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
        stages.append(Stage(name, command, {}, []))
    return Recipe("fake", root / "recipe.yaml", root, stages, {})


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    recipe = build_run(root)
    state = {s.name: {"status": "complete", "seconds": 1.0} for s in recipe.stages}
    return write_report(recipe, state)


def test_report_opens_with_the_headline(report):
    html_path, md_path = report
    text = html_path.read_text(encoding="utf-8")
    # the headline table is the first table, before the stage list and every curve
    assert text.index("id='headline'") < text.index("<table>") < text.index("data:image/png")
    assert "Chinese tokens per character (held out): 0.91 → 0.62" in text
    assert "proxy score rose but the gold judge fell: over-optimisation" in text
    assert "better on the gold judge (+0.21; not the target) at KL 3.1" in text
    assert "demo: no better than chance (0.27 vs 0.25)" in text
    assert "contamination: 3 of 200 demo items" in text
    assert text.count(f"<div class='warn'>⚠ {OVER_OPT}</div>") == 1  # the summary's, not twice
    # gold and proxy over KL: one figure, a curve per PPO run
    assert "<h2>Gold and proxy score over KL</h2>" in text
    # readable names in the tables, raw keys kept in collapsed details
    assert "<td><pre>bits per character (held out)</pre></td>" in text
    assert "<details><summary>raw keys</summary>" in text
    assert "<pre>eval.chinese_held_out.merged.tokens_per_char</pre>" in text
    md = md_path.read_text(encoding="utf-8")
    top = md.split("\n## ")[1]  # the first section of report.md
    assert top.startswith("What the run achieved") and "| stage | before → after | verdict |" in top
    assert f"**⚠ {OVER_OPT}**" in top


# --------------------------------------------------------------------------- in a real browser

PROBE = """<script>
window.addEventListener('load', () => {
  const t = document.getElementById('headline').getBoundingClientRect();
  const w = [...document.querySelectorAll('#headline .warn')];
  const out = {top: t.top, bottom: t.bottom, width: innerWidth, height: innerHeight,
    warnings: w.map(e => ({text: e.textContent, color: getComputedStyle(e).color,
                           bottom: e.getBoundingClientRect().bottom}))};
  const pre = document.createElement('pre');
  pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


def _run(browser: str, *args: str) -> str:
    cmd = [browser, "--headless", "--disable-gpu", "--hide-scrollbars", *args]
    if os.geteuid() == 0:
        cmd.insert(2, "--no-sandbox")  # Chromium refuses to sandbox as root
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.skipif(
    _chromium() is None,
    reason="no chromium on PATH: scripts/setup.sh installs it as root (apt-get install chromium)",
)
def test_report_in_headless_chromium(report, tmp_path):
    from PIL import Image

    browser = _chromium()
    html_path = report[0]
    size = f"--window-size={WIDTH},{HEIGHT}"
    # the layout as Chromium computes it: a copy of the report with a probe script
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text(encoding="utf-8") + PROBE, encoding="utf-8")
    dom = _run(browser, size, "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    layout = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    # --dump-dom's viewport is the window less Chromium's frame (1280x813 for 1280x900), the
    # screenshot's the whole window: the headline must fit the smaller one
    screen = min(layout["height"], HEIGHT)
    assert layout["width"] == WIDTH and screen > HEIGHT / 2, layout
    assert layout["top"] < 150 and layout["bottom"] <= screen, layout  # all on the first screen
    texts = [w["text"] for w in layout["warnings"]]
    assert any("over-optimisation" in t for t in texts) and any("contamination" in t for t in texts)
    red = "rgb({}, {}, {})".format(*RED)
    assert all(w["color"] == red for w in layout["warnings"]), layout["warnings"]
    assert all(w["bottom"] <= screen for w in layout["warnings"])

    # the report itself, unchanged, as a screenshot of the first screen
    shot = tmp_path / "report.png"
    _run(browser, size, f"--screenshot={shot}", html_path.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000
    img = Image.open(shot).convert("RGB")
    assert img.size == (WIDTH, HEIGHT)
    colours = img.getcolors(maxcolors=1 << 20) or []
    assert len(colours) > 50, f"a nearly blank screenshot: {len(colours)} colours"
    reds = sum(n for n, c in colours if all(abs(a - b) < 40 for a, b in zip(c, RED)))
    assert reds > 200, f"no red warning text on the first screen ({reds} red pixels)"
    if keep := os.environ.get("HANLM_REPORT_SCREENSHOT"):
        shutil.copy(shot, keep)
