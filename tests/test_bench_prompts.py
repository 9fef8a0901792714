"""Prompts as the reference scripts build them, the shipped subject tables, and split aliases.

The expected prompts are typed from the reference scripts, not produced by hanlm:
- C-Eval: C-Eval's `code/evaluator_series/evaluators/llama.py` and Chinese-LLaMA-Alpaca-2's
  `scripts/ceval/llama_evaluator.py` (format_example; generate_few_shot_prompt): the header
  `以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。` only with shots, the subject as its
  file name; each example `question\\nA. …\\nB. …\\nC. …\\nD. …\\n答案：` (+ `B\\n\\n` for a shot).
- CMMLU: CMMLU's `src/mp_utils.py` (format_example, gen_prompt): always the header
  `以下是关于{中文名}的单项选择题，请直接给出正确答案的选项。`, `题目：` before and `\\n答案是：` after.
- MMLU: hendrycks' `evaluate_hf.py` (format_subject, format_example, gen_prompt): always the header,
  `about` + format_subject (a space before each word: two spaces), `\\nAnswer:` + ` B\\n\\n`.
"""

import json

import pytest

from hanlm.eval.benchmarks import (
    build_prompt,
    canonical_split,
    load_benchmark,
    pick_style,
    subject_table,
)
from hanlm.pipeline import cli
from hanlm.testing import write_csv

Q1 = ("TCP 属于哪一层协议？", "应用层", "传输层", "网络层", "物理层", "B")
Q2 = ("HTTP 的默认端口是？", "21", "25", "80", "443", "C")
Q3 = ("「床前明月光」的下一句是？", "疑是地上霜", "低头思故乡", "举头望明月", "黄河入海流", "A")
EN1 = ("What is 2 + 2?", "3", "4", "5", "22", "B")
EN2 = ("What is 3 * 3?", "6", "9", "12", "33", "B")
EN3 = ("Which number is prime?", "4", "6", "7", "9", "C")


def make_ceval(root, val_dir="val"):
    """C-Eval's official layout (as in ceval-exam.zip: no subject_mapping.json)."""
    head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    write_csv(root / "dev/computer_network_dev.csv", [[0, *Q1, "解析"], [1, *Q2, ""]], head)
    write_csv(root / f"{val_dir}/computer_network_val.csv", [[0, *Q3, ""]], head)
    write_csv(root / "test/computer_network_test.csv", [[0, *Q1[:5]]], head[:6])
    return root


def make_cmmlu(root):
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(root / "dev/agronomy.csv", [[0, *Q1], [1, *Q2]], head)
    write_csv(root / "test/agronomy.csv", [[0, *Q3]], head)
    write_csv(root / "dev/chinese_history.csv", [[0, *Q2]], head)
    write_csv(root / "test/chinese_history.csv", [[0, *Q1]], head)
    return root


def make_mmlu(root):
    write_csv(root / "dev/elementary_mathematics_dev.csv", [EN1, EN2])
    write_csv(root / "test/elementary_mathematics_test.csv", [EN3])
    return root


