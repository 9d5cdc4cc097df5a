"""og.Generator, the API every onnxruntime-genai has (0.14, the last DirectML release, included): one
request at a time, run to its end. Also what the other backends hand a request they cannot take, and
what computes embeddings from a model's hidden states."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime_genai as og

from ortllm.errors import first_line

from ..job import EmbedJob, Job
from ..types import CANCELLED, ERROR, LENGTH, STOP

if TYPE_CHECKING:
    from . import GenaiModel as LoadedModel

EMBED_CHUNK = 16  # tokens per forward pass of an embedding (a long text takes several, between decode steps)


class GeneratorBackend:
    """A scheduler Backend that runs one job at a time with og.Generator; it takes every job."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self._job: Job | None = None

    @property
    def free(self) -> int:
        return 0 if self._job is not None else 1

    @property
    def busy(self) -> bool:
        return self._job is not None

    @property
    def wants_step(self) -> bool:
        return self._job is not None

    @property
    def wake_at(self) -> float | None:
        return None

    @property
    def wants_warm_up(self) -> bool:
        return False

    def takes(self, job: Job) -> bool:
        return True

    def admit(self, job: Job) -> bool:
        if self._job is not None:
            return False
        self._job = job
        return True

    def step(self) -> None:
        """Run the admitted job to its end (the worker does nothing else meanwhile)."""
        job = self._job
        if job is None:
            return
        try:
            self.run(job)
        finally:
            self._job = None

    def warm_up(self) -> None:
        pass

    def jobs(self) -> list[Job]:
        return [self._job] if self._job is not None else []

    def close(self) -> None:
        pass  # a job runs only inside step(), which ends when its job is cancelled

    def run(self, job: Job) -> None:
        """Generate `job` to its end; a failure finishes it with the error."""
        try:
            self._generate(job)
        except Exception as exc:
            job.finish(ERROR, f"generation failed: {first_line(exc)}")

    def _generate(self, job: Job) -> None:
        job.started = time.monotonic()
        o = job.options
        params = og.GeneratorParams(self.model.model)
        search: dict[str, Any] = {
            # at least the sliding window (og refuses less); the loop below stops at max_new itself
            "max_length": max(len(job.prompt_ids) + job.max_new, getattr(self.model, "kv_floor", 0)),
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
        hit_eos = False
        while not generator.is_done():
            if job.cancelled.is_set():
                job.finish(CANCELLED)
                return
            generator.generate_next_token()
            if not job.take(int(generator.get_next_tokens()[0]), self.model.eos_token_ids):
                if job.matcher.stopped:
                    job.finish(STOP)
                    return
                hit_eos = True
                break
            if len(job.token_ids) >= job.max_new:
                break
        job.finish(STOP if hit_eos else LENGTH)


def embed_chunk(model: LoadedModel, job: EmbedJob) -> None:
    """Feed the next EMBED_CHUNK tokens of `job`'s text in progress; a finished text gives its vector:
    the mean of its final hidden states, L2-normalised (chunked feeding gives the same states)."""
    ids = job.token_lists[len(job.vectors)]
    if job.generator is None:
        params = og.GeneratorParams(model.model)
        params.set_search_options(max_length=len(ids) + 1)
        job.generator = og.Generator(model.model, params)
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
