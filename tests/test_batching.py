"""train.batching: grouped and padding-free batches give the same per-example losses as each
conversation alone, and a packed sequence never attends across conversations."""

import itertools
import json

import pytest
import torch

from hanlm import IGNORE_INDEX
from hanlm.config import ConfigError, TrainConfig
from hanlm.data.templates import render
from hanlm.modeling import load_model, load_tokenizer
from hanlm.trainer import batching_args, check_launch

CONVS = [
    [{"role": "user", "content": "床前明月光"}, {"role": "assistant", "content": "疑是地上霜。"}],
    [
        {"role": "user", "content": "写一句关于秋天的诗，越长越好，越长越好"},
        {"role": "assistant", "content": "停车坐爱枫林晚，霜叶红于二月花。远上寒山石径斜。"},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
]


@pytest.fixture(scope="module")
def model_tok(tiny_model_path):
    from hanlm.config import ModelConfig

    model = load_model(
        ModelConfig(path=str(tiny_model_path), dtype="float32"), attn_implementation="sdpa"
    )
    return model.eval(), load_tokenizer(str(tiny_model_path))


def _losses(logits, labels):
    """Summed loss and token count per row of labels (shifted as in causal LM training)."""
    lp = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none"
    )
    return lp, labels[:, 1:] != IGNORE_INDEX


def test_padded_and_padding_free_batches_give_each_conversations_own_loss(model_tok):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, tok = model_tok
    rows = [dict(zip(("input_ids", "labels"), render(tok, c))) for c in CONVS]
    alone = []
    with torch.no_grad():
        for r in rows:
            ids, labels = torch.tensor([r["input_ids"]]), torch.tensor([r["labels"]])
            lp, keep = _losses(model(input_ids=ids).logits, labels)
            alone.append(lp[keep].sum().item() / keep.sum().item())

        padded = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)(rows)
        lp, keep = _losses(model(**padded).logits, padded["labels"])
        got = [(lp[i][keep[i]].sum() / keep[i].sum()).item() for i in range(len(rows))]
        assert got == pytest.approx(alone, abs=1e-5)

        flat = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(
            rows
        )
        assert flat["input_ids"].shape[0] == 1 and "attention_mask" not in flat
        lp, keep = _losses(model(**flat, use_cache=False).logits, flat["labels"])
        starts = [0]
        for r in rows:
            starts.append(starts[-1] + len(r["input_ids"]))
        got = [
            (lp[0, a : b - 1][keep[0, a : b - 1]].sum() / keep[0, a : b - 1].sum()).item()
            for a, b in itertools.pairwise(starts)
        ]
        assert got == pytest.approx(alone, abs=1e-5)


def test_a_packed_sequence_never_attends_across_conversations(model_tok):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model, tok = model_tok
    rows = [dict(zip(("input_ids", "labels"), render(tok, c))) for c in CONVS]
    collate = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)
    changed = [dict(rows[0], input_ids=[(t + 7) % 500 for t in rows[0]["input_ids"]]), *rows[1:]]
    with torch.no_grad():
        a = model(**collate(rows), use_cache=False).logits[0]
        b = model(**collate(changed), use_cache=False).logits[0]
    n0 = len(rows[0]["input_ids"])
    assert not torch.allclose(a[:n0], b[:n0])  # the first conversation did change
    assert torch.allclose(a[n0:], b[n0:], atol=1e-5)  # and nothing after it saw it


