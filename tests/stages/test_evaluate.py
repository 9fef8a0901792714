"""hanlm eval and hanlm eval contamination: readers, prompts, scorers, reports and the audit."""

import csv
import json
import math

import pytest

from hanlm.config import load_config
from hanlm.data.sources import DataError
from hanlm.eval.benchmarks import STYLES, Item, build_prompt, detect_layout, load_benchmark
from hanlm.eval.contamination import ContaminationConfig, audit, ngrams
from hanlm.eval.loglik import letter_token_ids, perplexity, score_letters, score_options
from hanlm.pipeline import cli
from hanlm.testing import write_csv

Q1 = ("TCP 属于哪一层协议？", "应用层", "传输层", "网络层", "物理层", "B")
Q2 = ('下列说法正确的是，"带引号"的那一项？', "甲，乙", "丙\n丁", "戊", "己", "A")
Q3 = ("「床前明月光」的下一句是？", "疑是地上霜", "低头思故乡", "举头望明月", "黄河入海流", "A")


def make_ceval(root):
    (root).mkdir(parents=True, exist_ok=True)
    mapping = {"computer_network": ["Computer Network", "计算机网络", "STEM"]}
    (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False))
    head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    write_csv(root / "dev/computer_network_dev.csv", [[0, *Q1, "解析"]], head)
    write_csv(root / "val/computer_network_val.csv", [[0, *Q2, ""], [1, *Q3, ""]], head)
    write_csv(root / "test/computer_network_test.csv", [[0, *Q1[:5]]], head[:6])
    return root


def make_cmmlu(root):
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    write_csv(root / "dev/agronomy.csv", [[0, *Q1]], head)
    write_csv(root / "test/agronomy.csv", [[0, *Q2], [1, *Q3]], head)
    return root


def make_mmlu(root):
    en = ("What is 2 + 2?", "3", "4", "5", "22", "B")
    write_csv(root / "dev/elementary_math_dev.csv", [en])
    write_csv(root / "test/elementary_math_test.csv", [Q2, Q3])
    return root


def bench_record(i, q, a, b, c, d, ans, subject="poetry", split="test"):
    return {
        "id": f"{subject}-{split}-{i}",
        "subject": subject,
        "subject_zh": "诗词",
        "category": "Humanities",
        "question": q,
        "A": a,
        "B": b,
        "C": c,
        "D": d,
        "answer": ans,
    }


def make_jsonl(root, test_items, dev_items=(Q1,)):
    root.mkdir(parents=True, exist_ok=True)
    for split, items in (("dev", dev_items), ("test", test_items)):
        lines = [bench_record(i, *q, split=split) for i, q in enumerate(items)]
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines)
        (root / f"bench.{split}.jsonl").write_text(text, encoding="utf-8")
    return root


# --------------------------------------------------------------------------- readers


@pytest.mark.parametrize(
    "layout, make, split",
    [("ceval", make_ceval, "val"), ("cmmlu", make_cmmlu, "test"), ("mmlu", make_mmlu, "test")],
)
def test_official_layouts_parse(tmp_path, layout, make, split):
    root = make(tmp_path / layout)
    assert detect_layout(root) == layout
    bench = load_benchmark(str(root), split, shots=1)
    assert bench.layout == layout and len(bench.items) == 2
    first = bench.items[0]
    assert first.question == Q2[0] and first.options == list(Q2[1:5]) and first.answer == "A"
    assert first.options[1] == "丙\n丁"  # a quoted newline inside a CSV field survives
    assert len(bench.dev[first.subject]) == 1
    if layout == "ceval":
        assert (first.name_zh, first.category) == ("计算机网络", "STEM")
        assert first.id == "computer_network/val/0"
    if layout == "mmlu":
        assert first.name_en == "elementary math"


def test_jsonl_layout_and_forced_layout(tmp_path):
    root = make_jsonl(tmp_path / "mine", [Q2, Q3])
    bench = load_benchmark(f"jsonl:{root}", "test", shots=1, limit=1)
    assert bench.name == "mine" and [it.id for it in bench.items] == ["poetry-test-0"]
    assert bench.items[0].name_zh == "诗词" and bench.dev["poetry"][0].answer == "B"


