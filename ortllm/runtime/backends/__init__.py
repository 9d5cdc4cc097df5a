"""The ways a scheduler's worker can run generation requests, behind one `Backend` protocol.

- `native.NativeBatcher`: ortllm's own continuous batching on plain onnxruntime (CPU models).
- `engine_pool.EnginePool`: a pool of og.Engines (onnxruntime-genai >= 0.18), static batches.
- `generator.GeneratorBackend`: og.Generator, one request at a time (any onnxruntime-genai).

A scheduler holds a list of them, best first; each request goes to the first that `takes` it.
The backends see a loaded model through `GenaiModel` only: runtime.loaded (which builds the native
decoder) imports this package, never the other way round.
"""

from __future__ import annotations

from typing import Any, Protocol

from ..job import Job


class GenaiModel(Protocol):
    """What the onnxruntime-genai backends use of a loaded model (runtime.loaded.LoadedModel is one)."""

    name: str
    eos_token_ids: list[int]

    @property
    def model(self) -> Any:
        """The og.Model."""
        ...


class Backend(Protocol):
    """What the scheduler's worker loop drives. Called from the worker thread only."""

    @property
    def free(self) -> int:
        """How many more jobs `admit` can start now."""
        ...

    @property
    def busy(self) -> bool:
        """Jobs are running (the worker must not stop before they end)."""
        ...

    @property
    def wants_step(self) -> bool:
        """`step` has work to do now."""
        ...

    @property
    def wake_at(self) -> float | None:
        """A monotonic time at which `step` will have work although it has none now (None: no such time)."""
        ...

    @property
    def wants_warm_up(self) -> bool:
        """Idle work would help (e.g. faulting in KV memory)."""
        ...

    def takes(self, job: Job) -> bool:
        """Whether this backend can run `job` at all."""
        ...

    def admit(self, job: Job) -> bool:
        """Start `job` (or finish it with an error); False when there was no room after all."""
        ...

    def step(self) -> None:
        """Advance the running jobs (one decode step; the generator runs one job to its end)."""
        ...

    def warm_up(self) -> None:
        """A few milliseconds of idle work."""
        ...

    def jobs(self) -> list[Job]:
        """The jobs running now."""
        ...

    def close(self) -> None:
        """Stop what runs (the jobs are cancelled); called on each worker turn until not `busy`."""
        ...