# Typed from the reference scripts (see the module docstring).
CEVAL_0 = (
    "「床前明月光」的下一句是？\nA. 疑是地上霜\nB. 低头思故乡\nC. 举头望明月\nD. 黄河入海流\n答案："
)
CEVAL_2 = (
    "以下是中国关于computer_network考试的单项选择题，请选出其中的正确答案。\n\n"
    "TCP 属于哪一层协议？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 物理层\n答案：B\n\n"
    "HTTP 的默认端口是？\nA. 21\nB. 25\nC. 80\nD. 443\n答案：C\n\n"
    "「床前明月光」的下一句是？\nA. 疑是地上霜\nB. 低头思故乡\nC. 举头望明月\nD. 黄河入海流\n答案："
)
CMMLU_0 = (
    "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
    "题目：「床前明月光」的下一句是？\nA. 疑是地上霜\nB. 低头思故乡\nC. 举头望明月\nD. 黄河入海流\n答案是："
)
CMMLU_2 = (
    "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"
    "题目：TCP 属于哪一层协议？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 物理层\n答案是：B\n\n"
    "题目：HTTP 的默认端口是？\nA. 21\nB. 25\nC. 80\nD. 443\n答案是：C\n\n"
    "题目：「床前明月光」的下一句是？\nA. 疑是地上霜\nB. 低头思故乡\nC. 举头望明月\nD. 黄河入海流\n答案是："
)
MMLU_0 = (
    "The following are multiple choice questions (with answers) about  elementary mathematics.\n\n"
    "Which number is prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:"
)
MMLU_2 = (
    "The following are multiple choice questions (with answers) about  elementary mathematics.\n\n"
    "What is 2 + 2?\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer: B\n\n"
    "What is 3 * 3?\nA. 6\nB. 9\nC. 12\nD. 33\nAnswer: B\n\n"
    "Which number is prime?\nA. 4\nB. 6\nC. 7\nD. 9\nAnswer:"
)


@pytest.mark.parametrize(
    "make, split, subject, zero, two",
    [
        (make_ceval, "val", "computer_network", CEVAL_0, CEVAL_2),
        (make_cmmlu, "test", "agronomy", CMMLU_0, CMMLU_2),
        (make_mmlu, "test", "elementary_mathematics", MMLU_0, MMLU_2),
    ],
    ids=["ceval", "cmmlu", "mmlu"],
)
def test_default_prompts_are_the_reference_scripts(tmp_path, make, split, subject, zero, two):
    bench = load_benchmark(str(make(tmp_path / "b")), split, shots=2)
    style = pick_style(bench, "auto")
    assert style.name == bench.layout
    item = next(it for it in bench.items if it.subject == subject)
    assert build_prompt(item, style, []) == zero
    assert build_prompt(item, style, bench.dev[subject][:2]) == two


def test_eval_writes_the_reference_prompts(tiny_model_path, tmp_path):
    """End to end: the prompt in predictions-*.jsonl is the reference prompt, zero- and 2-shot
    (C-Eval scored on val: its test split publishes no answers; MMLU by option likelihood, as
    the tiny test tokenizer writes " A" as two tokens)."""
    runs = [
        ("val", "letter", make_ceval(tmp_path / "ceval")),
        ("test", "letter", make_cmmlu(tmp_path / "cmmlu")),
        ("test", "loglik", make_mmlu(tmp_path / "mmlu")),
    ]
    expected = {
        0: {"ceval": CEVAL_0, "cmmlu": CMMLU_0, "mmlu": MMLU_0},
        2: {"ceval": CEVAL_2, "cmmlu": CMMLU_2, "mmlu": MMLU_2},
    }
    for shots, want in expected.items():
        for split, scoring, root in runs:
            out = tmp_path / f"out-{shots}-{root.name}"
            args = [f"output_dir={out}", f"bench=[{root}]", f"split={split}", f"shots={shots}"]
            assert cli.main(["eval", str(tiny_model_path), *args, f"scoring={scoring}"]) == 0
            report = json.loads((out / "eval_report.json").read_text())
            rows = (out / f"predictions-{root.name}.jsonl").read_text().splitlines()
            assert json.loads(rows[0])["prompt"] == want[root.name]
            assert report["benchmarks"][root.name]["style"] == root.name


def test_hanlm_style_gives_the_earlier_wording(tmp_path):
    bench = load_benchmark(str(make_ceval(tmp_path / "b")), "val", shots=1)
    style = pick_style(bench, "hanlm")
    assert style.name == "hanlm-ceval"
    prompt = build_prompt(bench.items[0], style, [])
    assert (
        prompt == "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n" + CEVAL_0
    )
    mmlu = load_benchmark(str(make_mmlu(tmp_path / "m")), "test")
    assert build_prompt(mmlu.items[0], pick_style(mmlu, "hanlm"), []).startswith(
        "The following are multiple choice questions (with answers) about elementary mathematics."
    )


