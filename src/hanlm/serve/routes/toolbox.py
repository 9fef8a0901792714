"""The embedded demo tools for the chat page (`hanlm serve demo_tools=true`): `GET /hanlm/tools`
lists them (an empty list when they are off) and `POST /hanlm/tools/call` runs one
(`{"name", "arguments"}` -> `{"result"}`), so the page can show a model's calls, their results
and the answer that uses them. Not part of the OpenAI API: a client there runs its own tools."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter

from hanlm.datagen.demo_tools import TOOLS, execute
from hanlm.serve.deps import Authorized, JSONBody, State
from hanlm.serve.errors import APIError

router = APIRouter()


@router.get("/hanlm/tools", include_in_schema=False)
async def tools(state: State) -> dict[str, Any]:
    if not state.demo_tools:
        return {"tools": []}
    return {"tools": TOOLS}


@router.post("/hanlm/tools/call", include_in_schema=False)
async def call(body: JSONBody, state: Authorized) -> dict[str, Any]:
    if not state.demo_tools:
        raise APIError("the demo tools are off: start the server with demo_tools=true", status=404)
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        raise APIError("expected {'name': str, 'arguments': object}", param="name")
    arguments = body.get("arguments") or {}
    if not isinstance(arguments, dict):
        raise APIError("'arguments' must be a JSON object", param="arguments")
    result = await asyncio.to_thread(execute, body["name"], arguments)
    return {"result": result}
