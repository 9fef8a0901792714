"""`hanlm eval`: multiple-choice benchmarks, perplexity and generation samples for any causal LM.

The benchmarks and their prompts come from `hanlm.eval.benchmarks` (C-Eval, CMMLU and MMLU in their
official layouts, hanlm's JSONL, or the hub; each benchmark's official wording, zero- or k-shot)
and the model's scores from `hanlm.eval.loglik`; the options are `hanlm.eval.eval_config`'s, and
one benchmark is scored by `hanlm.eval.multiple_choice` (its prompts fitted to the model,
optionally inside the model's chat template, scored, summarised). This module reads top to
bottom: perplexity, cloze and samples; the contamination audit read; and `run()` (every input
read before the model loads, then the benchmarks, recitation, perplexity, cloze and samples),
which writes everything to the output directory:

- `eval_report.json`  every score, for the recipe report (also summarised in `hanlm.json`);
- `predictions-<bench>.jsonl`  per question: the exact prompt, the four option scores, the chosen
  and the correct answer, so any score can be audited and recomputed;
- `samples.jsonl`  generations for a prompt file.

Prompts. By default each benchmark's prompt is built as its reference script builds it (C-Eval:
the header only before shots, the subject by its file name; CMMLU: the Chinese subject name;
MMLU: hendrycks' header with its two spaces); `style=hanlm` gives hanlm's earlier wording. Shots:
`shots=k` asks for k; a subject with fewer dev examples, or a prompt too long for k, gets fewer,
which is warned about, counted in the report and the table, and with `strict_shots=true` an error.

Scoring. `letter` (default) is what the C-Eval and CMMLU reference scripts do: after the prompt
(which ends in `答案：` / `答案是：` / `Answer:`) take the next-token logits of the four letters,
softmax over those four, answer = argmax. `loglik` scores each option's own text instead: its
log-likelihood after the prompt divided by its length in characters (characters, not tokens, so
tokenizers with different Chinese coverage compare fairly).

Averaging. `accuracy` is over all questions (micro; the MMLU reference script's overall figure);
`macro_accuracy` is the mean of the per-subject accuracies (each subject counts once, as in a
per-subject leaderboard average). Both are given overall and per category: compare like with like.

Cloze. `cloze=` files give a blank-infilling probe (`hanlm.eval.cloze`): held-out windows with
a span blanked, the true span against same-length spans from other texts, asked the causal way
and, for a tokenizer with the GLM tokens (`hanlm pretrain objective=glm`), GLM's way.

Determinism. Items are read in file order, batches are formed by a stable sort, scoring is greedy
and there is no sampling, so the same model, data and config give the same predictions.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hanlm.config import ConfigError, DataConfig
from hanlm.data import load
from hanlm.data.glm import glm_ids
from hanlm.data.sources import DataError, read_json_line, read_lines
from hanlm.data.templates import stop_token_ids
from hanlm.eval.benchmarks import Benchmark, canonical_split, load_benchmark
from hanlm.eval.cloze import cloze_accuracy, cloze_items
from hanlm.eval.eval_config import EvalConfig
from hanlm.eval.loglik import perplexity
from hanlm.eval.multiple_choice import AUDIT_GROUPS, Encoder, check_dev_shots, evaluate_benchmark
from hanlm.eval.recite import recite_probe
from hanlm.eval.tool_use import measure_tool_use, model_generate, read_tool_set
from hanlm.modeling import load_model, load_tokenizer
from hanlm.runs import Run, atomic_write_json

TOOL_FIGURES = (
    "right_tool",
    "valid_args",
    "correct_args",
    "answer_uses_result",
    "no_tool_direct",
    "malformed_calls",
)

# --------------------------------------------------------------------------- perplexity


def _read_texts(path: str, max_chars: int) -> str:
    recs = load(DataConfig(paths=[path], dedup="none"), kind="text").train
    text = "\n\n".join(r["text"] for r in recs)
    return text[:max_chars] if max_chars else text


# --------------------------------------------------------------------------- cloze


def _read_records(path: str) -> list[str]:
    return [r["text"] for r in load(DataConfig(paths=[path], dedup="none"), kind="text").train]


def cloze_probe(model: Any, tokenizer: Any, texts: list[str], cfg: EvalConfig) -> dict[str, Any]:
    """Cloze accuracy asked the causal way, and the GLM way when the tokenizer has its tokens."""
    t = time.perf_counter()
    items = cloze_items(
        texts,
        tokenizer,
        cfg.cloze_items,
        span=cfg.cloze_span,
        choices=cfg.cloze_choices,
        context=cfg.cloze_context,
        seed=cfg.seed,
    )
    if not items:
        raise DataError(f"no cloze item could be built: texts shorter than {cfg.cloze_span + 8}")
    out: dict[str, Any] = {"n": len(items), "chance": 1 / cfg.cloze_choices}
    modes = ["causal"] + (["glm"] if glm_ids(tokenizer) is not None else [])
    for mode in modes:
        out[mode] = cloze_accuracy(model, tokenizer, items, mode, cfg.batch_size)
    out["seconds"] = round(time.perf_counter() - t, 2)
    return out


# --------------------------------------------------------------------------- samples


def read_prompts(path: str) -> list[dict[str, Any]]:
    """.txt: one prompt a line; JSONL: {"prompt": str} or {"messages": [...]} per line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such prompt file")
    out: list[dict[str, Any]] = []
    for n, line in read_lines(p):
        if not line.strip():
            continue
        if p.suffix != ".jsonl":
            out.append({"prompt": line})
            continue
        rec = read_json_line(line, f"{path}:{n}")
        if isinstance(rec, dict) and isinstance(rec.get("messages"), list):
            out.append({"messages": rec["messages"]})
        elif isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
            out.append({"prompt": rec["prompt"]})
        else:
            raise DataError(f"{path}:{n}: expected {{'prompt': str}} or {{'messages': [...]}}")
    return out


