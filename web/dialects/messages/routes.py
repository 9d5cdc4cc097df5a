"""The Anthropic Messages dialect under /v1: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

Mapping rules: `system` and `messages` (text, tool_use, tool_result blocks) become OpenAI-shaped chat messages
(a tool_use is an assistant tool call with its id, a tool_result a tool message answering it), `tools` and
`tool_choice` (auto / any / tool / none, `disable_parallel_tool_use`) go through `Services.tool_plan`, the
answer through the plan's parser: content as text blocks, calls as tool_use blocks, the model's reasoning as
thinking blocks when `thinking` is enabled. `usage.input_tokens` counts the prompt tokens not served from
the prefix cache (those are `cache_read_input_tokens`), as Anthropic counts them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify

from ortllm.errors import InvalidOptions

from ...routes import api_route
from ...services import ToolDelta, services
from ...streaming import Outcome, cancel_reason, cancelled, complete, failed, sse_named
from . import protocol as p

bp = Blueprint("messages", __name__, url_prefix="/v1")
TAG = "Anthropic-compatible"


def chat_messages(body: p.MessagesBase) -> list[dict[str, Any]]:
    """The request's system prompt and messages as OpenAI-shaped chat messages (tool calls and results)."""
    out: list[dict[str, Any]] = []
    if body.system:
        system = body.system if isinstance(body.system, str) else "\n".join(b.text for b in body.system)
        out.append({"role": "system", "content": system})
    called: set[str] = set()  # the tool_use ids so far: a tool_result must answer one of them
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, block in enumerate(message.content):
            if isinstance(block, p.TextBlock):
                texts.append(block.text)
            elif isinstance(block, p.ToolUseBlock):
                called.add(block.id)
                arguments = json.dumps(block.input, ensure_ascii=False)
                calls.append({"id": block.id, "type": "function",
                              "function": {"name": block.name, "arguments": arguments}})  # fmt: skip
            elif isinstance(block, p.ToolResultBlock):
                if block.tool_use_id not in called:
                    raise InvalidOptions(
                        f"messages.{i}.content.{j}: tool_result for '{block.tool_use_id[:64]}' answers no "
                        "tool_use block of an earlier assistant message",
                        param=f"messages.{i}.content.{j}.tool_use_id",
                    )
                if texts:  # text before a result stays before it
                    out.append({"role": "user", "content": "\n".join(texts)})
                    texts = []
                result = block.text()
                out.append({"role": "tool", "tool_call_id": block.tool_use_id,
                            "content": f"Error: {result}" if block.is_error else result})  # fmt: skip
            # thinking blocks of earlier answers are not shown to the model again (as Anthropic does)
        if message.role == "assistant":
            out.append(
                {"role": "assistant", "content": "".join(texts), **({"tool_calls": calls} if calls else {})}
            )
        elif texts:
            out.append({"role": "user", "content": "\n".join(texts)})
    return out


def chat_tools(body: p.MessagesBase) -> tuple[list[dict[str, Any]] | None, Any, bool]:
    """`tools` in OpenAI's shape, `tool_choice` as OpenAI's, and whether parallel calls are allowed."""
    tools = None
    if body.tools:
        tools = [
            {"type": "function",
             "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}
            for t in body.tools
        ]  # fmt: skip
    choice = body.tool_choice
    if choice is None:
        return tools, None, True
    mapped: Any = {"auto": "auto", "any": "required", "none": "none"}.get(choice.type)
    if choice.type == "tool":
        mapped = {"type": "function", "function": {"name": choice.name}}
    return tools, mapped, not choice.disable_parallel_tool_use


def sampling(body: p.MessagesRequest) -> dict[str, Any]:
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "max_tokens": body.max_tokens,
        "stop": body.stop_sequences,
    }


def usage_of(event: Outcome) -> dict[str, int]:
    """Anthropic's usage: uncached prompt tokens, cache reads (prefix-cache hits), output tokens."""
    u = event.usage
    assert u is not None
    return {
        "input_tokens": u.prompt_tokens - u.cached_prompt_tokens,
        "output_tokens": u.completion_tokens,
        "cache_read_input_tokens": u.cached_prompt_tokens,
        "cache_creation_input_tokens": 0,
    }


def stop_reason(event: Outcome, calls: bool, stop_sequence: str | None) -> str:
    if event.finish_reason == "length":
        return "max_tokens"
    if calls:
        return "tool_use"
    return "stop_sequence" if stop_sequence is not None else "end_turn"


def tool_use_id(call_id: str) -> str:
    """Anthropic's id style for a call the parser named `call_…`."""
    return "toolu_" + call_id.removeprefix("call_")


def arguments(text: str) -> dict[str, Any]:
    value = json.loads(text) if text.strip() else {}
    return value if isinstance(value, dict) else {"value": value}


def error_event(kind: str, message: str) -> tuple[str, dict[str, Any]]:
    return "error", {"type": "error", "error": {"type": kind, "message": message}}


