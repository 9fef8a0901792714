"""The OpenAI-compatible FastAPI app: `create_app(engine, ...)` over an already loaded model.

Routes (hanlm.serve.routes): `GET /` (chat page), `GET /health`, `GET /v1/models`,
`GET /v1/models/{id}`, `POST /v1/chat/completions`, `POST /v1/completions`,
`POST /v1/embeddings`, `POST /tokenize`, `POST /detokenize`, `GET /tokenizer_info`,
`GET /metrics` (Prometheus). Every error is `{"error": {...}}` with a 4xx/5xx status (an invalid
body is a 400, never a 422; a 429 says when to retry in `Retry-After`); with an API key set,
every route but `/` and `/health` wants `Authorization: Bearer KEY`. Each `/v1/` request is
logged in one line and counted in the metrics (hanlm.serve.metrics); `cors_origins` lets pages
from those origins call the API.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from hanlm.serve.engine import Engine
from hanlm.serve.errors import APIError, invalid_body
from hanlm.serve.metrics import Metrics, RequestLog
from hanlm.serve.routes import (
    chat_completions,
    completions,
    embeddings,
    info,
    page,
    toolbox,
)
from hanlm.serve.state import Limits, ServeState

__all__ = ["Limits", "create_app"]


def create_app(
    engine: Engine,
    model_name: str = "hanlm",
    api_key: str = "",
    limits: Limits | None = None,
    retriever: Any = None,
    aliases: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
    demo_tools: bool = False,
) -> FastAPI:
    """The FastAPI app serving `engine`. Tests build it in-process around a tiny model.

    With a `retriever` (hanlm.rag.answer.Retriever), a chat request's last user turn is answered
    from retrieved passages, and the response carries them in an extra `sources` field.
    `aliases`: more model names requests may use (`*`: any); another name is a 404.
    `cors_origins`: origins whose pages may call the API from a browser (`*`: any).
    `demo_tools`: the chat page offers the embedded demo tools and runs the calls."""
    app = FastAPI(
        title="hanlm serve",
        version="1",
        description="OpenAI-compatible API for a hanlm model (continuous batching).",
    )
    app.state.hanlm = ServeState(
        engine, model_name, api_key, limits or Limits(), retriever, tuple(aliases), demo_tools
    )
    app.state.metrics = metrics = Metrics(lambda: engine.active)
    app.add_middleware(RequestLog, metrics=metrics)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        origins = list(cors_origins)
        app.add_middleware(
            CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _server_error)
    for module in (page, info, chat_completions, completions, embeddings, toolbox):
        app.include_router(module.router)
    return app


RETRY_AFTER_S = 1  # a full queue (429) drains in about this long for a small model


def _response(e: APIError) -> JSONResponse:
    headers = None
    if e.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif e.status == 429:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _api_error(request: Request, e: APIError) -> JSONResponse:
    return _response(e)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _response(APIError(str(e.detail), status=e.status_code, type=kind))


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    """FastAPI's own request validation: OpenAI's 400 naming the field, not FastAPI's 422."""
    return _response(invalid_body(e.errors()))


async def _server_error(request: Request, e: Exception) -> JSONResponse:
    return _response(APIError(f"{type(e).__name__}: {e}", 500, "server_error"))
