"""`GET /`: the self-contained chat page (page.html), with the served model's name filled in."""

from __future__ import annotations

from html import escape
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from hanlm.serve.deps import State

router = APIRouter()


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page(state: State) -> HTMLResponse:
    html = (resources.files("hanlm.serve") / "page.html").read_text(encoding="utf-8")
    return HTMLResponse(html.replace("{{MODEL}}", escape(state.model_name)))
