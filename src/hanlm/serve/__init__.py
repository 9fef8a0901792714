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
