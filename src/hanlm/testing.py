"""Tiny tokenizers and models for tests and CPU smoke runs (no network, seconds to build)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hanlm.config import ModelConfig
from hanlm.data.templates import apply_template, render
from hanlm.data.tools import function_tool
from hanlm.modeling import build_model, load_model, load_tokenizer, save_model

SAMPLE_TEXT = [
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？",
    "In the beginning God created the heavens and the earth.",
    "Hello, world! How are you today? 😀 Fine, thanks.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def tiny_tokenizer(
    vocab_size: int = 600, template: str = "chatml", texts: list[str] | None = None
) -> Any:
    """A byte-level BPE tokenizer (any text round-trips) with a chat template installed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((texts or SAMPLE_TEXT) * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    apply_template(fast, template)
    return fast


def tiny_model_dir(
    path: str | Path, template: str = "chatml", seed: int = 0, max_positions: int = 512, **dims: Any
) -> Path:
    """Save a randomly initialised `test`-preset LLaMA and its tokenizer to `path`."""
    import torch

    torch.manual_seed(seed)
    tok = tiny_tokenizer(template=template)
    model = build_model("test", vocab_size=len(tok), max_positions=max_positions, **dims)
    model.config.bos_token_id = tok.bos_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    return save_model(model, tok, path)


# Qwen2 / Qwen2.5's pre-tokenizer: its split regex, then bytes to characters (no regex of its own).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5-Instruct's own chat template, as its GGUF carries it (Apache-2.0): a default system
# prompt when the conversation has none, tools in the system turn, `<tool_call>` JSON in the
# assistant's turn, tool results as `<tool_response>` in a user turn.
QWEN_TEMPLATE = (
    Path(__file__).parent / "assets" / "templates" / "qwen2.5-instruct.jinja"
).read_text(encoding="utf-8")


# Three short conversations a tiny model can be taught in seconds (`teach`): Chinese with
# characters that span several byte tokens, English, and one with a system prompt.
TAUGHT_CHATS = [
    [
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！我是小龙，喜欢写诗。"},
    ],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
    ],
    [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "长城有多长？"},
        {"role": "assistant", "content": "两万多公里。"},
    ],
]
TAUGHT_PROMPTS = [chat[-2]["content"] for chat in TAUGHT_CHATS]


# Two tools in the shape of the embedded tool set's: a lookup and a calculator.
TOOLS = [
    function_tool("poet_dynasty", "查询诗人所属的朝代", {"poet": "string"}),
    function_tool("calculator", "计算算术表达式", {"expression": "string"}),
]


def qwen_tokenizer(vocab_size: int = 600, texts: list[str] | None = None) -> Any:
    """A byte-level BPE tokenizer laid out like Qwen's: Qwen's split regex, no BOS, the special
    tokens after the vocabulary (`<|endoftext|>` pads, `<|im_end|>` ends a turn and is EOS), and
    Qwen2.5-Instruct's chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((texts or SAMPLE_TEXT) * 20, trainer)
    tok.add_special_tokens(QWEN_SPECIAL)  # in Qwen's order, right after the vocabulary
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = QWEN_TEMPLATE
    return fast


def tiny_qwen_dir(path: str | Path, arch: str = "qwen2", seed: int = 0) -> Path:
    """Save a random tiny Qwen2 (attention biases) or Qwen3 (q/k norms, explicit head_dim)
    model with tied embeddings and a Qwen-like tokenizer (`qwen_tokenizer`) to `path`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    tok = qwen_tokenizer()
    dims = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**dims))
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=16, **dims))
    else:
        raise ValueError(f"arch must be qwen2 or qwen3, not {arch!r}")
    return save_model(model, tok, path)


