"""The native dialect (the MyLLM seeds): `/`, `/health`, `/api/models`, `/api/chat`, `/api/generate`,
`/api/embeddings`. Errors are `{"detail": ...}`."""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, jsonify

from ortllm import __version__
from ortllm.catalog import load_catalog
from ortllm.errors import GenerationFailed
from ortllm.runtime.types import ERROR, TokenEvent

from . import protocol as p
from . import ui
from .routes import api_route
from .service import services
from .sse import sse_response

bp = Blueprint("native", __name__)
TAG = "native (MyLLM)"


def usage_of(event: TokenEvent) -> dict[str, int]:
    u = event.usage
    assert u is not None
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }


def options_of(body: Any) -> dict[str, Any] | None:
    return body.options.model_dump(exclude_none=True) if body.options else None


def collect(events) -> tuple[str, TokenEvent]:
    """Run a stream to its end: the text and the final event (raises on a failed generation)."""
    parts, final = [], None
    for event in events:
        if event.text:
            parts.append(event.text)
        if event.done:
            final = event
    assert final is not None
    if final.finish_reason == ERROR:
        raise GenerationFailed(final.error or "generation failed")
    return "".join(parts), final


@bp.get("/")
def root() -> Response:
    """Browsers get the web UI; API clients the server information (the MyLLM and TGI seeds' union)."""
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
    summary="Health check (always open; 503 when the sessions database is unusable)",
    response=p.Health,
)
def health() -> Response:
    svc = services()
    svc.metrics.health_checks.inc()
    problem = svc.sessions_problem()
    response = jsonify(
        {
            "status": "unhealthy" if problem else "healthy",
            **({"detail": problem} if problem else {}),
            "model_loaded": bool(svc.registry.loaded()),
            "models_loaded": sorted(svc.registry.loaded()),
            "memory_usage": svc.memory_usage(),
            "active_connections": svc.active_connections,
            "uptime": round(time.time() - svc.started, 1),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    response.status_code = 503 if problem else 200
    return response


@api_route(bp, "/api/models", tag=TAG, summary="List installed models", response=p.ModelList)
def list_models() -> Response:
    svc = services()
    return jsonify({"models": [svc.model_object(m) for m in svc.installed()]})


@api_route(
    bp, "/api/models/<path:model_name>", tag=TAG, summary="One model's details", response=p.ModelObject
)
def get_model(model_name: str) -> Response:
    svc = services()
    return jsonify(svc.model_object(svc.registry.installed(model_name)))


@api_route(bp, "/api/models/<path:model_name>/load", ("POST",), tag=TAG, summary="Load a model into memory",
           response=p.StatusMessage)  # fmt: skip
def load_model(model_name: str) -> Response:
    scheduler = services().registry.load(model_name)
    return jsonify({"status": "success", "message": f"Model '{scheduler.model.name}' loaded"})


@api_route(bp, "/api/models/<path:model_name>/unload", ("POST",), tag=TAG, summary="Unload a model",
           response=p.StatusMessage)  # fmt: skip
def unload_model(model_name: str) -> Response:
    registry = services().registry
    name = registry.installed(model_name).name
    was_loaded = registry.unload(name)
    return jsonify(
        {
            "status": "success",
            "message": f"Model '{name}' " + ("unloaded" if was_loaded else "was not loaded"),
        }
    )


@api_route(bp, "/api/chat", ("POST",), tag=TAG, summary="Chat with history and sessions (SSE by default)",
           body=p.ChatRequest, response=p.ChatResponse, streams=True)  # fmt: skip
def chat(body: p.ChatRequest) -> Response:
    messages = [m.model_dump() for m in body.messages]
    _, session = services().chat(body.model, messages, options_of(body), session_id=body.session_id)
    if not body.stream:
        text, final = collect(session)
        return jsonify({"message": {"role": "assistant", "content": text}, "session_id": session.session_id,
                        "usage": usage_of(final), "finish_reason": final.finish_reason})  # fmt: skip

    def events():
        parts: list[str] = []
        for event in session:
            if event.text:
                parts.append(event.text)
                yield {"token": event.text, "done": False}
            if event.done:
                yield final_event(event, "".join(parts), session_id=session.session_id)

    return sse_response(events())


def final_event(event: TokenEvent, text: str, **extra: Any) -> dict[str, Any]:
    if event.finish_reason == ERROR:
        return {"done": True, "error": event.error, **extra}
    return {"done": True, **extra, "full_text": text, "usage": usage_of(event),
            "token_count": event.usage.completion_tokens if event.usage else 0,
            "finish_reason": event.finish_reason}  # fmt: skip


@api_route(bp, "/api/generate", ("POST",), tag=TAG, summary="Stateless generation (SSE by default)",
           body=p.GenerateRequest, response=p.GenerateResponse, streams=True)  # fmt: skip
def generate(body: p.GenerateRequest) -> Response:
    _, stream = services().complete(body.model, body.prompt, options_of(body), template=not body.raw,
                                    system=body.system)  # fmt: skip
    if not body.stream:
        with stream:
            text, final = collect(stream)
        return jsonify({"text": text, "usage": usage_of(final), "finish_reason": final.finish_reason})

    def events():
        parts: list[str] = []
        with stream:
            for event in stream:
                if event.text:
                    parts.append(event.text)
                    yield {"token": event.text, "done": False}
                if event.done:
                    yield final_event(event, "".join(parts))

    return sse_response(events())


@api_route(bp, "/api/embeddings", ("POST",), tag=TAG, summary="Embedding vector(s) for text",
           body=p.EmbeddingsRequest, response=p.EmbeddingResponse)  # fmt: skip
def embeddings(body: p.EmbeddingsRequest) -> Response:
    from flask import request

    from ortllm.runtime.types import client_gone_probe

    scheduler = services().scheduler(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    # the limits (server.max_embedding_*) are checked by the runtime, the same for every dialect
    vectors = scheduler.embed_texts(texts, client_gone=client_gone_probe(request.environ)).vectors
    if isinstance(body.input, str):
        return jsonify({"embedding": vectors[0], "model": scheduler.model.name})
    return jsonify({"embeddings": vectors, "model": scheduler.model.name})