def test_embedded_demo_benchmark_reads():
    bench = load_benchmark("demo", "test", shots=5)
    assert len(bench.items) >= 100 and bench.layout == "jsonl"
    assert {it.subject for it in bench.items} == set(bench.dev)
    assert all(len(v) >= 5 for v in bench.dev.values())


def test_ceval_test_split_without_answers_says_use_val(tmp_path):
    root = make_ceval(tmp_path / "ceval")
    with pytest.raises(DataError, match="use split=val"):
        load_benchmark(str(root), "test")


def test_bad_rows_name_file_and_line(tmp_path):
    root = make_mmlu(tmp_path / "mmlu")
    with open(root / "test/elementary_math_test.csv", "a", encoding="utf-8") as f:
        f.write("only,three,columns\n")
    with pytest.raises(DataError, match=r"elementary_math_test\.csv:4: 3 columns"):
        load_benchmark(str(root), "test")
    write_csv(root / "test/elementary_math_test.csv", [(*Q1[:5], "E")])
    with pytest.raises(DataError, match=r"elementary_math_test\.csv:1: answer 'E'"):
        load_benchmark(str(root), "test")


# --------------------------------------------------------------------------- prompts


def item(q, a, b, c, d, ans, i="x"):
    return Item(i, "computer_network", q, [a, b, c, d], ans, "computer network", "计算机网络")


def test_hanlm_earlier_wording_stays_available_as_hanlm_styles():
    """The reference wording is the default (tests/test_bench_prompts.py); hanlm's own, which
    always has the header and names the subject in Chinese (C-Eval, CMMLU) or English, is
    `style=hanlm` / `hanlm-<benchmark>`."""
    shots = [item(*Q1, i="s1"), item(*Q3, i="s2")]
    target = item("1+1=？", "1", "2", "3", "4", "B")
    assert build_prompt(target, STYLES["hanlm-ceval"], shots) == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "TCP 属于哪一层协议？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 物理层\n答案：B\n\n"
        "「床前明月光」的下一句是？\nA. 疑是地上霜\nB. 低头思故乡\nC. 举头望明月\nD. 黄河入海流\n答案：A\n\n"
        "1+1=？\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    )
    assert build_prompt(target, STYLES["hanlm-ceval"], []).startswith(
        "以下是中国关于计算机网络考试"
    )
    assert build_prompt(target, STYLES["hanlm-cmmlu"], shots[:1]) == (
        "以下是关于计算机网络的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：TCP 属于哪一层协议？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 物理层\n答案是：B\n\n"
        "题目：1+1=？\nA. 1\nB. 2\nC. 3\nD. 4\n答案是："
    )
    assert build_prompt(target, STYLES["hanlm-mmlu"], shots[:1]) == (
        "The following are multiple choice questions (with answers) about computer network.\n\n"
        "TCP 属于哪一层协议？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 物理层\nAnswer: B\n\n"
        "1+1=？\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )


# --------------------------------------------------------------------------- scorers


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    from hanlm.config import ModelConfig
    from hanlm.modeling import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_model_path))
    model = load_model(ModelConfig(path=str(tiny_model_path), dtype="float32")).eval()
    return model, tok


def test_letter_scorer_matches_hand_computed_softmax(tiny):
    import torch

    model, tok = tiny
    prompts = [build_prompt(item(*q), STYLES["ceval"], [item(*Q1)]) for q in (Q2, Q3, Q1)]
    seqs = [tok.encode(p) for p in prompts]
    shared = next(i for i, col in enumerate(zip(*seqs)) if len(set(col)) > 1)
    assert shared >= 16  # long enough for score_sequences' cached-prefix path
    letters = letter_token_ids(tok, prompts[0])
    assert [tok.decode([i]) for i in letters] == ["A", "B", "C", "D"]
    # batch 2 with a shared 5-shot-style prefix: the cached-prefix, left-padded path
    got = score_letters(model, seqs, [letters] * 3, batch_size=2, pad_id=tok.pad_token_id)
    for seq, res in zip(seqs, got):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, -1]
        by_hand = torch.softmax(logits[letters], dim=-1)
        assert res["probs"] == pytest.approx(by_hand.tolist(), abs=1e-5)
        assert res["pred"] == "ABCD"[int(by_hand.argmax())]
        mass = torch.softmax(logits, dim=-1)[letters].sum()
        assert res["mass"] == pytest.approx(float(mass), abs=1e-5)


