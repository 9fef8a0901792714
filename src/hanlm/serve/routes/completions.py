"""`POST /v1/completions`: text completions of one or several prompts (strings or token ids),
whole or streamed; with `echo` and `logprobs` the prompt is scored too, which is how
lm-evaluation-harness's `local-completions` model scores multiple-choice answers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from hanlm.serve.deps import Authorized, JSONBody
from hanlm.serve.jobs import Job
from hanlm.serve.metrics import Served
from hanlm.serve.protocol import CompletionBody, CompletionRequest, parse_completion, request_body
from hanlm.serve.sampling import Sampling
from hanlm.serve.state import ServeState, usage
from hanlm.serve.streaming import (
    Answer,
    collect,
    merge,
    pieces,
    sse,
    stream_response,
    until_disconnect,
)
from hanlm.serve.text import token_text

router = APIRouter()

Scored = tuple[int, float | None, list[tuple[int, float]]]  # (token, log-prob, top alternatives)


async def completion_request(body: JSONBody, state: Authorized) -> CompletionRequest:
    return parse_completion(body, state.limits.max_tokens, state.limits.max_n)


@router.post("/v1/completions", openapi_extra=request_body(CompletionBody))
async def completions(
    request: Request,
    req: Annotated[CompletionRequest, Depends(completion_request)],
    state: Authorized,
) -> Any:
    model = state.model_id(req.model)
    state.check_count(req.prompts, "prompt")
    state.check_bias(req.sampling.logit_bias)
    run = _Completions(state, req, model)
    request.state.hanlm = run.served
    ticket = state.engine.admit()
    try:
        run.submit()
    except BaseException:
        run.cancel()
        ticket.release()
        raise
    if req.stream:
        return stream_response(run.events(), run.jobs, ticket)
    try:
        work = asyncio.gather(*(run.choices(k) for k in range(len(run.prompts))))
        results = await until_disconnect(request, work, run.jobs)
    finally:
        ticket.release()
    choices = [c for group in results for c in group]
    spent = sum(c.pop("_n") for c in choices)
    run.served.completion_tokens = spent
    run.served.first_token = run.first_token()
    return {**run.head, "choices": choices, "usage": usage(run.prompt_tokens, spent)}


class _Completions:
    """One request's prompts, their samplings and jobs (none for a prompt that only echoes)."""

    def __init__(self, state: ServeState, req: CompletionRequest, model: str) -> None:
        self.state, self.req, self.tok = state, req, state.tok
        self.prompts = [state.encode(p, "prompt") for p in req.prompts]
        generate = req.sampling.max_tokens > 0
        self.samplings: list[Sampling] = [
            state.fit(replace(req.sampling), len(p), "prompt", generate) for p in self.prompts
        ]
        self.prompt_tokens = sum(map(len, self.prompts))
        self.head = {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        self.jobs: list[Job] = []
        self.job_of: list[Job | None] = []
        route = state.engine.route(self.samplings[0]) if self.samplings else ""
        self.served = Served(self.head["id"], self.prompt_tokens, user=req.user, path=route)

    def first_token(self) -> float | None:
        """Seconds from submission to the first token of any prompt's job."""
        times = [j.first_token - j.started for j in self.jobs if j.first_token is not None]
        return min(times) if times else None

    def submit(self) -> None:
        for p, s in zip(self.prompts, self.samplings):
            job = self.state.engine.submit(p, s) if s.max_tokens > 0 else None
            self.job_of.append(job)
            if job is not None:
                self.jobs.append(job)

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()

    async def echo(self, k: int) -> tuple[str, list[Scored]]:
        """Prompt `k` as text, and (with logprobs) its tokens scored."""
        p, orig = self.prompts[k], self.req.prompts[k]
        text = orig if isinstance(orig, str) else self.tok.decode(p, skip_special_tokens=False)
        top = self.samplings[0].logprobs
        if top is None:
            return text, []
        scored = await self.state.engine.run(self.state.engine.prompt_logprobs, p, top)
        return text, [(t, lp, alts) for t, (lp, alts) in zip(p, scored)]

    def logprobs(self, entries: list[Scored]) -> dict[str, Any]:
        """OpenAI's legacy `logprobs` block of a choice."""
        tokens, offsets, pos = [], [], 0
        for t, _, _ in entries:
            tokens.append(token_text(self.tok, t))
            offsets.append(pos)
            pos += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [
                ({token_text(self.tok, i): v for i, v in top} if lp is not None else None)
                for _, lp, top in entries
            ],
            "text_offset": offsets,
        }

    async def choices(self, k: int) -> list[dict[str, Any]]:
        """Prompt `k`'s choices, whole; `_n` counts each one's generated tokens."""
        job, s = self.job_of[k], self.samplings[k]
        prefix, prefix_lp = await self.echo(k) if self.req.echo else ("", [])
        if job is not None:
            answers = await collect(job, self.tok, s.n)
        else:
            answers = [Answer(finish="length") for _ in range(s.n)]
        out = []
        for j, a in enumerate(answers):
            entries = prefix_lp + [(t.id, t.logprob, t.top or []) for t in a.tokens]
            out.append(
                {
                    "index": k * s.n + j,
                    "text": prefix + a.text,
                    "logprobs": self.logprobs(entries) if s.logprobs is not None else None,
                    "finish_reason": a.finish,
                    "_n": len(a.tokens),
                }
            )
        return out

    async def stream_choices(self, k: int) -> AsyncIterator[dict[str, Any]]:
        """Prompt `k`'s choice chunks as they come; `_token` counts generated tokens (an item with
        no `index` only counts)."""
        job, s = self.job_of[k], self.samplings[k]
        if self.req.echo:
            text, entries = await self.echo(k)
            lp = self.logprobs(entries) if s.logprobs is not None else None
            for j in range(s.n):
                yield {"index": k * s.n + j, "text": text, "logprobs": lp, "finish_reason": None}
        if job is None:
            for j in range(s.n):
                yield {
                    "index": k * s.n + j,
                    "text": "",
                    "logprobs": None,
                    "finish_reason": "length",
                }
            return
        async for row, text, tokens, finish in pieces(job, self.tok, s.n, s.logprobs is None):
            lp = None
            if tokens and s.logprobs is not None:  # (not merged: one token)
                lp = self.logprobs([(t.id, t.logprob, t.top or []) for t in tokens])
            if text or lp or finish:
                yield {
                    "index": k * s.n + row,
                    "text": text,
                    "logprobs": lp,
                    "finish_reason": finish,
                    "_token": len(tokens),
                }
            elif tokens:
                yield {"_token": len(tokens)}

    async def events(self) -> AsyncIterator[bytes]:
        extra = {"usage": None} if self.req.include_usage else {}
        spent = 0
        async for _, choice in merge([self.stream_choices(k) for k in range(len(self.prompts))]):
            spent += choice.pop("_token", 0)
            self.served.completion_tokens = spent
            if self.served.first_token is None:
                self.served.first_token = self.first_token()
            if "index" in choice:
                yield sse({**self.head, "choices": [choice], **extra})
        if self.req.include_usage:
            yield sse({**self.head, "choices": [], "usage": usage(self.prompt_tokens, spent)})
