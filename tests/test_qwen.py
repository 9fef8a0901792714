"""The commands on the architectures Chinese practitioners adapt: tiny random Qwen2 (attention
biases) and Qwen3 (q/k norms) models with tied embeddings and a tokenizer laid out like Qwen's
(its split regex, no BOS, special tokens after the vocabulary, Qwen2.5's own chat template)."""

from __future__ import annotations

import json

import pytest

from hanlm import ASSETS
from hanlm.pipeline import cli
from hanlm.runs import read_run

ARCHS = ["qwen2", "qwen3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=ARCHS)
def qwen(request, tmp_path_factory):
    from hanlm.testing import tiny_qwen_dir

    return tiny_qwen_dir(tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.fixture(scope="module")
def sft_dir(qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft") / "out"
    argv = ["sft", f"model.path={qwen}", "train.max_steps=30", "train.lr=5e-3"]
    argv += ["train.batch_size=8", "data.max_records=64", "generation.max_new_tokens=4"]
    assert cli.main([*argv, "train.eval_steps=0", f"output_dir={out}"]) == 0
    return out


def _arch(path):
    return json.loads((path / "config.json").read_text())["model_type"]


def test_the_tiny_models_are_laid_out_like_qwen(qwen):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(qwen)
    config = AutoConfig.from_pretrained(qwen)
    n = len(tok)
    assert tok.convert_ids_to_tokens([n - 3, n - 2, n - 1]) == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    assert tok.bos_token is None and tok.eos_token == "<|im_end|>" and config.tie_word_embeddings
    text = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are Qwen")  # its default system prompt


def test_sft_full_trains_and_the_chat_answers(sft_dir, capsys):
    s = read_run(sft_dir)["summary"]
    assert s["answer_loss"] < s["initial_answer_loss"] - 0.5
    capsys.readouterr()
    assert (
        cli.main(["chat", str(sft_dir), "--prompt", "床前明月光", "generation.max_new_tokens=4"])
        == 0
    )
    assert capsys.readouterr().out.strip()


def test_lora_targets_every_projection_and_its_bias(qwen, tmp_path):
    out = tmp_path / "lora"
    argv = ["sft", f"model.path={qwen}", "lora.enabled=true", "lora.keep_adapter=true"]
    argv += ["train.max_steps=2", "data.max_records=16", "train.batch_size=4"]
    assert cli.main([*argv, f"output_dir={out}"]) == 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert {"q_proj", "k_proj", "v_proj"} <= set(adapter["target_modules"])
    merged = json.loads((out / "config.json").read_text())
    assert merged["model_type"] == _arch(qwen)


def test_pretrain_continues_and_held_out_loss_falls(qwen, tmp_path):
    out = tmp_path / "pt"
    argv = ["pretrain", f"model.path={qwen}", f"data.paths=[{ASSETS / 'zh_corpus.train.jsonl.gz'}]"]
    argv += [f"data.valid_paths=[{ASSETS / 'zh_corpus.valid.jsonl.gz'}]", "data.max_records=200"]
    argv += ["block_size=64", "train.max_steps=20", "train.lr=5e-3", "train.eval_steps=0"]
    assert cli.main([*argv, f"output_dir={out}"]) == 0
    s = read_run(out)["summary"]
    assert s["eval_loss"] < s["initial_eval_loss"]


def test_reward_dpo_ppo_and_grpo_run(qwen, tmp_path):
    from transformers import AutoConfig

    small = ["data.max_records=32", "train.max_steps=2", "train.batch_size=4"]
    rm = tmp_path / "rm"
    assert cli.main(["reward", f"model.path={qwen}", *small, f"output_dir={rm}"]) == 0
    assert AutoConfig.from_pretrained(rm).model_type == _arch(qwen)
    assert cli.main(["dpo", f"model.path={qwen}", *small, f"output_dir={tmp_path / 'dpo'}"]) == 0
    rl = [f"model.path={qwen}", "train.max_steps=2", "eval_prompts=4"]
    assert cli.main(["ppo", *rl, f"reward_model={rm}", f"output_dir={tmp_path / 'ppo'}"]) == 0
    grpo = ["grpo", *rl, f"reward_models=[{rm}]", "num_generations=2", "max_new_tokens=4"]
    assert cli.main([*grpo, "train.batch_size=4", f"output_dir={tmp_path / 'grpo'}"]) == 0
    for stage in ("dpo", "ppo", "grpo"):
        assert read_run(tmp_path / stage)["status"] == "complete", stage


def test_vocab_merge_keeps_every_id_and_shortens_chinese(qwen, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "vocab"
    argv = ["vocab", f"model.path={qwen}", "vocab_size=900", "data.max_records=300"]
    assert cli.main([*argv, f"output_dir={out}"]) == 0
    base, merged = AutoTokenizer.from_pretrained(qwen), AutoTokenizer.from_pretrained(out)
    assert all(merged.get_vocab()[t] == i for t, i in base.get_vocab().items())
    text = "山中相送罢，日暮掩柴扉。春草明年绿，王孙归不归？"
    assert len(merged(text)["input_ids"]) < len(base(text)["input_ids"])
    assert merged.decode(merged(text)["input_ids"]) == text


@pytest.mark.parametrize("gtype", ["f16", "q8_0"])
def test_gguf_export_writes_the_qwen_architecture(qwen, tmp_path, gtype):
    """On the random model, as for Llama: after SFT the tiny model's peaked logits move by up to
    7% of the largest under q8_0, the same whether dequantised here or read back from the file."""
    from gguf import GGUFReader

    out = tmp_path / "gguf"
    args = ["export", str(qwen), "format=gguf", f"gguf_type={gtype}", f"output_dir={out}"]
    assert cli.main([*args, "judge=transformers"]) == 0
    report = read_run(out)
    parity = report["parity"][f"gguf_{gtype}"]
    assert parity["passed"] and parity["greedy_equal"]
    assert parity["pre_tokenizer"] == "qwen2" and parity["chat_template_equal"]
    reader = GGUFReader(str(next(out.glob("*.gguf"))))
    arch = _arch(qwen)
    assert reader.fields["general.architecture"].contents() == arch
    names = {t.name for t in reader.tensors}
    if arch == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    else:
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
        assert reader.fields["qwen3.attention.key_length"].contents() == 16
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    # the turn ends where generation stops: EOS is <|im_end|> (an end-of-turn id only if it differs)
    end = (
        reader.fields.get("tokenizer.ggml.eot_token_id")
        or reader.fields["tokenizer.ggml.eos_token_id"]
    )
    assert reader.fields["tokenizer.ggml.tokens"].contents()[end.contents()] == "<|im_end|>"
    assert "tokenizer.ggml.bos_token_id" not in reader.fields  # Qwen has no BOS


def test_a_pruned_vocabulary_exports(sft_dir, tmp_path):
    out = tmp_path / "pruned"
    # one corpus mixing chats, plain text and preference pairs, each file read on its own
    kinds = ["sft.valid.jsonl.gz", "zh_corpus.valid.jsonl.gz", "preference.valid.jsonl.gz"]
    corpus = ",".join(str(ASSETS / k) for k in kinds)
    argv = ["export", str(sft_dir), f"prune_vocab=[{corpus}]", "prune_max_records=50"]
    assert cli.main([*argv, "format=both", f"output_dir={out}"]) == 0
    report = read_run(out)
    assert all(p["passed"] for p in report["parity"].values())
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == _arch(sft_dir)
    assert config["vocab_size"] < json.loads((sft_dir / "config.json").read_text())["vocab_size"]


def test_eval_and_embed(qwen, tmp_path, capsys):
    assert cli.main(["eval", str(qwen), f"output_dir={tmp_path / 'eval'}", "cloze_items=0"]) == 0
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    assert report["benchmarks"]
    capsys.readouterr()
    assert cli.main(["embed", str(qwen), "--text", "你好"]) == 0
    assert capsys.readouterr().out.strip()


def test_serve_answers_with_the_models_own_template(sft_dir):
    """The OpenAI API over continuous batching, through the real client: the greedy answer is
    `generate`'s, and the prompt is Qwen's own template (kept by SFT, default system prompt
    included) exactly as `apply_chat_template` renders it."""
    import openai

    from hanlm.serve.api import Limits, create_app
    from hanlm.serve.engine import Engine
    from hanlm.serve.server import ServeConfig, load
    from hanlm.testing import QWEN_TEMPLATE, ServedApp

    cfg = ServeConfig()
    cfg.model.path = str(sft_dir)
    model, tok = load(cfg)
    engine = Engine(model, tok, max_queue=4)
    served = ServedApp(create_app(engine, model_name="qwen", limits=Limits(max_tokens=64)))
    try:
        client = openai.OpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
        messages = [{"role": "user", "content": "床前明月光的下一句是什么？"}]
        got = client.chat.completions.create(
            model="qwen", messages=messages, max_tokens=6, temperature=0
        )
        import torch

        assert tok.chat_template == QWEN_TEMPLATE
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert text.startswith("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud.")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)
        want = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
        from hanlm.serve.text import incomplete_utf8, token_bytes

        data = b"".join(bytes(token_bytes(tok, t) or b"") for t in out[0, len(ids) :].tolist())
        if incomplete_utf8(data):  # cut inside a character: the server ends before it
            want = want[:-1]
        assert got.choices[0].message.content == want
        assert got.usage.prompt_tokens == len(ids)
    finally:
        served.close()
        engine.close()


def test_rag_index_and_ask(qwen, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "li_bai.txt").write_text("李白，字太白，号青莲居士，唐代诗人。", encoding="utf-8")
    (docs / "du_fu.txt").write_text("杜甫，字子美，唐代诗人，被称为诗圣。", encoding="utf-8")
    idx = tmp_path / "idx"
    argv = ["rag", "index", str(docs), f"model.path={qwen}", f"output_dir={idx}", "bm25=bigram"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    ask = ["rag", "ask", str(idx), str(qwen), "杜甫被称为什么？", "--json"]
    assert cli.main([*ask, "generation.max_new_tokens=4"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["sources"]


def test_distill_and_embed_train(qwen, tmp_path, capsys):
    chats = ASSETS / "sft.valid.jsonl.gz"
    distill = ["distill", f"model.path={qwen}", "context=请用一句话回答。", f"data.paths=[{chats}]"]
    distill += ["data.max_records=24", "data.valid_fraction=0.25", "max_new_tokens=4"]
    distill += ["eval_prompts=2", "train.max_steps=2", "train.batch_size=4"]
    assert cli.main([*distill, f"output_dir={tmp_path / 'distill'}"]) == 0
    assert read_run(tmp_path / "distill")["status"] == "complete"

    pairs = tmp_path / "pairs.jsonl"
    rows = [
        {"query": "李白是谁？", "positive": "李白，字太白，唐代诗人。"},
        {"query": "杜甫是谁？", "positive": "杜甫，字子美，被称为诗圣。"},
        {"query": "苏轼是谁？", "positive": "苏轼，字子瞻，号东坡居士。"},
        {"query": "王维是谁？", "positive": "王维，字摩诘，诗佛。"},
    ]
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    embed = ["embed", "train", f"model.path={qwen}", f"data=[{pairs}]", "valid_fraction=0"]
    embed += ["train.batch_size=4", "train.max_steps=2"]
    if _arch(qwen) == "qwen3":  # SGPT-BE's BitFit needs biases, which Qwen3 has none of
        capsys.readouterr()
        assert cli.main([*embed, "trainable=bias", f"output_dir={tmp_path / 'refused'}"]) == 1
        err = capsys.readouterr().err
        assert "no bias terms" in err and "Loading weights" not in err  # refused before loading
        assert not (tmp_path / "refused").exists()
        embed.append("trainable=lora")
    else:
        embed.append("trainable=bias")  # Qwen2's q/k/v biases
    assert cli.main([*embed, f"output_dir={tmp_path / 'embed'}"]) == 0
    assert read_run(tmp_path / "embed")["status"] == "complete"