def test_option_loglik_matches_hand_computation(tiny):
    import torch

    model, tok = tiny
    prompt = build_prompt(item(*Q3), STYLES["ceval"], [item(*Q1)])
    seqs = [tok.encode(prompt + o) for o in Q3[1:5]]
    n_ctx = len(tok.encode(prompt))
    conts = [len(s) - n_ctx for s in seqs]
    got = score_options(model, seqs, conts, batch_size=3, pad_id=tok.pad_token_id)
    for seq, c, value in zip(seqs, conts, got):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([seq])).logits[0], dim=-1)
        by_hand = sum(float(logp[p - 1, seq[p]]) for p in range(len(seq) - c, len(seq)))
        assert value == pytest.approx(by_hand, abs=1e-4)


def test_perplexity_sliding_window_scores_every_token_once(tiny):
    import torch

    model, tok = tiny
    text = "床前明月光，疑是地上霜。举头望明月，低头思故乡。Hello, world! 😀" * 3
    full = perplexity(model, tok, text, window=512, stride=512, progress=False)
    ids = [tok.bos_token_id, *tok.encode(text, add_special_tokens=False)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0], dim=-1)
    nll = -sum(float(logp[p - 1, ids[p]]) for p in range(1, len(ids)))
    assert full["tokens"] == len(ids) - 1 and full["nll"] == pytest.approx(nll, rel=1e-4)
    assert full["bpc"] == pytest.approx(nll / math.log(2) / len(text), rel=1e-4)
    windowed = perplexity(model, tok, text, window=16, stride=8, progress=False)
    assert windowed["tokens"] == len(ids) - 1 and math.isfinite(windowed["ppl"])


# --------------------------------------------------------------------------- hanlm eval


def _run_eval(model_path, out, *extra):
    assert cli.main(["eval", str(model_path), f"output_dir={out}", *extra]) == 0
    return json.loads((out / "eval_report.json").read_text(encoding="utf-8"))


