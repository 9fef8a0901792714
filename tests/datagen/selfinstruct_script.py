"""What the tiny model behind the self-instruct tests is taught, for short prompt templates, what a good
instruction writer would say: a numbered list mixing usable, blacklisted, too short and
near-duplicate instructions, answers with and without an input, and both sides of two chats.
Greedy decoding then makes every filter count known in advance. (A module with its own name:
test files cannot import from a conftest when several directories have one.)"""

from __future__ import annotations

import itertools

API_KEY = "datagen-key"
INSTRUCTION_PROMPT = "例子：\n{examples}\n从{next}开始写{n}个新任务："
ANSWER_PROMPT = "做这个任务：{instruction}"
USER_PROMPT = "对话：\n{transcript}\n用户下一句（结束写{end}）："
SEEDS = ["写一个关于猫的笑话。", "解释什么是光合作用。", "列出三种水果。"]
LIST_REPLY = (
    "3. 写一首关于春天的五言诗。\n"
    "4. 画一幅山水画。\n"
    "5. 好的\n"
    "6. 写一首关于春天的五言诗歌。\n"
    "7. 把这句话翻译成英文：我爱北京。"
)
KEPT = ["写一首关于春天的五言诗。", "把这句话翻译成英文：我爱北京。"]
ANSWERS = {KEPT[0]: "输出：春风吹绿柳。", KEPT[1]: "输入：我爱北京\n输出：I love Beijing."}
QUESTIONS = ["你好吗？", "今天天气怎么样？", "你好吗"]  # the third is a near duplicate
CHAT = {
    ("你好吗？",): "我很好，谢谢！",
    ("你好吗？", "我很好，谢谢！", "你喜欢诗吗？"): "喜欢，尤其是唐诗。",
    ("今天天气怎么样？",): "今天是晴天。",
}
USER_SIDE = {
    "用户：你好吗？\n助手：我很好，谢谢！": "你喜欢诗吗？",
    "用户：你好吗？\n助手：我很好，谢谢！\n用户：你喜欢诗吗？\n助手：喜欢，尤其是唐诗。": "[END]",
    "用户：今天天气怎么样？\n助手：今天是晴天。": "[END]",
}


def teaching_chats() -> list[list[dict[str, str]]]:
    def one(prompt: str, reply: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]

    chats = []
    for pair in itertools.permutations(SEEDS, 2):  # prompt_tasks=2 drawn from the seeds
        examples = "\n".join(f"{i}. {t}" for i, t in enumerate(pair, 1))
        chats.append(one(INSTRUCTION_PROMPT.format(examples=examples, next=3, n=5), LIST_REPLY))
    chats += [one(ANSWER_PROMPT.format(instruction=k), v) for k, v in ANSWERS.items()]
    for turns, reply in CHAT.items():
        roles = ["user", "assistant"] * 2
        msgs = [{"role": r, "content": c} for r, c in zip(roles, turns)]
        chats.append([*msgs, {"role": "assistant", "content": reply}])
    for transcript, line in USER_SIDE.items():
        chats.append(one(USER_PROMPT.format(transcript=transcript, end="[END]"), line))
    return chats
