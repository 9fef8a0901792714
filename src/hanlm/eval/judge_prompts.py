"""The prompts of `hanlm judge` (Chinese and English, written for hanlm) and the parsers of the
judge's verdicts.

Their structure follows MT-bench's judge prompts: one prompt grades a single answer on 1-10, one
compares two answers; each has a variant with a reference answer (math, reasoning, coding) and a
multi-turn variant where the judge sees the whole conversation and grades the second answer. The
verdict comes in a fixed form: `[[7]]` for a grade, `[[A]]`, `[[B]]` or `[[C]]` (a tie) for a
comparison. A reply without exactly one verdict of that form (or with several that differ, or
a grade outside 1-10) is unparseable: `parse_score` / `parse_verdict` return None and nothing is
guessed.
"""

from __future__ import annotations

import re
from typing import Literal

Lang = Literal["zh", "en"]
Message = dict[str, str]

SYSTEM = {
    "zh": "你是一位公正、严谨的评审，负责评价AI助手的回答。",
    "en": "You are a fair and careful reviewer of AI assistants' answers.",
}

_SINGLE = {
    "zh": (
        "请评价下面AI助手{which}的质量。综合考虑回答是否有用、切题、准确，是否有深度和创意，"
        "细节是否充分。{ref_note}先写几句简短、客观的评语，再给出1到10之间的整数评分。"
    ),
    "en": (
        "Grade the quality of {which} below. Weigh how helpful, relevant and accurate it is, its"
        " depth, creativity and level of detail. {ref_note}First write a short, objective comment"
        " in a few sentences, then give an integer grade from 1 to 10."
    ),
}
_PAIR = {
    "zh": (
        "请比较两位AI助手{which}，判断哪一个更好。综合考虑回答是否有用、切题、准确，是否有深度和"
        "创意，细节是否充分。{ref_note}不要让两个回答出现的先后顺序、回答的长短或助手的名称影响"
        "你的判断，尽量客观。先简要比较两者，再给出结论：A（助手A更好）、B（助手B更好）或"
        "C（两者不相上下）。"
    ),
    "en": (
        "Compare {which} of two AI assistants and decide which is better. Weigh how helpful,"
        " relevant and accurate each is, its depth, creativity and level of detail. {ref_note}"
        "Do not let the order in which the answers appear, their length or the assistants' names"
        " sway you; be as objective as you can. First compare the two briefly, then give your"
        " verdict: A (assistant A is better), B (assistant B is better) or C (a tie)."
    ),
}
# The form of the reply, given after the material: small judges copy a verdict written out in
# full ("[[A]]" if ...) instead of giving one, so the form names the choices without one.
REPLY_FORM = {
    ("zh", "single"): "请按以下格式回答：\n评语：（几句话）\n评分：[[n]]（n 为1到10之间的整数）",
    ("zh", "pair"): "请按以下格式回答：\n比较：（一两句话）\n结论：[[X]]（X 为 A、B 或 C）",
    ("en", "single"): (
        "Reply in this form:\nComment: (a few sentences)\nGrade: [[n]] (n an integer from 1 to 10)"
    ),
    (
        "en",
        "pair",
    ): "Reply in this form:\nComparison: (a sentence or two)\nVerdict: [[X]] (X is A, B or C)",
}
_WHICH = {  # (single turn, second turn) x (single, pair)
    "zh": {
        ("single", 1): "对用户问题的回答",
        ("single", 2): "在下面这段对话中对用户第二个问题的回答（只评价这一回答）",
        ("pair", 1): "对同一个用户问题的回答",
        ("pair", 2): "在各自的对话中对用户第二个问题的回答（只比较这一回答）",
    },
    "en": {
        ("single", 1): "the AI assistant's answer to the user's question",
        ("single", 2): (
            "the AI assistant's answer to the user's second question in the conversation below"
            " (grade that answer only)"
        ),
        ("pair", 1): "the answers to the same user question",
        ("pair", 2): (
            "the answers to the user's second question, each in its own conversation (compare"
            " those answers only)"
        ),
    },
}
_REF_NOTE = {
    "zh": "下面附有参考答案：先把回答与参考答案对照，指出其中的错误，再下结论。",
    "en": "A reference answer is given below: check the answers against it, name any mistakes,"
    " then conclude. ",
}
_LABELS = {
    "zh": {
        "question": "问题",
        "user": "用户",
        "assistant": "助手",
        "answer": "助手{x}的回答",
        "conversation": "与助手{x}的对话",
        "the_answer": "助手的回答",
        "the_conversation": "对话",
        "reference": "参考答案",
        "reference_turn": "第{n}个问题的参考答案",
        "begin": "开始",
        "end": "结束",
    },
    "en": {
        "question": "Question",
        "user": "User",
        "assistant": "Assistant",
        "answer": "Answer of assistant {x}",
        "conversation": "Conversation with assistant {x}",
        "the_answer": "The assistant's answer",
        "the_conversation": "The conversation",
        "reference": "Reference answer",
        "reference_turn": "Reference answer to question {n}",
        "begin": "begins",
        "end": "ends",
    },
}


