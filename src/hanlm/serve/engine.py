"""Where the server's tokens come from.

Two paths, chosen per request by `Sampling.route()`:

- **batch**: transformers' continuous-batching manager (`model.init_continuous_batching`, public
  API), started with `per_request_processors=True` so that temperature, top-k and top-p are read
  from each request (greedy is top-k 1). Requests join and leave the running batch token by
  token; a dispatcher thread reads `get_result()` and hands tokens to each request's queue.
- **generate**: `model.generate` on one worker thread, one request at a time, with the
  manager paused meanwhile (`manager.pause()`) so a seeded request draws from the global RNG
  alone and the model never runs two forward passes at once. It serves what the manager cannot:
  `seed`, presence/frequency/repetition penalties, classifier-free guidance, log-probs, `n > 1`.
  Prompt scoring (echo + logprobs) and embeddings run on the same worker.

Each request gets a `Job`: events (`Token`, `End`, `Failed`) arrive on an asyncio queue in the
event loop that submitted it; `Job.cancel()` stops its generation (a closed connection, a stop
string).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from hanlm.data.templates import stop_token_ids
from hanlm.embedding import embed_ids
from hanlm.infer.engine import decoding_kwargs
from hanlm.serve.protocol import APIError, Sampling

PAGE = 64  # tokens per KV-cache page
BATCH_TOKENS = 256  # most tokens in one forward pass (long prompts are prefilled in chunks)


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
    """One generation request's link between the engine's threads and the event loop."""

    def __init__(self, rid: str, prompt: list[int], sampling: Sampling) -> None:
        self.id, self.prompt, self.sampling = rid, prompt, sampling
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Token | End | Failed] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False  # set by the reader when every row has ended
        self._on_cancel: list[Any] = []

    def emit(self, event: Token | End | Failed) -> None:
        """Thread-safe: deliver an event to the job's event loop."""
        if not self.cancelled.is_set():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                self.cancelled.set()

    def cancel(self) -> None:
        """Stop generating (a no-op once the reader has seen every answer end)."""
        if not self.cancelled.is_set() and not self.finished:
            self.cancelled.set()
            for fn in self._on_cancel:
                fn()


class Ticket:
    """An admitted request's place; `release()` (idempotent) gives it back."""

    def __init__(self, engine: Engine) -> None:
        self.engine: Engine | None = engine

    def release(self) -> None:
        engine, self.engine = self.engine, None
        if engine is not None:
            engine._release()


