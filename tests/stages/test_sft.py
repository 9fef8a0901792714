"""hanlm sft and hanlm chat on a tiny model: answer loss falls, stop tokens saved, chat works."""

import io
import json
import subprocess
import sys

import pytest

from hanlm import IGNORE_INDEX
from hanlm.config import load_config
from hanlm.generation import GenerationOptions, generate, stream
from hanlm.runs import read_run
from hanlm.serve.chat import ChatConfig, ChatSession
from hanlm.testing import tiny_tokenizer
from hanlm.train.sft import SFTConfig, fit_to_length, run

QA = [
    ("床前明月光的下一句是什么？", "疑是地上霜。"),
    ("白日依山尽的下一句是什么？", "黄河入海流。"),
    ("春眠不觉晓的下一句是什么？", "处处闻啼鸟。"),
    ("Say hello.", "Hello, world!"),
]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("sftdata")
    rows = []
    for i in range(64):
        q, a = QA[i % len(QA)]
        rows.append({"instruction": q, "input": "", "output": a, "system": f"#{i}"})
    (d / "train.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    valid = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QA
    ]
    (d / "valid.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in valid))
    return d


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sft_data, tiny_model_path):
    out = tmp_path_factory.mktemp("sft") / "out"
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.path={tiny_model_path}",
            f"data.paths=[{sft_data / 'train.jsonl'}]",
            f"data.valid_paths=[{sft_data / 'valid.jsonl'}]",
            "data.dedup=none",
            "train.max_steps=40",
            "train.batch_size=8",
            "train.lr=5e-3",
            "train.eval_steps=20",
            "generation.max_new_tokens=12",
            f"output_dir={out}",
        ],
    )
    return run(cfg)


def test_answer_loss_falls_and_stop_tokens_are_saved(trained, summary_declared):
    s = read_run(trained)["summary"]
    summary_declared(trained)
    assert s["answer_loss"] < s["initial_answer_loss"] - 1.0
    assert 0 <= s["stop_rate"] <= 1 and "initial_stop_rate" in s
    from transformers import AutoTokenizer, GenerationConfig

    tok = AutoTokenizer.from_pretrained(trained)
    gen = GenerationConfig.from_pretrained(trained)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert eot in gen.eos_token_id and tok.eos_token_id in gen.eos_token_id
    assert "{% generation %}" in tok.chat_template


def test_save_reload_gives_identical_greedy_output(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples = [json.loads(x) for x in (trained / "samples.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(trained)
    tok = AutoTokenizer.from_pretrained(trained)
    convs = [[{"role": "user", "content": s["prompt"]}] for s in samples]
    again = generate(model, tok, convs, GenerationOptions(max_new_tokens=12, temperature=0.0))
    assert [a["text"] for a in again] == [s["text"] for s in samples]


def test_streaming_gives_the_same_text_in_pieces(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained)
    tok = AutoTokenizer.from_pretrained(trained)
    opts = GenerationOptions(max_new_tokens=12, temperature=0.0, repetition_penalty=1.0)
    conv = [{"role": "user", "content": QA[0][0]}]
    pieces = list(stream(model, tok, conv, opts))
    assert "".join(pieces).strip() == generate(model, tok, [conv], opts)[0]["text"].strip()


def test_chat_session_keeps_history_and_commands(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained)
    tok = AutoTokenizer.from_pretrained(trained)
    out = io.StringIO()
    s = ChatSession(model, tok, GenerationOptions(max_new_tokens=8, temperature=0.0))
    s.ask(QA[0][0], out)
    s.ask(QA[1][0], out)
    assert [m["role"] for m in s.history] == ["user", "assistant"] * 2
    assert s.messages("x")[-1] == {"role": "user", "content": "x"}
    assert s.command("/system 你是诗人", out) and s.system == "你是诗人" and s.history == []
    assert s.messages("x")[0] == {"role": "system", "content": "你是诗人"}
    assert s.command("/reset", out) and not s.command("/exit", out)


def _hanlm(*args, stdin=""):
    code = "import sys; from hanlm.pipeline.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_chat_cli_over_stdin(trained):
    proc = _hanlm(
        "chat",
        str(trained),
        "generation.temperature=0",
        "generation.max_new_tokens=8",
        stdin=f"{QA[0][0]}\n/system 你是诗人\n/reset\n/bogus\n{QA[1][0]}\n/exit\nnever read\n",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "(system prompt set: 你是诗人)" in lines and "(history cleared)" in lines
    assert any(line.startswith("unknown command /bogus") for line in lines)
    assert len(lines) == 5  # two streamed answers (one line each) and three command replies


def test_chat_cli_one_shot_prompt(trained):
    proc = _hanlm("chat", str(trained), "--prompt", QA[3][0], "--generation.temperature", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained)
    tok = AutoTokenizer.from_pretrained(trained)
    want = generate(
        model,
        tok,
        [[{"role": "user", "content": QA[3][0]}]],
        ChatConfig().generation.__class__(temperature=0.0),
    )
    assert proc.stdout.strip() == want[0]["text"].strip()


def test_truncation_policy_drops_oldest_turns_and_never_cuts_an_answer():
    tok = tiny_tokenizer()
    long = [{"role": "system", "content": "系统"}]
    for i in range(6):
        long += [
            {"role": "user", "content": f"问题{i}" * 5},
            {"role": "assistant", "content": f"回答{i}" * 5},
        ]
    full_len = len(tok.apply_chat_template(long, tokenize=True, return_dict=True)["input_ids"])
    ids, labels, dropped = fit_to_length(tok, long, full_len - 1, "truncate_history")
    assert len(ids) <= full_len - 1 and dropped == 2
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\n系统") and "问题0" not in text and "回答5" in text
    assert fit_to_length(tok, long, full_len - 1, "drop") is None
    # a single exchange that cannot fit is dropped, never cut
    assert fit_to_length(tok, long[:3], 5, "truncate_history") is None
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(labels, ids))


def test_truncation_counts_are_reported(tmp_path, tiny_model_path, sft_data):
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.path={tiny_model_path}",
            f"data.paths=[{sft_data / 'train.jsonl'}]",
            "data.dedup=none",
            "max_length=20",
            "truncation=drop",
            "train.max_steps=1",
            "eval_prompts=0",
            f"output_dir={tmp_path / 'o'}",
        ],
    )
    with pytest.raises(ValueError, match="no conversation fits max_length=20"):
        run(cfg)


def test_qlora_on_cpu_fails_clearly(tmp_path, tiny_model_path):
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.path={tiny_model_path}",
            "quantize=4bit",
            "lora.enabled=true",
            f"output_dir={tmp_path}",
        ],
    )
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        run(cfg)


def test_lora_sft_trains_new_template_tokens(tmp_path, sft_data):
    from hanlm.testing import tiny_model_dir

    base = tiny_model_dir(tmp_path / "base", template="alpaca")  # no chatml tokens yet
    cfg = load_config(
        SFTConfig,
        None,
        [
            f"model.path={base}",
            "template=chatml",
            f"data.paths=[{sft_data / 'train.jsonl'}]",
            "data.dedup=none",
            "lora.enabled=true",
            "train.max_steps=4",
            "eval_prompts=0",
            f"output_dir={tmp_path / 'o'}",
        ],
    )
    out = run(cfg)
    from safetensors.torch import load_file

    emb = load_file(str(out / "model.safetensors"))["model.embed_tokens.weight"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert emb.shape[0] >= len(tok) and tok.convert_tokens_to_ids("<|im_end|>") < emb.shape[0]
    assert read_run(out)["summary"]["template_tokens_added"] == ["<|im_start|>", "<|im_end|>"]
