"""Where the server's tokens come from.

Two paths, chosen per request by `Sampling.route()`:

- **batch**: transformers' continuous-batching manager (`model.init_continuous_batching`, public
  API) on its arg-max path over hanlm's processors (`compat.batching_logits_processors`): a
  per-request temperature (and, with `batch_top_p`, top-k and top-p), then `InverseCdfSampler`,
  which draws the token with one random number per row; greedy is a temperature of 1e-20,
  which leaves exactly the arg-max token. Requests join and leave the running batch token by
  token; a dispatcher thread reads `get_result()` and hands tokens to each request's queue.
- **generate**: `model.generate` on one worker, one request at a time, with the manager paused
  meanwhile (`manager.pause()`) so a seeded request draws from the global RNG alone and the
  model never runs two forward passes at once. It serves what the manager cannot: `seed`,
  presence/frequency/repetition penalties, classifier-free guidance, log-probs, `n > 1` (and
  top-k/top-p unless `batch_top_p`). Prompt scoring (echo + logprobs) and embeddings run there too.

A batch-route request that finds the engine idle runs alone on `generate` (faster than the
batching loop for one sequence) and hands off to the loop when another request arrives.

**One OpenMP thread team at a time.** PyTorch's CPU kernels run on libgomp, which gives each
thread that enters a parallel region its own team, kept until that thread exits; once the
process holds more team threads than CPUs, every team stops spin-waiting between kernels, and
decoding a small model slows 2.5x (measured: 520 -> 210 tokens/s for the demo model on 2 cores).
So the model is loaded on a thread that ends (`in_fresh_thread`), the worker runs on one thread
that lives only while nothing is batched, and the manager's loop thread runs only while batched
requests are in flight: it is stopped (its state kept) when the last one finishes and started
again, instantly, when one arrives, after the worker's idle thread has been told to end.

Each request gets a `Job` (hanlm.serve.jobs) whose events reach the event loop that submitted it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from concurrent.futures import Future
from contextlib import nullcontext
from typing import Any

from hanlm.compat import batching_logits_processors
from hanlm.data.templates import stop_token_ids
from hanlm.embed.pooling import embed_ids
from hanlm.generation import decoding_kwargs
from hanlm.serve.constrain import Grammars
from hanlm.serve.errors import APIError
from hanlm.serve.jobs import End, Failed, Job, Token
from hanlm.serve.processors import (
    CancelCriterion,
    InverseCdfSampler,
    JobStreamer,
    LogitBias,
    LogprobRecorder,
    OpenAIPenalty,
)
from hanlm.serve.sampling import Sampling
from hanlm.serve.threads import SerialThreads

PAGE = 64  # tokens per KV-cache page
BATCH_TOKENS = 256  # most tokens in one forward pass (long prompts are prefilled in chunks)
CACHE_TOKENS_PER_SEQ = 1024  # KV-cache room per concurrent request (at least one full context)
GREEDY_TEMPERATURE = 1e-20  # logits / 1e-20: softmax is one-hot on the arg-max (fp32-safe)


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
        batch_top_p: bool = False,
        stream_interval: float = 0.02,
    ) -> None:
        self.model, self.tok = model.eval(), tok
        self.stop_ids = stop_token_ids(tok)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.stop_ids[0]
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
        head = model.get_output_embeddings()
        self.logits_width = int(head.weight.shape[0]) if head is not None else len(tok)
        self.grammars = Grammars(tok, self.stop_ids, self.logits_width)  # response_format
        self.max_queue = max_queue
        self.batch_top_p = batch_top_p
        self.stream_interval = stream_interval  # seconds a token may wait for the next (Job)
        self.active = 0  # admitted requests not yet finished (bounded by max_queue)
        self._ids = itertools.count()
        self._jobs: dict[str, Job] = {}  # batched requests in the manager, by request id
        self._lock = threading.Lock()
        # the worker's thread (and OpenMP team) lives while nothing is batched
        self._worker = SerialThreads("hanlm-generate", keep=lambda: not self._batching)
        self._worker_jobs = 0  # tasks queued or running on the worker
        self._solo: Job | None = None  # a batch-route request running alone on `generate`
        self._contended = threading.Event()  # another request arrived: the solo one hands off
        self.handoffs = 0  # solo requests that continued in the batching loop
        # Batch requests wait here while the manager is stopped (or stopping) and the worker owns
        # the model: (job, prompt, max_tokens, request id).
        self._pending: list[tuple[Job, list[int], int, str]] = []
        self._batching = False  # the manager's loop is running
        self._stopping = False  # ... and is being stopped
        self._stop_done = threading.Condition(self._lock)  # notified when `_stopping` clears
        self._live = threading.Event()  # set while the loop runs: the dispatcher reads results
        self.manager: Any = None
        self._closing = threading.Event()
        self._dispatcher: threading.Thread | None = None
        if continuous_batching:
            self._init_manager()

    # ------------------------------------------------------------------ lifecycle

    def _init_manager(self) -> None:
        from transformers import (
            ContinuousBatchingConfig,
            GenerationConfig,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        # The manager runs its arg-max path over our processors: a per-request temperature
        # (and, with `batch_top_p`, top-k and top-p), then `InverseCdfSampler` draws the token.
        # transformers' own sampling (`torch.multinomial`) makes a random number per vocabulary
        # entry per row: 5 ms a step for 32 rows of the demo's 8k vocabulary, more than its
        # forward pass. Top-k and top-p sort the whole vocabulary of every batched row per token,
        # whatever the request asked for: on a CPU that costs more than a small model's forward
        # pass (benchmarks/cb_warpers.py), so by default requests that want them go to `generate`.
        warpers: list[Any] = [TemperatureLogitsWarper(0.5)]
        if self.batch_top_p:
            warpers += [TopKLogitsWarper(len(self.tok)), TopPLogitsWarper(0.99)]
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=256,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )
        # Size the paged KV cache for the work instead of letting transformers take a share of
        # free memory: on CPU that share is host RAM, and zero-filling its static tensors took
        # 9 s for a 3.7M-parameter model. Room for one full context or CACHE_TOKENS_PER_SEQ
        # tokens for each of `min(max_queue, 16)` requests, whichever is more (SmolLM2-135M:
        # 16,384 tokens = 0.75 GB); requests that do not fit wait in the manager's queue.
        tokens = max(self.context, min(self.max_queue, 16) * CACHE_TOKENS_PER_SEQ)
        cb_config = ContinuousBatchingConfig(
            per_request_processors=True,
            page_size=PAGE,
            num_blocks=-(-tokens // PAGE),
            max_batch_tokens=BATCH_TOKENS,
        )
        self.manager = self.model.init_continuous_batching(
            generation_config=config, continuous_batching_config=cb_config
        )
        batching_logits_processors(self.manager, [*warpers, InverseCdfSampler()])
        # Start once so the loop thread allocates the cache now rather than in the first batched
        # request's time to first token, then stop it (state kept) until requests need it.
        self.manager.start()
        self.manager.stop(block=True, keep_for_next_session=True)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="hanlm-cb-dispatch", daemon=True
        )
        self._dispatcher.start()

    def close(self) -> None:
        self._closing.set()
        self._live.set()  # wake the dispatcher to see `_closing`
        for job in list(self._jobs.values()):
            job.cancel()
        with self._lock:
            pending, self._pending = self._pending, []
        for job, *_ in pending:
            job.emit(Failed("the server is shutting down"))
        if self.manager is not None:
            with self._stop_done:  # a stop already under way (`_maybe_stop`) finishes first
                self._stop_done.wait_for(lambda: not self._stopping)
                self._stopping = True
                self._stop_done.notify_all()  # `_exclusive` waiters: closing, go on
            if self.manager.is_running():
                self.manager.stop(block=True, timeout=10)
            self.manager = None
        if self._dispatcher is not None:
            self._dispatcher.join(timeout=5)
        self._worker.shutdown()

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

    @property
    def batching(self) -> bool:
        """The batching loop is running (or still stopping)."""
        with self._lock:
            return self._batching or self._stopping

    # ------------------------------------------------------------------ generation

    def route(self, sampling: Sampling) -> str:
        """'batch' or 'generate' for this engine (see `Sampling.route`)."""
        if self.manager is None:
            return "generate"
        return sampling.route(truncation=self.batch_top_p)

    def submit(self, prompt: list[int], sampling: Sampling) -> Job:
        """Start generating for `prompt`; call from the event loop.

        A batch-route request that finds the engine idle runs on `generate`, which is faster
        than the batching loop for one sequence; when another request arrives it hands off: what
        it has generated so far becomes the prompt of a batch request for the rest."""
        job = Job(f"hanlm-{next(self._ids)}", prompt, sampling, self.stream_interval)
        if self.route(sampling) != "batch":
            self._contended.set()
            self._to_worker(self._guarded, self._generate, job)
            return job
        with self._lock:
            # Nothing batched and no solo request generating. A worker task may still be running
            # (a solo request that has sent its last token, or a seeded one): this request then
            # waits behind it as the worker's next solo task, as a batched one would wait for it.
            solo = self._solo is not None and not self._solo.generated
            idle = not (self._jobs or self._pending or self._batching or self._stopping or solo)
            if idle:
                self._solo = job
                self._contended.clear()
        if idle:
            self._to_worker(self._guarded, self._generate, job)
        else:
            self._contended.set()
            self._to_batch(job, job.prompt, sampling.max_tokens, job.id)
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
                self._flush()  # batch requests that waited for the model
                self._maybe_stop()

        return self._worker.submit(call)

    def _to_batch(self, job: Job, prompt: list[int], max_tokens: int, rid: str) -> None:
        """Queue `job` for the batching loop (or its continuation: `prompt` = the original one
        plus the tokens already sent, `max_tokens` what is left, under request id `rid`)."""
        with self._lock:
            self._pending.append((job, list(prompt), max_tokens, rid))
        job.on_cancel(lambda: self._cancel_batch(rid))
        self._flush()

    def _flush(self) -> None:
        """Hand the waiting batch requests to the manager, starting its loop if it is stopped
        and no worker task owns the model (else whoever finishes first flushes again)."""
        with self._lock:
            if self.manager is None or self._stopping or not self._pending:
                return
            if not self._batching:
                if self._worker_jobs:
                    return
                self._batching = True
                self._worker.retire()  # its idle thread ends: one OpenMP team at a time
                self.manager.start()
                self._live.set()
            pending, self._pending = self._pending, []
            for job, _, _, rid in pending:
                if not job.cancelled.is_set():
                    self._jobs[rid] = job
        for job, prompt, max_tokens, rid in pending:
            if job.cancelled.is_set():
                continue
            added = self.manager.add_request(
                prompt,
                request_id=rid,
                max_new_tokens=max_tokens,
                streaming=True,
                eos_token_id=self.stop_ids,
                **self._sampling_kwargs(job.sampling),
            )
            if added is None:
                with self._lock:
                    self._jobs.pop(rid, None)
                job.emit(Failed("the generation engine is stopping"))

    def _sampling_kwargs(self, s: Sampling) -> dict[str, Any]:
        temperature = float(s.temperature) if s.temperature > 0 else GREEDY_TEMPERATURE
        kwargs: dict[str, Any] = {"temperature": temperature}
        if self.batch_top_p:
            greedy = s.temperature == 0
            kwargs["top_k"] = int(s.top_k) if s.top_k > 0 and not greedy else len(self.tok)
            kwargs["top_p"] = float(s.top_p) if not greedy else 1.0
        return kwargs

    def _maybe_stop(self) -> None:
        """Stop the manager's loop (keeping its state) once nothing is batched any more, so its
        thread and OpenMP team go away until the next batch."""
        with self._lock:
            if not self._batching or self._stopping or self._closing.is_set():
                return
            if self._jobs or self._pending or self._worker_jobs:
                return
            self._stopping = True
        try:
            self.manager.stop(block=True, timeout=30, keep_for_next_session=True)
        finally:
            with self._lock:
                self._stopping = False
                self._batching = bool(self.manager is not None and self.manager.is_running())
                if not self._batching:
                    self._live.clear()
                self._stop_done.notify_all()
        self._flush()  # requests that arrived while it stopped

    def _cancel_batch(self, rid: str) -> None:
        with self._lock:
            self._jobs.pop(rid, None)
            self._pending = [p for p in self._pending if p[3] != rid]
            running = self._batching
        if running and self.manager is not None:
            self.manager.cancel_request(rid)
        # called from the event loop, which must not wait for the loop thread to stop
        threading.Thread(target=self._maybe_stop, name="hanlm-cb-stop", daemon=True).start()

    def _dispatch(self) -> None:
        """Route the manager's outputs to their jobs (cumulative tokens -> new ones)."""
        sent: dict[str, int] = {}
        while not self._closing.is_set():
            manager = self.manager
            if manager is None or not self._live.is_set():
                # a stopped manager's get_result() returns at once: waiting here, not spinning
                self._live.wait(0.5)
                continue
            out = manager.get_result(timeout=0.1)
            if out is None:
                with self._lock:
                    crashed = self._batching and not self._stopping and self._jobs
                if crashed and manager is not None and not manager.is_running():
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
                self._forget(out.request_id, sent)
                continue
            done = sent.get(out.request_id, 0)
            tokens = out.generated_tokens
            for t in tokens[done:]:
                job.emit(Token(0, int(t)))
            sent[out.request_id] = len(tokens)
            if out.is_finished():
                stopped = bool(tokens) and tokens[-1] in self.stop_ids
                job.emit(End(0, "stop" if stopped else "length"))
                self._forget(out.request_id, sent)

    def _forget(self, rid: str, sent: dict[str, int]) -> None:
        sent.pop(rid, None)
        with self._lock:
            self._jobs.pop(rid, None)
        self._maybe_stop()

    def _fail_all(self, message: str) -> None:
        with self._lock:
            jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job.emit(Failed(message))

    def _exclusive(self) -> Any:
        """Pause the continuous-batching loop while the worker uses the model. A loop being
        stopped is waited for (pausing one that is exiting would wait forever); no new stop or
        start begins while a worker task is counted in `_worker_jobs`."""
        with self._stop_done:
            self._stop_done.wait_for(lambda: not self._stopping or self._closing.is_set())
            running = self._batching and self.manager is not None
        manager = self.manager
        if running and manager is not None and manager.is_running():
            return manager.pause()
        return nullcontext()

    def _guarded(self, fn: Any, job: Job) -> None:
        try:
            if not job.cancelled.is_set():
                with self._exclusive():
                    fn(job)
        except Exception as e:  # reported to the waiting request, not lost in the thread
            job.emit(Failed(f"generation failed: {type(e).__name__}: {e}"))
        finally:
            with self._lock:
                if self._solo is job:  # cancelled before it ran, or failed
                    self._solo = None

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
            processors.append(OpenAIPenalty(len(job.prompt), s))
        # log-probs are the model's (after penalties), before the bias and the grammar
        recorder = LogprobRecorder(s.logprobs) if s.logprobs is not None else None
        if recorder is not None:
            processors.append(recorder)
        if s.logit_bias:
            processors.append(LogitBias(s.logit_bias))
        if s.constraint is not None:
            processors.append(s.constraint.processor(s.n, s.max_tokens, len(job.prompt)))
        streamer = JobStreamer(job, s, self.stop_ids, recorder)
        handoff = self._contended if job is self._solo else None
        if s.seed is not None:
            torch.manual_seed(s.seed)
        from transformers import LogitsProcessorList, StoppingCriteriaList

        with torch.no_grad():
            self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                logits_processor=LogitsProcessorList(processors),
                stopping_criteria=StoppingCriteriaList([CancelCriterion(job, streamer, handoff)]),
                streamer=streamer,
                **kw,
            )
        if handoff is not None:
            with self._lock:
                if self._solo is job:  # (the next solo request may already be queued)
                    self._solo = None
            left = s.max_tokens - streamer.count[0]
            if streamer.handed_off and left > 0 and not job.cancelled.is_set():
                self.handoffs += 1
                self._to_batch(job, job.prompt + streamer.tokens, left, job.id + "+")

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
        code of `hanlm embed` and `hanlm rag` (hanlm.embed.pooling), so vectors from the API match
        an index built with the same model."""
        return embed_ids(self.model, batch, self.pad_id, "weighted_mean", batch_size=16)
