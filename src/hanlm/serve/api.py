"""The OpenAI-compatible FastAPI app: `create_app(engine, ...)` over an already loaded model.

Routes: `GET /` (chat page), `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`,
`POST /v1/completions`, `POST /v1/embeddings`, `POST /tokenize`, `POST /detokenize`,
`GET /tokenizer_info`. Every error is `{"error": {...}}` with a 4xx/5xx status; with an API key
set, every route but `/` and `/health` wants `Authorization: Bearer KEY`.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime,
# and `Request` is imported inside `create_app` (fastapi is an optional extra).

import asyncio
import base64
import hmac
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from html import escape
from importlib import resources
from typing import Any

from hanlm.data.templates import prompt_ids
from hanlm.serve.engine import End, Engine, Failed, Job, Token
from hanlm.serve.protocol import (
    SCHEMAS,
    APIError,
    Sampling,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from hanlm.serve.text import Detokenizer, token_bytes, token_text

MAX_PROMPTS = 64  # prompts (or embedding inputs) in one request


@dataclass
class Limits:
    max_tokens: int = 2048  # cap on (and default of) max_tokens
    max_body_bytes: int = 1 << 20
    max_n: int = 8


@dataclass
class Answer:
    """One choice being produced: its text so far, tokens and finish reason."""

    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish: str | None = None


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _pieces(
    job: Job, tok: Any, rows: int, merge: bool = True
) -> AsyncIterator[tuple[int, str, list[Token], str | None]]:
    """(row, new text, its tokens, finish reason) as the job produces them; stops at stop strings
    (cancelling the job) and ends once every row has finished. With `merge`, the tokens of a row
    that are waiting together come as one piece: one SSE chunk for them instead of one each
    (each chunk costs the event loop, which shares the GIL with generation)."""
    dets = [Detokenizer(tok, job.sampling.stop) for _ in range(rows)]
    done = [False] * rows
    try:
        while not all(done):
            waiting = [await job.events.get()]
            while not job.events.empty():
                waiting.append(job.events.get_nowait())
            row, text, tokens = 0, "", []
            for ev in waiting:
                if isinstance(ev, Failed):
                    raise APIError(ev.message, status=500, type="server_error")
                if done[ev.row]:
                    continue
                if tokens and (ev.row != row or not merge or not isinstance(ev, Token)):
                    yield row, text, tokens, None
                    text, tokens = "", []
                if isinstance(ev, Token):
                    row, text = ev.row, text + dets[ev.row].push(ev.id)
                    tokens.append(ev)
                    if dets[ev.row].stopped:
                        done[ev.row] = True
                        if all(done):
                            job.cancel()  # a stop string: nothing more is wanted
                        yield row, text, tokens, "stop"
                        text, tokens = "", []
                elif isinstance(ev, End):
                    done[ev.row] = True
                    yield ev.row, dets[ev.row].finish(), [], ev.reason
            if tokens:
                yield row, text, tokens, None
        job.finished = True
    finally:
        job.cancel()  # the reader went away early (closed connection, error)


async def _collect(job: Job, tok: Any, rows: int) -> list[Answer]:
    answers = [Answer() for _ in range(rows)]
    async for row, text, tokens, finish in _pieces(job, tok, rows):
        answers[row].text += text
        answers[row].tokens.extend(tokens)
        if finish:
            answers[row].finish = finish
    return answers


async def _merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
    """Items of several async iterators as they come, tagged with the iterator's index."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(i: int, it: AsyncIterator[Any]) -> None:
        try:
            async for item in it:
                await queue.put((i, item))
        except Exception as e:
            await queue.put((i, e))
        await queue.put((i, end))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is end:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def create_app(
    engine: Engine,
    model_name: str = "hanlm",
    api_key: str = "",
    limits: Limits | None = None,
    retriever: Any = None,
) -> Any:
    """The FastAPI app serving `engine`. Tests build it in-process around a tiny model.

    With a `retriever` (hanlm.rag.answer.Retriever), a chat request's last user turn is answered
    from retrieved passages, and the response carries them in an extra `sources` field."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    limits = limits or Limits()
    tok = engine.tok
    vocab = min(len(tok), engine.model.get_input_embeddings().weight.shape[0])
    created = int(time.time())
    app = FastAPI(
        title="hanlm serve",
        version="1",
        description="OpenAI-compatible API for a hanlm model (continuous batching).",
    )

    def error_response(e: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(APIError(str(e.detail), status=e.status_code, type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(APIError(f"invalid request: {e.errors()}", status=400))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, e: Exception) -> JSONResponse:
        return error_response(APIError(f"{type(e).__name__}: {e}", 500, "server_error"))

    # ------------------------------------------------------------------ helpers

    def check_auth(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip(), api_key):
            raise APIError(
                "invalid or missing API key: send 'Authorization: Bearer KEY'",
                status=401,
                code="invalid_api_key",
            )

    async def read_json(request: Request) -> Any:
        check_auth(request)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(
                f"request body of {declared} bytes exceeds the limit of"
                f" {limits.max_body_bytes} (max_body_bytes)",
                status=413,
            )
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limits.max_body_bytes:
                raise APIError(f"request body exceeds {limits.max_body_bytes} bytes", status=413)
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(f"the request body is not valid JSON: {e}") from None

    def encode(prompt: list[int] | str, key: str) -> list[int]:
        if isinstance(prompt, str):
            return list(tok(prompt)["input_ids"])
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise APIError(
                f"'{key}' has token ids outside the vocabulary [0, {vocab}): {bad[:5]}", param=key
            )
        return prompt

    def fit(s: Sampling, prompt_len: int, key: str, generate: bool = True) -> Sampling:
        """Bound max_tokens by the cap and by the room the context leaves after the prompt
        (a prompt that leaves no room for the answer it asks for is an error)."""
        if prompt_len == 0:
            raise APIError(f"'{key}' is empty", param=key)
        if prompt_len > engine.context or (generate and prompt_len == engine.context):
            raise APIError(
                f"the prompt is {prompt_len} tokens, longer than the model's context of"
                f" {engine.context} tokens",
                param=key,
                code="context_length_exceeded",
            )
        s.max_tokens = min(s.max_tokens, limits.max_tokens, engine.context - prompt_len)
        return s

    def logprob_entry(t: Token) -> dict[str, Any]:
        return {
            "token": token_text(tok, t.id),
            "logprob": t.logprob,
            "bytes": token_bytes(tok, t.id),
            "top_logprobs": [
                {"token": token_text(tok, i), "logprob": lp, "bytes": token_bytes(tok, i)}
                for i, lp in (t.top or [])
            ],
        }

    def usage(prompt: int, completion: int) -> dict[str, int]:
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }

    async def until_disconnect(request: Request, work: Any, jobs: list[Job]) -> Any:
        """Await `work`, cancelling the jobs if the client hangs up first."""
        task = asyncio.ensure_future(work)

        async def watch() -> None:
            while not await request.is_disconnected():
                await asyncio.sleep(0.25)

        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            for job in jobs:
                job.cancel()
            raise APIError("the client closed the connection", status=499)
        return task.result()

    def stream_response(body: AsyncIterator[bytes], jobs: list[Job], ticket: Any) -> Any:
        async def guarded() -> AsyncIterator[bytes]:
            try:
                async for chunk in body:
                    yield chunk
            except APIError as e:  # mid-stream: the status is sent already, so say it inline
                yield _sse(e.body())
            finally:
                close()
            yield b"data: [DONE]\n\n"

        def close() -> None:
            for job in jobs:
                job.cancel()
            ticket.release()

        class _Stream(StreamingResponse):
            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                try:
                    await super().__call__(scope, receive, send)
                finally:  # also when the body never started (client gone at once)
                    close()

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return _Stream(guarded(), media_type="text/event-stream", headers=headers)

    # ------------------------------------------------------------------ routes

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = (resources.files("hanlm.serve") / "page.html").read_text(encoding="utf-8")
        return HTMLResponse(html.replace("{{MODEL}}", escape(model_name)))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "active": engine.active}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        check_auth(request)
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "hanlm",
                    "max_model_len": engine.context,
                }
            ],
        }

    @app.post("/v1/chat/completions", openapi_extra=_body(SCHEMAS["chat"]))
    async def chat(request: Request) -> Any:
        req = parse_chat(await read_json(request), limits.max_tokens, limits.max_n)
        hits: list[Any] = []
        if retriever is not None and req.messages and req.messages[-1]["role"] == "user":
            question = req.messages[-1]["content"]
            grounded, hits = await engine.run(retriever.prompt, question)
            req.messages = [*req.messages[:-1], {"role": "user", "content": grounded}]
        try:
            prompt = prompt_ids(tok, req.messages)
        except Exception as e:  # a template that refuses a role order, say
            raise APIError(
                f"the chat template cannot render these messages: {e}", param="messages"
            ) from None
        s = fit(req.sampling, len(prompt), "messages")
        if s.guidance_scale != 1 and req.negative_prompt:
            s.negative_ids = prompt_ids(tok, [{"role": "user", "content": req.negative_prompt}])
        rid, now = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "created": now, "model": model_name}
        ticket = engine.admit()
        try:
            job = engine.submit(prompt, s)
        except BaseException:
            ticket.release()
            raise

        if not req.stream:
            try:
                answers = await until_disconnect(request, _collect(job, tok, s.n), [job])
            finally:
                ticket.release()
            choices = []
            for i, a in enumerate(answers):
                lp = None
                if s.logprobs is not None:
                    lp = {"content": [logprob_entry(t) for t in a.tokens], "refusal": None}
                message = {"role": "assistant", "content": a.text}
                choices.append(
                    {"index": i, "message": message, "logprobs": lp, "finish_reason": a.finish}
                )
            spent = sum(len(a.tokens) for a in answers)
            extra: dict[str, Any] = {}
            if retriever is not None:  # the passages given, and which the first answer cites
                extra = retriever.sources(hits, answers[0].text if answers else "")
            return {
                "object": "chat.completion",
                **head,
                "choices": choices,
                "usage": usage(len(prompt), spent),
                **extra,
            }

        async def events() -> AsyncIterator[bytes]:
            extra = {"usage": None} if req.include_usage else {}

            def chunk(
                i: int, delta: dict[str, Any], finish: str | None = None, lp: Any = None
            ) -> bytes:
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
                return _sse(
                    {"object": "chat.completion.chunk", **head, "choices": [choice], **extra}
                )

            if retriever is not None:  # the passages first (no choices: clients skip it)
                sources = retriever.sources(hits, "")
                yield _sse({"object": "chat.completion.chunk", **head, "choices": [], **sources})
            for i in range(s.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            spent = 0
            async for row, text, tokens, finish in _pieces(job, tok, s.n, s.logprobs is None):
                spent += len(tokens)
                lp = None
                if tokens and s.logprobs is not None:  # (not merged: one token)
                    lp = {"content": [logprob_entry(t) for t in tokens], "refusal": None}
                if text or lp:
                    yield chunk(row, {"content": text}, None, lp)
                if finish:
                    yield chunk(row, {}, finish)
            if req.include_usage:
                yield _sse(
                    {
                        "object": "chat.completion.chunk",
                        **head,
                        "choices": [],
                        "usage": usage(len(prompt), spent),
                    }
                )

        return stream_response(events(), [job], ticket)

    @app.post("/v1/completions", openapi_extra=_body(SCHEMAS["completion"]))
    async def completions(request: Request) -> Any:
        req = parse_completion(await read_json(request), limits.max_tokens, limits.max_n)
        if len(req.prompts) > MAX_PROMPTS:
            raise APIError(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        prompts = [encode(p, "prompt") for p in req.prompts]
        samplings = []
        for p in prompts:
            s = fit(replace(req.sampling), len(p), "prompt", generate=req.sampling.max_tokens > 0)
            samplings.append(s)
        s0 = samplings[0]
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": now, "model": model_name}
        ticket = engine.admit()
        jobs: list[Job] = []
        try:
            for p, s in zip(prompts, samplings):
                if s.max_tokens > 0:
                    jobs.append(engine.submit(p, s))
        except BaseException:
            for job in jobs:
                job.cancel()
            ticket.release()
            raise
        by_prompt = iter(jobs)
        job_of = [next(by_prompt) if s.max_tokens > 0 else None for s in samplings]

        async def echo_part(p: list[int], orig: list[int] | str) -> tuple[str, list[Any]]:
            text = orig if isinstance(orig, str) else tok.decode(p, skip_special_tokens=False)
            if s0.logprobs is None:
                return text, []
            scored = await engine.run(engine.prompt_logprobs, p, s0.logprobs)
            return text, [(t, lp, top) for t, (lp, top) in zip(p, scored)]

        def lp_block(entries: list[tuple[int, float | None, list]], offset0: int) -> dict[str, Any]:
            tokens, offsets, pos = [], [], offset0
            for t, _, _ in entries:
                tokens.append(token_text(tok, t))
                offsets.append(pos)
                pos += len(tokens[-1])
            return {
                "tokens": tokens,
                "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [
                    ({token_text(tok, i): v for i, v in top} if lp is not None else None)
                    for _, lp, top in entries
                ],
                "text_offset": offsets,
            }

        async def one(k: int) -> list[dict[str, Any]]:
            p, job, s = prompts[k], job_of[k], samplings[k]
            prefix, prefix_lp = ("", [])
            if req.echo:
                prefix, prefix_lp = await echo_part(p, req.prompts[k])
            answers = (
                await _collect(job, tok, s.n)
                if job is not None
                else [Answer(finish="length") for _ in range(s.n)]
            )
            out = []
            for j, a in enumerate(answers):
                entries = prefix_lp + [(t.id, t.logprob, t.top or []) for t in a.tokens]
                lp = lp_block(entries, 0) if s.logprobs is not None else None
                out.append(
                    {
                        "index": k * s.n + j,
                        "text": prefix + a.text,
                        "logprobs": lp,
                        "finish_reason": a.finish,
                        "_n": len(a.tokens),
                    }
                )
            return out

        if not req.stream:
            try:
                work = asyncio.gather(*(one(k) for k in range(len(prompts))))
                results = await until_disconnect(request, work, jobs)
            finally:
                ticket.release()
            choices = [c for group in results for c in group]
            spent = sum(c.pop("_n") for c in choices)
            return {**head, "choices": choices, "usage": usage(sum(map(len, prompts)), spent)}

        async def stream_one(k: int) -> AsyncIterator[dict[str, Any]]:
            job, s = job_of[k], samplings[k]
            if req.echo:
                text, entries = await echo_part(prompts[k], req.prompts[k])
                for j in range(s.n):
                    lp = lp_block(entries, 0) if s.logprobs is not None else None
                    yield {
                        "index": k * s.n + j,
                        "text": text,
                        "logprobs": lp,
                        "finish_reason": None,
                    }
            if job is None:
                for j in range(s.n):
                    yield {
                        "index": k * s.n + j,
                        "text": "",
                        "logprobs": None,
                        "finish_reason": "length",
                    }
                return
            async for row, text, tokens, finish in _pieces(job, tok, s.n, s.logprobs is None):
                lp = None
                if tokens and s.logprobs is not None:  # (not merged: one token)
                    lp = lp_block([(t.id, t.logprob, t.top or []) for t in tokens], 0)
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

        async def events() -> AsyncIterator[bytes]:
            extra = {"usage": None} if req.include_usage else {}
            spent = 0
            async for _, choice in _merge([stream_one(k) for k in range(len(prompts))]):
                spent += choice.pop("_token", 0)
                if "index" in choice:
                    yield _sse({**head, "choices": [choice], **extra})
            if req.include_usage:
                yield _sse({**head, "choices": [], "usage": usage(sum(map(len, prompts)), spent)})

        return stream_response(events(), jobs, ticket)

    @app.post("/v1/embeddings", openapi_extra=_body(SCHEMAS["embedding"]))
    async def embeddings(request: Request) -> Any:
        req = parse_embedding(await read_json(request))
        if len(req.inputs) > MAX_PROMPTS:
            raise APIError(f"at most {MAX_PROMPTS} inputs per request", param="input")
        batch = [encode(x, "input") for x in req.inputs]
        for ids in batch:
            fit(Sampling(max_tokens=0), len(ids), "input", generate=False)
        width = engine.model.config.hidden_size
        if req.dimensions is not None and req.dimensions != width:
            raise APIError(
                f"'dimensions' must be {width} (the model's hidden size)", param="dimensions"
            )
        ticket = engine.admit()
        try:
            vectors = await engine.run(engine.embed, batch)
        finally:
            ticket.release()
        data = []
        for i, v in enumerate(vectors):
            value: Any = v
            if req.encoding_format == "base64":
                value = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()
            data.append({"object": "embedding", "index": i, "embedding": value})
        n = sum(map(len, batch))
        return {
            "object": "list",
            "data": data,
            "model": model_name,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    @app.post("/tokenize", openapi_extra=_body(SCHEMAS["tokenize"]))
    async def tokenize(request: Request) -> Any:
        body = await read_json(request)
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        if body.get("messages") is not None:
            req = parse_chat({**body, "max_tokens": None}, 1, 1)
            ids = prompt_ids(tok, req.messages) if body.get("add_generation_prompt", True) else None
            if ids is None:
                ids = tok.apply_chat_template(req.messages, tokenize=True, return_dict=True)[
                    "input_ids"
                ]
        else:
            prompt = body.get("prompt", body.get("text"))
            if not isinstance(prompt, str):
                raise APIError("'prompt' must be a string (or send 'messages')", param="prompt")
            special = body.get("add_special_tokens", True)
            if not isinstance(special, bool):
                raise APIError(
                    "'add_special_tokens' must be true or false", param="add_special_tokens"
                )
            ids = tok(prompt, add_special_tokens=special)["input_ids"]
        return {"tokens": list(ids), "count": len(ids), "max_model_len": engine.context}

    @app.post("/detokenize", openapi_extra=_body(SCHEMAS["detokenize"]))
    async def detokenize(request: Request) -> Any:
        body = await read_json(request)
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ids
        ):
            raise APIError("'tokens' must be a list of token ids", param="tokens")
        encode(ids, "tokens")
        return {"prompt": tok.decode(ids, skip_special_tokens=False)}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> Any:
        check_auth(request)
        template = tok.chat_template if isinstance(tok.chat_template, str) else None
        return {
            "tokenizer_class": type(tok).__name__,
            "vocab_size": len(tok),
            "model_max_length": engine.context,
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": tok.pad_token,
            "unk_token": tok.unk_token,
            "chat_template": template,
            "stop_token_ids": engine.stop_ids,
        }

    return app


def _body(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI requestBody for a JSON schema (the handlers read the body themselves)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
