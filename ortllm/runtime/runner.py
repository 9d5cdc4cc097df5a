"""What the registry holds for a loaded model (a `Runner`) and what it can do (`Generates`, `Embeds`).

Callers check a capability with `isinstance(runner, Generates)`: an embedding model's runner embeds
and cannot generate; a generative model's scheduler does both (embeddings from its hidden states).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .types import Embeddings, GenerationRequest, Result

if TYPE_CHECKING:
    from pathlib import Path

    from ortllm.store import InstalledModel, Variant

    from .job import Stream
    from .loaded import ModelInfo


class ModelFacts(Protocol):
    """What every loaded model tells about itself (LoadedModel, EmbeddingModel)."""

    @property
    def name(self) -> str: ...

    @property
    def ep(self) -> str: ...

    @property
    def installed(self) -> InstalledModel: ...

    @property
    def variant(self) -> Variant: ...

    @property
    def path(self) -> Path: ...

    @property
    def threads(self) -> int | None: ...

    @property
    def context_length(self) -> int: ...

    @property
    def info(self) -> ModelInfo: ...

    @property
    def parameters(self) -> dict[str, Any]: ...

    def encode(self, text: str) -> list[int]: ...


@runtime_checkable
class Runner(Protocol):
    """A loaded model with whatever serves its requests: counters for /metrics and idle unloading,
    `crashed` (why its worker died; the registry then loads it afresh) and `close`."""

    @property
    def model(self) -> ModelFacts: ...

    @property
    def name(self) -> str: ...

    @property
    def queue_depth(self) -> int: ...

    @property
    def active_count(self) -> int: ...

    crashed: str | None

    def close(self, timeout: float = 10.0) -> None: ...


@runtime_checkable
class Generates(Protocol):
    """Generation: `submit` queues a request (raising before anything runs when it cannot) and returns
    the Stream of its events; `generate` waits for the whole result."""

    def submit(self, request: GenerationRequest) -> Stream: ...

    def generate(self, request: GenerationRequest) -> Result: ...


@runtime_checkable
class Embeds(Protocol):
    """Embeddings: one L2-normalised vector per text."""

    def embed(self, texts: list[str]) -> list[list[float]]: ...

    def embed_texts(self, texts: list[str], client_gone: Callable[[], bool] | None = None) -> Embeddings: ...
