"""A request's link between the engine's threads and the event loop: `Job` and its events.

Each request gets a `Job`: events (`Token`, `End`, `Failed`) arrive on an asyncio queue in the
event loop that submitted it; `Job.cancel()` stops its generation (a closed connection, a stop
string).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from typing import Any

from hanlm.serve.sampling import Sampling


@dataclass
class Token:
    row: int  # which of the request's n answers
    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass
class End:
    row: int
    reason: str  # "stop" (end-of-turn token) or "length"


@dataclass
class Failed:
    message: str


class Job:
    """One generation request's link between the engine's threads and the event loop.

    Events reach the loop in batches: waking the loop costs the generating thread a write to
    the loop's self-pipe and, worse, the GIL while the loop turns the token into an SSE chunk
    (py-spy: 16% of a small model's decode time at one wake per token). A token waits (at most
    `interval` seconds, until the next event) unless the loop was last woken longer ago than
    that; the first token, `End` and `Failed` always wake it."""

    def __init__(
        self, rid: str, prompt: list[int], sampling: Sampling, interval: float = 0.0
    ) -> None:
        self.id, self.prompt, self.sampling = rid, prompt, sampling
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Token | End | Failed] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False  # set by the reader when every row has ended
        self.generated = False  # set by the generating thread once every row has ended
        self._on_cancel: list[Any] = []
        self.interval = interval
        self._held: list[Token | End | Failed] = []  # emitted, not yet handed to the loop
        self._held_lock = threading.Lock()
        self._woken = False  # a delivery is scheduled on the loop
        self._last_wake = float("-inf")
        self.started = time.monotonic()
        self.first_token: float | None = None  # when the first token came (monotonic seconds)

    def emit(self, event: Token | End | Failed) -> None:
        """Thread-safe: deliver an event to the job's event loop."""
        if self.cancelled.is_set():
            return
        now = time.monotonic()
        if self.first_token is None and isinstance(event, Token):
            self.first_token = now
        with self._held_lock:
            self._held.append(event)
            if self._woken or (isinstance(event, Token) and now - self._last_wake < self.interval):
                return
            self._woken, self._last_wake = True, now
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled.set()

    def _deliver(self) -> None:
        with self._held_lock:
            events, self._held, self._woken = self._held, [], False
        for event in events:
            self.events.put_nowait(event)

    def cancel(self) -> None:
        """Stop generating (a no-op once the reader has seen every answer end)."""
        if not self.cancelled.is_set() and not self.finished:
            self.cancelled.set()
            for fn in self._on_cancel:
                fn()

    def on_cancel(self, fn: Any) -> None:
        """Call `fn()` when the job is cancelled (the engine drops it from the batch)."""
        self._on_cancel.append(fn)
