"""Self-instruct's pure parts: numbered-list parsing (Chinese and English numbering), answer
parsing, the unusable-instruction filter, and character-level ROUGE-L against hand-computed
values and a plain dynamic-programming LCS."""

from __future__ import annotations

import random

import numpy as np
import pytest

from hanlm.datagen.rouge import RougePool, lcs_length, rouge_l, tokens
from hanlm.datagen.selfinstruct import (
    SelfInstructConfig,
    _base_url,
    instruction_problem,
    parse_answer,
    parse_numbered,
)


def test_numbered_lists_in_chinese_and_english_numbering():
    reply = """好的，下面是新的任务：
4. 写一首关于春天的五言绝句。
5、把“我爱北京”翻译成英文。
(6) 解释成语“画蛇添足”的意思。
（7）列出三种常见的水果。
八、用一句话总结《论语》。
第9条：比较猫和狗作为宠物的优缺点。
10) Write a haiku about the sea.
**11.** 给出一个减肥建议。
- 12. 解释 1.5 倍速播放的含义。
Instruction 13: Name three rivers in China.
任务14：判断下面句子的情感。
3.14 是圆周率的近似值
这一行没有编号，应被忽略。"""
    assert parse_numbered(reply) == [
        "写一首关于春天的五言绝句。",
        "把“我爱北京”翻译成英文。",
        "解释成语“画蛇添足”的意思。",
        "列出三种常见的水果。",
        "用一句话总结《论语》。",
        "比较猫和狗作为宠物的优缺点。",
        "Write a haiku about the sea.",
        "给出一个减肥建议。",
        "解释 1.5 倍速播放的含义。",
        "Name three rivers in China.",
        "判断下面句子的情感。",
    ]
    assert parse_numbered("你好！我是小龙，喜欢写诗。") == []


def test_answers_with_and_without_input_labels():
    assert parse_answer("输入：我爱你\n输出：I love you.") == ("我爱你", "I love you.")
    assert parse_answer("**输入：** 无\n**输出：** 春眠不觉晓。") == ("", "春眠不觉晓。")
    assert parse_answer("Input: 1+1\nOutput: 2") == ("1+1", "2")
    assert parse_answer("直接的回答，没有标签。") == ("", "直接的回答，没有标签。")
    assert parse_answer("输出：只有输出") == ("", "只有输出")


def test_unusable_instructions_are_named():
    cfg = SelfInstructConfig(seeds="x")
    assert instruction_problem("写诗", cfg) == "too_short"
    assert instruction_problem("写" * 151, cfg) == "too_long"
    assert instruction_problem("画一幅山水画并配上一首诗", cfg) == "blacklisted"
    assert instruction_problem("Draw a picture of a cat.", cfg) == "blacklisted"
    assert instruction_problem("把这张图片里的文字念出来", cfg) == "blacklisted"
    assert instruction_problem("，写一首关于秋天的诗", cfg) == "starts_with_punctuation"
    assert instruction_problem("写一首关于秋天的诗", cfg) is None
    assert instruction_problem("Write a poem about autumn.", cfg) is None


def test_endpoint_urls():
    assert _base_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert _base_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000/v1"
    assert _base_url("https://api.example.com/api/v3") == "https://api.example.com/api/v3"


def _dp_lcs(a, b):
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_rouge_l_by_hand():
    # each Chinese character is a token; punctuation is not
    assert tokens("写一首诗，Write a POEM!") == ["写", "一", "首", "诗", "write", "a", "poem"]
    # 写一首关于X天的诗 vs Y: LCS 8 of 9 and 9 -> 2*8/18
    assert rouge_l("写一首关于春天的诗", "写一首关于秋天的诗") == pytest.approx(16 / 18)
    # 翻译这句话 (5) vs 把下面的句子翻译成英文 (11): LCS 翻译 = 2 -> 4/16
    assert rouge_l("翻译这句话", "把下面的句子翻译成英文") == pytest.approx(0.25)
    # words for Latin text, case-insensitive: "the cat sat" vs "The cat ran away": LCS 2
    assert rouge_l("the cat sat", "The cat ran away") == pytest.approx(4 / 7)
    assert rouge_l("", "任何") == 0.0 and rouge_l("完全相同。", "完全相同") == 1.0


def test_rouge_pool_equals_plain_lcs_short_and_long():
    rng = random.Random(0)
    alphabet = "春夏秋冬天地人abc"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 90))) for _ in range(90)]
    pool = RougePool(texts[:60])
    for cand in texts[60:]:  # lengths up to 90 tokens: both the uint64 and the wide path
        want = [
            2 * _dp_lcs(tokens(cand), tokens(t)) / (len(tokens(cand)) + len(tokens(t)))
            for t in texts[:60]
        ]
        assert np.allclose(pool.scores(cand), want)
    for _ in range(200):
        a, b = (rng.choices(alphabet, k=rng.randint(0, 70)) for _ in range(2))
        assert lcs_length(a, b) == _dp_lcs(a, b)
    score, near = pool.max_score(texts[5])
    assert score == 1.0 and near == texts[5]
    assert RougePool().max_score("空的") == (0.0, None)
    # a token no kept text has matches nothing
    assert RougePool(["春天"]).scores("冬天").tolist() == [0.5]