def test_eval_run_writes_report_predictions_samples_and_is_deterministic(tiny_model_path, tmp_path):
    bench = make_jsonl(tmp_path / "bench", [Q2, Q3, Q1])
    (tmp_path / "corpus.txt").write_text("春眠不觉晓，处处闻啼鸟。\n\n夜来风雨声，花落知多少。\n")
    (tmp_path / "prompts.jsonl").write_text(
        json.dumps({"prompt": "床前明月光，"}, ensure_ascii=False)
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "你好"}]}, ensure_ascii=False)
        + "\n"
    )
    args = [f"bench=[{bench}]", "shots=1", "ppl=" + str(tmp_path / "corpus.txt"),
            "prompts=" + str(tmp_path / "prompts.jsonl"), "max_new_tokens=4"]  # fmt: skip
    first = _run_eval(tiny_model_path, tmp_path / "a", *args)
    second = _run_eval(tiny_model_path, tmp_path / "b", *args)
    b = first["benchmarks"]["bench"]
    assert b["n"] == 3 and b["style"] == "ceval" and b["mean_shots"] == 1
    assert b["fewer_shots"]["questions"] == 0
    assert set(b["subjects"]) == {"poetry"} and set(b["categories"]) == {"Humanities"}
    preds = (tmp_path / "a" / "predictions-bench.jsonl").read_text(encoding="utf-8")
    assert preds == (tmp_path / "b" / "predictions-bench.jsonl").read_text(encoding="utf-8")
    row = json.loads(preds.splitlines()[0])
    # C-Eval's reference wording: the subject by its slug (the file name in C-Eval's layout)
    assert row["prompt"].startswith("以下是中国关于poetry考试") and row["prompt"].endswith("答案：")
    assert set(row["scores"]) == set("ABCD") and row["pred"] in "ABCD" and row["answer"] == "A"
    assert b["accuracy"] == second["benchmarks"]["bench"]["accuracy"]
    assert first["perplexity"][str(tmp_path / "corpus.txt")]["bpc"] > 0
    samples = (tmp_path / "a" / "samples.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(samples) == 2 and all("output" in json.loads(s) for s in samples)
    assert (tmp_path / "a" / "hanlm.json").is_file()


def test_eval_with_chat_template_and_option_loglik(tiny_model_path, tmp_path):
    bench = make_jsonl(tmp_path / "bench", [Q2, Q3])
    args = [f"bench=[{bench}]", "chat_template=true", "scoring=loglik", "batch_size=3"]
    report = _run_eval(tiny_model_path, tmp_path / "out", *args)
    assert report["benchmarks"]["bench"]["n"] == 2 and report["scoring"] == "loglik"
    row = json.loads((tmp_path / "out" / "predictions-bench.jsonl").read_text().splitlines()[0])
    assert row["prompt"].startswith(
        '<|im_start|>user\n下列说法正确的是，"带引号"'
    )  # zero-shot: no header
    assert row["prompt"].endswith("答案：<|im_end|>\n<|im_start|>assistant\n")
    assert len(row["loglik"]) == 4 and row["pred"] == max("ABCD", key=lambda c: row["scores"][c])


# --------------------------------------------------------------------------- contamination


def test_ngrams_are_characters_for_chinese_and_words_for_english():
    grams = ngrams("床前明月光，疑是地上霜。The quick brown fox", char_n=8, word_n=3)
    assert "明月光疑是地上霜" in grams  # punctuation dropped, characters joined
    assert "the quick brown" in grams and "quick brown fox" in grams
    assert not any(len(g) == 8 and " " not in g and g.isascii() for g in grams)


LEAKED = (
    "「万里悲秋常作客」的下一句是？",
    "百年多病独登台",
    "春风不度玉门关",
    "天涯何处无芳草",
    "一片冰心在玉壶",
    "A",
)
ENGLISH = ("Which planet in our solar system is known as the red planet because of its iron oxide dust?",
           "Mars", "Venus", "Jupiter", "Saturn", "A")  # fmt: skip


def make_training(root, leak: bool):
    root.mkdir(parents=True, exist_ok=True)
    chats = [
        {
            "messages": [
                {"role": "user", "content": "「白日依山尽」的下一句是？"},
                {"role": "assistant", "content": "黄河入海流"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "「万里长征」是什么意思？"},
                {"role": "assistant", "content": "形容路途遥远。"},
            ]
        },
    ]
    if leak:
        chats.append(
            {
                "messages": [
                    {"role": "user", "content": LEAKED[0]},
                    {"role": "assistant", "content": LEAKED[1]},
                ]
            }
        )
    text = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats)
    (root / "sft.jsonl").write_text(text, encoding="utf-8")
    corpus = [{"text": "《登高》风急天高猿啸哀，渚清沙白鸟飞回。"},
              {"text": "Mars is a planet. The quick brown fox jumps over the lazy dog."}]  # fmt: skip
    if leak:
        corpus.append({"text": "Quiz: " + ENGLISH[0] + " Answer: Mars."})
    text = "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in corpus)
    (root / "corpus.jsonl").write_text(text, encoding="utf-8")
    return root


def _audit(tmp_path, leak):
    bench = make_jsonl(tmp_path / "bench", [Q3, LEAKED, Q2, ENGLISH])
    train = make_training(tmp_path / ("leaky" if leak else "clean"), leak)
    cfg = load_config(ContaminationConfig, None, [("train", [str(train)]), ("bench", [str(bench)])])
    return audit(cfg)["benchmarks"]["bench"]


