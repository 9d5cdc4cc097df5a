"""The scheduler: one worker thread per loaded model drives onnxruntime-genai.

The bindings hold the GIL and are not thread-safe, so only the worker touches the model.
Callers `submit()` a GenerationRequest and iterate the returned Stream of TokenEvents;
`Stream.cancel()` from any thread frees the slot within one decode step.

Three backends: `native` (CPU: ortllm's own continuous batching on plain onnxruntime, see native.py;
constrained-output requests still go to og.Engine), `engine` (og.Engine, onnxruntime-genai >= 0.18:
batches requests, per-turn options) and `generator` (og.Generator, the older API, e.g. 0.14 — the last
DirectML release), one request at a time.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

import numpy as np
import onnxruntime_genai as og

from ortllm.errors import (
    Busy,
    GenerationFailed,
    InvalidOptions,
    ModelLoadError,
    OrtllmError,
    RequestCancelled,
    first_line,
)

from .loaded import LoadedModel
from .native import NativeBatcher
from .options import GenerationOptions
from .stop import StopMatcher
from .types import (
    CANCELLED,
    ERROR,
    LENGTH,
    STOP,
    Embeddings,
    GenerationRequest,
    RequestLimits,
    Result,
    Timings,
    TokenEvent,
    Usage,
    embedding_tokens,
)

log = logging.getLogger("ortllm.scheduler")
T = TypeVar("T")

DEFAULT_MAX_QUEUE = 64  # requests waiting for a slot; beyond this submit() raises Busy
DEFAULT_MAX_BATCH = 4  # requests per og.Engine batch (the CPU Engine's own default)
DEFAULT_MAX_ENGINES = 4  # Engines (static batches) stepping side by side


ADMISSION_WINDOW_S = 0.15  # while other batches run, a new batch waits this long for companions
EMBED_CHUNK = 16  # tokens per forward pass of an embedding (a long text takes several, between decode steps)
EMBED_SLICE_S = 0.01  # embedding work per turn of the worker loop (at least one chunk)
EMBED_YIELD = 3.0  # while others generate, they get this many times the embeddings' time in between
POLL_S = 0.25  # how often a waiting caller checks whether its client has gone


class _Batch:
    """One og.Engine and the jobs of the static batch it is running (or forming, before its first step)."""

    def __init__(self, model: Any) -> None:
        self.jobs: dict[int, Job] = {}
        self.reset(model)

    def reset(self, model: Any) -> None:
        self.engine = og.Engine(model)
        self.buffer = self.engine.create_event_buffer(256)
        self.jobs.clear()
        self.idle()

    def idle(self) -> None:
        self.started = False  # True from its first step until its last job ends
        self.hold_until = 0.0  # a forming batch is not stepped before this (unless full)

    def ready(self, now: float, max_batch: int) -> bool:
        return bool(self.jobs) and (self.started or now >= self.hold_until or len(self.jobs) >= max_batch)


def engine_supported() -> bool:
    """The 0.18 Engine API (requests with turns); 0.14's older Engine (add_request/step) does not count."""
    return hasattr(og, "Engine") and hasattr(og.Engine, "create_request") and hasattr(og, "TurnOptions")


class Job:
    """One request inside the scheduler: its prompt, progress and the queue its events go to."""

    def __init__(self, request: GenerationRequest, prompt_ids: list[int], max_new: int) -> None:
        self.request = request
        self.options: GenerationOptions = request.options
        self.prompt_ids = prompt_ids
        self.max_new = max_new
        self.events: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.submitted = time.monotonic()
        self.started: float | None = None
        self.first_token_at: float | None = None
        self.matcher = StopMatcher(self.options.stop)
        self.token_ids: list[int] = []
        self.cached_prompt_tokens = 0
        self.decoder: Any = None
        self.og_request: Any = None
        self.batch: _Batch | None = None
        self.turn_id: int | None = None
        self.cancel_sent = False
        self.hit_eos = False
        self.done = False

    def finish(self, reason: str, error: str | None = None) -> None:
        if self.done:
            return
        self.done = True
        tail = self.matcher.flush()
        if tail:
            self.events.put(TokenEvent(text=tail))
        end = time.monotonic()
        decode_s = end - (self.first_token_at or end)
        timings = Timings(
            queued_s=(self.started or end) - self.submitted,
            ttft_s=(self.first_token_at or end) - self.submitted,
            total_s=end - self.submitted,
            decode_tokens_per_s=(len(self.token_ids) - 1) / decode_s
            if decode_s > 0 and len(self.token_ids) > 1
            else 0.0,
        )
        usage = Usage(len(self.prompt_ids), len(self.token_ids), self.cached_prompt_tokens)
        self.events.put(TokenEvent(finish_reason=reason, usage=usage, timings=timings, error=error))


