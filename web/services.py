"""What every dialect shares: the loaded models, the session store, options, chat turns, model facts.

Blueprints translate their wire format into calls here and the results back; no generation
logic lives in a route. This is the one web module that imports `ortllm.runtime` (import-linter checks
it): what the dialects need from the runtime they take from here.
"""

from __future__ import annotations

import errno
import functools
import json
import math
import os
import select
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from flask import current_app, has_request_context, request

from ortllm import toolcalls
from ortllm.conversation import ChatSession, ChatTurn, plan_turn
from ortllm.converters.pipeline import ConvertRequest, Progress, convert, resolve
from ortllm.errors import InvalidOptions, ModelLoadError, SessionStoreUnavailable
from ortllm.responses_store import ResponseStore
from ortllm.runtime import templates
from ortllm.runtime.embedder import not_generative
from ortllm.runtime.job import Stream
from ortllm.runtime.loaded import EP_PREFERENCE, available_eps, variant_candidates, variant_ep
from ortllm.runtime.options import MAX_STOP_STRINGS, GenerationOptions, validate_options
from ortllm.runtime.registry import ModelRegistry
from ortllm.runtime.runner import Embeds, Generates, Runner
from ortllm.runtime.types import (
    CANCELLED,
    ERROR,
    Embeddings,
    GenerationRequest,
    RequestLimits,
    Result,
    TokenEvent,
    TokenLogprob,
)
from ortllm.sessions import SessionStore
from ortllm.settings import Settings
from ortllm.store import InstalledModel, ModelStore, validate_name

from .access_log import count_tokens
from .metrics import Metrics
from .security import cache_scope

# the runtime's vocabulary the dialects use, re-exported so that they import this module only
__all__ = [
    "CANCELLED",
    "EP_PREFERENCE",
    "ERROR",
    "MAX_STOP_STRINGS",
    "ModelRegistry",
    "Result",
    "Stream",
    "TokenEvent",
    "TokenLogprob",
    "ToolDelta",
    "available_eps",
    "variant_ep",
    "ChatSession",
    "ConvertRequest",
    "Services",
    "ToolPlan",
    "make_registry",
    "ModelCard",
    "model_card",
    "services",
    "client_gone",
]


def make_registry(settings: Settings) -> ModelRegistry:
    """The app's model registry with the server's queue bound and request limits."""
    return ModelRegistry(max_queue=settings.server.max_queue, limits=RequestLimits.of(settings.server))