def _block(lang: Lang, title: str, body: str) -> str:
    t = _LABELS[lang]
    sep = "" if lang == "zh" else " "
    return f"[{title}{sep}{t['begin']}]\n{body}\n[{title}{sep}{t['end']}]"


def _conversation(lang: Lang, questions: list[str], answers: list[str]) -> str:
    t = _LABELS[lang]
    parts = []
    for q, a in zip(questions, answers):
        parts += [f"### {t['user']}:\n{q}", f"### {t['assistant']}:\n{a}"]
    return "\n\n".join(parts)


def _references(lang: Lang, turn: int, reference: list[str] | None) -> list[str]:
    if not reference:
        return []
    t = _LABELS[lang]
    if turn == 1:
        return [_block(lang, t["reference"], reference[0])]
    return [_block(lang, t["reference_turn"].format(n=i + 1), r) for i, r in enumerate(reference)]


def single_messages(
    lang: Lang,
    questions: list[str],
    answers: list[str],
    turn: int,
    reference: list[str] | None = None,
) -> list[Message]:
    """The judge's request to grade the answer of `turn` (1 or 2): the question and answer, or
    for turn 2 the whole conversation; the reference answer(s) when the category has them."""
    t = _LABELS[lang]
    intro = _SINGLE[lang].format(
        which=_WHICH[lang][("single", turn)], ref_note=_REF_NOTE[lang] if reference else ""
    )
    if turn == 1:
        body = [
            _block(lang, t["question"], questions[0]),
            _block(lang, t["the_answer"], answers[0]),
        ]
    else:
        conversation = _conversation(lang, questions[:2], answers[:2])
        body = [_block(lang, t["the_conversation"], conversation)]
    parts = [intro, *_references(lang, turn, reference), *body, REPLY_FORM[lang, "single"]]
    return [
        {"role": "system", "content": SYSTEM[lang]},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


def pair_messages(
    lang: Lang,
    questions: list[str],
    first: list[str],
    second: list[str],
    turn: int,
    reference: list[str] | None = None,
) -> list[Message]:
    """The judge's request to compare `first` (shown as assistant A) with `second` (B) on
    `turn`; for turn 2 each assistant's whole conversation is shown."""
    t = _LABELS[lang]
    intro = _PAIR[lang].format(
        which=_WHICH[lang][("pair", turn)], ref_note=_REF_NOTE[lang] if reference else ""
    )
    if turn == 1:
        body = [
            _block(lang, t["question"], questions[0]),
            _block(lang, t["answer"].format(x="A"), first[0]),
            _block(lang, t["answer"].format(x="B"), second[0]),
        ]
    else:
        body = [
            _block(lang, t["conversation"].format(x=x), _conversation(lang, questions[:2], ans[:2]))
            for x, ans in (("A", first), ("B", second))
        ]
    parts = [intro, *_references(lang, turn, reference), *body, REPLY_FORM[lang, "pair"]]
    return [
        {"role": "system", "content": SYSTEM[lang]},
        {"role": "user", "content": "\n\n".join(parts)},
    ]


_SCORE = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")
# The reply form's verdict line ("评分：7", "结论：B（助手B更好）", "Verdict: [[A]]"), at the start
# of a line or after a sentence: the label, then the grade or the letter alone (brackets
# optional), then the end, a full stop or a parenthesis. Prose ("so A is better") is not read.
_AFTER = r"(?=\s*(?:$|[。.，,;；（(]))"
_SCORE_LINE = re.compile(
    r"(?:^|(?<=[。.！!\s]))(?:评分|grade)\s*[:：]\s*\[{0,2}\s*(\d+(?:\.\d+)?)\s*\]{0,2}\s*分?"
    + _AFTER,
    re.M | re.I,
)
_VERDICT_LINE = re.compile(
    r"(?:^|(?<=[。.！!\s]))(?:结论|verdict)\s*[:：]\s*\[{0,2}\s*([ABC])\s*\]{0,2}" + _AFTER,
    re.M | re.I,
)


def parse_score(text: str) -> float | None:
    """The grade in `[[n]]` or on the form's `评分：n` / `Grade: n` line (1-10); None when there
    is none, several that differ, or one out of range."""
    text = text or ""
    found = {float(m) for m in _SCORE.findall(text) + _SCORE_LINE.findall(text)}
    if len(found) != 1:
        return None
    score = found.pop()
    return score if 1 <= score <= 10 else None


def parse_verdict(text: str) -> str | None:
    """ "A", "B" or "tie" from `[[A]]`, `[[B]]`, `[[C]]` or the form's `结论：A` / `Verdict: A`
    line; None when there is none or several that differ."""
    text = text or ""
    found = set(_VERDICT.findall(text) + _VERDICT_LINE.findall(text))
    if len(found) != 1:
        return None
    v = found.pop()
    return "tie" if v == "C" else v
