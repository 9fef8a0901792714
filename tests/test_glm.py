"""GLM blank infilling: the example layout, the prefix-LM mask (and that the model obeys it), the
loss on exactly the spans, span sampling, and `hanlm pretrain objective=glm`."""

import json
import random

import pytest
import torch

from hanlm import IGNORE_INDEX
from hanlm.config import ConfigError, load_config
from hanlm.data.glm import (
    GLMCollator,
    GLMConfig,
    GLMIds,
    add_glm_tokens,
    build_example,
    glm_example,
    glm_ids,
    prefix_lm_mask,
    sample_spans,
)

IDS = GLMIds(mask=90, gmask=91, sop=92, eop=93)
TEXT = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
SPANS = [(2, 4), (7, 8)]  # blanks "12 13" and "17"
IGN = IGNORE_INDEX


def hand_example():
    return build_example(TEXT, SPANS, IDS, order=[1, 0])  # Part B: the second span first


def test_example_by_hand():
    ex = hand_example()
    part_a = [10, 11, 90, 14, 15, 16, 90, 18, 19]  # [MASK] at positions 2 and 6
    assert ex["prefix_len"] == 9
    assert ex["input_ids"] == [*part_a, 92, 17, 93, 92, 12, 13, 93]
    assert ex["labels"] == [IGN] * 9 + [IGN, 17, 93] + [IGN, 12, 13, 93]
    # Part A 0..8; each span numbered from its [MASK]'s position (6, then 2)
    assert ex["position_ids"] == [*range(9), 6, 7, 8, 2, 3, 4, 5]


def test_gmask_example_by_hand():
    ex = build_example(TEXT, [(6, 10)], IDS, gmask=True)
    assert ex["input_ids"] == [10, 11, 12, 13, 14, 15, 91, 92, 16, 17, 18, 19, 93]
    assert ex["labels"] == [IGN] * 7 + [IGN, 16, 17, 18, 19, 93]
    assert ex["position_ids"] == [*range(7), 6, 7, 8, 9, 10, 11]
    assert ex["prefix_len"] == 7


