"""The native dialect: `/`, `/health`, `/api/models`, `/api/chat`, `/api/generate`, `/api/embeddings`.
Errors are `{"detail": ...}`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify
from pydantic import BaseModel

from ortllm import __version__
from ortllm.catalog import load_catalog

from ... import ui
from ...routes import api_route
from ...services import TokenEvent, services
from ...streaming import failed, sse_response, usage_of
from . import protocol as p

bp = Blueprint("native", __name__)
TAG = "native"


def send(model: BaseModel, status: int = 200) -> Response:
    """A JSON response from the route's response model: what /openapi.json documents is what is sent."""
    response = jsonify(model.model_dump(mode="json"))
    response.status_code = status
    return response


def options_of(body: Any) -> dict[str, Any] | None:
    return body.options.model_dump(exclude_none=True) if body.options else None


@bp.get("/")
def root() -> Response:
    """Browsers get the web UI; API clients the server information."""
    if ui.wants_html():
        return ui.index()
    svc = services()
    installed = [m.name for m in svc.installed()]
    return jsonify(
        {
            "name": "ortllm",
            "version": __version__,
            "status": "running",
            "models_available": len(installed),
            "message": "LLM Inference API",
            "models": installed or [e.name for e in load_catalog()],
            "running_containers": sorted(svc.registry.loaded()),
            "docs": "/docs",
        }
    )


@api_route(
    bp,
    "/health",
    tag="health",
    summary='Health check (always open; 503 when the local sessions database is unusable, "degraded" when a shared one is away)',
    response=p.Health,
)
def health() -> Response:
    svc = services()
    svc.metrics.health_checks.inc()
    problem = svc.sessions_problem()
    fatal = problem if problem and not svc.sessions_shared else None
    loaded = svc.registry.loaded()
    health = p.Health(
        status="unhealthy" if fatal else "degraded" if problem else "healthy",
        detail=problem,
        model_loaded=bool(loaded),
        models_loaded=sorted(loaded),
        memory_usage=svc.memory_usage(),
        active_connections=svc.active_connections,
        uptime=round(time.time() - svc.started, 1),
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    return send(health, 503 if fatal else 200)


@api_route(bp, "/api/models", tag=TAG, summary="List installed models", response=p.ModelList)
def list_models() -> Response:
    svc = services()
    return send(p.ModelList(models=[p.ModelObject(**svc.model_object(m)) for m in svc.installed()]))


@api_route(
    bp, "/api/models/<path:model_name>", tag=TAG, summary="One model's details", response=p.ModelObject
)
def get_model(model_name: str) -> Response:
    svc = services()
    return send(p.ModelObject(**svc.model_object(svc.registry.installed(model_name))))


@api_route(
    bp,
    "/api/models/<path:model_name>/load",
    ("POST",),
    tag=TAG,
    summary="Load a model into memory",
    response=p.StatusMessage,
)
def load_model(model_name: str) -> Response:
    scheduler = services().registry.load(model_name)
    return send(p.StatusMessage(status="success", message=f"Model '{scheduler.model.name}' loaded"))


@api_route(
    bp,
    "/api/models/<path:model_name>/unload",
    ("POST",),
    tag=TAG,
    summary="Unload a model",
    response=p.StatusMessage,
)
def unload_model(model_name: str) -> Response:
    registry = services().registry
    name = registry.installed(model_name).name
    was_loaded = registry.unload(name)
    message = f"Model '{name}' " + ("unloaded" if was_loaded else "was not loaded")
    return send(p.StatusMessage(status="success", message=message))


@api_route(
    bp,
    "/api/chat",
    ("POST",),
    tag=TAG,
    summary="Chat with history and sessions (SSE by default)",
    body=p.ChatRequest,
    response=p.ChatResponse,
    streams=True,
)
def chat(body: p.ChatRequest) -> Response:
    messages = [m.model_dump() for m in body.messages]
    _, session = services().chat(body.model, messages, options_of(body), session_id=body.session_id)
    stream = session.stream
    if not body.stream:
        result = stream.result()
        reply = p.Message(role="assistant", content=result.text)
        return send(
            p.ChatResponse(
                message=reply,
                session_id=session.session_id,
                usage=p.Usage(**usage_of(result)),
                finish_reason=result.finish_reason,
            )
        )

    def events() -> Iterator[dict[str, Any]]:
        for event in stream:
            if event.text:
                yield {"token": event.text, "done": False}
            if event.done:
                yield final_event(event, stream.text, session_id=session.session_id)

    return sse_response(events())


def final_event(event: TokenEvent, text: str, **extra: Any) -> dict[str, Any]:
    """The stream's last event: the whole text and usage, or the error that ended it."""
    if failed(event):
        return {"done": True, "error": event.error, **extra}
    return {
        "done": True,
        **extra,
        "full_text": text,
        "usage": usage_of(event),
        "token_count": event.usage.completion_tokens if event.usage else 0,
        "finish_reason": event.finish_reason,
    }


@api_route(
    bp,
    "/api/generate",
    ("POST",),
    tag=TAG,
    summary="Stateless generation (SSE by default)",
    body=p.GenerateRequest,
    response=p.GenerateResponse,
    streams=True,
)
def generate(body: p.GenerateRequest) -> Response:
    _, stream = services().complete(
        body.model, body.prompt, options_of(body), template=not body.raw, system=body.system
    )
    if not body.stream:
        result = stream.result()
        usage = p.Usage(**usage_of(result))
        return send(p.GenerateResponse(text=result.text, usage=usage, finish_reason=result.finish_reason))

    def events() -> Iterator[dict[str, Any]]:
        for event in stream:
            if event.text:
                yield {"token": event.text, "done": False}
            if event.done:
                yield final_event(event, stream.text)

    return sse_response(events())


@api_route(
    bp,
    "/api/embeddings",
    ("POST",),
    tag=TAG,
    summary="Embedding vector(s) for text",
    body=p.EmbeddingsRequest,
    response=p.EmbeddingResponse,
)
def embeddings(body: p.EmbeddingsRequest) -> Response:
    texts = [body.input] if isinstance(body.input, str) else body.input
    name, result = services().embed(body.model, texts)
    if isinstance(body.input, str):
        return send(p.EmbeddingResponse(embedding=result.vectors[0], model=name))
    return send(p.EmbeddingResponse(embeddings=result.vectors, model=name))