def test_preference_pairs_padded_together_keep_each_pairs_own_log_probs(model_tok):
    """trl's preference collator pads chosen and rejected answers of several pairs to one
    width; each answer's summed log-prob is the one it has alone, so batching pairs of other
    lengths (grouped or not) leaves every pair's DPO and reward loss as it is."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    model, tok = model_tok
    rows = []
    for c in CONVS:
        prompt = tok.apply_chat_template(c[:-1], add_generation_prompt=True, return_dict=True)
        prompt = prompt["input_ids"]
        answer = tok.encode(c[-1]["content"], add_special_tokens=False)
        rows.append({"prompt_ids": prompt, "chosen_ids": answer, "rejected_ids": answer[:2]})

    def logps(batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        lp = torch.log_softmax(logits[:, :-1], -1)
        lp = lp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        return (lp * batch["completion_mask"][:, 1:]).sum(1).tolist()

    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        together = logps(collate(rows))
        alone = [logps(collate([r])) for r in rows]
    n = len(rows)
    assert collate(rows)["attention_mask"].float().mean() < 0.9  # the batch does hold padding
    assert together[:n] == pytest.approx([a[0] for a in alone], abs=1e-4)  # chosen
    assert together[n:] == pytest.approx([a[1] for a in alone], abs=1e-4)  # rejected


def _pairs_run(tmp_path, model_path, stage, batching, pairs):
    from hanlm.pipeline.cli import main

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    out = tmp_path / f"{stage}-{batching}"
    argv = [
        stage,
        f"model.path={model_path}",
        f"data.paths=[{data}]",
        "data.valid_fraction=0",
        "data.dedup=none",
        "train.max_steps=20",
        "train.batch_size=2",
        "train.eval_steps=0",
        f"train.batching={batching}",
        "train.precision=fp32",
        f"output_dir={out}",
    ]
    if stage == "dpo":
        argv += [f"ref_cache_dir={tmp_path / 'ref'}", "eval_prompts=0"]
    assert main(argv) == 0
    return json.loads((out / "hanlm.json").read_text())["summary"]


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_grouped_preference_batches_compute_less_padding(tmp_path, tiny_model_path, stage):
    """Short and long pairs in batches of 2: random batches pad the short ones to the long,
    grouped ones hardly pad (counted from the training batches the model received)."""
    short = {"prompt": "你好", "chosen": "好。", "rejected": "不。"}
    long = {
        "prompt": "春眠不觉晓，处处闻啼鸟。" * 4,
        "chosen": "夜来风雨声，花落知多少。" * 4,
        "rejected": "床前明月光，疑是地上霜。" * 4,
    }
    pairs = [dict(p, prompt=f"{p['prompt']}{i}") for i in range(20) for p in (short, long)]
    random = _pairs_run(tmp_path, tiny_model_path, stage, "random", pairs)
    grouped = _pairs_run(tmp_path, tiny_model_path, stage, "grouped", pairs)
    assert (random["batching"], grouped["batching"]) == ("random", "grouped")
    assert random["padding_fraction"] > 0.1, random["padding_fraction"]  # (seed 42: 12.6%)
    assert grouped["padding_fraction"] < 0.05, grouped["padding_fraction"]  # (3.9%)


def _sft(tmp_path, model_path, batching, batch_size=12, steps=1, convs=CONVS * 4):
    from hanlm.pipeline.cli import main

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs))
    out = tmp_path / batching
    rc = main(
        [
            "sft",
            f"model.path={model_path}",
            f"data.paths=[{data}]",
            "data.valid_fraction=0",
            "data.dedup=none",
            f"train.max_steps={steps}",
            f"train.batch_size={batch_size}",
            "train.logging_steps=1",
            "train.eval_steps=0",
            f"train.batching={batching}",
            "train.precision=fp32",
            f"output_dir={out}",
        ]
    )
    assert rc == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "hanlm.json").read_text())["summary"]
    return next(x["loss"] for x in lines if "loss" in x), summary


def test_every_batching_gives_the_same_first_loss_through_hanlm_sft(tmp_path, tiny_model_path):
    """One batch holding every conversation: random, grouped and padding-free must agree."""
    losses = {
        b: _sft(tmp_path, tiny_model_path, b)[0] for b in ("random", "grouped", "padding_free")
    }
    assert losses["grouped"] == pytest.approx(losses["random"], abs=1e-5)
    assert losses["padding_free"] == pytest.approx(losses["random"], abs=1e-5)


def test_grouped_batches_compute_less_padding(tmp_path, tiny_model_path):
    """Short and long conversations, batches of 2 for a whole epoch: random batches pad the
    short ones, grouped ones hardly pad; both counted from the batches the model received."""
    short = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "好。"}]
    long = [
        {"role": "user", "content": "春眠不觉晓，处处闻啼鸟。" * 6},
        {"role": "assistant", "content": "夜来风雨声，花落知多少。" * 6},
    ]
    convs = [short, long] * 40  # the sampler sorts within 4 random mega-batches of 20
    _, random = _sft(tmp_path, tiny_model_path, "random", batch_size=2, steps=40, convs=convs)
    _, grouped = _sft(tmp_path, tiny_model_path, "grouped", batch_size=2, steps=40, convs=convs)
    assert (random["batching"], grouped["batching"]) == ("random", "grouped")
    assert random["padding_fraction"] > 0.1  # (seed 42: 13%; 25% expected over many batches)
    assert grouped["padding_fraction"] < 0.05


def test_batching_choices_and_refusals():
    cfg = TrainConfig()
    grouped = {"train_sampling_strategy": "group_by_length", "length_column_name": "length"}
    assert batching_args(cfg, "sft", padding_free=True) == grouped
    assert batching_args(cfg, "dpo") == grouped
    assert batching_args(TrainConfig(batching="padding_free"), "sft", padding_free=True) == {
        "padding_free": True
    }
    assert batching_args(TrainConfig(batching="random"), "sft") == {}
    with pytest.raises(ConfigError, match="offers random, grouped"):
        batching_args(TrainConfig(batching="padding_free"), "sft (packing)", padding_free=False)
    with pytest.raises(ConfigError, match="hanlm dpo offers random, grouped"):
        batching_args(TrainConfig(batching="padding_free"), "hanlm dpo")
    with pytest.raises(ConfigError, match="pretrain offers random only .*: its blocks are full"):
        check_launch(TrainConfig(batching="grouped"), "hanlm pretrain", "its blocks are full")


def test_padding_is_counted_on_training_batches_only():
    """`count_padding` wraps a trainer's collator; the Trainer forms evaluation batches with the
    same collator after `on_step_end` (an evaluation due) and before `on_evaluate`, and those
    are not counted; nor is a batch the data loader formed ahead that training never used, nor
    anything after training ends."""
    from types import SimpleNamespace

    from hanlm.trainer import count_padding

    def collate(rows):
        width = max(len(r) for r in rows)
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        return {"input_ids": torch.zeros(len(rows), width), "attention_mask": torch.tensor(mask)}

    callbacks = []
    trainer = SimpleNamespace(data_collator=collate, add_callback=callbacks.append)
    counter = count_padding(trainer)
    (phases,) = callbacks
    trainer.data_collator([[1, 2], [1, 2, 3, 4]])  # training: 8 computed, 6 real
    phases.on_step_end(None, None, SimpleNamespace(should_evaluate=True))
    trainer.data_collator([[1], [1, 2, 3, 4, 5, 6, 7, 8]])  # evaluation: not counted
    phases.on_evaluate(None, None, None)
    trainer.data_collator([[1, 2, 3, 4]])  # a micro-batch: 4 computed, 4 real
    phases.on_substep_end(None, None, None)
    trainer.data_collator([[1, 2], [1, 2, 3, 4]])  # the step's last: 8 computed, 6 real
    phases.on_step_end(None, None, SimpleNamespace(should_evaluate=False))
    trainer.data_collator([[1], [1, 2, 3]])  # formed ahead, never trained on: not counted
    phases.on_train_end(None, None, None)
    trainer.data_collator([[1], [1, 2, 3, 4, 5, 6, 7, 8]])  # after training: not counted
    assert counter.counts == (20, 16)
    assert counter.fraction == pytest.approx(0.2)
    counter.restored = (80, 40)  # what a checkpoint counted before a resume adds to the rest
    assert counter.fraction == pytest.approx(1 - 56 / 100)
