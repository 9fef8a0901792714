"""`POST /v1/chat/completions`: a chat answer (or `n`), whole or streamed as server-sent events.

With a retriever, the last user turn is answered from retrieved passages, returned in an extra
`sources` field (streamed: a first chunk with no choices). `tools` reach the model through its
chat template, and its `<tool_call>` blocks come back as OpenAI `tool_calls`
(hanlm.serve.tool_choice; a forced call is constrained like a `response_format`). A
`response_format` of
`json_object` or `json_schema` constrains the output with a grammar (hanlm.serve.constrain);
such requests run on the engine's `generate` path."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from hanlm.data.templates import prompt_ids
from hanlm.serve.deps import Authorized, JSONBody
from hanlm.serve.jobs import Job, Token
from hanlm.serve.metrics import Served
from hanlm.serve.protocol import ChatCompletionBody, ChatRequest, parse_chat, request_body
from hanlm.serve.state import ServeState, usage
from hanlm.serve.streaming import Answer, collect, pieces, sse, stream_response, until_disconnect
from hanlm.serve.text import token_bytes, token_text
from hanlm.serve.tool_choice import (
    OPEN,
    CallStream,
    call_deltas,
    call_schema,
    split_answer,
    tool_conversation,
)

router = APIRouter()


async def chat_request(body: JSONBody, state: Authorized) -> ChatRequest:
    return parse_chat(body, state.limits.max_tokens, state.limits.max_n)


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionBody))
async def chat_completions(
    request: Request, req: Annotated[ChatRequest, Depends(chat_request)], state: Authorized
) -> Any:
    model = state.model_id(req.model)
    state.check_bias(req.sampling.logit_bias)
    req.sampling.constraint = await state.constraint(req.response_format)
    calls = req.tools
    req.messages = tool_conversation(req.messages, calls, state.tok)
    if calls is not None and calls.forced:  # the call's JSON follows the tools' schemas
        req.sampling.constraint = await asyncio.to_thread(
            state.engine.grammars.constraint,
            call_schema(calls),
            True,
            f"{OPEN}\n",
            "\n</tool_call>",
            "tool_choice",
        )
    hits: list[Any] = []
    retriever = state.retriever
    if retriever is not None and req.messages[-1]["role"] == "user":
        question = req.messages[-1]["content"]
        grounded, hits = await state.engine.run(retriever.prompt, question)
        req.messages = [*req.messages[:-1], {"role": "user", "content": grounded}]
    prompt = state.chat_ids(req.messages, tools=calls.prompt_tools if calls else None)
    s = state.fit(req.sampling, len(prompt), "messages")
    if s.guidance_scale != 1 and req.negative_prompt:
        s.negative_ids = prompt_ids(state.tok, [{"role": "user", "content": req.negative_prompt}])
    head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time())}
    head["model"] = model
    served = Served(head["id"], len(prompt), user=req.user, path=state.engine.route(s))
    request.state.hanlm = served
    ticket = state.engine.admit()
    try:
        job = state.engine.submit(prompt, s)
    except BaseException:
        ticket.release()
        raise
    if req.stream:
        events = _events(state, req, job, head, served, hits)
        return stream_response(events, [job], ticket)
    try:
        answers = await until_disconnect(request, collect(job, state.tok, s.n), [job])
    finally:
        ticket.release()
    served.completion_tokens = sum(len(a.tokens) for a in answers)
    served.first_token = job.first_token - job.started if job.first_token else None
    return _completion(state, req, answers, head, len(prompt), hits)


def _completion(
    state: ServeState,
    req: ChatRequest,
    answers: list[Answer],
    head: dict[str, Any],
    prompt_len: int,
    hits: list[Any],
) -> dict[str, Any]:
    choices = []
    for i, a in enumerate(answers):
        lp = None
        if req.sampling.logprobs is not None:
            lp = {"content": [_logprob(state.tok, t) for t in a.tokens], "refusal": None}
        content, calls = split_answer(a.text, req.tools)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        finish = a.finish
        if calls:
            message["tool_calls"] = calls
            finish = "tool_calls" if finish == "stop" else finish
        choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": finish})
    spent = sum(len(a.tokens) for a in answers)
    extra: dict[str, Any] = {}
    if state.retriever is not None:  # the passages given, and which the first answer cites
        extra = state.retriever.sources(hits, answers[0].text if answers else "")
    return {
        "object": "chat.completion",
        **head,
        "choices": choices,
        "usage": usage(prompt_len, spent),
        **extra,
    }


async def _events(
    state: ServeState,
    req: ChatRequest,
    job: Job,
    head: dict[str, Any],
    served: Served,
    hits: list[Any],
) -> AsyncIterator[bytes]:
    s, tok = req.sampling, state.tok
    head = {"object": "chat.completion.chunk", **head}
    extra = {"usage": None} if req.include_usage else {}

    def chunk(i: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> bytes:
        choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        return sse({**head, "choices": [choice], **extra})

    if state.retriever is not None:  # the passages first (no choices: clients skip it)
        yield sse({**head, "choices": [], **state.retriever.sources(hits, "")})
    for i in range(s.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    spent = 0
    calls = [CallStream(req.tools) for _ in range(s.n)]  # holds back <tool_call> blocks
    async for row, text, tokens, finish in pieces(job, tok, s.n, s.logprobs is None):
        spent += len(tokens)
        served.completion_tokens = spent
        if served.first_token is None and job.first_token is not None:
            served.first_token = job.first_token - job.started
        lp = None
        if tokens and s.logprobs is not None:  # (not merged: one token)
            lp = {"content": [_logprob(tok, t) for t in tokens], "refusal": None}
        text = calls[row].feed(text)
        if text or lp:
            yield chunk(row, {"content": text}, None, lp)
        if finish:
            rest, made = calls[row].finish()
            if rest:
                yield chunk(row, {"content": rest})
            for delta in call_deltas(made):
                yield chunk(row, delta)
            yield chunk(row, {}, "tool_calls" if made and finish == "stop" else finish)
    if req.include_usage:
        yield sse({**head, "choices": [], "usage": usage(served.prompt_tokens, spent)})


def _logprob(tok: Any, t: Token) -> dict[str, Any]:
    """A generated token's entry in OpenAI's chat `logprobs.content`."""
    return {
        "token": token_text(tok, t.id),
        "logprob": t.logprob,
        "bytes": token_bytes(tok, t.id),
        "top_logprobs": [
            {"token": token_text(tok, i), "logprob": lp, "bytes": token_bytes(tok, i)}
            for i, lp in (t.top or [])
        ],
    }
