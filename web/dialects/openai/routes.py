"""The OpenAI dialect under /v1: chat completions, completions, embeddings, models.

Mapping rules: `max_completion_tokens` wins over `max_tokens`; `presence_penalty` and
`frequency_penalty` are accepted and not applied (the runtime has a multiplicative
`repeat_penalty`, an extension field here, as is `top_k`); `n` must be 1; `response_format`
json_object / json_schema constrain the output with the runtime's guidance (llguidance).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify
from llguidance import LLMatcher

from ortllm.errors import InvalidOptions, ModelNotFound, RequestCancelled
from ortllm.runtime.types import CANCELLED, ERROR, TokenEvent

from . import protocol as p
from .native import collect
from .routes import api_route
from .service import services
from .sse import cancel_reason, sse_response

bp = Blueprint("openai", __name__, url_prefix="/v1")
TAG = "OpenAI-compatible"


def sampling(body: p.OpenAISampling, max_tokens: int | None) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return {"temperature": body.temperature, "top_p": body.top_p, "top_k": body.top_k, "max_tokens": max_tokens,
            "stop": stop, "seed": body.seed, "repeat_penalty": body.repeat_penalty,
            "min_tokens": max_tokens if body.ignore_eos else None}  # fmt: skip


def guidance_of(fmt: p.ResponseFormat | None) -> tuple[str, str] | None:
    """`response_format` as a grammar for the runtime's constrained decoding (llguidance)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ("json_schema", json.dumps({"type": "object"}))
    spec = fmt.json_schema or {}
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise InvalidOptions("response_format.json_schema.schema must be a JSON Schema object")
    text = json.dumps(schema)
    # the runtime compiles it only when the answer starts: check it here, so a bad schema is a 400, not a 500
    problem = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(text))
    if problem:
        raise InvalidOptions(
            f"response_format.json_schema.schema cannot be used: {problem.strip()}", param="response_format"
        )
    return ("json_schema", text)


def usage_of(event: TokenEvent) -> dict[str, Any]:
    u = event.usage
    assert u is not None
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens}}  # fmt: skip


def finish_reason(event: TokenEvent) -> str:
    """OpenAI's finish_reason of a complete answer (a cut-short one never gets one: see `ended_early`)."""
    if event.finish_reason == CANCELLED:
        raise RequestCancelled(f"The answer was cancelled: {cancel_reason()}")
    return "length" if event.finish_reason == "length" else "stop"


def ended_early(event: TokenEvent) -> dict[str, Any] | None:
    """The error chunk that ends a failed or cancelled stream, else None; no `[DONE]` follows it (as
    llama-server does), and the openai SDK raises APIError on it, so a cut-short answer never looks whole."""
    if event.finish_reason == ERROR:
        message, code = event.error or "generation failed", None
    elif event.finish_reason == CANCELLED:
        message, code = f"The answer was cancelled: {cancel_reason()}", "cancelled"
    else:
        return None
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


@api_route(bp, "/chat/completions", ("POST",), tag=TAG, summary="Chat completion (OpenAI)",
           body=p.ChatCompletionRequest, streams=True)  # fmt: skip
def chat_completions(body: p.ChatCompletionRequest) -> Response:
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages if m.role != "tool"]  # fmt: skip
    max_tokens = body.max_completion_tokens or body.max_tokens
    scheduler, chat = services().chat(
        body.model,
        messages,
        sampling(body, max_tokens),
        store=False,
        guidance=guidance_of(body.response_format),
    )
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), scheduler.model.name
    if not body.stream:
        text, final = collect(chat)
        return jsonify({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason(final)}],
            "usage": usage_of(final), "system_fingerprint": None,
        })  # fmt: skip
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
               "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}  # fmt: skip
        if include_usage:
            out["usage"] = None
        return out

    def events():
        yield chunk({"role": "assistant", "content": ""})
        for event in chat:
            if event.text:
                yield chunk({"content": event.text})
            if event.done:
                if (error := ended_early(event)) is not None:
                    yield error
                    return
                yield chunk({}, finish_reason(event))
                if include_usage:
                    yield {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
                           "choices": [], "usage": usage_of(event)}  # fmt: skip
        yield "[DONE]"

    return sse_response(events())


@api_route(bp, "/completions", ("POST",), tag=TAG, summary="Text completion (OpenAI legacy)",
           body=p.CompletionRequest, streams=True)  # fmt: skip
def completions(body: p.CompletionRequest) -> Response:
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise InvalidOptions("prompt must be one string (batches of prompts are not supported)")
    max_tokens = body.max_tokens if body.max_tokens is not None else 16  # OpenAI's default
    scheduler, stream = services().complete(
        body.model, prompts[0], sampling(body, max_tokens), template=False
    )
    cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), scheduler.model.name
    prefix = prompts[0] if body.echo else ""
    if not body.stream:
        with stream:
            text, final = collect(stream)
        return jsonify({
            "id": cid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": prefix + text, "logprobs": None,
                         "finish_reason": finish_reason(final)}],
            "usage": usage_of(final),
        })  # fmt: skip
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(text: str, reason: str | None = None) -> dict[str, Any]:
        return {"id": cid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}  # fmt: skip

    def events():
        with stream:
            if prefix:
                yield chunk(prefix)
            for event in stream:
                if event.text:
                    yield chunk(event.text)
                if event.done:
                    if (error := ended_early(event)) is not None:
                        yield error
                        return
                    yield chunk("", finish_reason(event))
                    if include_usage:
                        yield {**chunk(""), "choices": [], "usage": usage_of(event)}
        yield "[DONE]"

    return sse_response(events())


@api_route(
    bp, "/embeddings", ("POST",), tag=TAG, summary="Embeddings (OpenAI)", body=p.OpenAIEmbeddingsRequest
)
def embeddings(body: p.OpenAIEmbeddingsRequest) -> Response:
    from flask import request

    from ortllm.runtime.types import client_gone_probe

    scheduler = services().scheduler(body.model)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InvalidOptions("input must not be empty")
    # the limits (server.max_embedding_*) are checked by the runtime, the same for every dialect
    result = scheduler.embed_texts(texts, client_gone=client_gone_probe(request.environ))
    tokens = result.tokens
    data = []
    for i, vector in enumerate(result.vectors):
        if body.dimensions:  # truncate and renormalise, as OpenAI's shortened embeddings do
            v = np.asarray(vector[: body.dimensions], dtype=np.float32)
            vector = (v / (np.linalg.norm(v) or 1.0)).tolist()
        value: Any = vector
        if body.encoding_format == "base64":
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append({"object": "embedding", "index": i, "embedding": value})
    return jsonify({"object": "list", "data": data, "model": scheduler.model.name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip


def model_card(name: str, created: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(created), "owned_by": "ortllm"}


@api_route(bp, "/models", tag=TAG, summary="List models (OpenAI)")
def list_models() -> Response:
    return jsonify(
        {
            "object": "list",
            "data": [model_card(m.name, m.path.stat().st_mtime) for m in services().installed()],
        }
    )


@api_route(bp, "/models/<path:model_id>", tag=TAG, summary="One model (OpenAI)")
def get_model(model_id: str) -> Response:
    try:
        model = services().registry.installed(model_id)
    except ModelNotFound as exc:
        raise ModelNotFound(f"The model '{model_id}' does not exist") from exc
    return jsonify(model_card(model.name, model.path.stat().st_mtime))
