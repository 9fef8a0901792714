"""`hanlm serve MODEL_DIR`: load a model (plus an optional LoRA adapter) and serve the
OpenAI-compatible API and the chat page with uvicorn."""

from __future__ import annotations

import gc
import logging
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from hanlm.config import ConfigError, InferenceModelConfig, TemplateName, opt
from hanlm.data.templates import require_template
from hanlm.modeling import load_model, load_tokenizer, quantize_weights
from hanlm.rag.answer import RetrievalOptions, Retriever
from hanlm.serve.engine import Engine
from hanlm.serve.state import Limits
from hanlm.serve.threads import in_fresh_thread

try:  # the web app needs the serve extra (fastapi, pydantic); `run` says so when it is missing
    from hanlm.serve.api import create_app
except ModuleNotFoundError as e:
    if e.name not in ("fastapi", "pydantic", "pydantic_core", "starlette"):
        raise
    create_app = None


@dataclass
class ServeConfig:
    model: InferenceModelConfig = opt(InferenceModelConfig, "the model directory to serve")
    adapter: str = opt("", "a LoRA adapter directory to apply to the model (merged at load)")
    template: TemplateName = opt("auto", "chat template if the model has none")
    name: str = opt("", "model id shown in /v1/models (default: the directory's name)")
    aliases: str = opt(
        "",
        "more model names requests may use, comma-separated ('*': any name); any other name is"
        " answered 404 model_not_found, as OpenAI does",
    )
    demo_tools: bool = opt(
        False,
        "offer the embedded demo tools (a poem's next line, an idiom's meaning, a poet's dynasty,"
        " a calculator) on the chat page, which shows the model's calls and their results",
    )
    cors_origins: str = opt(
        "",
        "origins whose web pages may call the API, comma-separated ('*': any), e.g."
        " http://localhost:3000 (default: none, browsers block cross-origin calls)",
    )
    host: str = opt("127.0.0.1", "address to bind; 0.0.0.0 exposes the server to the network")
    port: int = opt(8000, "TCP port")
    api_key: str = opt(
        "",
        "require 'Authorization: Bearer KEY' on every route but / and /health"
        " (default: the HANLM_API_KEY environment variable; empty = open)",
    )
    continuous_batching: bool = opt(
        True, "batch requests with transformers' continuous batching (false: one at a time)"
    )
    max_queue: int = opt(64, "requests in progress at once; more are answered 429")
    batch_top_p: bool = opt(
        False,
        "also batch requests that set top_p < 1 or top_k (every batched request then pays two"
        " full-vocabulary sorts per token; on a CPU that can cost more than a small model's"
        " forward pass). Off: such requests run one at a time on generate",
    )
    stream_interval_ms: float = opt(
        20.0,
        "streamed tokens made within this many milliseconds of the last chunk wait for the next"
        " and go out together (fewer SSE chunks: a fast model decodes faster; 0 = every token"
        " at once). The first token is never held",
    )
    max_tokens: int = opt(2048, "cap on a request's max_tokens (also the default)")
    max_n: int = opt(8, "most answers per request (n)")
    max_body_bytes: int = opt(1_000_000, "largest request body accepted (413 above)")
    log_level: str = opt("info", "uvicorn log level: critical, error, warning, info, debug")
    retrieval: RetrievalOptions = opt(
        RetrievalOptions,
        "answer chat requests from a hanlm rag index (passages returned in a 'sources' field)",
    )

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port={self.port}: must be between 0 and 65535")
        if self.stream_interval_ms < 0:
            raise ConfigError(f"stream_interval_ms={self.stream_interval_ms}: must be >= 0")
        for key in ("max_queue", "max_tokens", "max_n", "max_body_bytes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)}: must be at least 1")


def load(cfg: ServeConfig) -> tuple[Any, Any]:
    """The model (adapter merged: continuous batching needs plain weights) and tokenizer."""
    tok = load_tokenizer(cfg.model.path)
    require_template(tok, cfg.template, cfg.model.path, "serve")
    # sdpa runs both under continuous batching and in `generate` (eager would be switched to
    # paged attention by the batching manager, which `generate` cannot use).
    if cfg.adapter and not (Path(cfg.adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"adapter={cfg.adapter}: no adapter_config.json there")
    # An adapter is merged into full-precision weights first, and only then quantized.
    plain = replace(cfg.model, quantize="none") if cfg.adapter else cfg.model
    model = load_model(plain, attn_implementation="sdpa")
    if cfg.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, cfg.adapter).merge_and_unload()
        if cfg.model.quantize != "none":
            quantize_weights(model, cfg.model.quantize)
    return model.eval(), tok


def run(cfg: ServeConfig) -> int:
    try:
        import uvicorn
    except ImportError:
        uvicorn = None
    if uvicorn is None or create_app is None:
        raise ConfigError("hanlm serve needs the serve extra: pip install 'hanlm[serve]'")
    api_key = cfg.api_key or os.environ.get("HANLM_API_KEY", "")
    # Loaded on a thread that ends: the OpenMP team its kernels start must not outlive it
    # (hanlm.serve.engine: one team at a time keeps decoding fast on a small CPU).
    model, tok = in_fresh_thread(load, cfg)
    name = cfg.name or Path(cfg.model.path.rstrip("/")).name or "hanlm"
    engine = Engine(
        model,
        tok,
        cfg.continuous_batching,
        cfg.max_queue,
        cfg.batch_top_p,
        stream_interval=cfg.stream_interval_ms / 1000,
    )
    limits = Limits(max_tokens=cfg.max_tokens, max_body_bytes=cfg.max_body_bytes, max_n=cfg.max_n)
    retriever = None
    if cfg.retrieval.index:
        retriever = Retriever(cfg.retrieval)
    app = create_app(
        engine,
        model_name=name,
        api_key=api_key,
        limits=limits,
        retriever=retriever,
        aliases=_names(cfg.aliases),
        cors_origins=_names(cfg.cors_origins),
        demo_tools=cfg.demo_tools,
    )
    _log_requests(cfg.log_level)
    # transformers' batching manager runs gc.collect() each time it stops (here: when the last
    # batched request finishes); over the model's, tokenizer's and web app's objects that took
    # 200 ms with the GIL held, stalling every request. Objects that live as long as the server
    # are frozen out of collections (stop: 220 -> 5-10 ms).
    gc.freeze()
    open_to = (
        "" if cfg.host in ("127.0.0.1", "localhost", "::1") else " (reachable from the network)"
    )
    print(
        f"[hanlm] serving {name} at http://{cfg.host}:{cfg.port}/{open_to};"
        f" API key {'required' if api_key else 'off'}",
        file=sys.stderr,
    )
    try:
        # (no access log: hanlm.serve.metrics logs each API request with its tokens and times)
        uvicorn.run(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False)
    finally:
        engine.close()
    return 0


def _names(value: str) -> list[str]:
    return [n.strip() for n in value.split(",") if n.strip()]


def _log_requests(level: str) -> None:
    """The request log (logger `hanlm.serve`) on stderr, at uvicorn's log level."""
    logger = logging.getLogger("hanlm.serve")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s [hanlm] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(getattr(logging, level.upper(), logging.DEBUG))  # (uvicorn's trace)
    logger.propagate = False