def test_audit_finds_planted_leak_with_its_training_record(tmp_path):
    report = _audit(tmp_path, leak=True)
    assert report["flagged"] == ["poetry-test-1", "poetry-test-3"]
    zh = report["details"]["poetry-test-1"]
    assert zh["overlap"] == 1.0 and zh["status"] == "contaminated"
    assert zh["matches"][0]["where"].endswith("sft.jsonl:3")
    en = report["details"]["poetry-test-3"]
    # "Answer:" sits between question and answer in the leak: the question is matched apart
    assert en["matches"][0]["where"].endswith("corpus.jsonl:3") and en["overlap"] == 1.0
    assert report["items"] == 5  # 4 test + 1 dev item, all audited


def test_audit_reports_zero_on_a_clean_pair(tmp_path):
    report = _audit(tmp_path, leak=False)
    assert report["contaminated"] == 0 and report["flagged"] == [] and report["partial"] == 0


def test_embedded_benchmark_is_clean_against_embedded_training_data():
    cfg = load_config(ContaminationConfig, None, [])
    report = audit(cfg)
    demo = report["benchmarks"]["demo"]
    assert demo["items"] >= 100 and report["train"]["records"] > 10_000
    assert demo["contaminated"] == 0, demo["flagged"]


def test_eval_scores_clean_and_contaminated_items_apart(tiny_model_path, tmp_path):
    bench = make_jsonl(tmp_path / "bench", [Q3, LEAKED, Q2, ENGLISH])
    train = make_training(tmp_path / "leaky", leak=True)
    out = tmp_path / "audit"
    args = ["eval", "contamination", str(train), f"bench=[{bench}]", f"output_dir={out}"]
    assert cli.main(args) == 0
    report = _run_eval(tiny_model_path, tmp_path / "ev", f"bench=[{bench}]", f"contamination={out}")
    split = report["benchmarks"]["bench"]["contamination"]
    assert split["contaminated"]["n"] == 2 and split["clean"]["n"] == 2
    assert split["unaudited"] == 0
    rows = (tmp_path / "ev" / "predictions-bench.jsonl").read_text(encoding="utf-8").splitlines()
    status = {json.loads(r)["id"]: json.loads(r)["contamination"] for r in rows}
    assert status["poetry-test-1"] == "contaminated" and status["poetry-test-0"] == "clean"


# --------------------------------------------------------------------------- shots


def test_fewer_shots_than_asked_is_warned_and_tabled(tiny_model_path, tmp_path, capsys):
    bench = make_jsonl(tmp_path / "bench", [Q2, Q3])  # one dev example
    report = _run_eval(tiny_model_path, tmp_path / "a", f"bench=[{bench}]", "shots=3")
    b = report["benchmarks"]["bench"]
    assert (b["shots"], b["mean_shots"], b["min_shots"]) == (3, 1, 1)
    assert b["fewer_shots"] == {
        "questions": 2,
        "dev_too_small": {"poetry": 1},
        "dropped_for_length": 0,
    }
    out = capsys.readouterr()
    assert (
        "warning: bench (test): shots=3, but 1 subject(s) have fewer dev examples: poetry (1)"
        in out.err
    )
    assert "(test, 3-shot asked, 1 on average," in out.out
    assert "FEWER SHOTS for 2 of 2 questions (min 1): poetry has 1 dev examples" in out.out


def test_strict_shots_makes_too_few_shots_an_error(tiny_model_path, tmp_path, capsys):
    from hanlm.eval.benchmarks import pick_style
    from hanlm.modeling import load_tokenizer

    bench = make_jsonl(tmp_path / "bench", [Q2, Q3])
    args = ["eval", str(tiny_model_path), f"bench=[{bench}]", "strict_shots=true"]
    assert cli.main([*args, f"output_dir={tmp_path / 'a'}", "shots=3"]) == 1
    err = capsys.readouterr().err
    assert "poetry (1)" in err and "lower shots=" in err and "strict_shots=false" in err
    assert not (tmp_path / "a" / "eval_report.json").exists()  # failed before the model loaded

    # Enough dev examples, but the 1-shot prompts do not fit max_length: dropped, or an error.
    b = load_benchmark(str(bench), "test", shots=1)
    tok = load_tokenizer(str(tiny_model_path))
    style = pick_style(b, "auto")
    zero = max(len(tok.encode(build_prompt(it, style, []))) for it in b.items)
    fit = f"max_length={zero + 2}"
    assert cli.main([*args, f"output_dir={tmp_path / 'b'}", "shots=1", fit]) == 1
    assert "fit fewer than shots=1 examples in max_length=" in capsys.readouterr().err
    report = _run_eval(tiny_model_path, tmp_path / "c", f"bench=[{bench}]", "shots=1", fit)
    fewer = report["benchmarks"]["bench"]["fewer_shots"]
    assert fewer["dropped_for_length"] == 2 and fewer["questions"] == 2
    assert "2 prompts too long for max_length" in capsys.readouterr().out


