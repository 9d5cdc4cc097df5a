"""What every dialect shares: the loaded models, the session store, options, chat turns, model facts.

Blueprints translate their wire format into calls here and the results back; no generation
logic lives in a route.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
from flask import current_app

from ortllm.conversation import ChatTurn, commit_turn, plan_turn
from ortllm.runtime.embedder import not_generative
from ortllm.runtime.options import GenerationOptions, validate_options
from ortllm.runtime.registry import ModelRegistry
from ortllm.runtime.scheduler import Scheduler, Stream
from ortllm.runtime.types import CANCELLED, ERROR, GenerationRequest, TokenEvent
from ortllm.sessions import SessionStore
from ortllm.settings import Settings
from ortllm.store import InstalledModel

from .metrics import MeteredStream, Metrics
from .security import cache_scope


class Services:
    """The app's shared objects (one per app), reachable as `services()` inside a request."""

    def __init__(self, settings: Settings, registry: ModelRegistry, sessions: SessionStore) -> None:
        self.settings = settings
        self.registry = registry
        self.sessions = sessions
        self.metrics = Metrics(registry)
        self.started = time.time()
        self._connections = 0
        self._lock = threading.Lock()

    # ---- bookkeeping -----------------------------------------------------------------------

    def connection_opened(self) -> None:
        with self._lock:
            self._connections += 1
            self.metrics.active_connections.set(self._connections)

    def connection_closed(self) -> None:
        with self._lock:
            self._connections -= 1
            self.metrics.active_connections.set(self._connections)

    @property
    def active_connections(self) -> int:
        return self._connections

    def memory_usage(self) -> str:
        """Process RSS over total RAM, e.g. '0.4GB/24.0GB'."""
        rss = psutil.Process().memory_info().rss
        return f"{rss / 1e9:.1f}GB/{psutil.virtual_memory().total / 1e9:.1f}GB"

    # ---- generation --------------------------------------------------------------------------

    def scheduler(self, model: str) -> Scheduler:
        """The model's scheduler, loaded on first use (404 when it is not installed)."""
        return self.registry.get(model)

    def options(self, scheduler: Scheduler, raw: dict[str, Any] | None) -> GenerationOptions:
        if getattr(scheduler, "kind", "chat") == "embedding":  # before any session is created for the turn
            raise not_generative(scheduler.model.name)
        return validate_options(raw, scheduler.model.parameters,
                                max_tokens_limit=self.settings.server.max_tokens_limit)  # fmt: skip

    def complete(self, model: str, prompt: str, raw_options: dict[str, Any] | None, *, template: bool,
                 system: str | None = None) -> tuple[Scheduler, MeteredStream]:  # fmt: skip
        """Start a stateless generation: the chat template applied (`template`) or the prompt as is."""
        scheduler = self.scheduler(model)
        self.metrics.completions.labels(scheduler.model.name).inc()
        options = self.options(scheduler, raw_options)
        if template:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            request = GenerationRequest(options, messages=messages, cache_scope=cache_scope())
        else:
            request = GenerationRequest(options, prompt=prompt, cache_scope=cache_scope())
        return scheduler, self.metered(scheduler, scheduler.submit(request))

    def metered(self, scheduler: Scheduler, stream: Stream) -> MeteredStream:
        """A stream whose outcome is counted in /metrics."""
        return MeteredStream(stream, self.metrics, scheduler.model.name)

    def chat(self, model: str, messages: list[dict[str, str]], raw_options: dict[str, Any] | None, *,
             session_id: str | None = None, system_prompt: str | None = None, store: bool = True,
             guidance: tuple[str, str] | None = None) -> tuple[Scheduler, ChatSession]:  # fmt: skip
        """Start a chat turn; with `store`, history comes from and goes to the session store."""
        scheduler = self.scheduler(model)
        self.metrics.chat_completions.labels(scheduler.model.name).inc()
        options = self.options(scheduler, raw_options)
        if store:
            turn = plan_turn(self.sessions, model=scheduler.model.name, messages=messages,
                             session_id=session_id, system_prompt=system_prompt)  # fmt: skip
        else:
            turn = ChatTurn("", messages)
        request = GenerationRequest(options, messages=turn.messages, session_id=turn.session_id or None,
                                    guidance=guidance, cache_scope=cache_scope())  # fmt: skip
        stream = self.metered(scheduler, scheduler.submit(request))
        return scheduler, ChatSession(self.sessions if store else None, turn, stream)

    # ---- model facts -------------------------------------------------------------------------

    def installed(self) -> list[InstalledModel]:
        return self.registry.store.list()

    def model_object(self, model: InstalledModel) -> dict[str, Any]:
        """The native dialect's model object (also the base of the other dialects' listings)."""
        loaded = self.registry.loaded().get(model.name)
        variants = model.variants
        variant = loaded.model.variant if loaded else next(iter(variants.values()))
        return {
            "name": model.name,
            "family": model.get("family", ""),
            "size_mb": round(variant.size_bytes / 1e6, 1),
            "quantization": variant.precision,
            "context_size": int(model.get("context_size") or 0),
            "template": model.get("template", ""),
            "parameters": model.get("parameters", {}),
            "loaded": loaded is not None,
            "kind": model.kind,
            "variant": variant.id,
            "variants": sorted(variants),
            "ep": loaded.model.ep if loaded else variant.ep,
            "ep_reason": loaded.model.reason if loaded else None,
            "hf_name": model.get("hf_name") or model.get("source", ""),
        }


class ChatSession:
    """A chat turn's event stream that stores the reply in the session when the turn completes."""

    def __init__(self, sessions: SessionStore | None, turn: ChatTurn, stream: MeteredStream) -> None:
        self.sessions = sessions
        self.turn = turn
        self.stream = stream
        self.parts: list[str] = []

    @property
    def session_id(self) -> str:
        return self.turn.session_id

    def __iter__(self) -> Iterator[TokenEvent]:
        with self.stream:
            for event in self.stream:
                if event.text:
                    self.parts.append(event.text)
                if event.done:
                    self._store(event)
                yield event

    def _store(self, final: TokenEvent) -> None:
        reply = "".join(self.parts)
        if self.sessions is not None and final.finish_reason not in (ERROR, CANCELLED) and reply:
            commit_turn(self.sessions, self.turn, reply)

    def cancel(self) -> None:
        self.stream.cancel()


def services() -> Services:
    return current_app.extensions["ortllm"]
