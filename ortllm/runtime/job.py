"""One request inside a scheduler (Job, EmbedJob), its token handling, and the Stream its caller reads."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import Future, InvalidStateError
from typing import Any

import numpy as np

from ortllm.errors import GenerationFailed, OrtllmError

from .constrain import Constraint, TokenTable
from .options import GenerationOptions
from .sampling import token_logprobs
from .stop import StopMatcher
from .types import ERROR, STOP, GenerationRequest, Result, Timings, TokenEvent, TokenLogprob, Usage

POLL_S = 0.25  # how often a waiting caller checks whether its client has gone


class Job:
    """One generation request: its prompt, progress and the queue its events go to. What a backend
    needs besides (an Engine request, a KV slot) it keeps itself."""

    def __init__(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        max_new: int,
        new_decoder: Callable[[], Any],
        *,
        tokens: TokenTable | None = None,
    ) -> None:
        """`new_decoder`: makes the tokenizer's incremental decoder (called on the worker thread); `tokens`:
        the model's TokenTable, for log-probabilities."""
        self.request = request
        self.tokens = tokens
        self.constraint: Constraint | None = None  # the grammar, when ortllm's own sampler applies it
        self._logprobs: list[TokenLogprob] = []  # those of tokens whose text is not streamed yet
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
        self.drafted_tokens = 0  # speculative decoding: tokens drafted for this request, and those kept
        self.accepted_tokens = 0
        self._new_decoder = new_decoder
        self._decoder: Any = None
        self.done = False

    def take(self, token: int, eos_ids: Collection[int] = (), logprob: TokenLogprob | None = None) -> bool:
        """A generated token: streamed (stop strings held back) unless it ends the sequence; False when
        the job should stop here (end-of-sequence, or a stop string matched)."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if token in eos_ids:
            return False
        if self._decoder is None:
            self._decoder = self._new_decoder()
        self.token_ids.append(token)
        if logprob is not None:
            self._logprobs.append(logprob)
        text = self.matcher.feed(self._decoder.decode(token))
        if text:
            self.events.put(TokenEvent(text=text, token_id=token, logprobs=self._take_logprobs()))
        return not self.matcher.stopped

    def logprob(self, logits: np.ndarray, token: int) -> TokenLogprob:
        """`token`'s log-probability under the adjusted `logits` with the request's number of alternatives."""
        assert self.tokens is not None  # the scheduler gives every job of a logprobs request its table
        value, best = token_logprobs(logits, token, self.request.logprobs or 0)

        def described(t: int) -> tuple[str, bytes]:
            raw = self.tokens.token_bytes(t) if self.tokens else b""
            return raw.decode("utf-8", errors="replace"), raw

        text, raw = described(token)
        return TokenLogprob(text, raw, value, [(*described(t), lp) for t, lp in best])

    def _take_logprobs(self) -> list[TokenLogprob] | None:
        if not self._logprobs:
            return None
        out, self._logprobs = self._logprobs, []
        return out

    def finish(self, reason: str, error: str | None = None) -> None:
        """The final event (usage, timings); later calls do nothing."""
        if self.done:
            return
        self.done = True
        tail = self.matcher.flush()
        if tail:
            self.events.put(TokenEvent(text=tail, logprobs=self._take_logprobs()))
        end = time.monotonic()
        decode_s = end - (self.first_token_at or end)
        generated = len(self.token_ids)
        timings = Timings(
            queued_s=(self.started or end) - self.submitted,
            ttft_s=(self.first_token_at or end) - self.submitted,
            total_s=end - self.submitted,
            decode_tokens_per_s=(generated - 1) / decode_s if decode_s > 0 and generated > 1 else 0.0,
            draft_tokens=self.drafted_tokens,
            accepted_draft_tokens=self.accepted_tokens,
        )
        usage = Usage(len(self.prompt_ids), generated, self.cached_prompt_tokens)
        self.events.put(TokenEvent(finish_reason=reason, usage=usage, timings=timings, error=error))


class Stream:
    """The events of one request, for one reader: iterate it, or `result()` for the whole generation;
    `cancel()` it from any thread. It closes itself: read to the end, a reader that leaves its loop early
    (an exception, a `break`, its generator closed), a `with` block left, or `close()` frees the request's
    slot (an unfinished one is cancelled). Hooks: `on_final` callbacks get the final event once, in the
    reading thread, before it is yielded; `on_close` callbacks run once when it closes."""

    def __init__(self, job: Job, drop: Callable[[Job], None]) -> None:
        """`drop`: the scheduler's way to take a cancelled job out of its queue."""
        self._job = job
        self._drop = drop
        self.final: TokenEvent | None = None
        self.prompt_tokens = len(job.prompt_ids)
        self._parts: list[str] = []
        self.logprobs: list[TokenLogprob] = []  # read so far (requests with logprobs)
        self._final_hooks: list[Callable[[TokenEvent], None]] = []
        self._close_hooks: list[Callable[[], None]] = []
        self._cancelled = False
        self._closed = False
        self._lock = threading.Lock()

    @property
    def text(self) -> str:
        """The text read so far (all of it once the final event is read)."""
        return "".join(self._parts)

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the answer (None: end-of-sequence, max_tokens or no stop matched)."""
        return self._job.matcher.matched

    def on_final(self, callback: Callable[[TokenEvent], None]) -> None:
        """Run `callback(final_event)` when the reader reads the final event (e.g. metering, storing)."""
        self._final_hooks.append(callback)

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run `callback()` when the stream closes, read to its end or not (e.g. a turn its reader left)."""
        self._close_hooks.append(callback)

    def __iter__(self) -> Iterator[TokenEvent]:
        gone = self._job.request.client_gone
        try:
            while self.final is None:
                try:  # a timeout keeps the consumer interruptible (Ctrl-C in the terminal chat)
                    event = self._job.events.get(timeout=POLL_S if gone else 0.5)
                except queue.Empty:
                    if gone is not None and gone():  # nobody will read the answer: free the place / slot
                        self.cancel()
                    continue
                if event.text:
                    self._parts.append(event.text)
                if event.logprobs:
                    self.logprobs.extend(event.logprobs)
                if event.done:
                    self.final = event
                    for hook in self._final_hooks:
                        hook(event)
                yield event
        finally:  # read to the end, or the reader stopped (an exception, a closed generator)
            self.close()

    def cancel(self) -> None:
        """Stop the request: one still queued is dropped at once (it never runs), a running one at the
        next decode step; the reader still gets the final (cancelled) event."""
        if self.final is None and not self._cancelled:
            self._cancelled = True
            self._job.cancelled.set()
            self._drop(self._job)

    def close(self) -> None:
        """The caller is done with the stream: cancel it when unfinished and run the close hooks (once)."""
        self.cancel()
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for hook in self._close_hooks:
            hook()

    def result(self) -> Result:
        """Read the stream to its end: the whole generation; raise GenerationFailed when it failed."""
        for _ in self:
            pass
        final = self.final
        assert final is not None
        if final.finish_reason == ERROR:
            raise GenerationFailed(final.error or "generation failed")
        return Result(
            self.text,
            final.finish_reason or STOP,
            final.usage or Usage(),
            final.timings or Timings(),
            list(self._job.token_ids),
            self.logprobs if self._job.request.logprobs is not None else None,
        )

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
