"""Loaded models by name: load on first use or on request, one Runner each, unload on request."""

from __future__ import annotations

import logging
import threading
import time

from ortllm.catalog import load_catalog
from ortllm.errors import ModelNotFound
from ortllm.store import InstalledModel, ModelStore

from .embedder import Embedder, is_embedding_model
from .loaded import LoadedModel, batcher_choice
from .runner import Runner
from .scheduler import DEFAULT_MAX_QUEUE, Scheduler
from .types import RequestLimits

log = logging.getLogger("ortllm.registry")


class ModelRegistry:
    """Thread-safe map of model name → Runner (a Scheduler; an Embedder for embedding models) over a
    ModelStore."""

    def __init__(
        self,
        store: ModelStore | None = None,
        *,
        max_queue: int = DEFAULT_MAX_QUEUE,
        batcher: str | None = None,
        threads: int | None = None,
        limits: RequestLimits | None = None,
    ) -> None:
        """`batcher`: who batches generation (native | engine | generator | auto; default $ORTLLM_BATCHER);
        `limits`: the most work one request may ask of a model (RequestLimits.of(settings.server))."""
        self.store = store or ModelStore()
        self.max_queue = max_queue
        self.limits = limits or RequestLimits()
        self.batcher = batcher or batcher_choice()
        self.threads = threads
        self._loaded: dict[str, Runner] = {}
        self._last_used: dict[str, float] = {}
        self._lock = threading.Lock()
        self._load_locks: dict[str, threading.Lock] = {}

    def installed(self, name: str) -> InstalledModel:
        """The installed model for a name or catalog alias; 404-style error listing what is installed."""
        model = self.store.find(name) or self.store.find(load_catalog().canonical(name))
        if model is None:
            available = ", ".join(m.name for m in self.store.list()) or "none (run: ortllm pull smollm2-135m)"
            raise ModelNotFound(f"Model '{name}' not found. Available models: {available}")
        return model

    def get(self, name: str, *, autoload: bool = True, ep: str | None = None) -> Runner:
        """The model's runner, loading it first when `autoload` (else ModelNotFound if not loaded)."""
        try:
            canonical = self.installed(name).name
        except ModelNotFound:
            if name in self._loaded:  # its files were deleted while it was loaded: let it go
                self.unload(name)
            raise
        scheduler = self._loaded.get(canonical)
        if scheduler is not None and scheduler.crashed:
            # its worker died (a bug, logged with its traceback): load the model afresh rather than
            # answering "being unloaded" until the server restarts
            log.warning("reloading %s: its worker crashed (%s)", canonical, scheduler.crashed)
            self.unload(canonical)
            scheduler = None
        if scheduler is None:
            if not autoload:
                raise ModelNotFound(f"Model '{canonical}' is not loaded")
            scheduler = self.load(canonical, ep=ep)
        self._last_used[canonical] = time.monotonic()
        return scheduler

    def load(self, name: str, *, ep: str | None = None) -> Runner:
        installed = self.installed(name)
        with self._lock:
            load_lock = self._load_locks.setdefault(installed.name, threading.Lock())
        with load_lock:
            current = self._loaded.get(installed.name)
            if current is not None and (ep is None or current.model.ep == ep):
                return current
            if current is not None:
                self.unload(installed.name)
            scheduler: Runner
            if is_embedding_model(installed):  # plain onnxruntime: it Embeds, it does not Generate
                scheduler = Embedder(installed, force_ep=ep, threads=self.threads, limits=self.limits)
            else:
                model = LoadedModel(installed, force_ep=ep, threads=self.threads, batcher=self.batcher)
                scheduler = Scheduler(
                    model, max_queue=self.max_queue, batcher=self.batcher, limits=self.limits
                )
            with self._lock:
                self._loaded[installed.name] = scheduler
                self._last_used[installed.name] = time.monotonic()
            return scheduler

    def unload(self, name: str) -> bool:
        """Stop and drop a loaded model; False when it was not loaded."""
        canonical = name if name in self._loaded or self.store.find(name) else self.installed(name).name
        with self._lock:
            scheduler = self._loaded.pop(canonical, None)
            self._last_used.pop(canonical, None)
        if scheduler is None:
            return False
        scheduler.close()
        return True

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def loaded(self) -> dict[str, Runner]:
        with self._lock:
            return dict(self._loaded)

    def unload_idle(self, idle_s: float) -> list[str]:
        """Unload models unused for `idle_s` seconds with nothing queued or running."""
        now = time.monotonic()
        victims = [
            name
            for name, s in self.loaded().items()
            if now - self._last_used.get(name, now) >= idle_s and not s.active_count and not s.queue_depth
        ]
        for name in victims:
            log.info("unloading idle model %s", name)
            self.unload(name)
        return victims

    def close(self) -> None:
        for name in list(self.loaded()):
            self.unload(name)