def test_prefix_mask_by_hand():
    m = prefix_lm_mask([16, 5], [9, 0], 16)
    assert m.shape == (2, 1, 16, 16) and m.dtype == torch.bool
    a = m[0, 0]
    assert a[:9, :9].all()  # Part A sees all of Part A, later tokens too (bidirectional)
    assert not a[:9, 9:].any()  # Part A never sees Part B
    assert a[9:, :9].all()  # Part B sees all of Part A
    b = a[9:, 9:]
    assert torch.equal(b, torch.tril(torch.ones(7, 7, dtype=torch.bool)))  # Part B causal
    # An empty Part A is a causal mask; padding keys are never visible
    c = m[1, 0]
    assert torch.equal(c[:5, :5], torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    assert not c[:, 5:].any()
    assert c[5:, :5].all()  # padding queries see the real tokens (no all-False row)


@pytest.fixture(scope="module")
def model():
    from hanlm.modeling import build_model

    torch.manual_seed(0)
    m = build_model("test", vocab_size=128, max_positions=64).eval()
    assert m.config._attn_implementation == "sdpa"
    return m


def _logits(model, ex):
    batch = GLMCollator(pad_id=0)([ex])
    with torch.no_grad():
        return model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits[0]


def test_model_obeys_the_mask(model):
    """The mask reaches attention: a change late in Part A moves the first token's output
    (bidirectional), a change in Part B moves no Part A output and no earlier Part B one."""
    ex = hand_example()
    base = _logits(model, ex)
    late_a = dict(ex, input_ids=list(ex["input_ids"]))
    late_a["input_ids"][8] = 50  # the last Part A token
    assert not torch.allclose(_logits(model, late_a)[0], base[0], atol=1e-6)
    in_b = dict(ex, input_ids=list(ex["input_ids"]))
    in_b["input_ids"][13] = 50  # a token of the second Part B span (index 13 of 16)
    changed = _logits(model, in_b)
    assert torch.allclose(changed[:13], base[:13], atol=1e-6)  # Part A and B before it
    assert not torch.allclose(changed[13], base[13], atol=1e-6)


def test_loss_covers_exactly_the_spans(model):
    ex = hand_example()
    batch = GLMCollator(pad_id=0)([ex])
    targets = [t for t in ex["labels"] if t != IGN]
    assert targets == [17, 93, 12, 13, 93]  # the span tokens and each <eop>, nothing else
    out = model(**batch)
    logits = out.logits[0].float()
    # By hand: cross-entropy at the positions just before each labelled token
    pos = [i for i, t in enumerate(ex["labels"]) if t != IGN]
    logp = torch.log_softmax(logits[[p - 1 for p in pos]], -1)
    manual = -logp[range(len(pos)), targets].mean()
    assert torch.allclose(out.loss, manual, atol=1e-5)


def test_span_sampling_ratio_and_shape():
    rng = random.Random(0)
    lengths, covered = [], 0
    for _ in range(300):
        spans = sample_spans(256, rng, 0.15, 3.0)
        prev_end = -1
        for s, e in spans:
            assert 0 <= s < e <= 256 and s > prev_end  # in order, never touching
            prev_end = e
            lengths.append(e - s)
        covered += sum(e - s for s, e in spans)
    frac = covered / (300 * 256)
    assert 0.15 <= frac < 0.17  # at least 15%, overshoot by at most one span
    mean = sum(lengths) / len(lengths)
    assert 2.9 < mean < 3.5  # Poisson(3) floored at 1 has mean 3 + e^-3 = 3.05


def test_glm_example_mix_and_determinism():
    cfg = GLMConfig(gmask_fraction=0.5, causal_fraction=0.5)
    block = list(range(100, 164))
    kinds = {"causal": 0, "gmask": 0, "mask": 0}
    for seed in range(400):
        ex = glm_example(block, cfg, IDS, seed)
        assert ex == glm_example(block, cfg, IDS, seed)
        if ex["prefix_len"] == 0:
            kinds["causal"] += 1
        elif IDS.gmask in ex["input_ids"]:
            kinds["gmask"] += 1
        else:
            kinds["mask"] += 1
        # Every block token is either in Part A or predicted in Part B, once
        a = [t for t in ex["input_ids"][: ex["prefix_len"]] if t >= 100]
        b = [t for t in ex["labels"] if t >= 100]
        assert sorted(a + b) == block or ex["prefix_len"] == 0
    assert 160 < kinds["causal"] < 240 and 60 < kinds["gmask"] < 140 and 60 < kinds["mask"] < 140


def test_config_checks():
    with pytest.raises(ConfigError, match="glm.mask_ratio"):
        from hanlm.train.pretrain import PretrainConfig

        load_config(PretrainConfig, None, ["tokenizer=x", "objective=glm", "glm.mask_ratio=1.5"])


def test_tokens_added_once(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    assert glm_ids(tok) is None
    assert len(add_glm_tokens(tok)) == 4 and add_glm_tokens(tok) == []
    ids = glm_ids(tok)
    assert tok.encode("[MASK]床前[gMASK]", add_special_tokens=False)[0] == ids.mask
    assert tok.decode([ids.sop, ids.eop], skip_special_tokens=True) == ""


def test_pretrain_glm_runs_and_saves_tokens(tmp_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    from hanlm.runs import read_run
    from hanlm.train.pretrain import PretrainConfig, run

    rng = random.Random(0)
    lines = ["床前明月光，疑是地上霜。", "举头望明月，低头思故乡。", "白日依山尽，黄河入海流。"]
    corpus = tmp_path / "c.jsonl"
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(120):
            text = "".join(rng.choice(lines) for _ in range(4)) + f" {i}"
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    cfg = load_config(
        PretrainConfig,
        None,
        [
            f"tokenizer={tmp_path / 'tok'}",
            "preset=test",
            f"data.paths=[{corpus}]",
            "data.valid_fraction=0.1",
            "block_size=64",
            "objective=glm",
            "glm.gmask_fraction=0.3",
            "train.batch_size=4",
            "train.max_steps=8",
            "train.eval_steps=0",
            "train.lr=3e-3",
            f"output_dir={tmp_path / 'out'}",
            f"cache_dir={tmp_path / 'cache'}",
        ],
    )
    out = run(cfg)
    info = read_run(out)
    s = info["summary"]
    assert info["status"] == "complete"
    assert s["eval_loss"] < s["initial_eval_loss"]  # causal validation improves too
    assert "eval_bpc" in s
    assert glm_ids(AutoTokenizer.from_pretrained(out)) is not None
    # The cloze probe of `hanlm eval` asks a GLM-trained model both ways
    from hanlm.eval.evaluate import EvalConfig
    from hanlm.eval.evaluate import run as evaluate

    ecfg = load_config(
        EvalConfig,
        None,
        [
            f"model.path={out}",
            "bench=[]",
            f"cloze=[{corpus}]",
            "cloze_items=20",
            f"output_dir={tmp_path / 'eval'}",
        ],
    )
    report = json.loads((evaluate(ecfg) / "eval_report.json").read_text(encoding="utf-8"))
    c = report["cloze"][str(corpus)]
    assert c["n"] == 20 and c["chance"] == 0.25
    assert 0 <= c["causal"]["accuracy"] <= 1 and 0 <= c["glm"]["accuracy"] <= 1


def test_cloze_items_and_scoring(tiny_tokenizer):
    from hanlm.eval.cloze import cloze_accuracy, cloze_items
    from hanlm.modeling import build_model

    torch.manual_seed(0)
    model = build_model("test", vocab_size=len(tiny_tokenizer), max_positions=64).eval()

    texts = [f"第{i}首：床前明月光，疑是地上霜。举头望明月，低头思故乡。{i * 7}" for i in range(30)]
    items = cloze_items(texts, tiny_tokenizer, 10, span=2, choices=4, context=8, seed=1)
    assert len(items) == 10
    for it in items:
        assert len(it.options) == 4 and all(len(o) == 2 for o in it.options)
        assert len({tuple(o) for o in it.options}) == 4
        assert 4 <= len(it.left) <= 8 and 4 <= len(it.right) <= 8
    # A model scoring causally: the chosen option is the argmax of its own summed log-probs
    res = cloze_accuracy(model, tiny_tokenizer, items, "causal")
    assert res["n"] == 10 and 0 <= res["accuracy"] <= 1
    with pytest.raises(ValueError, match="GLM tokens"):
        cloze_accuracy(model, tiny_tokenizer, items, "glm")
