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
from collections.abc import Iterator
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify
from llguidance import LLMatcher

from ortllm.errors import InvalidOptions, ModelNotFound

from ...routes import api_route
from ...services import TokenEvent, services
from ...streaming import Outcome, cancel_reason, cancelled, complete, failed, sse_response
from ...streaming import usage_of as usage
from . import protocol as p

bp = Blueprint("openai", __name__, url_prefix="/v1")
TAG = "OpenAI-compatible"


def sampling(body: p.OpenAISampling, max_tokens: int | None) -> dict[str, Any]:
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "max_tokens": max_tokens,
        "stop": stop,
        "seed": body.seed,
        "repeat_penalty": body.repeat_penalty,
        "min_tokens": max_tokens if body.ignore_eos else None,
    }


def guidance_of(fmt: p.ResponseFormat | None) -> tuple[str, str] | None:
    """`response_format` as a grammar for the runtime's constrained decoding (llguidance)."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ("json_schema", json.dumps({"type": "object"}))
    schema = fmt.json_schema["schema"] if fmt.json_schema else None
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


def usage_of(event: Outcome) -> dict[str, Any]:
    """OpenAI's usage object: the token counts with the prompt tokens served from the prefix cache."""
    return usage(event, cached=True)


def finish_reason(event: Outcome) -> str:
    """OpenAI's finish_reason of a complete answer (a cut-short one never gets one: see `ended_early`)."""
    return "length" if complete(event).finish_reason == "length" else "stop"


def ended_early(event: TokenEvent) -> dict[str, Any] | None:
    """The error chunk that ends a failed or cancelled stream, else None; no `[DONE]` follows it (as
    llama-server does), and the openai SDK raises APIError on it, so a cut-short answer never looks whole."""
    if failed(event):
        message, code = event.error or "generation failed", None
    elif cancelled(event):
        message, code = f"The answer was cancelled: {cancel_reason()}", "cancelled"
    else:
        return None
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


@api_route(
    bp,
    "/chat/completions",
    ("POST",),
    tag=TAG,
    summary="Chat completion (OpenAI)",
    body=p.ChatCompletionRequest,
    response=p.ChatCompletion,
    streams=True,
)
def chat_completions(body: p.ChatCompletionRequest) -> Response:
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in body.messages
        if m.role != "tool"
    ]
    max_tokens = body.max_completion_tokens or body.max_tokens
    scheduler, chat = services().chat(
        body.model,
        messages,
        sampling(body, max_tokens),
        store=False,
        guidance=guidance_of(body.response_format),
    )
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), scheduler.model.name
    stream = chat.stream
    if not body.stream:
        result = stream.result()
        choice = p.ChatChoice(
            index=0, message=p.AssistantMessage(content=result.text), finish_reason=finish_reason(result)
        )
        reply = p.ChatCompletion(
            id=cid, created=created, model=model, choices=[choice], usage=p.OpenAIUsage(**usage_of(result))
        )
        return jsonify(reply.model_dump(mode="json"))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        out = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
        }
        if include_usage:
            out["usage"] = None
        return out

    def events() -> Iterator[dict[str, Any] | str]:
        with stream:  # a client gone at the first chunk, before the stream is read, closes it too
            yield chunk({"role": "assistant", "content": ""})
            for event in stream:
                if event.text:
                    yield chunk({"content": event.text})
                if event.done:
                    if (error := ended_early(event)) is not None:
                        yield error
                        return
                    yield chunk({}, finish_reason(event))
                    if include_usage:
                        yield {
                            "id": cid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": usage_of(event),
                        }
        yield "[DONE]"

    return sse_response(events())


@api_route(
    bp,
    "/completions",
    ("POST",),
    tag=TAG,
    summary="Text completion (OpenAI legacy)",
    body=p.CompletionRequest,
    response=p.Completion,
    streams=True,
)
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
        result = stream.result()
        choice = p.CompletionChoice(index=0, text=prefix + result.text, finish_reason=finish_reason(result))
        reply = p.Completion(
            id=cid, created=created, model=model, choices=[choice], usage=p.OpenAIUsage(**usage_of(result))
        )
        return jsonify(reply.model_dump(mode="json"))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(text: str, reason: str | None = None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
        }

    def events() -> Iterator[dict[str, Any] | str]:
        with stream:  # a client gone at the echoed prompt, before the stream is read, closes it too
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
    bp,
    "/embeddings",
    ("POST",),
    tag=TAG,
    summary="Embeddings (OpenAI)",
    body=p.OpenAIEmbeddingsRequest,
    response=p.EmbeddingList,
)
def embeddings(body: p.OpenAIEmbeddingsRequest) -> Response:
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InvalidOptions("input must not be empty")
    name, result = services().embed(body.model, texts)
    tokens = result.tokens
    data: list[p.EmbeddingObject] = []
    for i, vector in enumerate(result.vectors):
        if body.dimensions:  # truncate and renormalise, as OpenAI's shortened embeddings do
            v = np.asarray(vector[: body.dimensions], dtype=np.float32)
            vector = (v / (np.linalg.norm(v) or 1.0)).tolist()
        value: Any = vector
        if body.encoding_format == "base64":
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
        data.append(p.EmbeddingObject(index=i, embedding=value))
    usage = p.EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    return jsonify(p.EmbeddingList(data=data, model=name, usage=usage).model_dump(mode="json"))


def model_card(name: str, created: float) -> p.ModelCard:
    return p.ModelCard(id=name, created=int(created), owned_by="ortllm")


@api_route(bp, "/models", tag=TAG, summary="List models (OpenAI)", response=p.ModelCardList)
def list_models() -> Response:
    cards = [model_card(m.name, m.path.stat().st_mtime) for m in services().installed()]
    return jsonify(p.ModelCardList(data=cards).model_dump(mode="json"))


@api_route(bp, "/models/<path:model_id>", tag=TAG, summary="One model (OpenAI)", response=p.ModelCard)
def get_model(model_id: str) -> Response:
    try:
        model = services().registry.installed(model_id)
    except ModelNotFound as exc:
        raise ModelNotFound(f"The model '{model_id}' does not exist") from exc
    return jsonify(model_card(model.name, model.path.stat().st_mtime).model_dump(mode="json"))