# --------------------------------------------------------------------------- audit layouts

LEAK_LAYOUTS = {
    # the options of an exam page between question and answer
    "exam": {
        "text": "2019 年语文模拟题\n" + LEAKED[0] + "\nA. " + LEAKED[1] + "\nB. " + LEAKED[2]
        + "\nC. " + LEAKED[3] + "\nD. " + LEAKED[4] + "\n答案：A"
    },
    "chat": {
        "messages": [
            {"role": "user", "content": "请回答：" + LEAKED[0]},
            {"role": "assistant", "content": f"这句出自杜甫《登高》，下一句是「{LEAKED[1]}」。"},
        ]
    },
    "da": {"text": f"问：{LEAKED[0]}答：{LEAKED[1]}"},
}  # fmt: skip
SHORT = ("天下第一关是？", "山海关", "嘉峪关", "雁门关", "居庸关", "A")  # 6 + 3 characters
TINY = ("1+1=？", "1", "2", "3", "4", "B")  # nothing to match
PARTIAL = (
    "「白日依山尽，黄河入海流」描写的是哪里的景色？",
    "鹳雀楼",
    "岳阳楼",
    "黄鹤楼",
    "滕王阁",
    "A",
)


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_text(text, encoding="utf-8")
    return path


def _audit_of(bench, train, *overrides):
    pairs = [("train", [str(train)]), ("bench", [str(bench)]), *overrides]
    return audit(load_config(ContaminationConfig, None, pairs))


@pytest.mark.parametrize("layout", sorted(LEAK_LAYOUTS))
def test_audit_finds_leaks_with_text_between_question_and_answer(tmp_path, layout):
    """Joined into one string, question + answer scored 0.42 (partial) in these layouts."""
    bench = make_jsonl(tmp_path / "bench", [Q3, LEAKED, Q2])
    noise = {"text": "《登高》风急天高猿啸哀，渚清沙白鸟飞回。"}
    if "messages" in LEAK_LAYOUTS[layout]:  # one format per file
        noise = {
            "messages": [
                {"role": "user", "content": "你好"},
                {"role": "assistant", "content": noise["text"]},
            ]
        }
    train = _write_jsonl(tmp_path / "train" / "leak.jsonl", [noise, LEAK_LAYOUTS[layout]])
    report = _audit_of(bench, train)["benchmarks"]["bench"]
    assert report["flagged"] == ["poetry-test-1"]
    d = report["details"]["poetry-test-1"]
    assert d["status"] == "contaminated" and d["question_overlap"] == 1.0 and d["answer_near"]
    assert d["matches"][0]["where"].endswith("leak.jsonl:2")


def test_audit_finds_a_short_question_with_its_answer(tmp_path):
    bench = make_jsonl(tmp_path / "bench", [SHORT, TINY, Q3])
    train = _write_jsonl(
        tmp_path / "train" / "t.jsonl",
        [{"text": "天下第一关是哪里？很多人知道。"}, {"text": "天下第一关是？答：山海关。"}],
    )
    report = _audit_of(bench, train)["benchmarks"]["bench"]
    assert report["flagged"] == ["poetry-test-0"]
    d = report["details"]["poetry-test-0"]
    assert d["answer_near"] and d["pair_overlap"] == 1.0 and len(d["matches"]) == 1
    assert d["matches"][0]["where"].endswith("t.jsonl:2")  # the question alone is no evidence
    # TINY has nothing to match; dev's "TCP 属于哪一层协议？" (7 characters) was not found with
    # its answer: both unchecked, neither clean
    assert report["too_short_ids"] == ["poetry-dev-0", "poetry-test-1"] and report["clean"] == 1
    # matched by its question alone, the short question cannot be checked
    alone = _audit_of(bench, train, ("fields", "question"))["benchmarks"]["bench"]
    assert alone["flagged"] == [] and alone["too_short"] == 3


