"""Threads for torch work that leave no OpenMP team behind.

PyTorch's CPU kernels run on libgomp, which gives every thread that runs a parallel kernel its own
OpenMP team, kept until that thread exits; once a process holds more team threads than CPUs,
every team stops spin-waiting between kernels and small-model decoding slows 2.5x. `hanlm serve`
runs torch on several threads (loader, worker, batching loop) and uses these helpers so that
only one team exists at a time (see hanlm.serve.engine)."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


def in_fresh_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` on a new thread that ends with it, so the OpenMP team its torch kernels start
    ends too (see the module docstring); exceptions propagate."""
    future: Future = Future()

    def call() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # re-raised in the caller
            future.set_exception(e)

    thread = threading.Thread(target=call, name="hanlm-torch")
    thread.start()
    thread.join()
    return future.result()


class SerialThreads:
    """Runs submitted tasks one at a time, in order, on one thread that lives while `keep()` is
    true and ends (its OpenMP team with it) once it is idle and `keep()` is false; the next task
    then starts a new thread. Call `retire()` after `keep()` turns false to end an idle thread."""

    def __init__(self, name: str, keep: Callable[[], bool] = lambda: True) -> None:
        self.name, self._keep = name, keep
        self._cv = threading.Condition()
        self._tasks: deque[tuple[Future, Callable[..., Any], tuple]] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the worker is shut down")
            self._tasks.append((future, fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
            self._cv.notify_all()
        return future

    def retire(self) -> None:
        with self._cv:
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._tasks and not self._closed and self._keep():
                    self._cv.wait()
                if not self._tasks:
                    self._thread = None
                    return
                future, fn, args = self._tasks.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # delivered to whoever awaits the future
                    future.set_exception(e)

    def shutdown(self) -> None:
        """Cancel what has not started, wait for what has."""
        with self._cv:
            self._closed = True
            for future, _, _ in self._tasks:
                future.cancel()
            self._tasks.clear()
            thread = self._thread
            self._cv.notify_all()
        if thread is not None:
            thread.join()
