"""The model and its tokenizer: `GET /health` (open), `GET /v1/models`, `GET /v1/models/{id}`,
`POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info` (vLLM's names and shapes), and
the Prometheus metrics, `GET /metrics`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from hanlm.serve.deps import Authorized, JSONBody, State
from hanlm.serve.errors import APIError
from hanlm.serve.protocol import (
    DetokenizeBody,
    TokenizeBody,
    chat_messages,
    request_body,
    validate,
)

router = APIRouter()


@router.get("/health")
async def health(state: State) -> dict[str, Any]:
    return {"status": "ok", "model": state.model_name, "active": state.engine.active}


def _model(state: Any, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": state.created,
        "owned_by": "hanlm",
        "max_model_len": state.engine.context,
    }


@router.get("/v1/models")
async def models(state: Authorized) -> dict[str, Any]:
    """The served model under each of its names (the served name first)."""
    return {"object": "list", "data": [_model(state, n) for n in state.names]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, state: Authorized) -> dict[str, Any]:
    return _model(state, state.model_id(model_id))


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, state: Authorized) -> Response:
    try:
        body, kind = request.app.state.metrics.render()
    except RuntimeError as e:
        raise APIError(f"no metrics: {e} (pip install 'hanlm[serve]')", status=501) from None
    return Response(body, media_type=kind)


@router.post("/tokenize", openapi_extra=request_body(TokenizeBody))
async def tokenize(body: JSONBody, state: Authorized) -> Any:
    req = validate(TokenizeBody, body)
    if req.messages is not None:
        generation_prompt = req.add_generation_prompt is not False
        ids = state.chat_ids(chat_messages(req.messages), generation_prompt)
    else:
        prompt = req.prompt if req.prompt is not None else req.text
        if prompt is None:
            raise APIError("'prompt' must be a string (or send 'messages')", param="prompt")
        special = req.add_special_tokens is not False
        ids = state.tok(prompt, add_special_tokens=special)["input_ids"]
    return {"tokens": list(ids), "count": len(ids), "max_model_len": state.engine.context}


@router.post("/detokenize", openapi_extra=request_body(DetokenizeBody))
async def detokenize(body: JSONBody, state: Authorized) -> Any:
    ids = state.encode(validate(DetokenizeBody, body).tokens, "tokens")
    return {"prompt": state.tok.decode(ids, skip_special_tokens=False)}


@router.get("/tokenizer_info")
async def tokenizer_info(state: Authorized) -> Any:
    tok = state.tok
    return {
        "tokenizer_class": type(tok).__name__,
        "vocab_size": len(tok),
        "model_max_length": state.engine.context,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.pad_token,
        "unk_token": tok.unk_token,
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
        "stop_token_ids": state.engine.stop_ids,
    }
