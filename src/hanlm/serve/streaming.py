"""From a job's events to an HTTP answer: text pieces (never half a character or half a stop
string), whole answers, several streams merged, server-sent events, and cancelling the jobs of a
client that hung up."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from hanlm.serve.errors import APIError
from hanlm.serve.jobs import End, Failed, Job, Token
from hanlm.serve.text import Detokenizer

Piece = tuple[int, str, list[Token], str | None]  # (row, new text, its tokens, finish reason)


@dataclass
class Answer:
    """One choice being produced: its text so far, tokens and finish reason."""

    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish: str | None = None


def sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def pieces(job: Job, tok: Any, rows: int, merge: bool = True) -> AsyncIterator[Piece]:
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


async def collect(job: Job, tok: Any, rows: int) -> list[Answer]:
    """Every row's whole answer."""
    answers = [Answer() for _ in range(rows)]
    async for row, text, tokens, finish in pieces(job, tok, rows):
        answers[row].text += text
        answers[row].tokens.extend(tokens)
        if finish:
            answers[row].finish = finish
    return answers


async def merge(streams: list[AsyncIterator[Any]]) -> AsyncIterator[tuple[int, Any]]:
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


async def until_disconnect(request: Request, work: Awaitable[Any], jobs: list[Job]) -> Any:
    """Await `work`, cancelling the jobs if the client hangs up first (499)."""
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


class EventStream(StreamingResponse):
    """Server-sent events ending with `data: [DONE]`; an error after the status went out is sent
    inline as an event. `close` runs once the response ends, also when the body never started
    (a client gone at once)."""

    def __init__(self, body: AsyncIterator[bytes], close: Callable[[], None]) -> None:
        self.on_close = close
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(self._guarded(body), media_type="text/event-stream", headers=headers)

    async def _guarded(self, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        try:
            async for chunk in body:
                yield chunk
        except APIError as e:  # mid-stream: the status is sent already, so say it inline
            yield sse(e.body())
        finally:
            self.on_close()
        yield b"data: [DONE]\n\n"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def stream_response(body: AsyncIterator[bytes], jobs: list[Job], ticket: Any) -> EventStream:
    """`body` as server-sent events; the jobs are cancelled and the ticket released at the end."""

    def close() -> None:
        for job in jobs:
            job.cancel()
        ticket.release()

    return EventStream(body, close)
