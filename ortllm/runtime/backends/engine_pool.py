"""A pool of og.Engines (onnxruntime-genai >= 0.18: requests with turns, per-turn options).

On CPU an Engine runs a static batch: a request added while its batch runs waits for the whole batch.
So new requests start in an idle Engine (a fresh one while fewer than `max_engines` exist) and never
join a running batch: late arrivals get their first token after one prefill, not after the longest
running answer. While other batches run, a newly formed batch is held for ADMISSION_WINDOW_S so
near-simultaneous arrivals share it (tiny batches stepping in turn waste the batching); on an idle
server it starts at once.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime_genai as og

from ortllm.errors import first_line

from ..job import Job
from ..types import CANCELLED, ERROR, LENGTH, STOP
from .generator import GeneratorBackend

if TYPE_CHECKING:
    from . import GenaiModel as LoadedModel

log = logging.getLogger("ortllm.scheduler")

DEFAULT_MAX_BATCH = 4  # requests per og.Engine batch (the CPU Engine's own default)
DEFAULT_MAX_ENGINES = 4  # Engines (static batches) stepping side by side
ADMISSION_WINDOW_S = 0.15  # while other batches run, a new batch waits this long for companions


@dataclass
class _Turn:
    """A job running on an Engine: its og request, the turn it began, the batch it is in."""

    job: Job
    request: Any
    turn_id: int
    batch: _Batch
    cancel_sent: bool = False


class _Batch:
    """One og.Engine and the turns of the static batch it is running (or forming, before its first step)."""

    def __init__(self, model: Any) -> None:
        self.turns: dict[int, _Turn] = {}  # by id() of the og request
        self.reset(model)

    def reset(self, model: Any) -> None:
        self.engine = og.Engine(model)
        self.buffer = self.engine.create_event_buffer(256)
        self.turns.clear()
        self.idle()

    def idle(self) -> None:
        self.started = False  # True from its first step until its last job ends
        self.hold_until = 0.0  # a forming batch is not stepped before this (unless full)

    def ready(self, now: float, max_batch: int) -> bool:
        return bool(self.turns) and (self.started or now >= self.hold_until or len(self.turns) >= max_batch)


class EnginePool:
    """A scheduler Backend over up to `max_engines` og.Engines of `max_batch` requests each. Seeded
    requests go to `fallback` once an Engine says it cannot reseed per turn (the static CPU Engine)."""

    def __init__(
        self,
        model: LoadedModel,
        fallback: GeneratorBackend,
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_engines: int = DEFAULT_MAX_ENGINES,
    ) -> None:
        self.model = model
        self.fallback = fallback
        self.max_batch = max_batch
        self.max_engines = max_engines
        self._batches: list[_Batch] = []
        self._turns: dict[int, _Turn] = {}  # every running turn, by id() of its og request
        self._engine_seeds = True  # until the Engine says it cannot reseed per turn
        self._token_flag = int(og.EngineEventFlags.TOKEN)
        self._failed_flag = int(og.EngineEventFlags.FAILED)
        self._end_flags = int(og.EngineEventFlags.TURN_FINISHED) | self._failed_flag

    @property
    def free(self) -> int:
        """Free places in forming Engines and in Engines not yet made."""
        forming = sum(self.max_batch - len(b.turns) for b in self._batches if not b.started)
        return forming + (self.max_engines - len(self._batches)) * self.max_batch

    @property
    def busy(self) -> bool:
        return bool(self._turns)

    @property
    def wants_step(self) -> bool:
        """A batch is ready to step, or a stopped job's turn is still to cancel."""
        now = time.monotonic()
        return any(b.ready(now, self.max_batch) for b in self._batches) or any(
            self._stopped(t) for t in self._turns.values()
        )

    @property
    def wake_at(self) -> float | None:
        now = time.monotonic()
        held = [b.hold_until for b in self._batches if b.turns and not b.ready(now, self.max_batch)]
        return min(held) if held else None

    @property
    def wants_warm_up(self) -> bool:
        return False

    def takes(self, job: Job) -> bool:
        return job.options.seed is None or self._engine_seeds

    def jobs(self) -> list[Job]:
        turns = list(self._turns.values())  # one C-level copy: other threads read it (active_count)
        return [t.job for t in turns]

    def admit(self, job: Job) -> bool:
        """Begin `job`'s turn in a forming Engine (a new one while fewer than max_engines exist)."""
        batch = next((b for b in self._batches if not b.started and len(b.turns) < self.max_batch), None)
        if batch is None:
            if len(self._batches) >= self.max_engines:
                return False
            batch = _Batch(self.model.model)
            self._batches.append(batch)
        if not batch.turns and any(b.started for b in self._batches):
            batch.hold_until = time.monotonic() + ADMISSION_WINDOW_S
        self._begin_turn(batch, job)
        return True

    def step(self) -> None:
        """Cancel the turns whose jobs stopped, then one decode step of each ready batch."""
        for turn in list(self._turns.values()):
            if self._stopped(turn):
                turn.cancel_sent = True
                turn.request.cancel_turn(turn.turn_id)
        now = time.monotonic()
        for batch in [b for b in self._batches if b.ready(now, self.max_batch)]:
            batch.started = True
            self._step(batch)

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        """The jobs are cancelled: their turns end at the next step."""
        self.step()

    @staticmethod
    def _stopped(turn: _Turn) -> bool:
        """Its job was cancelled or hit a stop string, and the Engine has not been told yet."""
        return (turn.job.cancelled.is_set() or turn.job.matcher.stopped) and not turn.cancel_sent

    # ---- one turn's life -----------------------------------------------------------------------

    def _restart(self, batch: _Batch, error: str) -> None:
        """Fail every turn `batch` holds and give it a fresh og.Engine: after a failed turn og says the Engine
        "is no longer healthy" and refuses every later request (seen on CUDA, a guidance error)."""
        for turn in list(batch.turns.values()):
            self._turns.pop(id(turn.request), None)
            turn.job.finish(ERROR, error)
        batch.reset(self.model.model)

    def _begin_turn(self, batch: _Batch, job: Job, retry: bool = True) -> None:
        job.started = time.monotonic()
        if job.cancelled.is_set():
            job.finish(CANCELLED)
            return
        o = job.options
        try:
            opts = og.RequestOptions()
            # total length = prompt + max_tokens: never the config's default, which sizes a full KV cache
            # (at least the sliding window of Gemma 2/3, which og refuses to go below)
            opts.set_max_session_tokens(
                max(len(job.prompt_ids) + job.max_new, getattr(self.model, "kv_floor", 0))
            )
            request = batch.engine.create_request(options=opts)
            turn = og.TurnOptions(request)
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
            turn_id = request.begin_turn(np.asarray(job.prompt_ids, dtype=np.int32), turn)
            running = _Turn(job, request, turn_id, batch)
            self._turns[id(request)] = running
            batch.turns[id(request)] = running
        except RuntimeError as exc:
            if o.seed is not None and "seed" in str(exc):
                # the static (CPU) Engine has no per-turn seeds: seeded requests run on the Generator path
                self._engine_seeds = False
                self.fallback.run(job)
            elif retry and "no longer healthy" in str(exc):
                log.warning(
                    "%s: og.Engine unhealthy, starting a fresh one: %s", self.model.name, first_line(exc)
                )
                self._restart(batch, f"generation failed: {first_line(exc)}")
                self._begin_turn(batch, job, retry=False)
            else:
                job.finish(ERROR, f"could not start generation: {first_line(exc)}")
        except Exception as exc:
            job.finish(ERROR, f"could not start generation: {first_line(exc)}")

    def _step(self, batch: _Batch) -> None:
        """One decode step of one batch, its events handed to their jobs."""
        try:
            events = list(batch.engine.run(batch.buffer))
        except Exception as exc:  # the step failed: fail what it held, start a fresh Engine, keep serving
            log.exception("engine step failed for %s", self.model.name)
            self._restart(batch, f"generation failed: {first_line(exc)}")
            return
        for event in events:
            owner = batch.turns.get(id(event.request))
            if owner is None:
                continue
            try:
                self._on_event(owner, event)
            except Exception as exc:  # one request's failure must not stop the others
                log.exception("request failed on %s", self.model.name)
                self._abort(owner, exc)

    def _on_event(self, turn: _Turn, event: Any) -> None:
        flags = int(event.flags)
        job = turn.job
        if flags & self._token_flag and not turn.cancel_sent:
            # the Engine reports end-of-sequence as a finish, not a token: take() leaves it out
            job.take(int(event.token), self.model.eos_token_ids)
            if job.matcher.stopped:
                turn.cancel_sent = True
                turn.request.cancel_turn(turn.turn_id)
        if flags & self._end_flags:
            if event.usage is not None:
                job.cached_prompt_tokens = int(event.usage.cached_prompt_tokens)
            self._end_turn(turn, event, failed=bool(flags & self._failed_flag))

    def _abort(self, turn: _Turn, exc: Exception) -> None:
        """Fail one Engine request and release its slot."""
        self._release(turn)
        try:
            turn.request.cancel_turn(turn.turn_id)
            turn.request.close()
        except Exception:  # already finished or closed: nothing to release
            pass
        turn.job.finish(ERROR, f"generation failed: {first_line(exc)}")

    def _release(self, turn: _Turn) -> None:
        self._turns.pop(id(turn.request), None)
        turn.batch.turns.pop(id(turn.request), None)
        if not turn.batch.turns:
            turn.batch.idle()

    def _end_turn(self, turn: _Turn, event: Any, failed: bool) -> None:
        self._release(turn)
        try:
            turn.request.close()
        except Exception:  # closing a finished request is best effort
            pass
        job = turn.job
        reason_name = getattr(event.finish_reason, "name", str(event.finish_reason))
        if failed or reason_name == "FAILED":
            error = f"generation failed ({getattr(event.error_code, 'name', event.error_code)})"
            job.finish(ERROR, error)
            # a failed turn leaves og's Engine unhealthy: its other turns fail with it, the next ones get a new one
            log.warning("%s: a turn failed (%s); starting a fresh og.Engine", self.model.name, error)
            self._restart(turn.batch, error)
        elif job.matcher.stopped or reason_name in ("EOS", "STOP_STRING"):
            job.finish(STOP)
        elif reason_name == "CANCELLED":
            job.finish(CANCELLED)
        else:  # MAX_GENERATED_TOKENS, MAX_SESSION_TOKENS
            job.finish(LENGTH)
