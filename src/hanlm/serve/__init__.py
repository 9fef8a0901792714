"""`hanlm serve`: an OpenAI-compatible HTTP API and a web chat page for a hanlm (or any causal-LM)
model directory.

- `server.py`: `ServeConfig` and `run(cfg)` (load the model, start uvicorn).
- `api.py`: the FastAPI app factory, `create_app(engine, ...)`.
- `engine.py`: where tokens come from: transformers' continuous-batching manager, or `generate`
  on a worker thread for what the manager cannot do (seed, penalties, guidance, logprobs, n>1).
- `protocol.py`: request parsing and OpenAI-shaped errors (pure Python, no web framework).
- `text.py`: incremental detokenising and stop strings (never split a character).
- `page.html`: the self-contained chat page served at `/`.
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
