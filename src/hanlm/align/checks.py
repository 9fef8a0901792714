"""Judges that are not the optimisation target: rule checks of answers and collapse detectors.

A proxy reward model that a policy is optimised against cannot judge that policy (Gao et al.
2022): the policy finds strings the proxy over-scores. Alignment stages therefore measure their
held-out answers with judges they were not trained on:

- a gold reward model (`gold_reward_model=DIR`: trained on a disjoint half of the preferences;
  scored by `hanlm.align.rewards.Scorer`, never part of the training reward);
- `check_answer`: rule checks of the defects the embedded preference data was built from (echo of
  the question, truncation, looping, scrambled characters, off-topic, missing stop) and whether
  the answer contains the known correct line or explanation;
- `collapse`: distinct answers per prompt, the share of the most frequent answer, answers given
  to several different prompts, and the mean length — a policy that found one string its proxy
  loves answers every prompt with it.

Pure Python (no model), so the checks are cheap and deterministic.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any

DEFECTS = ("echo", "truncated", "looping", "scrambled", "off_topic", "no_stop")

_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f"
_QUOTED = re.compile(r"「([^」]+)」")
_HAN_RUN = re.compile(f"[{_HAN}]+")
_KEEP = re.compile(r"[\w]", re.UNICODE)


def _norm(text: str) -> str:
    """Letters, digits and Han characters only, NFKC and lower case: punctuation, spaces and
    full/half-width differences do not make two answers different."""
    text = unicodedata.normalize("NFKC", text).lower()
    return "".join(_KEEP.findall(text)).replace("_", "")


def core(text: str) -> str:
    """What an answer says, without its wrapper: the first 「quoted」 part if any, else the
    whole text; normalised."""
    m = _QUOTED.search(text)
    return _norm(m.group(1) if m else text)


def _question_terms(prompt: str) -> list[str]:
    """The Han runs of the prompt that name what is asked about (the line or the word), longest
    first; the question's own wording (「的下一句是什么」) is shorter than the line it quotes."""
    quoted = _QUOTED.findall(prompt)
    runs = quoted or _HAN_RUN.findall(prompt)
    return sorted((_norm(r) for r in runs if len(_norm(r)) >= 2), key=len, reverse=True)


def _loops(text: str) -> bool:
    """Degenerate repetition: a fragment of 1-4 characters repeated 3+ times in a row, or a long
    answer made of very few distinct characters."""
    if re.search(r"(.{1,4}?)\1{2,}", text):
        return True
    return len(text) >= 12 and len(set(text)) <= len(text) // 4


def check_answer(
    prompt: str, answer: str, reference: str | None = None, stopped: bool = True
) -> dict[str, Any]:
    """Rule checks of one answer: `{"defects": [...], "correct": bool | None}`.

    `correct` says whether the answer contains the reference's core (the quoted line, or the
    whole reference); None when there is no reference. Defects other than `no_stop` and
    `looping` need the reference to be told apart from a right answer.
    """
    a = core(answer)
    ref = core(reference) if reference else ""
    defects: list[str] = []
    if not stopped:
        defects.append("no_stop")
    if _loops(_norm(answer)):
        defects.append("looping")
    correct = None
    if ref:
        correct = bool(a) and ref in _norm(answer) and "looping" not in defects
        terms = _question_terms(prompt)
        if not correct and "looping" not in defects:
            if a and ((len(a) >= 2 and a in _norm(prompt)) or (terms and terms[0] in a)):
                defects.append("echo")
            if a and len(a) < len(ref) and ref.startswith(a):
                defects.append("truncated")
            elif a and a != ref and sorted(a) == sorted(ref):
                defects.append("scrambled")
            elif not defects and _overlap(a, ref) < 0.2:
                defects.append("off_topic")
    return {"defects": defects, "correct": correct}


def _overlap(a: str, b: str) -> float:
    """Share of `b`'s characters (with multiplicity) that `a` also has."""
    if not b:
        return 0.0
    common = sum((Counter(a) & Counter(b)).values())
    return common / len(b)


def collapse(prompts: list[str], answers: list[str]) -> dict[str, float]:
    """Collapse detectors over held-out answers (one per prompt).

    - `distinct_answers`: distinct (normalised) answers / answers (1 = all different);
    - `top_answer_share`: the share of the most frequent answer;
    - `shared_answer_rate`: the share of answers that were also given to a different prompt
      (prompt dependence: 0 when every answer is specific to its prompt);
    - `length`: mean answer length in characters.
    """
    n = len(answers)
    if n == 0:
        return {}
    normed = [_norm(a) for a in answers]
    counts = Counter(normed)
    prompts_of: dict[str, set[str]] = {}
    for p, a in zip(prompts, normed):
        prompts_of.setdefault(a, set()).add(_norm(p))
    shared = sum(1 for a in normed if len(prompts_of[a]) > 1)
    return {
        "distinct_answers": len(counts) / n,
        "top_answer_share": counts.most_common(1)[0][1] / n,
        "shared_answer_rate": shared / n,
        "length": sum(len(a) for a in answers) / n,
    }


