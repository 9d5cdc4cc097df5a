"""The OpenAI dialect under /v1: chat completions, completions, embeddings, models.

Mapping rules: `max_completion_tokens` wins over `max_tokens`; `tools`, `tool_choice` and
`parallel_tool_calls` go through `Services.tool_plan` (the model's own template and tool-call format, a
grammar that enforces the choice, a parser that turns the answer into `tool_calls`); `n` choices decode
together (choice i with seed + i), usage counts the prompt once; `logprobs` come from the runtime's
sampler; `response_format` json_object / json_schema constrain the output (llguidance). Every request
field is honoured or refused by protocol.py (400 naming it).
"""

from __future__ import annotations

import base64
import json
import queue
import threading
import time
import uuid
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import numpy as np
from flask import Blueprint, Response, jsonify
from llguidance import LLMatcher

from ortllm.errors import InvalidOptions, ModelNotFound

from ...routes import api_route
from ...services import Stream, TokenEvent, TokenLogprob, ToolDelta, services
from ...streaming import Outcome, cancel_reason, cancelled, complete, failed, logprob_items, sse_response
from ...streaming import usage_of as usage
from . import protocol as p

bp = Blueprint("openai", __name__, url_prefix="/v1")
TAG = "OpenAI-compatible"


def sampling(body: p.OpenAISampling, max_tokens: int | None, choice: int = 0) -> dict[str, Any]:
    """The runtime's options; choice i of n gets seed + i (the same seed would repeat one answer n times)."""
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "min_p": body.min_p,
        "max_tokens": max_tokens,
        "stop": stop,
        "seed": body.seed if body.seed is None or choice == 0 else (body.seed + choice) % 2**63,
        "repeat_penalty": body.repeat_penalty,
        "repeat_last_n": body.repeat_last_n,
        "presence_penalty": body.presence_penalty,
        "frequency_penalty": body.frequency_penalty,
        "logit_bias": body.logit_bias,
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


def total_usage(finals: Sequence[Outcome]) -> dict[str, Any]:
    """The usage of n choices: the prompt counted once (the choices share its keys and values)."""
    out = usage_of(finals[0])
    completion = sum(usage_of(f)["completion_tokens"] for f in finals)
    out["completion_tokens"] = completion
    out["total_tokens"] = out["prompt_tokens"] + completion
    return out


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


def completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions' `logprobs` (text offsets count from `offset`, the echoed prompt's length)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.text)
    return {
        "tokens": [e.text for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{t: lp for t, _, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


def openai_messages(body: p.ChatCompletionRequest) -> list[dict[str, Any]]:
    """The request's messages as the runtime reads them (developer = system; tool calls and results kept)."""
    out = []
    for m in body.messages:
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_calls:
            message["tool_calls"] = [call.model_dump(mode="json") for call in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.name is not None and m.role == "tool":
            message["name"] = m.name
        out.append(message)
    return out


def merged(streams: list[Stream]) -> Generator[tuple[int, TokenEvent], None, None]:
    """The events of several streams as they come, each with its stream's index (the n choices of one
    request decode together); closing the iterator closes every stream."""
    if len(streams) == 1:
        yield from ((0, event) for event in streams[0])
        return
    events: queue.SimpleQueue[tuple[int, TokenEvent | None]] = queue.SimpleQueue()

    def pump(index: int, stream: Stream) -> None:
        try:
            for event in stream:
                events.put((index, event))
        finally:
            events.put((index, None))

    threads = [threading.Thread(target=pump, args=(i, s), daemon=True) for i, s in enumerate(streams)]
    for thread in threads:
        thread.start()
    try:
        left = len(streams)
        while left:
            index, event = events.get()
            if event is None:
                left -= 1
            else:
                yield index, event
    finally:
        for stream in streams:
            stream.close()


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
    svc = services()
    plan = svc.tool_plan(
        body.model,
        openai_messages(body),
        body.tools,
        body.tool_choice,
        parallel=body.parallel_tool_calls is not False,
    )
    guidance = guidance_of(body.response_format)
    if guidance is not None and plan.guidance is not None:
        raise InvalidOptions(
            "response_format cannot be combined with tools the answer may call (use tool_choice none)",
            param="response_format",
        )
    max_tokens = body.max_completion_tokens or body.max_tokens
    top = (body.top_logprobs or 0) if body.logprobs else None
    chats = []
    try:
        for i in range(body.n):
            scheduler, chat = svc.chat(
                body.model,
                plan.messages,
                sampling(body, max_tokens, i),
                store=False,
                guidance=plan.guidance or guidance,
                tools=plan.tools,
                logprobs=top,
            )
            chats.append(chat)
    except BaseException:
        for chat in chats:
            chat.stream.close()
        raise
    cid, created, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), scheduler.model.name
    streams = [chat.stream for chat in chats]
    parsers = [plan.parser() for _ in streams]
    if not body.stream:
        choices, results = [], []
        try:
            for index, (stream, parser) in enumerate(zip(streams, parsers, strict=True)):
                result = stream.result()
                results.append(result)
                parser.feed(result.text)
                parser.finish()
                calls = [
                    p.ToolCall(id=c.id, function=p.FunctionCall(name=c.name, arguments=c.arguments))
                    for c in parser.calls
                ]
                reason = finish_reason(result)
                message = p.AssistantMessage(
                    content=parser.content if parser.content or not calls else None,
                    tool_calls=calls or None,
                    reasoning_content=parser.reasoning or None,
                    reasoning=parser.reasoning or None,
                )
                logprobs = (
                    p.ChatLogprobs(content=logprob_items(result.logprobs))
                    if top is not None and result.logprobs is not None
                    else None
                )
                choices.append(
                    p.ChatChoice(
                        index=index,
                        message=message,
                        logprobs=logprobs,
                        finish_reason="tool_calls" if calls and reason == "stop" else reason,
                    )
                )
        finally:
            for stream in streams:
                stream.close()
        reply = p.ChatCompletion(
            id=cid, created=created, model=model, choices=choices, usage=p.OpenAIUsage(**total_usage(results))
        )
        return jsonify(reply.model_dump(mode="json"))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(
        index: int, delta: dict[str, Any], reason: str | None = None, logprobs: Any = None
    ) -> dict[str, Any]:
        out = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
        }
        if include_usage:
            out["usage"] = None
        return out

    def deltas(index: int, pieces: list[ToolDelta]) -> Iterator[dict[str, Any]]:
        for d in pieces:
            if d.kind == "content":
                yield {"content": d.text}
            elif d.kind == "reasoning":
                yield {"reasoning_content": d.text, "reasoning": d.text}
            elif d.id is not None:  # a call's first piece: its id and name
                call = {"index": d.index, "id": d.id, "type": "function"}
                yield {"tool_calls": [{**call, "function": {"name": d.name, "arguments": d.text}}]}
            else:
                yield {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}

    def events() -> Iterator[dict[str, Any] | str]:
        finals: list[TokenEvent | None] = [None] * len(streams)
        held: list[list[TokenLogprob]] = [[] for _ in streams]  # logprobs waiting for a chunk to ride on
        source = merged(streams)
        try:  # a client gone at the first chunk, before the streams are read, closes them too
            for index in range(len(streams)):
                yield chunk(index, {"role": "assistant", "content": ""})
            for index, event in source:
                parser = parsers[index]
                if event.logprobs:
                    held[index].extend(event.logprobs)
                pieces = parser.feed(event.text) if event.text else []
                if event.done:
                    if (error := ended_early(event)) is not None:
                        yield error
                        return
                    pieces += parser.finish()
                for delta in deltas(index, pieces):
                    logprobs = {"content": logprob_items(held[index])} if held[index] else None
                    held[index] = []
                    yield chunk(index, delta, logprobs=logprobs)
                if event.done:
                    finals[index] = event
                    reason = finish_reason(event)
                    yield chunk(index, {}, "tool_calls" if parser.calls and reason == "stop" else reason)
            if include_usage:
                yield {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": total_usage([f for f in finals if f is not None]),
                }
        finally:
            source.close()
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
    top = body.logprobs
    svc = services()
    streams: list[Stream] = []
    try:
        for i in range(body.n):
            scheduler, stream = svc.complete(
                body.model, prompts[0], sampling(body, max_tokens, i), template=False, logprobs=top
            )
            streams.append(stream)
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    cid, created, model = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time()), scheduler.model.name
    prefix = prompts[0] if body.echo else ""
    if not body.stream:
        choices, results = [], []
        try:
            for index, stream in enumerate(streams):
                result = stream.result()
                results.append(result)
                logprobs = (
                    p.CompletionLogprobs(**completion_logprobs(result.logprobs, len(prefix)))
                    if top is not None and result.logprobs is not None
                    else None
                )
                choices.append(
                    p.CompletionChoice(
                        index=index,
                        text=prefix + result.text,
                        logprobs=logprobs,
                        finish_reason=finish_reason(result),
                    )
                )
        finally:
            for stream in streams:
                stream.close()
        reply = p.Completion(
            id=cid, created=created, model=model, choices=choices, usage=p.OpenAIUsage(**total_usage(results))
        )
        return jsonify(reply.model_dump(mode="json"))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(index: int, text: str, reason: str | None = None, logprobs: Any = None) -> dict[str, Any]:
        return {
            "id": cid,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}],
        }

    def events() -> Iterator[dict[str, Any] | str]:
        offsets = [len(prefix)] * len(streams)
        finals: list[TokenEvent] = []
        source = merged(streams)
        try:  # a client gone at the echoed prompt, before the streams are read, closes them too
            if prefix:
                for index in range(len(streams)):
                    yield chunk(index, prefix)
            for index, event in source:
                if event.text:
                    logprobs = None
                    if top is not None and event.logprobs:
                        logprobs = completion_logprobs(event.logprobs, offsets[index])
                    offsets[index] += len(event.text)
                    yield chunk(index, event.text, logprobs=logprobs)
                if event.done:
                    if (error := ended_early(event)) is not None:
                        yield error
                        return
                    finals.append(event)
                    yield chunk(index, "", finish_reason(event))
            if include_usage:
                yield {**chunk(0, ""), "choices": [], "usage": total_usage(finals)}
        finally:
            source.close()
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