class Engine:
    """The loaded model and tokenizer, and the two generation paths."""

    def __init__(
        self,
        model: Any,
        tok: Any,
        continuous_batching: bool = True,
        max_queue: int = 64,
    ) -> None:
        self.model, self.tok = model.eval(), tok
        self.stop_ids = stop_token_ids(tok)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0]
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        self.max_queue = max_queue
        self.active = 0  # admitted requests not yet finished (bounded by max_queue)
        self._ids = itertools.count()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hanlm-generate")
        self._worker_jobs = 0  # tasks queued or running on the worker
        self._solo: Job | None = None  # a batch-route request running alone on `generate`
        self._contended = threading.Event()  # another request arrived: the solo one hands off
        self.handoffs = 0  # solo requests that continued in the batching loop
        self.manager: Any = None
        self._closing = threading.Event()
        self._dispatcher: threading.Thread | None = None
        if continuous_batching:
            self._start_manager()

    # ------------------------------------------------------------------ lifecycle

    def _start_manager(self) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        # Sampling on, with every warper present (temperature != 1, top-k, top-p < 1) so that
        # each has a per-request version; requests always send all three explicitly.
        config = GenerationConfig(
            do_sample=True,
            temperature=0.5,
            top_k=len(self.tok),
            top_p=0.99,
            max_new_tokens=256,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        # Size the paged KV cache for the work instead of letting transformers take a share of
        # free memory: on CPU that share is host RAM, and zero-filling its static tensors took
        # 9 s for a 3.7M-parameter model. Room for `min(max_queue, 16)` full contexts at once;
        # more requests wait in the manager's queue.
        pages = -(-self.context // PAGE)
        cb_config = ContinuousBatchingConfig(
            per_request_processors=True,
            page_size=PAGE,
            num_blocks=pages * min(self.max_queue, 16),
            max_batch_tokens=BATCH_TOKENS,
        )
        self.manager = self.model.init_continuous_batching(
            generation_config=config, continuous_batching_config=cb_config
        )
        self.manager.start()
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="hanlm-cb-dispatch", daemon=True
        )
        self._dispatcher.start()

    def close(self) -> None:
        self._closing.set()
        for job in list(self._jobs.values()):
            job.cancel()
        if self.manager is not None:
            self.manager.stop(block=True, timeout=10)
            self.manager = None
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        self._worker.shutdown(wait=True, cancel_futures=True)

    def admit(self) -> Ticket:
        """Count a request in; a full house answers 429 rather than queueing without bound."""
        with self._lock:
            if self.active >= self.max_queue:
                raise APIError(
                    f"the server is busy ({self.active} requests in progress, max_queue ="
                    f" {self.max_queue}); retry later",
                    status=429,
                    type="rate_limit_error",
                    code="queue_full",
                )
            self.active += 1
        return Ticket(self)

    def _release(self) -> None:
        with self._lock:
            self.active -= 1

    # ------------------------------------------------------------------ generation

    def submit(self, prompt: list[int], sampling: Sampling) -> Job:
        """Start generating for `prompt`; call from the event loop.

        A batch-route request that finds the engine idle runs on `generate`, which is faster
        than the batching loop for one sequence; when another request arrives it hands off: what
        it has generated so far becomes the prompt of a batch request for the rest."""
        job = Job(f"hanlm-{next(self._ids)}", prompt, sampling)
        if self.manager is None or sampling.route() != "batch":
            self._contended.set()
            self._to_worker(self._guarded, self._generate, job)
            return job
        with self._lock:
            idle = not self._jobs and self._worker_jobs == 0
            if idle:
                self._solo = job
                self._contended.clear()
        if idle:
            self._to_worker(self._guarded, self._generate, job)
        else:
            self._contended.set()
            self._submit_batch(job)
        return job

    def _to_worker(self, fn: Any, *args: Any) -> Future:
        with self._lock:
            self._worker_jobs += 1

        def call() -> Any:
            try:
                return fn(*args)
            finally:
                with self._lock:
                    self._worker_jobs -= 1

        return self._worker.submit(call)

    def _submit_batch(
        self, job: Job, prompt: list[int] | None = None, max_tokens: int = 0, rid: str = ""
    ) -> None:
        """Queue `job` in the batching loop (or its continuation: `prompt` = the original one plus
        the tokens already sent, `max_tokens` what is left, under request id `rid`)."""
        s = job.sampling
        rid = rid or job.id
        if s.temperature == 0:  # greedy: the single most likely token survives top-k 1
            kwargs = {"temperature": 1.0, "top_k": 1, "top_p": 1.0}
        else:
            top_k = s.top_k if s.top_k > 0 else len(self.tok)
            kwargs = {"temperature": float(s.temperature), "top_k": int(top_k)}
            kwargs["top_p"] = float(s.top_p)
        with self._lock:
            self._jobs[rid] = job
        job._on_cancel.append(lambda: self._cancel_batch(rid))
        added = self.manager.add_request(
            list(prompt or job.prompt),
            request_id=rid,
            max_new_tokens=max_tokens or s.max_tokens,
            streaming=True,
            eos_token_id=self.stop_ids,
            **kwargs,
        )
        if added is None:
            with self._lock:
                self._jobs.pop(rid, None)
            raise APIError("the generation engine is stopping", status=503, type="server_error")

    def _cancel_batch(self, rid: str) -> None:
        with self._lock:
            self._jobs.pop(rid, None)
        if self.manager is not None:
            self.manager.cancel_request(rid)

    def _dispatch(self) -> None:
        """Route the manager's outputs to their jobs (cumulative tokens -> new ones)."""
        sent: dict[str, int] = {}
        while not self._closing.is_set():
            manager = self.manager
            out = manager.get_result(timeout=0.1) if manager is not None else None
            if out is None:
                if manager is not None and not manager.is_running():
                    self._fail_all("the continuous-batching loop stopped")
                    self._closing.wait(0.1)
                continue
            with self._lock:
                job = self._jobs.get(out.request_id)
            if job is None:  # cancelled meanwhile
                sent.pop(out.request_id, None)
                continue
            if out.error:
                job.emit(Failed(f"generation failed: {out.error}"))
                self._forget(job.id, sent)
                continue
            done = sent.get(job.id, 0)
            tokens = out.generated_tokens
            for t in tokens[done:]:
                job.emit(Token(0, int(t)))
            sent[job.id] = len(tokens)
            if out.is_finished():
                stopped = bool(tokens) and tokens[-1] in self.stop_ids
                job.emit(End(0, "stop" if stopped else "length"))
                self._forget(job.id, sent)

    def _forget(self, rid: str, sent: dict[str, int]) -> None:
        sent.pop(rid, None)
        with self._lock:
            self._jobs.pop(rid, None)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.emit(Failed(message))

    def _exclusive(self) -> Any:
        """Pause the continuous-batching loop while the worker uses the model."""
        manager = self.manager
        if manager is not None and manager.is_running():
            return manager.pause()
        return nullcontext()

    def _guarded(self, fn: Any, job: Job) -> None:
        try:
            if not job.cancelled.is_set():
                with self._exclusive():
                    fn(job)
        except Exception as e:  # reported to the waiting request, not lost in the thread
            job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))

    def _generate(self, job: Job) -> None:
        import torch

        s = job.sampling
        device = self.model.device
        # n answers as n rows of a batch (num_return_sequences refuses greedy decoding).
        ids = torch.tensor([job.prompt] * s.n, device=device)
        kw = decoding_kwargs(
            max_new_tokens=s.max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            repetition_penalty=s.repetition_penalty,
            guidance_scale=s.guidance_scale,
            stop_ids=self.stop_ids,
            pad_id=self.pad_id,
        )
        if s.guidance_scale != 1 and s.negative_ids:
            neg = torch.tensor([s.negative_ids] * s.n, device=device)
            kw["negative_prompt_ids"] = neg
            kw["negative_prompt_attention_mask"] = torch.ones_like(neg)
        processors = []
        if s.presence_penalty or s.frequency_penalty:
            processors.append(_OpenAIPenalty(len(job.prompt), s))
        recorder = _LogprobRecorder(s.logprobs) if s.logprobs is not None else None
        if recorder is not None:
            processors.append(recorder)
        streamer = _JobStreamer(job, s, self.stop_ids, recorder)
        handoff = self._contended if job is self._solo else None
        if s.seed is not None:
            torch.manual_seed(s.seed)
        from transformers import LogitsProcessorList, StoppingCriteriaList

        with torch.no_grad():
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([_Cancelled(job, streamer, handoff)]),
                streamer=streamer,
                **kw,
            )
        if handoff is not None:
            with self._lock:
                self._solo = None
            left = s.max_tokens - streamer.count[0]
            if streamer.handed_off and left > 0 and not job.cancelled.is_set():
                prompt = job.prompt + streamer.tokens
                self.handoffs += 1
                self._submit_batch(job, prompt, left, rid=job.id + "+")

    # ------------------------------------------------------------------ forward passes

    def run(self, fn: Any, *args: Any) -> asyncio.Future:
        """Run `fn(*args)` on the worker with the batch loop paused; awaitable."""

        def call() -> Any:
            with self._exclusive():
                return fn(*args)

        self._contended.set()
        return asyncio.wrap_future(self._to_worker(call))

    def prompt_logprobs(
        self, prompt: list[int], top: int
    ) -> list[tuple[float | None, list[tuple[int, float]]]]:
        """Log-prob of each prompt token given the ones before (None for the first), with the
        `top` most likely alternatives: how lm-evaluation-harness scores answers."""
        import torch

        with torch.no_grad():
            ids = torch.tensor([prompt], device=self.model.device)
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            lp = torch.log_softmax(logits.float()[:-1], dim=-1)
        chosen = lp.gather(1, ids[0, 1:, None])[:, 0].tolist()
        out: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
        tops = lp.topk(top, dim=-1) if top > 0 else None
        for i, value in enumerate(chosen):
            alts = []
            if tops is not None:
                alts = list(zip(tops.indices[i].tolist(), tops.values[i].tolist()))
            out.append((value, alts))
        return out

    def embed(self, batch: list[list[int]]) -> list[list[float]]:
        """SGPT position-weighted mean pooling (Muennighoff 2022), L2-normalised: the shared
        code of `hanlm embed` and `hanlm rag` (hanlm.embedding), so vectors from the API match
        an index built with the same model."""
        return embed_ids(self.model, batch, self.pad_id, "weighted_mean", batch_size=16)


