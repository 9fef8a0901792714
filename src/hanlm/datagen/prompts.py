"""What `hanlm data self-instruct` (`hanlm.datagen.selfinstruct`) asks the endpoint and how it
reads what comes back: the built-in Chinese prompt templates, the parsers of the replies
(numbered lists of tasks in Chinese or English numbering; answers labelled 输入/输出), and the
seed tasks read from a file."""

from __future__ import annotations

import re

from hanlm.data.sources import BadJson, DataError, iter_source, resolve

INSTRUCTION_PROMPT = """你需要想出{n}个多样的任务指令，交给一个中文语言模型去完成。要求：
1. 指令不要重复，用词要多样，不要只是换个说法；
2. 任务类型要多样：开放式生成、分类、改写、翻译、问答、推理、写作、编程、建议等；
3. 语言模型只能处理文字：不要让它画图、看图片、听音频、上网或操作文件；
4. 每条指令用中文写，一到两句话，可以是问句，也可以是祈使句；
5. 按编号列出，每行一条，不要写答案。

例子：
{examples}

请从 {next} 开始编号，写出 {n} 个新的任务指令："""

ANSWER_PROMPT = """请完成下面的任务。如果任务需要一段输入材料（比如要翻译的句子、要分类的文本），\
先写“输入：”和你编写的输入，再写“输出：”和答案；不需要输入时，只写“输出：”和答案。

任务：{instruction}"""

USER_SIDE_PROMPT = """下面是用户和 AI 助手的对话。请你扮演用户，写出用户的下一句话（追问、\
换个角度提问或者回应助手），只写这句话本身。如果话题已经聊完了，只回复 {end}。

{transcript}

用户的下一句话："""

# "1." "1、" "1)" "(1)" "（1）" "一、" "第1条：" "Instruction 1:" -- the numbering of one item.
_CN_NUM = "一二三四五六七八九十百零〇两"
_ITEM = re.compile(
    r"^\s*(?:[-*•]\s*)?(?:\*\*)?"
    r"(?:"
    rf"[\(（]\s*(?:\d+|[{_CN_NUM}]+)\s*[\)）]"  # (1) （一）
    rf"|第\s*(?:\d+|[{_CN_NUM}]+)\s*[条个题项]?\s*[\.．、:：]?"  # 第1条：
    r"|(?:instruction|task|指令|任务)\s*\d+\s*[\.．、:：]"  # Instruction 1: / 任务1：
    rf"|(?:\d+|[{_CN_NUM}]+)\s*(?:[\.．、:：\)）](?!\d)|\s)"  # 1. 1、 1) 一、 (not 1.5)
    r")\s*(?:\*\*)?\s*(?:(?:instruction|指令|任务)\s*[:：]\s*)?(?P<text>.+?)\s*$",
    re.IGNORECASE,
)


def parse_numbered(reply: str) -> list[str]:
    """The numbered items of a reply, in order, numbering and list markup removed. Unnumbered
    lines are no items (a preamble, or an answer the model wrote by mistake)."""
    items = []
    for line in reply.splitlines():
        m = _ITEM.match(line)
        if m:
            text = m.group("text").strip().strip("*").strip()
            if text:
                items.append(text)
    return items


_LABELS = re.compile(
    r"^\s*(?:\*\*)?(输入|输出|input|output)(?:\*\*)?\s*[:：]\s*(?:\*\*)?\s*", re.I | re.M
)


def parse_answer(reply: str) -> tuple[str, str]:
    """(input, output) from an answer written as 输入：…输出：…; unlabelled text is all output."""
    parts = _LABELS.split(reply)
    if len(parts) == 1:
        return "", reply.strip()
    found: dict[str, str] = {}
    for label, text in zip(parts[1::2], parts[2::2]):
        key = "input" if label.lower() in ("输入", "input") else "output"
        found.setdefault(key, text.strip())
    if "output" not in found:  # only an input label: treat everything as the output
        return "", reply.strip()
    extra = found.get("input", "")
    # "无" / "none": the model saying the task needs no input
    if extra.strip("。.（）() ").lower() in (
        "",
        "无",
        "没有",
        "none",
        "n/a",
        "<noinput>",
        "不需要",
    ):
        extra = ""
    return extra, found["output"]


def seed_texts(path: str) -> list[str]:
    """Seed tasks or questions, one per record: instruction (+ input), prompt, question, text,
    or the first user turn of a messages record; a .txt file is one per line."""
    out: list[str] = []
    for source in resolve(path):
        for raw, loc in iter_source(source, "line"):
            if isinstance(raw, BadJson):
                raise DataError(f"{loc}: {raw.reason}")
            if isinstance(raw, dict):
                text = None
                for key in ("instruction", "prompt", "question", "text"):
                    if isinstance(raw.get(key), str) and raw[key].strip():
                        text = raw[key]
                        if key == "instruction" and str(raw.get("input") or "").strip():
                            text += "\n" + raw["input"]
                        break
                if text is None and isinstance(raw.get("messages"), list):
                    text = next(
                        (m.get("content") for m in raw["messages"] if m.get("role") == "user"),
                        None,
                    )
            else:
                text = raw if isinstance(raw, str) else None
            if not isinstance(text, str) or not text.strip():
                raise DataError(
                    f"{loc}: expected a seed task: {{'instruction': ...}}, {{'prompt': ...}},"
                    f" {{'question': ...}} or a line of text; found {str(raw)[:80]!r}"
                )
            out.append(text.strip())
    if not out:
        raise DataError(f"{path}: no seed tasks")
    return out