def test_audit_of_official_ceval_dir_checks_test_questions_alone(tmp_path):
    root = make_ceval(tmp_path / "ceval")  # its test split has no answer column
    train = _write_jsonl(tmp_path / "train" / "t.jsonl", [{"text": "题库：" + Q1[0] + "答案见书"}])
    report = _audit_of(root, train)["benchmarks"]["ceval"]
    assert report["items"] == 4 and report["question_only"] == {"test": 1}
    assert report["by_split"]["test"] == {
        "items": 1,
        "contaminated": 0,
        "partial": 0,
        "too_short": 1,
    }
    # "TCP 属于哪一层协议？" has 7 characters: checkable only with an answer. A longer one is found:
    long_q = ("在 OSI 参考模型中，TCP 协议属于哪一层协议？", "应用层", "传输层", "网络层", "物理层")
    head = ["id", "question", "A", "B", "C", "D"]
    with open(root / "test/computer_network_test.csv", "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([head, [0, *long_q]])
    _write_jsonl(tmp_path / "train" / "t.jsonl", [{"text": "题库：" + long_q[0]}])
    report = _audit_of(root, train)["benchmarks"]["ceval"]
    assert report["flagged"] == ["computer_network/test/0"]


def test_bad_record_hint_names_a_key_the_audit_accepts(tmp_path):
    import re

    bench = make_jsonl(tmp_path / "bench", [Q3])
    train = tmp_path / "train" / "t.jsonl"
    train.parent.mkdir()
    train.write_text('{"text": "床前明月光"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        _audit_of(bench, train)
    key = re.search(r"pass (\S+)=skip", str(err.value)).group(1)
    assert key == "data.on_bad_record"
    report = _audit_of(bench, train, (key, "skip"))
    assert report["train"]["bad_records"] == 1 and report["train"]["records"] == 1


def test_eval_scores_partial_and_too_short_items_apart_from_clean(
    tiny_model_path, tmp_path, summary_declared
):
    bench = make_jsonl(tmp_path / "bench", [Q3, LEAKED, PARTIAL, TINY])
    train = _write_jsonl(
        tmp_path / "train" / "t.jsonl",
        [LEAK_LAYOUTS["exam"], {"text": "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"}],
    )
    out = tmp_path / "audit"
    assert (
        cli.main(["eval", "contamination", str(train), f"bench=[{bench}]", f"output_dir={out}"])
        == 0
    )
    audit_report = json.loads((out / "contamination.json").read_text())["benchmarks"]["bench"]
    assert audit_report["partial_ids"] == ["poetry-test-2"]
    summary_declared(out)
    report = _run_eval(tiny_model_path, tmp_path / "ev", f"bench=[{bench}]", f"contamination={out}")
    split = report["benchmarks"]["bench"]["contamination"]
    summary_declared(tmp_path / "ev", absent=["tools/*"])  # no tool-use measure asked
    assert {g: split[g]["n"] for g in ("clean", "contaminated", "partial", "too_short")} == {
        "clean": 1,
        "contaminated": 1,
        "partial": 1,
        "too_short": 1,
    }
    rows = (tmp_path / "ev" / "predictions-bench.jsonl").read_text(encoding="utf-8").splitlines()
    status = {json.loads(r)["id"]: json.loads(r)["contamination"] for r in rows}
    assert status == {
        "poetry-test-0": "clean",
        "poetry-test-1": "contaminated",
        "poetry-test-2": "partial",
        "poetry-test-3": "too_short",
    }