# --------------------------------------------------------------------------- generate helpers
# Duck-typed logits processor, stopping criterion and streamer (what `generate` calls), kept
# free of transformers base classes so this module imports without torch.


class _OpenAIPenalty:
    """OpenAI's presence/frequency penalties over the generated tokens only:
    logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, prompt_len: int, s: Sampling) -> None:
        self.prompt_len, self.presence, self.frequency = (
            prompt_len,
            s.presence_penalty,
            s.frequency_penalty,
        )

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        generated = input_ids[:, self.prompt_len :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores)
        counts.scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


class _LogprobRecorder:
    """Keeps the log-softmax of each step's scores after penalties and guidance, before
    temperature and truncation (which `generate` applies after custom processors)."""

    def __init__(self, top: int) -> None:
        self.top = top
        self.last: Any = None

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class _Cancelled:
    """Stops `generate` when the job is cancelled, every row has finished on its own, or (a
    solo request) `handoff` is set because another request is waiting."""

    def __init__(
        self, job: Job, streamer: _JobStreamer, handoff: threading.Event | None = None
    ) -> None:
        self.job, self.streamer, self.handoff = job, streamer, handoff

    def __call__(self, input_ids: Any, scores: Any, **kw: Any) -> Any:
        import torch

        stop = self.job.cancelled.is_set() or all(self.streamer.done)
        if not stop and self.handoff is not None and self.handoff.is_set():
            self.streamer.handed_off = stop = True
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _JobStreamer:
    """Receives each step's tokens from `generate` and emits them to the job, row by row."""

    def __init__(
        self, job: Job, s: Sampling, stop_ids: list[int], recorder: _LogprobRecorder | None
    ) -> None:
        self.job, self.stop_ids, self.recorder = job, set(stop_ids), recorder
        self.max_tokens = s.max_tokens
        self.done = [False] * s.n
        self.count = [0] * s.n
        self.tokens: list[int] = []  # row 0's tokens so far (a solo request's handoff)
        self.handed_off = False  # stopped to continue in the batching loop: no End here
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # the first call hands over the prompt
            self.prompt_seen = True
            return
        tokens = value.reshape(-1).tolist()
        lp = self.recorder.last if self.recorder is not None else None
        for row, t in enumerate(tokens):
            if self.done[row]:
                continue
            event = Token(row, int(t))
            if lp is not None:
                event.logprob = float(lp[row, t])
                if self.recorder.top > 0:
                    v, i = lp[row].topk(self.recorder.top)
                    event.top = list(zip(i.tolist(), v.tolist()))
            self.job.emit(event)
            self.count[row] += 1
            if row == 0:
                self.tokens.append(int(t))
            if t in self.stop_ids:
                self.done[row] = True
                self.job.emit(End(row, "stop"))
            elif self.count[row] >= self.max_tokens:
                self.done[row] = True
                self.job.emit(End(row, "length"))

    def end(self) -> None:
        if self.handed_off:
            return
        for row, done in enumerate(self.done):
            if not done:
                self.done[row] = True
                self.job.emit(End(row, "length"))