# --------------------------------------------------------------------------- subject tables


def test_subject_tables_are_complete():
    ceval, cmmlu, mmlu = (subject_table(n) for n in ("ceval", "cmmlu", "mmlu"))
    assert (len(ceval), len(cmmlu), len(mmlu)) == (52, 67, 57)
    assert ceval["computer_network"] == ("Computer Network", "计算机网络", "STEM")
    assert ceval["clinical_medicine"][2] == "Other"
    assert {v[2] for v in ceval.values()} == {"STEM", "Social Science", "Humanities", "Other"}
    assert cmmlu["chinese_history"] == (
        "chinese history",
        "中国历史",
        "Humanities",
        "China specific",
    )
    assert cmmlu["agronomy"] == ("agronomy", "农学", "Other")
    assert cmmlu["ancient_chinese"][1:] == ("古汉语", "Social Science", "China specific")
    assert {v[2] for v in cmmlu.values()} == {"STEM", "Social Science", "Humanities", "Other"}
    assert sum(len(v) > 3 for v in cmmlu.values()) == 15  # CMMLU's "china specific" subjects
    assert mmlu["elementary_mathematics"][2] == "STEM"
    assert mmlu["anatomy"][2] == "other (business, health, misc.)"
    assert mmlu["human_sexuality"][2] == "social sciences"
    assert mmlu["world_religions"][2] == "humanities"


def test_cmmlu_subjects_get_chinese_names_and_categories(tiny_model_path, tmp_path):
    bench = load_benchmark(str(make_cmmlu(tmp_path / "cmmlu")), "test")
    hist = next(it for it in bench.items if it.subject == "chinese_history")
    assert (hist.name_zh, hist.category, hist.groups) == (
        "中国历史",
        "Humanities",
        ("China specific",),
    )
    out = tmp_path / "out"
    args = ["eval", str(tiny_model_path), f"output_dir={out}", f"bench=[{tmp_path / 'cmmlu'}]"]
    assert cli.main(args) == 0
    cats = json.loads((out / "eval_report.json").read_text())["benchmarks"]["cmmlu"]["categories"]
    assert set(cats) == {"Other", "Humanities", "China specific"}
    assert cats["China specific"]["subjects"] == 1 and cats["Other"]["n"] == 1


# --------------------------------------------------------------------------- splits


def test_split_aliases_resolve_once():
    assert [canonical_split(s) for s in ("validation", "valid", "VAL", "dev", "test", "train")] == [
        "val",
        "val",
        "val",
        "dev",
        "test",
        "train",
    ]


@pytest.mark.parametrize("val_dir", ["val", "validation"])
@pytest.mark.parametrize("split", ["val", "validation"])
def test_ceval_validation_split_keeps_subjects_and_shots(tmp_path, val_dir, split):
    bench = load_benchmark(str(make_ceval(tmp_path / "b", val_dir)), split, shots=2)
    assert bench.split == "val"
    assert [(it.subject, it.id) for it in bench.items] == [
        ("computer_network", "computer_network/val/0")
    ]
    item = bench.items[0]
    assert build_prompt(item, pick_style(bench, "auto"), bench.dev[item.subject][:2]) == CEVAL_2


def test_eval_on_validation_split_uses_the_shots(tiny_model_path, tmp_path):
    root = make_ceval(tmp_path / "ceval")
    out = tmp_path / "out"
    args = ["eval", str(tiny_model_path), f"output_dir={out}", f"bench=[{root}]"]
    assert cli.main([*args, "split=validation", "shots=2"]) == 0
    b = json.loads((out / "eval_report.json").read_text())["benchmarks"]["ceval"]
    assert b["split"] == "val" and set(b["subjects"]) == {"computer_network"}
    assert b["mean_shots"] == 2 and b["fewer_shots"]["questions"] == 0