class Services:
    """The app's shared objects (one per app), reachable as `services()` inside a request."""

    def __init__(self, settings: Settings, registry: ModelRegistry, sessions: SessionStore) -> None:
        self.settings = settings
        self.registry = registry
        self.session_store = sessions  # every owner's sessions: reach them through `sessions()`
        # every owner's stored Responses, in the sessions' database: reach them through `responses()`
        self.response_store = ResponseStore(sessions.db)
        self.metrics = Metrics(registry.loaded)
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

    @staticmethod
    def owner() -> str:
        """Who this request acts for: the owner of its sessions and responses ("" when auth is off)."""
        return cache_scope() or ""

    def sessions(self) -> SessionStore:
        """The calling key's (or JWT subject's) own sessions; everything stored without an owner when auth
        is off. A foreign session id is simply not found."""
        return self.session_store.scoped(cache_scope() or "")

    def responses(self) -> ResponseStore:
        """The calling key's (or JWT subject's) own stored Responses, scoped as `sessions()`."""
        return self.response_store.scoped(cache_scope() or "")

    def sessions_problem(self) -> str | None:
        """Why the sessions database cannot be used right now (None when it can): /health and /readiness."""
        try:
            self.session_store.check()
        except SessionStoreUnavailable as exc:
            return str(exc)
        return None

    @property
    def sessions_shared(self) -> bool:
        """Whether sessions live in a database server shared by replicas. When it is away every replica is hit
        alike: restarting or unrouting this one helps nothing, so /health says "degraded" (200) and /readiness
        stays ready, while a local SQLite file's problem makes this server unhealthy (503)."""
        return not self.session_store.db.sqlite

    # ---- generation --------------------------------------------------------------------------

    def scheduler(self, model: str) -> Runner:
        """The model's runner (a Scheduler, or an Embedder), loaded on first use (404 when not installed)."""
        return self.registry.get(model)

    def embed(self, model: str, texts: list[str]) -> tuple[str, Embeddings]:
        """The model's name and its vectors for `texts`; the limits (server.max_embedding_*) are checked
        by the runtime, the same for every dialect."""
        runner = self.scheduler(model)
        if not isinstance(runner, Embeds):
            raise InvalidOptions(f"Model '{runner.model.name}' cannot embed text")
        return runner.model.name, runner.embed_texts(texts, client_gone=client_gone())

    def load_on(self, model: str, ep: str) -> None:
        """Load `model` on the execution provider `ep`; 400 when this machine or model has none for it."""
        installed = self.registry.installed(model)
        try:
            # the loader's own checks: a variant for ep, ep installed
            variant_candidates(installed, force_ep=ep)
        except ModelLoadError as exc:
            raise InvalidOptions(str(exc)) from exc  # the request named the device: a client error (400)
        self.registry.load(installed.name, ep=ep)

    def options(self, scheduler: Runner, raw: dict[str, Any] | None) -> GenerationOptions:
        if not isinstance(scheduler, Generates):  # an embedding model; before any session is created
            raise not_generative(scheduler.model.name)
        return validate_options(
            raw, scheduler.model.parameters, max_tokens_limit=self.settings.server.max_tokens_limit
        )

    def complete(
        self,
        model: str,
        prompt: str,
        raw_options: dict[str, Any] | None,
        *,
        template: bool,
        system: str | None = None,
        logprobs: int | None = None,
        guidance: tuple[str, str] | None = None,
    ) -> tuple[Runner, Stream]:
        """Start a stateless generation: the chat template applied (`template`) or the prompt as is;
        `guidance`: constrained output, as for `chat`."""
        scheduler = self.scheduler(model)
        self.metrics.completions.labels(scheduler.model.name).inc()
        options = self.options(scheduler, raw_options)
        system_part = [{"role": "system", "content": system}] if system else []
        messages = system_part + [{"role": "user", "content": prompt}] if template else None
        request = GenerationRequest(
            options,
            messages=messages,
            prompt=None if template else prompt,
            guidance=guidance,
            logprobs=logprobs,
            cache_scope=cache_scope(),
            client_gone=client_gone(),
        )
        return scheduler, self.submit(scheduler, request)

    def submit(self, runner: Runner, request: GenerationRequest) -> Stream:
        """Start `request`; its outcome is counted in /metrics (a hook on the stream's final event)."""
        assert isinstance(runner, Generates)  # options() refused any other
        model = runner.model.name
        stream = runner.submit(request)
        stream.on_final(lambda final: self.metrics.observe(model, final, failed=final.finish_reason == ERROR))
        count_tokens(stream)  # the request's access log line says how many tokens it generated
        return stream

    def tool_plan(
        self,
        model: str,
        messages: list[dict[str, Any]],
        tools: list[Any] | None,
        tool_choice: Any = None,
        *,
        parallel: bool = True,
    ) -> ToolPlan:
        """How a chat with OpenAI-shaped `tools` and messages (tool calls, tool results) runs on `model`: the
        messages and tools its template reads, the grammar that enforces `tool_choice`, and the parser of
        its answer. Every dialect with tools (OpenAI, Ollama, Responses, Messages) comes through here."""
        runner = self.scheduler(model)
        # markup that is one special token of the model (Qwen's <tool_call>) is written as that token
        table = getattr(runner.model, "token_table", None)
        tokenizer = table.tokenizer if table is not None and tools else None
        template = getattr(runner.model, "chat_template", None)
        return toolcalls.plan(template, messages, tools, tool_choice, parallel=parallel, tokenizer=tokenizer)

    def count_chat_tokens(
        self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> int:
        """The prompt tokens a chat (as `tool_plan` prepares it) takes on `model`: its own template and
        tokenizer, the count a generation's usage reports (400 when the prompt cannot fit its context)."""
        runner = self.scheduler(model)
        if not isinstance(runner, Generates):
            raise not_generative(runner.model.name)
        prompt_ids = getattr(runner, "prompt_ids", None)  # the Scheduler's tokenization of a request
        if prompt_ids is None:
            raise InvalidOptions(f"Model '{runner.model.name}' cannot count prompt tokens")
        return len(prompt_ids(GenerationRequest(messages=messages, tools=tools)))

    def chat(
        self,
        model: str,
        messages: list[dict[str, Any]],
        raw_options: dict[str, Any] | None,
        *,
        session_id: str | None = None,
        system_prompt: str | None = None,
        store: bool = True,
        guidance: tuple[str, str] | None = None,
        tools: list[dict[str, Any]] | None = None,
        logprobs: int | None = None,
    ) -> tuple[Runner, ChatSession[Stream]]:
        """Start a chat turn; with `store`, history comes from and goes to the session store. `tools`: what
        the chat template describes (see `tool_plan`); `logprobs`: alternatives per token (None: none)."""
        scheduler = self.scheduler(model)
        self.metrics.chat_completions.labels(scheduler.model.name).inc()
        options = self.options(scheduler, raw_options)
        sessions = self.sessions() if store else None
        if sessions is not None:
            turn = plan_turn(
                sessions,
                model=scheduler.model.name,
                messages=messages,
                session_id=session_id,
                system_prompt=system_prompt,
            )
        else:
            turn = ChatTurn("", messages)
        gone = client_gone()
        request = GenerationRequest(
            options,
            messages=turn.messages,
            session_id=turn.session_id or None,
            guidance=guidance,
            tools=tools,
            logprobs=logprobs,
            cache_scope=cache_scope(),
            client_gone=gone,
        )
        # only an accepted turn is stored: a refused one (busy, too long) raises here and leaves no session
        stream = self.submit(scheduler, request)
        return scheduler, ChatSession.begin(sessions, turn, stream, gone)

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
            # why this EP: LoadedModel and EmbeddingModel both say, ModelFacts does not promise it
            "ep_reason": getattr(loaded.model, "reason", None) if loaded else None,
            "hf_name": model.get("hf_name") or model.get("source", ""),
        }

    # ---- model management (the Ollama dialect's pull, create, copy and delete) ----------------

    @property
    def store(self) -> ModelStore:
        return self.registry.store

    @property
    def server_paths_allowed(self) -> bool:
        """Whether a request may name a file or folder on this machine as a model source: only a server
        without authentication (bound to this machine, see check_exposure) — its callers are local users who
        can read those files anyway; with keys, callers are other people."""
        auth = self.settings.auth
        return not (auth.api_keys or auth.key_file or auth.jwt_secret)

    def conversion(
        self, source: str, *, name: str | None = None, precision: str | None = None, force: bool = False
    ) -> tuple[ConvertRequest, str]:
        """A conversion of `source` (catalog name, local path, hf:, pypi:) and the store name it installs,
        checked before anything runs: an unknown name is a 404, a bad path or name a 400."""
        request = ConvertRequest(source, name=name, precision=precision, force=force)
        return request, resolve(request)[2]

    def convert(self, request: ConvertRequest, progress: Progress) -> InstalledModel:
        """Run one conversion into this server's store (slow: call it off the request thread)."""
        return convert(request, self.store, progress)

    def delete_model(self, name: str) -> str:
        """Unload (cancelling its answers) and remove an installed model; its store name."""
        canonical = self.registry.installed(name).name
        self.registry.unload(canonical)
        self.store.remove(canonical)
        return canonical

    def copy_model(self, source: str, destination: str) -> InstalledModel:
        """Install `source` again as `destination` (hard links where the file system has them), replacing a
        model of that name atomically: the new name lists complete or not at all."""
        src = self.registry.installed(source)
        dest = validate_name(destination)
        if dest == src.name:
            return src
        root = self.store.root
        staging = root / f".staging-{dest}-copy-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(src.path, staging, copy_function=_link_or_copy)
            manifest = {**src.manifest, "name": dest, "copied_from": src.name}
            (staging / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            if self.store.find(dest) is not None:
                self.registry.unload(dest)
            target = root / dest
            trash = root / f".trash-{dest}-{uuid.uuid4().hex[:8]}"
            if target.exists():
                os.rename(target, trash)
            os.rename(staging, target)
            shutil.rmtree(trash, ignore_errors=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.store.get(dest)


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (a copy shares the files: conversions replace folders, never write into them), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


ToolPlan = toolcalls.ToolPlan

# fill-in-the-middle markers (prefix, suffix, middle) as tokenizers spell them: Qwen/DeepSeek style, StarCoder style
FIM_STYLES = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
)


@dataclass(frozen=True)
class ModelCard:
    """What a model's files say about it without loading it (the Ollama dialect's /api/show and /api/tags)."""

    architecture: str  # genai_config's model type, e.g. llama, qwen2 (the manifest's family when it has none)
    context_length: int
    embedding_length: int  # hidden size
    parameter_count: int  # weights counted in the ONNX graph (0 when it cannot be read)
    chat_template: str | None
    fim: tuple[str, str, str] | None  # the tokenizer's fill-in-the-middle markers, when it has them


def model_card(model: InstalledModel) -> ModelCard:
    """The facts of `model`'s first variant (all variants are builds of the same weights), cached per file."""
    variant = next(iter(model.variants.values()))
    manifest = model.path / "manifest.json"
    return _model_card(
        str(model.path), str(variant.path), manifest.stat().st_mtime_ns if manifest.exists() else 0
    )


@functools.lru_cache(maxsize=64)
def _model_card(model_path: str, variant_path: str, _stamp: int) -> ModelCard:
    path = Path(variant_path)
    manifest = _json_file(Path(model_path) / "manifest.json")
    cfg = _json_file(path / "genai_config.json").get("model") or {}
    decoder = cfg.get("decoder") or {}
    embed_cfg = _json_file(path / "config.json")  # embedding models keep the Hugging Face config
    context = int(cfg.get("context_length") or embed_cfg.get("max_position_embeddings") or 0)
    context = context or int(manifest.get("context_size") or 0)
    hidden = int(decoder.get("hidden_size") or embed_cfg.get("hidden_size") or 0)
    arch = str(cfg.get("type") or embed_cfg.get("model_type") or manifest.get("family") or "unknown")
    added = {t.get("content") for t in _json_file(path / "tokenizer.json").get("added_tokens", [])}
    fim = next((style for style in FIM_STYLES if added.issuperset(style)), None)
    return ModelCard(arch, context, hidden, _parameter_count(path), templates.model_template(path), fim)


def _json_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _parameter_count(variant: Path) -> int:
    """The weights in the ONNX graph: MatMulNBits count N*K each (not their packed bytes), other initializers
    their elements; an embedding table shaped as a quantized LM head is that head untied by the builder
    (tied models, e.g. Qwen2.5-0.5B), so it is counted once. 0 when the graph cannot be read."""
    files = sorted(variant.glob("*.onnx"))
    if not files:
        return 0
    try:
        import onnx

        graph = onnx.load(str(files[0]), load_external_data=False).graph
    except Exception:  # a damaged or foreign file: the count is informative only
        return 0
    sizes = {init.name: tuple(init.dims) for init in graph.initializer}
    packed: set[str] = set()
    heads: set[tuple[int, int]] = set()
    total = 0
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            total += attrs.get("N", 0) * attrs.get("K", 0)
            heads.add((attrs.get("N", 0), attrs.get("K", 0)))
            packed.update(node.input[1:])
    for name, dims in sizes.items():
        if name in packed:
            continue
        count = math.prod(dims) if dims else 1
        if len(dims) == 2 and dims in heads and count > 1_000_000:
            continue  # the untied copy of a tied embedding
        total += count
    return int(total)


ToolDelta = toolcalls.Delta  # one piece of a parsed answer: content, reasoning or a tool call's part


def client_gone() -> Callable[[], bool] | None:
    """A check that this request's HTTP client has closed its connection (None outside a request, or when
    the server does not expose the socket): the runtime then drops the request from its queue. A peek that
    finds the end of the stream, without blocking or consuming data."""
    environ = request.environ if has_request_context() else {}
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    if not isinstance(sock, socket.socket) or not hasattr(select, "poll"):  # no poll() on Windows
        return None

    def gone() -> bool:
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN)
            events = poller.poll(0)
            if not events:
                return False
            if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                return True
            # readable with nothing to read is the end of the stream (poll said recv will not wait)
            return sock.recv(1, socket.MSG_PEEK) == b""
        except OSError as exc:  # reset or closed under us; anything else is not a verdict
            return exc.errno in (errno.ECONNRESET, errno.EPIPE, errno.EBADF, errno.ENOTCONN)
        except ValueError:  # the socket object was closed (fileno -1)
            return True

    return gone


def services() -> Services:
    """This app's Services (inside a request)."""
    services: Services = current_app.extensions["ortllm"]
    return services