class Stream:
    """The events of one request. Iterate it; `cancel()` it from any thread; use it as a context
    manager so an abandoned stream (client gone) is cancelled."""

    def __init__(self, job: Job, scheduler: Scheduler) -> None:
        self._job = job
        self._scheduler = scheduler
        self.final: TokenEvent | None = None
        self.prompt_tokens = len(job.prompt_ids)

    def __iter__(self) -> Iterator[TokenEvent]:
        gone = self._job.request.client_gone
        while self.final is None:
            try:  # a timeout keeps the consumer interruptible (Ctrl-C in the terminal chat)
                event = self._job.events.get(timeout=POLL_S if gone else 0.5)
            except queue.Empty:
                if gone is not None and gone():  # nobody will read the answer: free the queue place / slot
                    self.cancel()
                continue
            if event.done:
                self.final = event
            yield event

    def cancel(self) -> None:
        """Stop the request: one still queued is dropped at once (it never runs), a running one at the
        next decode step."""
        if self.final is None:
            self._job.cancelled.set()
            self._scheduler.drop(self._job)

    def result(self) -> Result:
        """Wait for the whole generation; raise if it failed."""
        parts = [ev.text for ev in self if ev.text]
        final = self.final
        assert final is not None
        if final.finish_reason == ERROR:
            raise GenerationFailed(final.error or "generation failed")
        return Result("".join(parts), final.finish_reason or STOP, final.usage or Usage(), final.timings or Timings(),
                      list(self._job.token_ids))  # fmt: skip

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class EmbedJob:
    """One embeddings request inside the scheduler: its texts' tokens, progress (the worker computes a
    few chunks per turn) and the future its vectors go to."""

    def __init__(self, token_lists: list[list[int]]) -> None:
        self.token_lists = token_lists
        self.vectors: list[list[float]] = []
        self.future: Future[list[list[float]]] = Future()
        self.cancelled = threading.Event()
        self.generator: Any = None  # the og.Generator of the text in progress
        self.offset = 0  # tokens of that text already fed
        self.total: np.ndarray | None = None  # the sum of their hidden states
        self.started = False

    def fail(self, exc: OrtllmError) -> None:
        self.generator = None
        try:
            self.future.set_exception(exc)
        except InvalidStateError:  # already answered
            pass


