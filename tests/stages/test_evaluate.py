"""hanlm eval and hanlm eval contamination: readers, prompts, scorers, reports and the audit."""

import csv
import json
import math

import pytest

from hanlm import cli
from hanlm.bench import STYLES, Item, build_prompt, detect_layout, load_benchmark
from hanlm.config import load_config
from hanlm.data.sources import DataError
from hanlm.infer.scoring import letter_token_ids, perplexity, score_letters, score_options
from hanlm.stages.contamination import ContaminationConfig, audit, ngrams

Q1 = ("TCP 属于哪一层协议？", "应用层", "传输层", "网络层", "物理层", "B")
Q2 = ('下列说法正确的是，"带引号"的那一项？', "甲，乙", "丙\n丁", "戊", "己", "A")
Q3 = ("「床前明月光」的下一句是？", "疑是地上霜", "低头思故乡", "举头望明月", "黄河入海流", "A")


def _write_csv(path, rows, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def make_ceval(root):
    (root).mkdir(parents=True, exist_ok=True)
    mapping = {"computer_network": ["Computer Network", "计算机网络", "STEM"]}
    (root / "subject_mapping.json").write_text(json.dumps(mapping, ensure_ascii=False))
    head = ["id", "question", "A", "B", "C", "D", "answer", "explanation"]
    _write_csv(root / "dev/computer_network_dev.csv", [[0, *Q1, "解析"]], head)
    _write_csv(root / "val/computer_network_val.csv", [[0, *Q2, ""], [1, *Q3, ""]], head)
    _write_csv(root / "test/computer_network_test.csv", [[0, *Q1[:5]]], head[:6])
    return root


def make_cmmlu(root):
    head = ["", "Question", "A", "B", "C", "D", "Answer"]
    _write_csv(root / "dev/agronomy.csv", [[0, *Q1]], head)
    _write_csv(root / "test/agronomy.csv", [[0, *Q2], [1, *Q3]], head)
    return root


def make_mmlu(root):
    en = ("What is 2 + 2?", "3", "4", "5", "22", "B")
    _write_csv(root / "dev/elementary_math_dev.csv", [en])
    _write_csv(root / "test/elementary_math_test.csv", [Q2, Q3])
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
    _write_csv(root / "test/elementary_math_test.csv", [(*Q1[:5], "E")])
    with pytest.raises(DataError, match=r"elementary_math_test\.csv:1: answer 'E'"):
        load_benchmark(str(root), "test")


# --------------------------------------------------------------------------- prompts


def item(q, a, b, c, d, ans, i="x"):
    return Item(i, "computer_network", q, [a, b, c, d], ans, "computer network", "计算机网络")


def test_kshot_prompts_are_built_as_documented():
    shots = [item(*Q1, i="s1"), item(*Q3, i="s2")]
    target = item("1+1=？", "1", "2", "3", "4", "B")
    assert build_prompt(target, STYLES["ceval"], shots) == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "TCP 属于哪一层协议？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 物理层\n答案：B\n\n"
        "「床前明月光」的下一句是？\nA. 疑是地上霜\nB. 低头思故乡\nC. 举头望明月\nD. 黄河入海流\n答案：A\n\n"
        "1+1=？\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    )
    assert build_prompt(target, STYLES["cmmlu"], shots[:1]) == (
        "以下是关于计算机网络的单项选择题，请直接给出正确答案的选项。\n\n"
        "题目：TCP 属于哪一层协议？\nA. 应用层\nB. 传输层\nC. 网络层\nD. 物理层\n答案是：B\n\n"
        "题目：1+1=？\nA. 1\nB. 2\nC. 3\nD. 4\n答案是："
    )
    assert build_prompt(target, STYLES["mmlu"], shots[:1]) == (
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
    assert set(b["subjects"]) == {"poetry"} and set(b["categories"]) == {"Humanities"}
    preds = (tmp_path / "a" / "predictions-bench.jsonl").read_text(encoding="utf-8")
    assert preds == (tmp_path / "b" / "predictions-bench.jsonl").read_text(encoding="utf-8")
    row = json.loads(preds.splitlines()[0])
    assert row["prompt"].startswith("以下是中国关于诗词考试") and row["prompt"].endswith("答案：")
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
    assert row["prompt"].startswith("<|im_start|>user\n以下是中国关于诗词考试")
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
    # "Answer:" sits between question and answer in the leak: the grams across it differ
    assert en["matches"][0]["where"].endswith("corpus.jsonl:3") and 0.7 <= en["overlap"] < 1
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