def generate_samples(
    model: Any, tokenizer: Any, prompts: list[dict[str, Any]], cfg: EvalConfig
) -> list[dict[str, Any]]:
    """One generation per prompt; chat-shaped prompts (or chat_template=true) use the template."""
    import torch

    device = next(model.parameters()).device
    samples = []
    for p in prompts:
        chat = "messages" in p or cfg.chat_template
        if chat:
            messages = p.get("messages") or [{"role": "user", "content": p["prompt"]}]
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            try:
                stops = stop_token_ids(tokenizer)
            except ValueError:  # a template hanlm does not know: its EOS still stops it
                stops = [tokenizer.eos_token_id]
        else:
            text = p["prompt"]
            stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None
        ids = tokenizer.encode(text, add_special_tokens=not chat)
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids], device=device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=device),
                max_new_tokens=cfg.max_new_tokens,
                do_sample=cfg.temperature > 0,
                temperature=cfg.temperature if cfg.temperature > 0 else None,
                top_p=None,
                top_k=None,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, len(ids) :].tolist()
        samples.append(
            {
                **p,
                "output": tokenizer.decode(new, skip_special_tokens=True),
                "new_tokens": len(new),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
    return samples


# --------------------------------------------------------------------------- contamination


def read_audit(path: str) -> dict[str, dict[str, str]]:
    """{bench name: {item id: clean | contaminated | partial | too_short}} from `hanlm eval
    contamination` output (its contamination.json, or the directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "contamination.json"
    if not p.is_file():
        raise DataError(f"{path}: no contamination audit here (run hanlm eval contamination)")
    data = json.loads(p.read_text(encoding="utf-8"))
    out: dict[str, dict[str, str]] = {}
    try:
        for name, b in data["benchmarks"].items():
            status = dict.fromkeys(b["audited"], "clean")
            # audits before too_short was its own group called those items "unchecked"
            short = b["too_short_ids"] if "too_short_ids" in b else b["unchecked_ids"]
            status.update(dict.fromkeys(short, "too_short"))
            status.update(dict.fromkeys(b["partial_ids"], "partial"))
            status.update(dict.fromkeys(b["flagged"], "contaminated"))
            out[name] = status
    except (KeyError, TypeError, AttributeError):
        raise DataError(f"{p}: not a hanlm contamination audit") from None
    return out


# --------------------------------------------------------------------------- run


def _fmt_acc(d: dict[str, Any]) -> str:
    return f"{d['accuracy']:.4f} (n={d['n']})" if d["n"] else "- (n=0)"


def _table(report: dict[str, Any]) -> str:
    lines = []
    for name, b in report["benchmarks"].items():
        fewer = b["fewer_shots"]
        shots = f"{b['shots']}-shot"
        if fewer["questions"]:
            shots += f" asked, {b['mean_shots']:g} on average"
        lines.append(
            f"{name} ({b['split']}, {shots}, {b['style']} prompts, {report['scoring']}): accuracy"
            f" {b['accuracy']:.4f}  macro {b['macro_accuracy']:.4f}  n={b['n']}"
            f"  chance {b['chance']:.2f}  {b['seconds']:.1f}s"
        )
        if fewer["questions"]:
            why = [f"{s} has {n} dev examples" for s, n in sorted(fewer["dev_too_small"].items())]
            if fewer["dropped_for_length"]:
                why.append(f"{fewer['dropped_for_length']} prompts too long for max_length")
            lines.append(
                f"  FEWER SHOTS for {fewer['questions']} of {b['n']} questions"
                f" (min {b['min_shots']}): {'; '.join(why)}"
            )
        for s, v in b["subjects"].items():
            lines.append(f"  {s:<24} {v['accuracy']:.4f}  n={v['n']}")
        c = b.get("contamination")
        if c:
            groups = "  ".join(f"{g.replace('_', ' ')} {_fmt_acc(c[g])}" for g in AUDIT_GROUPS)
            lines.append(f"  {groups}  unaudited {c['unaudited']}")
    for name, v in report.get("recite", {}).items():
        groups = "  ".join(f"{g} {x['bpc']} (n={x['n']})" for g, x in v["groups"].items())
        lines.append(f"recite {name}: bits/char of the reference answer {v['bpc']}  {groups}")
    for path, v in report["perplexity"].items():
        lines.append(
            f"perplexity {path}: ppl {v['ppl']:.3f}, bpc {v['bpc']:.4f}, {v['tokens']} tokens"
        )
    for path, v in report.get("cloze", {}).items():
        modes = "  ".join(f"{m} {v[m]['accuracy']:.4f}" for m in ("causal", "glm") if m in v)
        lines.append(f"cloze {path}: {modes}  n={v['n']}  chance {v['chance']:.2f}")
    if report.get("tool_use"):
        u = report["tool_use"]
        figures = "  ".join(f"{k} {u[k]}" for k in TOOL_FIGURES)
        lines.append(f"tools {u['set']} (n={u['n']}, {u['n_no_tool']} without a tool): {figures}")
    if report.get("samples"):
        lines.append(f"samples: {report['samples']['n']} -> {report['samples']['path']}")
    return "\n".join(lines)


def run(cfg: EvalConfig) -> Path:
    inputs = _read_inputs(cfg)
    with Run("eval", cfg, seed=cfg.seed) as run:
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(cfg.model.path)
        model = load_model(cfg.model).eval()
        model_max = getattr(model.config, "max_position_embeddings", None) or 2048
        max_len = min(cfg.max_length or model_max, model_max)
        report: dict[str, Any] = {
            "model": cfg.model.path,
            "split": canonical_split(cfg.split),
            "shots": cfg.shots,
            "scoring": cfg.scoring,
            "chat_template": cfg.chat_template,
            "max_length": max_len,
            "load_seconds": round(time.perf_counter() - t0, 2),
            "benchmarks": {},
            "perplexity": {},
            "samples": None,
        }
        _score_benchmarks(cfg, run, model, tokenizer, inputs, max_len, report)
        _recite(cfg, run, model, tokenizer, inputs, max_len, report)
        window = min(cfg.ppl_window, model_max)
        for path, text in inputs.texts.items():
            t = time.perf_counter()
            res = perplexity(model, tokenizer, text, window, min(cfg.ppl_stride, window))
            report["perplexity"][path] = {**res, "seconds": round(time.perf_counter() - t, 2)}
        if inputs.cloze_texts:
            report["cloze"] = {
                p: cloze_probe(model, tokenizer, recs, cfg)
                for p, recs in inputs.cloze_texts.items()
            }
        if inputs.tool_set:
            t = time.perf_counter()
            gen = model_generate(model, tokenizer, cfg.tools_max_new_tokens, cfg.batch_size)
            res = measure_tool_use(
                inputs.tool_set, gen, run.dir / "tool_use.jsonl", cfg.tools_max_rounds
            )
            report["tool_use"] = {
                "set": cfg.tools,
                "path": "tool_use.jsonl",
                **res,
                "seconds": round(time.perf_counter() - t, 2),
            }
        if inputs.prompts:
            samples = generate_samples(model, tokenizer, inputs.prompts, cfg)
            with open(run.dir / "samples.jsonl", "w", encoding="utf-8") as f:
                for s in samples:
                    f.write(json.dumps(s, ensure_ascii=False) + "\n")
            report["samples"] = {"path": "samples.jsonl", "n": len(samples)}
        report["seconds"] = round(time.perf_counter() - t0, 2)
        atomic_write_json(run.dir / "eval_report.json", report)
        run.finish(_headline(report))
    print(_table(report))
    return run.dir


@dataclass
class Inputs:
    """Everything `hanlm eval` reads besides the model: the benchmarks to score, the audit
    ({bench: {item id: group}}), the generation benchmarks to probe, the perplexity texts by
    path, the cloze texts by path and the sample prompts."""

    benches: list[Benchmark]
    audit: dict[str, dict[str, str]] | None
    recites: list[Benchmark]
    texts: dict[str, str]
    cloze_texts: dict[str, list[str]]
    prompts: list[dict[str, Any]]
    tool_set: list[dict[str, Any]]


def _read_inputs(cfg: EvalConfig) -> Inputs:
    """Every input, read and checked before the model loads, so that a bad path fails in a
    second, not a minute."""
    if not (cfg.bench or cfg.ppl or cfg.prompts or cfg.cloze or cfg.recite or cfg.tools):
        raise ConfigError(
            "nothing to evaluate: give bench=, ppl=, cloze=, recite=, tools= or prompts="
        )
    benches = [
        load_benchmark(s, cfg.split, cfg.shots, cfg.limit, dev_from_head=cfg.dev_from_head)
        for s in cfg.bench
    ]
    for b in benches:
        if b.layout == "qa":
            raise ConfigError(f"{b.name}: a generation (qa) task is for the audit, not scoring")
    if len({b.name for b in benches}) != len(benches):
        raise ConfigError(f"two benchmarks share a name: {[b.name for b in benches]}")
    if cfg.strict_shots:  # too few dev examples fails here, before the model loads
        for b in benches:
            check_dev_shots(b, cfg.shots, strict=True)
    audit = read_audit(cfg.contamination) if cfg.contamination else None
    recites = [load_benchmark(s, cfg.split, answers=False) for s in cfg.recite]
    for b in recites:
        if b.layout != "qa":
            raise ConfigError(f"recite: {b.name} is not a generation task; use qa:PATH")
    texts = {p: _read_texts(p, cfg.ppl_max_chars) for p in cfg.ppl}
    cloze_texts = {p: _read_records(p) for p in cfg.cloze}
    prompts = read_prompts(cfg.prompts) if cfg.prompts else []
    tool_set = read_tool_set(cfg.tools, cfg.tools_limit) if cfg.tools else []
    return Inputs(benches, audit, recites, texts, cloze_texts, prompts, tool_set)


def _score_benchmarks(
    cfg: EvalConfig,
    run: Run,
    model: Any,
    tokenizer: Any,
    inputs: Inputs,
    max_len: int,
    report: dict[str, Any],
) -> None:
    """Each multiple-choice benchmark scored into `report` (its predictions file beside it)."""
    audit = inputs.audit
    for step, bench in enumerate(inputs.benches):
        t = time.perf_counter()
        status = None if audit is None else audit.get(bench.name, {})
        out = run.dir / f"predictions-{bench.name}.jsonl"
        summary = evaluate_benchmark(model, tokenizer, bench, cfg, max_len, out, status)
        summary["seconds"] = round(time.perf_counter() - t, 2)
        report["benchmarks"][bench.name] = summary
        keys = ("accuracy", "macro_accuracy", "n", "seconds")
        run.log(step, bench=bench.name, **{k: summary[k] for k in keys})


def _recite(
    cfg: EvalConfig,
    run: Run,
    model: Any,
    tokenizer: Any,
    inputs: Inputs,
    max_len: int,
    report: dict[str, Any],
) -> None:
    """Each generation benchmark probed for memorisation into `report` (per contamination group
    with an audit)."""
    audit = inputs.audit
    for bench in inputs.recites:
        status = None if audit is None else audit.get(bench.name, {})
        enc = Encoder(tokenizer, cfg.chat_template)
        report.setdefault("recite", {})[bench.name] = recite_probe(
            model,
            tokenizer,
            bench.items,
            lambda q, a, enc=enc: (enc.ids(enc.text(q)), enc.ids(enc.text(q) + a)),
            run.dir / f"recite-{bench.name}.jsonl",
            status,
            cfg.recite_limit,
            cfg.batch_size,
            max_len,
        )


def _headline(report: dict[str, Any]) -> dict[str, Any]:
    """The summary in hanlm.json: each benchmark's accuracy, each text's bits per character,
    each recitation's bits per character and each cloze accuracy."""
    return {
        **{f"{n}/accuracy": b["accuracy"] for n, b in report["benchmarks"].items()},
        **{f"ppl/{p}/bpc": v["bpc"] for p, v in report["perplexity"].items()},
        **{f"recite/{n}/bpc": v["bpc"] for n, v in report.get("recite", {}).items()},
        **{
            f"cloze/{p}/{mode}": v[mode]["accuracy"]
            for p, v in report.get("cloze", {}).items()
            for mode in ("causal", "glm")
            if mode in v
        },
        **{f"tools/{k}": v for k, v in report.get("tool_use", {}).items() if k in TOOL_FIGURES},
        "report": "eval_report.json",
    }