def sp_model_dir(path: str | Path, texts: list[str], vocab_size: int = 400) -> Path:
    """Save a LLaMA-style SentencePiece BPE tokenizer (byte fallback, identity normaliser, the
    `LlamaTokenizer` class) trained on `texts`, and a random `test`-preset model, to `path`."""
    import io
    import json

    import sentencepiece as spm
    import torch
    from transformers import AutoTokenizer

    d = Path(path)
    d.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts * 10),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (d / "tokenizer.model").write_bytes(buf.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    config = {"tokenizer_class": "LlamaTokenizer", **special}
    (d / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tok = AutoTokenizer.from_pretrained(d)
    torch.manual_seed(0)
    save_model(build_model("test", vocab_size=len(tok), max_positions=256), None, d)
    return d


def write_csv(path: str | Path, rows: list, header: list | None = None) -> None:
    """A CSV file as the C-Eval / CMMLU / MMLU layouts have them (parents created)."""
    import csv

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)


def teach(model_dir: str | Path, chats: list[Any], steps: int = 120) -> Path:
    """Fit a tiny model dir to answer these conversations (answer-only loss, full batch, seconds
    on CPU) and save it in place: tests then know what a served model will say. A conversation
    is a message list, or {"messages": [...], "tools": [...]} to teach it with tools declared."""
    import torch

    tok = load_tokenizer(str(model_dir))
    model = load_model(ModelConfig(path=str(model_dir)))
    batch = [
        render(tok, c["messages"], tools=c.get("tools")) if isinstance(c, dict) else render(tok, c)
        for c in chats
    ]
    width = max(len(ids) for ids, _ in batch)
    ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in batch])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if loss.item() < 0.01:
            break
    return save_model(model.eval(), tok, model_dir)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedApp:
    """An ASGI app served by uvicorn in a daemon thread on a free local port (tests, demos)."""

    def __init__(self, app: Any, timeout: float = 30.0) -> None:
        import threading
        import time

        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def tensorboard_scalars(log_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under `log_dir` (subdirectories included),
    read back with TensorBoard's own reader: tag -> [(step, value), ...] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    dirs = sorted({p.parent for p in Path(log_dir).rglob("events.out.tfevents.*")})
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0})  # 0: keep every event
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in out.items()}


def wandb_offline_history(run_file: str | Path) -> tuple[list[dict[str, Any]], int | None]:
    """The history rows ({key: value}, `_step` included) and the exit code of an offline wandb
    run, read from its `run-*.wandb` file: a 7-byte header, then records laid out as in
    LevelDB's log (4-byte CRC, 2-byte length, 1-byte type, in 32 KiB blocks), each record a
    `wandb_internal_pb2.Record`. The exit code is None while the run was not finished."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{run_file}: not a wandb run file")
    rows: list[dict[str, Any]] = []
    exit_code, pos, chunks = None, 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (2, 3):  # the first or a middle part of a record split across blocks
            continue
        record = pb.Record.FromString(chunks)
        chunks = b""
        if record.HasField("history"):
            rows.append(
                {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json)
                    for i in record.history.item
                }
            )
        elif record.HasField("exit"):
            exit_code = record.exit.exit_code
    return rows, exit_code


def wandb_offline_runs(wandb_dir: str | Path) -> list[tuple[list[dict[str, Any]], int | None]]:
    """(history rows, exit code) of each offline wandb run under `wandb_dir` (its WANDB_DIR),
    oldest first."""
    files = sorted((Path(wandb_dir) / "wandb").glob("offline-run-*/*.wandb"))
    return [wandb_offline_history(f) for f in files]


def mlflow_file_runs(
    store: str | Path, metric: str
) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """(name, status, [(step, value)] of `metric`) of each run in mlflow's file store `store`
    (every experiment), oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(Path(store).as_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    out = []
    for r in client.search_runs(experiments, order_by=["attributes.start_time ASC"]):
        history = client.get_metric_history(r.info.run_id, metric)
        out.append((r.info.run_name, r.info.status, [(m.step, m.value) for m in history]))
    return out