@api_route(
    bp,
    "/messages",
    ("POST",),
    tag=TAG,
    summary="Create a message (Anthropic)",
    body=p.MessagesRequest,
    response=p.MessageResponse,
    streams=True,
)
def create_message(body: p.MessagesRequest) -> Response:
    svc = services()
    tools, choice, parallel = chat_tools(body)
    plan = svc.tool_plan(body.model, chat_messages(body), tools, choice, parallel=parallel)
    scheduler, chat = svc.chat(
        body.model, plan.messages, sampling(body), store=False, guidance=plan.guidance, tools=plan.tools
    )
    stream, parser = chat.stream, plan.parser()
    mid, model = f"msg_{uuid.uuid4().hex[:24]}", scheduler.model.name
    thinking = body.thinking is not None and body.thinking.type != "disabled"
    if not body.stream:
        try:
            result = complete(stream.result())
            parser.feed(result.text)
            parser.finish()
        finally:
            stream.close()
        content: list[dict[str, Any]] = []
        if thinking and parser.reasoning:
            content.append({"type": "thinking", "thinking": parser.reasoning, "signature": ""})
        if parser.content:
            content.append({"type": "text", "text": parser.content})
        for call in parser.calls:
            content.append(
                {
                    "type": "tool_use",
                    "id": tool_use_id(call.id),
                    "name": call.name,
                    "input": arguments(call.arguments),
                }
            )
        reply = p.MessageResponse(
            id=mid,
            model=model,
            content=content,
            stop_reason=stop_reason(result, bool(parser.calls), stream.stop_sequence),  # type: ignore[arg-type]
            stop_sequence=stream.stop_sequence if not parser.calls else None,
            usage=p.MessagesUsage(**usage_of(result)),
        )
        return jsonify(reply.model_dump(mode="json"))

    def events() -> Iterator[tuple[str, dict[str, Any]]]:
        index, open_kind = -1, ""  # the content block being streamed: its index and kind ("" = none)
        start_usage = {"input_tokens": stream.prompt_tokens, "output_tokens": 0,
                       "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}  # fmt: skip
        message: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": start_usage}  # fmt: skip

        def open_block(kind: str, block: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
            nonlocal index, open_kind
            yield from close_block()
            index, open_kind = index + 1, kind
            yield (
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": block},
            )

        def close_block() -> Iterator[tuple[str, dict[str, Any]]]:
            nonlocal open_kind
            if open_kind:
                yield "content_block_stop", {"type": "content_block_stop", "index": index}
                open_kind = ""

        def delta(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
            return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": body}

        def blocks(pieces: list[ToolDelta]) -> Iterator[tuple[str, dict[str, Any]]]:
            for d in pieces:
                if d.kind == "reasoning":
                    if not thinking:
                        continue
                    if open_kind != "thinking":
                        yield from open_block(
                            "thinking", {"type": "thinking", "thinking": "", "signature": ""}
                        )
                    yield delta({"type": "thinking_delta", "thinking": d.text})
                elif d.kind == "content":
                    if open_kind != "text":
                        yield from open_block("text", {"type": "text", "text": ""})
                    yield delta({"type": "text_delta", "text": d.text})
                elif d.id is not None:  # a call's first piece: its id and name
                    use: dict[str, Any] = {
                        "type": "tool_use",
                        "id": tool_use_id(d.id),
                        "name": d.name,
                        "input": {},
                    }
                    yield from open_block(f"tool_use:{d.index}", use)
                    if d.text:
                        yield delta({"type": "input_json_delta", "partial_json": d.text})
                elif d.text:
                    yield delta({"type": "input_json_delta", "partial_json": d.text})

        try:
            yield "message_start", {"type": "message_start", "message": message}
            yield "ping", {"type": "ping"}
            for event in stream:
                pieces = parser.feed(event.text) if event.text else []
                if event.done:
                    if failed(event):
                        yield error_event("api_error", event.error or "generation failed")
                        return
                    if cancelled(event):
                        yield error_event("overloaded_error", f"The answer was cancelled: {cancel_reason()}")
                        return
                    pieces += parser.finish()
                yield from blocks(pieces)
                if event.done:
                    yield from close_block()
                    reason = stop_reason(event, bool(parser.calls), stream.stop_sequence)
                    sequence = stream.stop_sequence if reason == "stop_sequence" else None
                    yield (
                        "message_delta",
                        {
                            "type": "message_delta",
                            "delta": {"stop_reason": reason, "stop_sequence": sequence},
                            "usage": usage_of(event),
                        },
                    )
                    yield "message_stop", {"type": "message_stop"}
        finally:
            stream.close()

    return sse_named(events())


@api_route(
    bp,
    "/messages/count_tokens",
    ("POST",),
    tag=TAG,
    summary="Count a message's input tokens (Anthropic)",
    body=p.CountTokensRequest,
    response=p.TokenCount,
)
def count_tokens(body: p.CountTokensRequest) -> Response:
    svc = services()
    tools, choice, parallel = chat_tools(body)
    plan = svc.tool_plan(body.model, chat_messages(body), tools, choice, parallel=parallel)
    count = svc.count_chat_tokens(body.model, plan.messages, plan.tools)
    return jsonify(p.TokenCount(input_tokens=count).model_dump(mode="json"))
