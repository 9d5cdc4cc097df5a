"""The chat service dialect: `/readiness`, `/completions`, `/chat/completions` (kebab-case body), sessions
and history. Streams are SSE of raw token text; errors are `{"error": "..."}`. `WS /chat/ws` is in ws.py."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from flask import Blueprint, Response, jsonify

from ortllm.errors import InvalidOptions

from ...errors import error_response
from ...routes import api_route
from ...services import ChatSession, Stream, TokenEvent, services
from ...streaming import cancelled, failed, sse_response
from . import protocol as p
from .ws import ws_route

bp = Blueprint("chat_ws", __name__)
TAG = "chat service"
DEVICES = {"cpu": "cpu", "cuda": "cuda", "dml": "dml", "directml": "dml", "webgpu": "webgpu"}


def use_device(model: str, device: str) -> None:
    """Load `model` on the execution provider `device` names; 400 when this machine or model has none."""
    ep = DEVICES.get(device.lower())
    if ep == "cpu":
        return
    if device.lower() == "metal":
        raise InvalidOptions(
            "device 'metal' is not supported: onnxruntime-genai has no Metal execution provider"
        )
    if ep is None:
        raise InvalidOptions(f"Unknown device '{device}': use cpu, cuda, dml or webgpu")
    services().load_on(model, ep)


def start_chat(body: p.RustChatRequest) -> ChatSession[Stream]:
    """Start one chat turn of the kebab-case body; the session's stored history comes first."""
    use_device(body.model_name, body.device)
    options = {
        "max_tokens": body.max_token,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "repeat_penalty": body.repeat_penalty,
        "stop": body.stop,
    }
    _, session = services().chat(
        body.model_name,
        [{"role": "user", "content": body.prompt}],
        options,
        session_id=body.session_id,
        system_prompt=body.system_prompt,
    )
    return session


def raw_tokens(events: Iterable[TokenEvent]) -> Iterator[str]:
    """Token texts as raw SSE events; a failed generation ends with `__ERROR__:message`, one the server cut
    short (shutdown, unload) with `__ERROR__:cancelled`, so it never looks complete."""
    for event in events:
        if event.text:
            yield event.text
        if event.done and failed(event):
            yield f"__ERROR__:{event.error}"
        elif event.done and cancelled(event):
            yield "__ERROR__:cancelled"


@api_route(
    bp, "/readiness", tag=TAG, summary="Ready when a model is loaded (503 until then)", response=p.Readiness
)
def readiness() -> Response:
    svc = services()
    loaded = svc.registry.loaded()
    if not loaded:
        return error_response(503, "Not ready: no model is loaded yet")
    problem = svc.sessions_problem()
    if problem and not svc.sessions_shared:
        return error_response(503, f"Not ready: {problem}")
    ready = p.Readiness(
        status="ready",
        models_available=len(loaded),
        timestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    return jsonify(ready.model_dump(mode="json"))


@api_route(
    bp,
    "/completions",
    ("POST",),
    tag=TAG,
    summary="Text completion, no chat template (stream: SSE)",
    body=p.RustCompletionRequest,
    response=p.RustCompletionResponse,
    streams=True,
)
def completions(body: p.RustCompletionRequest) -> Response:
    options = {
        "max_tokens": body.max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "stop": body.stop,
    }
    _, stream = services().complete(body.model, body.prompt, options, template=False)
    if body.stream:
        return sse_response(raw_tokens(stream))
    whole = stream.result()
    reply = p.RustCompletionResponse(text=whole.text, model=body.model, tokens=whole.usage.completion_tokens)
    return jsonify(reply.model_dump(mode="json"))


@api_route(
    bp,
    "/chat/completions",
    ("POST",),
    tag=TAG,
    summary="Chat with session history: SSE of raw tokens",
    body=p.RustChatRequest,
    streams=True,
)
def chat_completions(body: p.RustChatRequest) -> Response:
    session = start_chat(body)
    response = sse_response(raw_tokens(session.stream))
    response.headers["X-Session-Id"] = session.session_id
    return response


@api_route(bp, "/sessions", tag=TAG, summary="Session ids, most recent first", response=p.SessionIds)
def list_sessions() -> Response:
    return jsonify(p.SessionIds([s.id for s in services().sessions().list()]).model_dump(mode="json"))


@api_route(
    bp,
    "/chat/history/<path:session_id>",
    tag=TAG,
    summary="A session's messages, system prompt first",
    response=p.History,
)
def history(session_id: str) -> Response:
    messages = p.History.model_validate(services().sessions().history(session_id))
    return jsonify(messages.model_dump(mode="json"))


@api_route(bp, "/chat/history/<path:session_id>", ("DELETE",), tag=TAG, summary="Delete a session (204)")
def delete_history(session_id: str) -> Response:
    services().sessions().delete(session_id)
    return Response(status=204)


@api_route(
    bp,
    "/chat/history/<path:session_id>/rollback",
    ("POST",),
    tag=TAG,
    summary="Remove the last `amount` messages",
    body=p.Rollback,
    response=p.RollbackDone,
)
def rollback(body: p.Rollback, session_id: str) -> Response:
    services().sessions().rollback(session_id, body.amount)
    return jsonify(p.RollbackDone().model_dump(mode="json"))


ws_route(bp, start_chat)  # WS /chat/ws: the same chat turn, one text frame per token
