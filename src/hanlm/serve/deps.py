"""FastAPI dependencies the routers share: the server's state, the API-key check, and the
request body as decoded JSON (read by `ServeState.read_json`: size-limited, any content type;
the routes validate it with hanlm.serve.protocol's models)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request

from hanlm.serve.state import ServeState


async def serve_state(request: Request) -> ServeState:
    return request.app.state.hanlm


async def authorized(request: Request) -> ServeState:
    """The state, once the request has shown the API key (if one is set)."""
    state: ServeState = request.app.state.hanlm
    state.check_auth(request.headers)
    return state


async def json_body(request: Request, state: Annotated[ServeState, Depends(authorized)]) -> Any:
    return await state.read_json(request)


State = Annotated[ServeState, Depends(serve_state)]
Authorized = Annotated[ServeState, Depends(authorized)]
JSONBody = Annotated[Any, Depends(json_body)]  # (after the key check: a 401 comes first)
