"""Talking to a model: `hanlm serve` (an OpenAI-compatible HTTP API and a web chat page) and
`hanlm chat` (the terminal).

- `server.py`: `ServeConfig` and `run(cfg)` (load the model, start uvicorn).
- `api.py`: `create_app(engine, ...)` assembles the FastAPI app from `routes/` (one router per
  endpoint group: chat, completions, embeddings, info, the page) over `state.py`'s `ServeState`
  (limits, API key, prompt encoding) and `deps.py`'s dependencies.
- `protocol.py`: the pydantic request models; `errors.py`: OpenAI-shaped errors (400, never 422).
- `engine.py`: where tokens come from: transformers' continuous-batching manager, or `generate`
  on a worker thread for what the manager cannot do (seed, penalties, guidance, logprobs, n>1);
  `jobs.py` its requests and events, `sampling.py` their settings, `processors.py` the logits
  processors, stopping criterion and streamer, `constrain.py` JSON-schema grammars
  (`response_format`, through xgrammar), `threads.py` threads that leave no OpenMP team.
- `metrics.py`: Prometheus metrics (`/metrics`) and the per-request log line.
- `streaming.py`: job events into text pieces, whole answers and server-sent events.
- `text.py`: incremental detokenising and stop strings (never split a character).
- `chat.py`: the terminal chat; `page.html`: the self-contained chat page served at `/`.
"""

from hanlm.stage import Command

COMMANDS = (
    Command(
        "chat",
        "hanlm.serve.chat",
        "ChatConfig",
        "chat with a model in the terminal, streaming (or answer one --prompt and exit)",
        positional="model.path",
        usage="MODEL_DIR",
    ),
    Command(
        "serve",
        "hanlm.serve.server",
        "ServeConfig",
        "serve an OpenAI-compatible API (continuous batching) and a web chat page",
        positional="model.path",
        usage="MODEL_DIR",
    ),
)