def judge_answers(
    prompts: list[str],
    answers: list[str],
    references: list[str | None],
    stopped: list[bool],
) -> dict[str, float]:
    """Rule checks and collapse detectors over held-out answers, as figures for `hanlm.json`:
    `defect_rate` (answers with any defect), `defect_<kind>` shares, `correct` (share of answers
    containing the known right answer, where references exist) and the `collapse` figures."""
    n = len(answers)
    if n == 0:
        return {}
    checks = [check_answer(p, a, r, s) for p, a, r, s in zip(prompts, answers, references, stopped)]
    out: dict[str, float] = {"defect_rate": sum(bool(c["defects"]) for c in checks) / n}
    for kind in DEFECTS:
        out[f"defect_{kind}"] = sum(kind in c["defects"] for c in checks) / n
    known = [c["correct"] for c in checks if c["correct"] is not None]
    if known:
        out["correct"] = sum(known) / len(known)
    out.update(collapse(prompts, answers))
    return out


def warnings_for(initial: dict[str, float], final: dict[str, float]) -> list[str]:
    """Plain-language warnings from held-out figures before and after alignment: the proxy score
    rose while the gold score fell (over-optimisation), or the answers collapsed."""
    out = []
    proxy_key = "rm_score" if "rm_score" in final else "score"
    if {proxy_key, "gold_score"} <= set(initial) & set(final):
        proxy = final[proxy_key] - initial[proxy_key]
        gold = final["gold_score"] - initial["gold_score"]
        if proxy > 0 and gold < 0:
            out.append(
                f"over-optimisation: the proxy score rose by {proxy:.3f} while the gold judge"
                f" fell by {-gold:.3f}"
            )
    if "distinct_answers" in initial and "distinct_answers" in final:
        before, after = initial["distinct_answers"], final["distinct_answers"]
        if after < 0.5 * before:
            out.append(
                f"collapse: distinct answers fell from {before:.0%} to {after:.0%} of prompts"
            )
    if final.get("top_answer_share", 0) >= 0.25 and final["top_answer_share"] > 2 * initial.get(
        "top_answer_share", 0
    ):
        out.append(
            f"collapse: one answer is given to {final['top_answer_share']:.0%} of the prompts"
        )
    proxy_rose = final.get(proxy_key, 0) > initial.get(proxy_key, 0)
    for kind in DEFECTS:
        key = f"defect_{kind}"
        if proxy_rose and final.get(key, 0) >= initial.get(key, 0) + 0.25:
            out.append(
                f"the proxy score rose with more {kind.replace('_', ' ')} answers"
                f" ({initial.get(key, 0):.0%} -> {final[key]:.0%})"
            )
    fewer_correct = final.get("correct", 1) < initial.get("correct", 0)
    if fewer_correct and proxy_rose:
        out.append(
            f"the proxy score rose but correct answers fell from {initial['correct']:.0%}"
            f" to {final['correct']:.0%}"
        )
    return out


TREND_KEYS = ("reward_first_quarter", "reward_last_quarter", "reward_change_sem")


def reward_trend(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """How the reward PPO's updates raise (each step's mean score - β·KL of its rollouts) moved:
    its mean over the first and over the last quarter of the steps, and the standard error of
    the difference (the steps taken as independent). None for fewer than 8 steps. A step logged
    twice (the rows between a checkpoint and a kill, logged again after the resume) counts once,
    with its last row."""
    by_step = {r["step"]: float(r["reward"]) for r in rows if "reward" in r}
    values = [by_step[s] for s in sorted(by_step)]
    if len(values) < 8:
        return None
    q = len(values) // 4
    first, last = values[:q], values[-q:]

    def mean_var(xs: list[float]) -> tuple[float, float]:
        m = sum(xs) / len(xs)
        return m, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)

    (m1, v1), (m2, v2) = mean_var(first), mean_var(last)
    return dict(zip(TREND_KEYS, (m1, m2, ((v1 + v2) / q) ** 0.5)))


def trend_warnings(trend: dict[str, float] | None, ptx: bool) -> list[str]:
    """A warning when PPO lowered the reward its updates raise by more than twice the standard
    error: the optimiser is not doing what it is for."""
    if trend is None:
        return []
    a, b = trend["reward_first_quarter"], trend["reward_last_quarter"]
    if b - a >= -2 * trend["reward_change_sem"]:
        return []
    why = (
        "the pretraining mix may be pulling harder than the reward: compare the ptx-alone control"
        " (pg_coef=0) or lower ptx_coef"
        if ptx
        else "lower train.lr or raise kl_coef"
    )
    return [
        f"PPO lowered its own objective: the rollouts' reward (score - β·KL) fell from {a:.3f}"
        f" (first quarter of the steps) to {b:.3f} (last quarter); {why}"
    ]
