"""The scheduler: a model's request queue and the one worker thread that drives its backends.

The bindings hold the GIL and are not thread-safe, so only the worker touches the model.
Callers `submit()` a GenerationRequest and iterate the returned Stream of TokenEvents;
`Stream.cancel()` from any thread frees the slot within one decode step. Embeddings requests are
computed a slice at a time between decode steps.

Who batches (`batcher`): `native` (CPU: ortllm's own continuous batching on plain onnxruntime, see
backends/native.py; constrained-output requests still go to og.Engine), `engine` (og.Engine,
onnxruntime-genai >= 0.18: batches requests, per-turn options) and `generator` (og.Generator, the older
API, e.g. 0.14 — the last DirectML release), one request at a time. Each is a Backend (see backends/);
a request goes to the first backend of the list that takes it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

from ortllm.errors import (
    Busy,
    GenerationFailed,
    InvalidOptions,
    ModelLoadError,
    RequestCancelled,
    first_line,
)

from .backends import Backend
from .backends.engine_pool import DEFAULT_MAX_BATCH, DEFAULT_MAX_ENGINES, EnginePool
from .backends.generator import GeneratorBackend, embed_chunk
from .backends.native import NativeBatcher
from .constrain import grammar_of
from .job import POLL_S, EmbedJob, Job, Stream
from .loaded import LoadedModel, engine_supported
from .types import (
    CANCELLED,
    ERROR,
    Embeddings,
    GenerationRequest,
    RequestLimits,
    Result,
    embedding_tokens,
)

__all__ = ["DEFAULT_MAX_QUEUE", "Scheduler", "Stream", "engine_supported"]

log = logging.getLogger("ortllm.scheduler")
T = TypeVar("T")

DEFAULT_MAX_QUEUE = 64  # requests waiting for a slot; beyond this submit() raises Busy
EMBED_SLICE_S = 0.01  # embedding work per turn of the worker loop (at least one chunk)
EMBED_YIELD = 3.0  # while others generate, they get this many times the embeddings' time in between


class Scheduler:
    """Owns a LoadedModel and its worker thread; the only way to generate with it (a Runner that
    Generates and Embeds)."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_engines: int = DEFAULT_MAX_ENGINES,
        batcher: str | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        """`batcher`: native, engine, generator, or auto/None (what the model was loaded for)."""
        batcher = None if batcher == "auto" else batcher
        if batcher == "engine" and not engine_supported():
            raise ModelLoadError("This onnxruntime-genai has no Engine API (it needs 0.18 or later)")
        if batcher == "native" and model.native is None:
            raise ModelLoadError(f"Model '{model.name}' was not loaded for the native batcher")
        self.model = model
        self.batcher = batcher or model.info.batcher
        self.backends = self._backends(max_batch, max_engines)
        self.max_queue = max_queue
        self.limits = limits or RequestLimits()
        self._pending: deque[Job] = deque()
        self._calls: deque[Callable[[], None]] = deque()
        self._embeds: deque[EmbedJob] = deque()  # the first is in progress, a slice per turn of the loop
        self._embed_next = 0.0  # while others generate, no embedding slice before this time
        self.dropped = 0  # requests dropped from the queue (their client gone) before they ran
        self._cv = threading.Condition()
        self._stopping = False
        self.crashed: str | None = None  # why the worker died (a bug): the registry then loads it afresh
        self._thread = threading.Thread(target=self._run, name=f"ortllm-worker-{model.name}", daemon=True)
        self._thread.start()

    def _backends(self, max_batch: int, max_engines: int) -> list[Backend]:
        """Best first: the native batcher (what it cannot take goes on), og.Engine, og.Generator."""
        generator = GeneratorBackend(self.model)
        backends: list[Backend] = []
        if self.batcher == "native":
            backends.append(NativeBatcher(self.model.native, self.model.eos_token_ids))
        if self.batcher != "generator" and engine_supported():
            backends.append(EnginePool(self.model, generator, max_batch=max_batch, max_engines=max_engines))
        backends.append(generator)
        return backends

    # ---- callers' side -------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def queue_depth(self) -> int:
        """Requests waiting: generations not started and embeddings behind the one in progress."""
        return len(self._pending) + sum(1 for e in self._embeds if not e.started)

    @property
    def active_count(self) -> int:
        return len(self._running())

    def _running(self) -> list[Job]:
        """The jobs generating now, in every backend."""
        return [job for backend in self.backends for job in backend.jobs()]

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        """Tokenize the request's prompt (chat template applied to messages)."""
        if request.prompt_tokens is not None:
            ids = list(request.prompt_tokens)
        elif request.messages is not None:
            if not request.messages:
                raise InvalidOptions("messages must not be empty")
            ids = self.model.encode(self.model.render_chat(request.messages, request.tools))
        elif request.prompt is not None:
            ids = self.model.encode(request.prompt)
        else:
            raise InvalidOptions("a prompt or messages are required")
        if not ids:
            raise InvalidOptions("prompt must not be empty")
        self.model.check_fits(len(ids), self.context_of(request))
        return ids

    def context_of(self, request: GenerationRequest) -> int:
        """The request's context: its `num_ctx`, which may not exceed the model's own length (400 when it does)."""
        asked = request.options.num_ctx
        if asked > self.model.context_length:
            raise InvalidOptions(
                f"num_ctx must be at most {self.model.context_length} (the model's context length)",
                param="num_ctx",
            )
        return asked or self.model.context_length

    def submit(self, request: GenerationRequest) -> Stream:
        """Queue a request; raises ContextOverflow, InvalidOptions or Busy before anything runs."""
        ids = self.prompt_ids(request)
        max_new = min(request.options.max_tokens, self.context_of(request) - len(ids))
        job = Job(request, ids, max_new, self.model.tokenizer.create_stream, tokens=self.model.token_table)
        self._prepare(job)
        with self._cv:
            if self._stopping:
                raise ModelLoadError(f"Model '{self.model.name}' is being unloaded")
            if len(self._pending) >= self.max_queue:
                raise Busy(
                    f"Model '{self.model.name}' is busy ({self.max_queue} requests waiting); retry shortly"
                )
            self._pending.append(job)
            self._cv.notify()
        return Stream(job, self.drop)

    def _prepare(self, job: Job) -> None:
        """Check what `job` asks of the backend that will run it (400 for what that backend cannot honour)
        and give it its grammar: ortllm's own sampler applies it (og.Engine and og.Generator get the
        guidance itself)."""
        request, options = job.request, job.options
        native = isinstance(self._backend_for(job), NativeBatcher)
        if not native:
            asked = options.native_only + (["logprobs"] if request.logprobs is not None else [])
            if asked:
                raise InvalidOptions(
                    f"{', '.join(asked)} {'is' if len(asked) == 1 else 'are'} not supported for this request: "
                    f"model '{self.model.name}' runs it on onnxruntime-genai ({self.batcher} batcher), "
                    "whose sampler lacks them",
                    param=asked[0],
                )
        vocab = self.model.token_table.vocab
        wrong = next((t for t, _ in options.logit_bias if vocab and t >= vocab), None)
        if wrong is not None:
            raise InvalidOptions(
                f"logit_bias names token {wrong}; the vocabulary has {vocab}", param="logit_bias"
            )
        if request.guidance:
            if native:
                job.constraint = self.model.token_table.constraint(request.guidance)
            else:
                grammar_of(*request.guidance)  # a grammar that cannot be compiled is a 400 here too

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
            self._loop()
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

    def _backend_for(self, job: Job) -> Backend:
        return next(b for b in self.backends if b.takes(job))

    def _next_work(
        self, busy: bool, wait_s: float | None = None
    ) -> tuple[list[tuple[Job, Backend]], list[Callable[[], None]]]:
        """The waiting jobs that can start now (in order, each with its backend, while the backend of the
        next one has room) and the calls to run; blocks while there is nothing to do (at most `wait_s`
        seconds when given)."""
        with self._cv:
            while (
                not busy and not self._pending and not self._calls and not self._embeds and not self._stopping
            ):
                if not self._cv.wait(wait_s) and wait_s is not None:
                    break
            admit: list[tuple[Job, Backend]] = []
            room: dict[int, int] = {}
            while self._pending:
                job = self._pending[0]
                if job.cancelled.is_set():  # cancelled while queued (Stream.cancel normally removes it)
                    self._pending.popleft()
                    self.dropped += 1
                    job.finish(CANCELLED)
                    continue
                backend = self._backend_for(job)
                left = room.setdefault(id(backend), backend.free)
                if left <= 0:
                    break
                room[id(backend)] = left - 1
                admit.append((self._pending.popleft(), backend))
            calls = list(self._calls)
            self._calls.clear()
            return admit, calls

    def _loop(self) -> None:
        """Admit waiting jobs to their backends, step the backends, compute a slice of embeddings;
        until the scheduler stops and nothing runs."""
        while True:
            busy = any(b.wants_step or b.wants_warm_up for b in self.backends)
            wakes = [t for t in (b.wake_at for b in self.backends) if t is not None]
            wait_s = max(0.0, min(wakes) - time.monotonic()) if wakes else None
            admit, calls = self._next_work(busy=busy, wait_s=wait_s)
            for call in calls:
                call()
            if self._stopping and not admit and not any(b.busy for b in self.backends):
                return
            unplaced = [job for job, backend in admit if not self._admit(job, backend)]
            if unplaced:
                with self._cv:
                    stopping = self._stopping  # close() already emptied the queue: do not refill it
                    if not stopping:
                        self._pending.extendleft(reversed(unplaced))
                if stopping:
                    for job in unplaced:
                        job.finish(CANCELLED)
            warmed = False
            for backend in self.backends:
                if self._stopping:
                    backend.close()
                elif backend.wants_step:
                    backend.step()
                elif backend.wants_warm_up and not self._embeds and not warmed:
                    backend.warm_up()  # idle: e.g. fault in a cold KV slot, a few ms at a time
                    warmed = True
            self._embed_turn(generating=bool(self._running()))

    def _admit(self, job: Job, backend: Backend) -> bool:
        """Hand `job` to `backend`; False when it has no room. A backend that fails to take the job (e.g.
        og.Engine refusing the model) fails that job alone: it is neither queued nor running, so a crash here
        would leave its caller waiting forever."""
        try:
            return backend.admit(job)
        except Exception as exc:
            log.exception("could not start a request on %s", self.model.name)
            job.finish(ERROR, f"could not start generation: {first_line(exc)}")
            return True

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
                embed_chunk(self.model, job)
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