class Scheduler:
    """Owns a LoadedModel and its worker thread; the only way to generate with it."""

    def __init__(self, model: LoadedModel, *, max_queue: int = DEFAULT_MAX_QUEUE, max_batch: int = DEFAULT_MAX_BATCH,
                 max_engines: int = DEFAULT_MAX_ENGINES, backend: str | None = None,
                 limits: RequestLimits | None = None) -> None:  # fmt: skip
        backend = None if backend == "auto" else backend
        if backend == "engine" and not engine_supported():
            raise ModelLoadError("This onnxruntime-genai has no Engine API (it needs 0.18 or later)")
        if backend == "native" and model.native is None:
            raise ModelLoadError(f"Model '{model.name}' was not loaded for the native batcher")
        self.model = model
        self.backend = backend or model.info.api  # auto: what the model was loaded for
        self.use_engine = self.backend != "generator" and engine_supported()  # what native cannot do
        self.native = (
            NativeBatcher(model.native, model.eos_token_ids, self._native_token)
            if self.backend == "native"
            else None
        )
        self.max_queue = max_queue
        self.limits = limits or RequestLimits()
        self.max_batch = max_batch
        self.max_engines = max_engines
        self._batches: list[_Batch] = []
        self._pending: deque[Job] = deque()
        self._calls: deque[Callable[[], None]] = deque()
        self._embeds: deque[EmbedJob] = deque()  # the first is in progress, a slice per turn of the loop
        self._embed_next = 0.0  # while others generate, no embedding slice before this time
        self.dropped = 0  # requests dropped from the queue (their client gone) before they ran
        self._active: dict[int, Job] = {}
        self._cv = threading.Condition()
        self._stopping = False
        self.crashed: str | None = None  # why the worker died (a bug): the registry then loads it afresh
        self._engine_seeds = True  # until the Engine says it cannot reseed per turn
        self._thread = threading.Thread(target=self._run, name=f"ortllm-worker-{model.name}", daemon=True)
        self._thread.start()

    # ---- callers' side -------------------------------------------------------------------------

    @property
    def api(self) -> str:
        return self.backend

    @property
    def queue_depth(self) -> int:
        """Requests waiting: generations not started and embeddings behind the one in progress."""
        return len(self._pending) + sum(1 for e in self._embeds if not e.started)

    @property
    def active_count(self) -> int:
        return len(self._running())

    def _running(self) -> list[Job]:
        """The jobs generating now: in og.Engine batches and in the native batcher."""
        return list(self._active.values()) + (self.native.jobs() if self.native else [])

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Tokenize the request's prompt (chat template applied to messages)."""
        if request.prompt_tokens is not None:
            ids = list(request.prompt_tokens)
        elif request.messages is not None:
            if not request.messages:
                raise InvalidOptions("messages must not be empty")
            ids = self.model.encode(self.model.render_chat(request.messages))
        elif request.prompt is not None:
            ids = self.model.encode(request.prompt)
        else:
            raise InvalidOptions("a prompt or messages are required")
        if not ids:
            raise InvalidOptions("prompt must not be empty")
        self.model.check_fits(len(ids))
        return ids

    def submit(self, request: GenerationRequest) -> Stream:
        """Queue a request; raises ContextOverflow, InvalidOptions or Busy before anything runs."""
        ids = self.prompt_ids(request)
        max_new = min(request.options.max_tokens, self.model.context_length - len(ids))
        job = Job(request, ids, max_new)
        with self._cv:
            if self._stopping:
                raise ModelLoadError(f"Model '{self.model.name}' is being unloaded")
            if len(self._pending) >= self.max_queue:
                raise Busy(
                    f"Model '{self.model.name}' is busy ({self.max_queue} requests waiting); retry shortly"
                )
            self._pending.append(job)
            self._cv.notify()
        return Stream(job, self)

    def generate(self, request: GenerationRequest) -> Result:
        with self.submit(request) as stream:
            return stream.result()

    def call(self, fn: Callable[[], T], timeout: float | None = None) -> T:
        """Run `fn` on the worker thread (between decode steps) and return its result."""
        future: Future[T] = Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # handed back to the caller
                    future.set_exception(exc)

        with self._cv:
            if self._stopping:
                raise ModelLoadError(f"Model '{self.model.name}' is being unloaded")
            self._calls.append(run)
            self._cv.notify()
        return future.result(timeout)

    def embed(self, texts: list[str]) -> list[list[float]]:
        """Mean-pooled, L2-normalised final hidden states, one vector per text."""
        return self.embed_texts(texts).vectors

    def embed_texts(self, texts: list[str], client_gone: Callable[[], bool] | None = None) -> Embeddings:
        """`embed` with the token count; checked against the limits first, computed a slice at a time
        between decode steps (generation keeps streaming), dropped when `client_gone()` turns true."""
        if not self.model.has_hidden_states:
            raise InvalidOptions(
                f"Model '{self.model.name}' was built without hidden states; reconvert it with this ortllm to embed"
            )
        token_lists = embedding_tokens(texts, self.model.encode, self.limits)
        for ids in token_lists:
            self.model.check_fits(len(ids))
        job = EmbedJob(token_lists)
        with self._cv:
            if self._stopping:
                raise ModelLoadError(f"Model '{self.model.name}' is being unloaded")
            if self.queue_depth >= self.max_queue:
                raise Busy(
                    f"Model '{self.model.name}' is busy ({self.max_queue} requests waiting); retry shortly"
                )
            self._embeds.append(job)
            self._cv.notify()
        try:
            while True:
                try:
                    vectors = job.future.result(POLL_S)
                    break
                except FutureTimeout:
                    if client_gone is not None and client_gone():
                        raise RequestCancelled(
                            "The embeddings request was cancelled: its client went away"
                        ) from None
        finally:
            # cancelled (client gone, or the caller interrupted): it stops at its next slice
            if not job.future.done():
                job.cancelled.set()
                self.drop(job)
        return Embeddings(vectors, sum(len(ids) for ids in token_lists))

    def drop(self, job: Job | EmbedJob) -> None:
        """A cancelled request: out of the queue now when it has not started (counted in `dropped`)."""
        with self._cv:
            if isinstance(job, Job):
                waiting = job in self._pending
                if waiting:
                    self._pending.remove(job)
            else:
                waiting = job in self._embeds and not job.started
                if waiting:
                    self._embeds.remove(job)
            self.dropped += waiting
            self._cv.notify()
        if isinstance(job, EmbedJob):
            job.fail(RequestCancelled("The embeddings request was cancelled"))
        elif waiting:
            job.finish(CANCELLED)

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel everything, stop the worker and release the model."""
        with self._cv:
            self._stopping = True
            pending = list(self._pending)
            self._pending.clear()
            embeds = list(self._embeds)
            self._embeds.clear()
            for job in self._running():
                job.cancelled.set()
            self._cv.notify()
        for job in pending:
            job.finish(CANCELLED)
        for embed in embeds:  # the one in progress stops at its next chunk
            embed.cancelled.set()
            embed.fail(ModelLoadError(f"Model '{self.model.name}' is being unloaded"))
        self._thread.join(timeout)

    # ---- worker side ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._run_batched() if self.backend != "generator" else self._run_generator()
        except BaseException as exc:  # the worker must never die silently: fail what it holds
            log.exception("worker for %s crashed", self.model.name)
            with self._cv:
                self.crashed = first_line(exc)
                self._stopping = True
                jobs = self._running() + list(self._pending)
                self._pending.clear()
                embeds = list(self._embeds)
                self._embeds.clear()
            for job in jobs:
                job.finish(ERROR, f"generation failed: {self.crashed}")
            for embed in embeds:
                embed.fail(GenerationFailed(f"embedding failed: {self.crashed}"))

    def _next_work(
        self, busy: bool, room: int, wait_s: float | None = None
    ) -> tuple[list[Job], list[Callable[[], None]]]:
        """Up to `room` jobs to admit and the calls to run; blocks while there is nothing to do
        (at most `wait_s` seconds when given)."""
        with self._cv:
            while (
                not busy and not self._pending and not self._calls and not self._embeds and not self._stopping
            ):
                if not self._cv.wait(wait_s) and wait_s is not None:
                    break
            admit: list[Job] = []
            while self._pending and len(admit) < room:
                job = self._pending.popleft()
                if job.cancelled.is_set():  # cancelled while queued (Stream.cancel normally removes it)
                    self.dropped += 1
                    job.finish(CANCELLED)
                else:
                    admit.append(job)
            calls = list(self._calls)
            self._calls.clear()
            return admit, calls

    def _run_batched(self) -> None:
        """Drive the native batcher (when the model has one) and a pool of og.Engines.

        On CPU an Engine runs a static batch: a request added while its batch runs waits for the whole
        batch. So new Engine requests start in an idle Engine (a fresh one while fewer than `max_engines`
        exist) and never join a running batch: late arrivals get their first token after one prefill,
        not after the longest running answer. While other batches run, a newly formed batch is held for
        ADMISSION_WINDOW_S so near-simultaneous arrivals share it (tiny batches stepping in turn waste
        the batching); on an idle server it starts at once. The native batcher has no such limits:
        requests join its running batch at the next step."""
        token_flag, finished_flag, failed_flag = (
            int(og.EngineEventFlags.TOKEN),
            int(og.EngineEventFlags.TURN_FINISHED),
            int(og.EngineEventFlags.FAILED),
        ) if self.use_engine else (0, 0, 0)  # fmt: skip
        native = self.native
        while True:
            now = time.monotonic()
            held = [b.hold_until for b in self._batches if b.jobs and not b.ready(now, self.max_batch)]
            busy = any(b.ready(now, self.max_batch) for b in self._batches) or bool(
                native and (native.wants_step or native.wants_warm_up)
            )
            wait_s = max(0.0, min(held) - now) if held else None
            admit, calls = self._next_work(busy=busy, room=self._room(), wait_s=wait_s)
            for call in calls:
                call()
            if self._stopping and not self._active and not admit and not (native and native.busy):
                return
            running = any(b.started for b in self._batches)
            unplaced: list[Job] = []
            for job in admit:
                if native is not None and native.takes(job):
                    if not native.admit(job):
                        unplaced.append(job)
                    continue
                if not self.use_engine or (job.options.seed is not None and not self._engine_seeds):
                    self._run_serially(job)
                    continue
                batch = next(
                    (b for b in self._batches if not b.started and len(b.jobs) < self.max_batch), None
                )
                if batch is None:
                    if len(self._batches) >= self.max_engines:
                        unplaced.append(job)
                        continue
                    batch = _Batch(self.model.model)
                    self._batches.append(batch)
                if not batch.jobs and running:
                    batch.hold_until = time.monotonic() + ADMISSION_WINDOW_S
                self._begin_turn(batch, job)
            if unplaced:
                with self._cv:
                    stopping = self._stopping  # close() already emptied the queue: do not refill it
                    if not stopping:
                        self._pending.extendleft(reversed(unplaced))
                if stopping:
                    for job in unplaced:
                        job.finish(CANCELLED)
            for job in list(self._active.values()):
                if (job.cancelled.is_set() or job.matcher.stopped) and not job.cancel_sent:
                    job.cancel_sent = True
                    job.og_request.cancel_turn(job.turn_id)
            now = time.monotonic()
            for batch in [b for b in self._batches if b.ready(now, self.max_batch)]:
                batch.started = True
                self._step(batch, token_flag, finished_flag | failed_flag, failed_flag)
            if native is not None:
                if self._stopping:
                    native.close()
                elif native.wants_step:
                    native.step()
                elif native.wants_warm_up and not self._embeds:
                    native.warm_up()  # idle: fault in a cold KV slot, a few ms at a time
            self._embed_turn(generating=bool(self._running()))

    def _room(self) -> int:
        """How many waiting jobs can start now."""
        if self.native is None:
            return self._engine_room()
        # a job in front that the native batcher cannot take goes to og.Engine; else its free slots
        head = self._pending[0] if self._pending else None
        if head is not None and not self.native.takes(head):
            return min(1, self._engine_room()) if self.use_engine else 1
        return self.native.free

    def _engine_room(self) -> int:
        """How many waiting jobs can start now: free places in forming Engines and in Engines not yet made."""
        forming = sum(self.max_batch - len(b.jobs) for b in self._batches if not b.started)
        return forming + (self.max_engines - len(self._batches)) * self.max_batch

    def _step(self, batch: _Batch, token_flag: int, end_flags: int, failed_flag: int) -> None:
        """One decode step of one batch, its events handed to their jobs."""
        try:
            events = list(batch.engine.run(batch.buffer))
        except Exception as exc:  # the step failed: fail what it held, start a fresh Engine, keep serving
            log.exception("engine step failed for %s", self.model.name)
            for job in list(batch.jobs.values()):
                self._active.pop(id(job.og_request), None)
                job.finish(ERROR, f"generation failed: {first_line(exc)}")
            batch.reset(self.model.model)
            return
        for event in events:
            owner = batch.jobs.get(id(event.request))
            if owner is None:
                continue
            try:
                self._on_event(owner, event, token_flag, end_flags, failed_flag)
            except Exception as exc:  # one request's failure must not stop the others
                log.exception("request failed on %s", self.model.name)
                self._abort(owner, exc)

    def _on_event(self, job: Job, event: Any, token_flag: int, end_flags: int, failed_flag: int) -> None:
        flags = int(event.flags)
        if flags & token_flag and not job.cancel_sent:
            self._on_token(job, int(event.token))
            if job.matcher.stopped:
                job.cancel_sent = True
                job.og_request.cancel_turn(job.turn_id)
        if flags & end_flags:
            if event.usage is not None:
                job.cached_prompt_tokens = int(event.usage.cached_prompt_tokens)
            self._end_turn(job, event, failed=bool(flags & failed_flag))

    def _abort(self, job: Job, exc: Exception) -> None:
        """Fail one Engine request and release its slot."""
        self._release(job)
        try:
            job.og_request.cancel_turn(job.turn_id)
            job.og_request.close()
        except Exception:  # already finished or closed: nothing to release
            pass
        job.finish(ERROR, f"generation failed: {first_line(exc)}")

    def _release(self, job: Job) -> None:
        self._active.pop(id(job.og_request), None)
        if job.batch is not None:
            job.batch.jobs.pop(id(job.og_request), None)
            if not job.batch.jobs:
                job.batch.idle()

    def _begin_turn(self, batch: _Batch, job: Job) -> None:
        job.started = time.monotonic()
        if job.cancelled.is_set():
            job.finish(CANCELLED)
            return
        try:
            opts = og.RequestOptions()
            # total length = prompt + max_tokens: never the config's default, which sizes a full KV cache
            opts.set_max_session_tokens(len(job.prompt_ids) + job.max_new)
            request = batch.engine.create_request(options=opts)
            turn = og.TurnOptions(request)
            o = job.options
            turn.set_max_generated_tokens(job.max_new)
            if o.min_tokens:
                turn.set_min_generated_tokens(min(o.min_tokens, job.max_new))
            if o.greedy:
                turn.set_do_sample(False)
            else:
                turn.set_do_sample(True)
                turn.set_temperature(o.temperature)
                turn.set_top_p(o.top_p)
                turn.set_top_k(o.top_k)
            turn.set_repetition_penalty(o.repetition_penalty)
            if o.seed is not None:
                turn.set_seed(o.seed)
            if job.request.guidance:
                turn.set_guidance(*job.request.guidance)
            job.turn_id = request.begin_turn(np.asarray(job.prompt_ids, dtype=np.int32), turn)
            job.og_request = request
            job.batch = batch
            job.decoder = self.model.tokenizer.create_stream()
            self._active[id(request)] = job
            batch.jobs[id(request)] = job
        except RuntimeError as exc:
            if o.seed is not None and "seed" in str(exc):
                # the static (CPU) Engine has no per-turn seeds: seeded requests run on the Generator path
                self._engine_seeds = False
                self._run_serially(job)
            else:
                job.finish(ERROR, f"could not start generation: {first_line(exc)}")
        except Exception as exc:
            job.finish(ERROR, f"could not start generation: {first_line(exc)}")

    def _run_serially(self, job: Job) -> None:
        """Generate one job to the end with og.Generator (blocks the worker meanwhile)."""
        try:
            self._generate_one(job)
        except Exception as exc:
            job.finish(ERROR, f"generation failed: {first_line(exc)}")

    def _end_turn(self, job: Job, event: Any, failed: bool) -> None:
        self._release(job)
        try:
            job.og_request.close()
        except Exception:  # closing a finished request is best effort
            pass
        reason_name = getattr(event.finish_reason, "name", str(event.finish_reason))
        if failed or reason_name == "FAILED":
            job.finish(ERROR, f"generation failed ({getattr(event.error_code, 'name', event.error_code)})")
        elif job.matcher.stopped or reason_name in ("EOS", "STOP_STRING"):
            job.finish(STOP)
        elif reason_name == "CANCELLED":
            job.finish(CANCELLED)
        else:  # MAX_GENERATED_TOKENS, MAX_SESSION_TOKENS
            job.finish(LENGTH)

    def _on_token(self, job: Job, token: int) -> None:
        if job.first_token_at is None:
            job.first_token_at = time.monotonic()
        if token in self.model.eos_token_ids:  # the Engine reports EOS as a finish, not a token: match it
            job.hit_eos = True
            return
        job.token_ids.append(token)
        text = job.matcher.feed(job.decoder.decode(token))
        if text:
            job.events.put(TokenEvent(text=text, token_id=token))

    def _native_token(self, job: Job, token: int) -> bool:
        """A token from the native batcher (never end-of-sequence); False once a stop string matched."""
        if job.decoder is None:
            job.decoder = self.model.tokenizer.create_stream()
        self._on_token(job, token)
        return not job.matcher.stopped

    def _run_generator(self) -> None:
        while True:
            admit, calls = self._next_work(busy=False, room=1)
            for call in calls:
                call()
            if self._stopping and not admit:
                return
            for job in admit:
                self._active[id(job)] = job
                try:
                    self._run_serially(job)
                finally:
                    self._active.pop(id(job), None)
            self._embed_turn(generating=False)  # one request at a time here: a slice between requests

    def _generate_one(self, job: Job) -> None:
        job.started = time.monotonic()
        o = job.options
        params = og.GeneratorParams(self.model.model)
        search: dict[str, Any] = {
            "max_length": len(job.prompt_ids) + job.max_new,
            "min_length": len(job.prompt_ids) + min(o.min_tokens, job.max_new),
            "do_sample": not o.greedy,
            "repetition_penalty": o.repetition_penalty,
        }
        if not o.greedy:
            search.update(temperature=o.temperature, top_p=o.top_p, top_k=o.top_k or 1_000_000)
        if o.seed is not None:
            search["random_seed"] = o.seed
        params.set_search_options(**search)
        if job.request.guidance:
            params.set_guidance(*job.request.guidance)
        generator = og.Generator(self.model.model, params)
        generator.append_tokens(np.asarray([job.prompt_ids], dtype=np.int32))
        job.decoder = self.model.tokenizer.create_stream()
        while not generator.is_done():
            if job.cancelled.is_set():
                job.finish(CANCELLED)
                return
            generator.generate_next_token()
            self._on_token(job, int(generator.get_next_tokens()[0]))
            if job.matcher.stopped:
                job.finish(STOP)
                return
        job.finish(STOP if job.hit_eos else LENGTH)

    def _embed_turn(self, generating: bool) -> None:
        """One slice of the first embeddings request, unless others generating have not yet had their
        EMBED_YIELD share of time since the last slice."""
        if not self._embeds or (generating and time.monotonic() < self._embed_next):
            return
        start = time.monotonic()
        self._embed_slice(self._embeds[0], start + EMBED_SLICE_S)
        end = time.monotonic()
        self._embed_next = end + EMBED_YIELD * (end - start)

    def _embed_slice(self, job: EmbedJob, until: float) -> None:
        """Chunks of `job` until the time `until` (at least one); the job leaves the queue when done."""
        job.started = True
        try:
            while not job.cancelled.is_set() and len(job.vectors) < len(job.token_lists):
                self._embed_chunk(job)
                if time.monotonic() >= until:
                    break
        except Exception as exc:  # one request's failure must not stop the worker
            log.exception("embedding failed on %s", self.model.name)
            job.fail(GenerationFailed(f"embedding failed: {first_line(exc)}"))
        if job.cancelled.is_set() or job.future.done() or len(job.vectors) == len(job.token_lists):
            with self._cv:
                if self._embeds and self._embeds[0] is job:
                    self._embeds.popleft()
            job.generator = None
            try:
                job.future.set_result(job.vectors)
            except InvalidStateError:  # failed or cancelled meanwhile
                pass

    def _embed_chunk(self, job: EmbedJob) -> None:
        """Feed the next EMBED_CHUNK tokens of the text in progress; a finished text gives its vector:
        the mean of its final hidden states, L2-normalised (chunked feeding gives the same states)."""
        ids = job.token_lists[len(job.vectors)]
        if job.generator is None:
            params = og.GeneratorParams(self.model.model)
            params.set_search_options(max_length=len(ids) + 1)
            job.generator = og.Generator(self.model.model, params)
            job.offset, job.total = 0, None
        chunk = ids[job.offset : job.offset + EMBED_CHUNK]
        job.generator.append_tokens(np.asarray([chunk], dtype=np.int32))
        hidden = np.asarray(job.generator.get_output("hidden_states"), dtype=np.float64)[0]
        part = hidden.sum(axis=0)
        job.total = part if job.total is None else job.total + part
        job.offset += len(chunk)
        if job.offset < len(ids):
            return
        vector = job.total / len(ids)
        norm = float(np.linalg.norm(vector)) or 1.0
        job.vectors.append((vector / norm).astype(np.float32).tolist())
        job.generator = None
