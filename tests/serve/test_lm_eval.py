"""A peer's harness against `hanlm serve`: lm-evaluation-harness's `local-completions` model
scores the same multiple-choice items as `hanlm eval scoring=loglik`, with hanlm's prompts, and
the two pick the same option for every item."""

from __future__ import annotations

import json

import pytest

lm_eval = pytest.importorskip("lm_eval")

QUESTIONS = [  # (question, four options, answer)
    ("“床前明月光”的下一句是？", ["疑是地上霜", "低头思故乡", "举头望明月", "春眠不觉晓"], "A"),
    ("“画蛇添足”比喻什么？", ["做多余的事", "画画很好", "蛇有脚", "做事认真"], "A"),
    ("中国的首都是哪里？", ["上海", "北京", "广州", "深圳"], "B"),
    ("一年有几个季节？", ["两个", "三个", "四个", "五个"], "C"),
    ("“你好”用英文怎么说？", ["Goodbye", "Thanks", "Sorry", "Hello"], "D"),
    ("水在零度会怎样？", ["沸腾", "结冰", "蒸发", "燃烧"], "B"),
    ("李白是哪个朝代的诗人？", ["宋朝", "明朝", "唐朝", "清朝"], "C"),
    ("“守株待兔”讽刺的是？", ["勤劳", "侥幸心理", "勇敢", "聪明"], "B"),
    ("太阳从哪边升起？", ["东边", "西边", "南边", "北边"], "A"),
    ("1 加 1 等于几？", ["一", "三", "二", "四"], "C"),
]


def _hanlm_predictions(model_dir, tmp_path) -> list[dict]:
    from hanlm.config import load_config
    from hanlm.eval.evaluate import EvalConfig, run

    bench = tmp_path / "bench"
    bench.mkdir()
    with open(bench / "bench.test.jsonl", "w", encoding="utf-8") as f:
        for i, (q, opts, a) in enumerate(QUESTIONS):
            rec = {"id": f"q{i}", "subject": "常识", "question": q, "answer": a}
            rec.update(zip("ABCD", opts))
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    out = tmp_path / "eval"
    cfg = load_config(
        EvalConfig,
        None,
        [f"model.path={model_dir}", f"bench=[{bench}]", "scoring=loglik", f"output_dir={out}"],
    )
    run(cfg)
    (preds,) = out.glob("predictions-*.jsonl")
    return [json.loads(line) for line in preds.read_text(encoding="utf-8").splitlines()]


def test_lm_eval_local_completions_agrees_with_hanlm_eval(live, taught_model_dir, tmp_path):
    ours = _hanlm_predictions(taught_model_dir, tmp_path)
    assert len(ours) == len(QUESTIONS)
    # The same items for lm-eval, with hanlm's exact prompts; the option follows the prompt
    # directly (C-Eval's wording has no space before the answer), as hanlm scores it.
    docs = tmp_path / "docs.jsonl"
    with open(docs, "w", encoding="utf-8") as f:
        for row, (_, opts, a) in zip(ours, QUESTIONS):
            doc = {"prompt": row["prompt"], "choices": opts, "target": "ABCD".index(a)}
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "hanlm_agree.yaml").write_text(
        "task: hanlm_agree\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: prompt\n"
        "doc_to_choice: choices\n"
        "doc_to_target: target\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc_norm\n",
        encoding="utf-8",
    )
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model="local-completions",
        model_args={
            "model": "tiny",
            "base_url": live.url + "/v1/completions",
            "auth_token": live.key,  # for the tokenizer probe and /tokenize
            "header": {"Authorization": f"Bearer {live.key}"},  # for /v1/completions
            "num_concurrent": 1,
            "max_retries": 1,
            # no tokenizer given: lm-eval finds /tokenizer_info and tokenizes through the server
        },
        tasks=["hanlm_agree"],
        task_manager=TaskManager(include_path=str(tasks)),
        log_samples=True,
    )
    samples = sorted(results["samples"]["hanlm_agree"], key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)
    theirs = []
    for s, (_, opts, _) in zip(samples, QUESTIONS):
        lls = [r[0] for r in s["filtered_resps"]]
        # acc_norm: log-likelihood per character of the option, which is what hanlm's loglik is
        norm = [ll / len(o) for ll, o in zip(lls, opts)]
        theirs.append("ABCD"[max(range(4), key=lambda c: (norm[c], -c))])
        # the log-likelihoods themselves agree, not only the choice
        ref = next(r for r in ours if r["prompt"] == s["doc"]["prompt"])
        assert lls == pytest.approx(ref["loglik"], abs=1e-3)
    assert theirs == [r["pred"] for r in ours]
