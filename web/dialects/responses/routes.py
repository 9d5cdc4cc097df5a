"""The OpenAI Responses API under /v1/responses: stateful (stored in the sessions database), typed streaming
events, function tools.

Mapping rules: `input` items and `instructions` become OpenAI chat messages (function_call items an assistant
message's tool_calls with id = call_id, function_call_output items tool messages), planned through
`Services.tool_plan` (the model's template, the grammar that enforces `tool_choice`, the parser of the answer);
the parser's content, calls and reasoning become `message`, `function_call` and `reasoning` output items.
`previous_response_id` prepends the stored conversation (its inputs and outputs, recursively).
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request
from llguidance import LLMatcher

from ortllm.errors import InvalidOptions
from ortllm.responses_store import ResponseStore, StoredResponse

from ...routes import api_route
from ...services import Stream, TokenEvent, ToolDelta, ToolPlan, services
from ...streaming import cancel_reason, cancelled, failed, sse_named
from . import protocol as p

bp = Blueprint("responses", __name__, url_prefix="/v1")
TAG = "OpenAI Responses"
ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")
# the streams of responses in progress, by (owner, id): POST /v1/responses/{id}/cancel stops them
RUNNING: dict[tuple[str, str], tuple[Turn, Stream]] = {}
_RUNNING_LOCK = threading.Lock()


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


# ---- input items → chat messages ------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    """A message's content (a string or text parts) as text; 400 naming a part that is not text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidOptions(f"{where} must be a string or a list of content parts", param=where)
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS:
            raise InvalidOptions(
                f"{where}[{j}].type {str(kind)[:40]!r} is not supported (the models here read text: send "
                "input_text parts)",
                param=f"{where}[{j}].type",
            )
        value = part.get("refusal") if kind == "refusal" else part.get("text")
        if not isinstance(value, str):
            raise InvalidOptions(f"{where}[{j}].text must be a string", param=f"{where}[{j}].text")
        out.append(value)
    return "".join(out)


def _id_of(item: dict[str, Any]) -> str | None:
    """An input item's own id, when it sent a usable one."""
    value = item.get("id")
    return value if isinstance(value, str) and value else None


def normalized(raw: str | list[Any]) -> list[dict[str, Any]]:
    """The request's input as stored input items (a string is one user message; items get ids); 400 naming
    an item that is not a message, function_call, function_call_output or reasoning item."""
    if isinstance(raw, str):
        raw = [{"type": "message", "role": "user", "content": raw}]
    items = []
    for i, item in enumerate(raw):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidOptions(f"{where} must be an object", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ROLES:
                raise InvalidOptions(
                    f"{where}.role must be one of {', '.join(ROLES)} (got {str(role)[:40]!r})",
                    param=f"{where}.role",
                )
            content = item.get("content")
            text = _text(content, f"{where}.content")
            part = "output_text" if role == "assistant" else "input_text"
            parts = [{"type": part, "text": text}] if isinstance(content, str) else content
            items.append(
                {"type": "message", "id": _id_of(item) or new_id("msg"), "role": role, "content": parts}
            )
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str) or (key != "arguments" and not item[key]):
                    raise InvalidOptions(f"{where}.{key} must be a string", param=f"{where}.{key}")
            items.append(
                {
                    "type": "function_call",
                    "id": _id_of(item) or new_id("fc"),
                    "call_id": item["call_id"],
                    "name": item["name"],
                    "arguments": item["arguments"],
                    "status": "completed",
                }
            )
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise InvalidOptions(f"{where}.call_id must be a string", param=f"{where}.call_id")
            output = _text(item.get("output"), f"{where}.output")
            items.append(
                {
                    "type": "function_call_output",
                    "id": _id_of(item) or new_id("fco"),
                    "call_id": item["call_id"],
                    "output": output,
                    "status": "completed",
                }
            )
        elif kind == "reasoning":  # a replayed reasoning item: kept in history, not shown to the template
            items.append({**item, "id": _id_of(item) or new_id("rs")})
        else:
            raise InvalidOptions(
                f"{where}.type {str(kind)[:40]!r} is not supported (message, function_call, "
                "function_call_output and reasoning items are)",
                param=f"{where}.type",
            )
    return items


def chat_messages(
    instructions: str | None, history: list[dict[str, Any]], items: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Instructions, the stored conversation and the new input items as OpenAI chat messages."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    calls: set[str] = set()
    offset = len(history)
    for n, item in enumerate(history + items):
        kind = item["type"]
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _text(item["content"], "content")})
        elif kind == "function_call":
            calls.add(item["call_id"])
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # parallel calls, or text then calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            if item["call_id"] not in calls:
                where = f"input[{n - offset}].call_id"
                raise InvalidOptions(
                    f"{where} {item['call_id']!r} matches no function_call earlier in the conversation",
                    param=where,
                )
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses' flat function tools in chat's nested shape; 400 naming any other tool type."""
    if tools is None:
        return None
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise InvalidOptions(
                f"tools[{i}].type {str(kind)[:40]!r} is not supported (only function tools are)",
                param=f"tools[{i}].type",
            )
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def chat_tool_choice(choice: Any) -> Any:
    """Responses' `tool_choice` as chat's; 400 for hosted tools and allowed_tools."""
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidOptions(
        'tool_choice must be "none", "auto", "required" or {"type": "function", "name": NAME}',
        param="tool_choice",
    )


def guidance_of(text: p.TextConfig | None) -> tuple[str, str] | None:
    """`text.format` as a grammar for the runtime's constrained decoding (llguidance)."""
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    schema = json.dumps({"type": "object"} if fmt.type == "json_object" else fmt.schema_)
    # the runtime compiles it only when the answer starts: check it here, so a bad schema is a 400, not a 500
    problem = LLMatcher.validate_grammar(LLMatcher.grammar_from_json_schema(schema))
    if problem:
        raise InvalidOptions(f"text.format.schema cannot be used: {problem.strip()}", param="text.format")
    return ("json_schema", schema)


def sampling(body: p.ResponseRequest) -> dict[str, Any]:
    return {
        "temperature": body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "max_tokens": body.max_output_tokens,
    }


# ---- the response being generated --------------------------------------------------------------------


class Turn:
    """One response: its output items built from the parser's deltas, and the typed events that say so."""

    def __init__(self, body: p.ResponseRequest, model: str, inputs: list[dict[str, Any]]) -> None:
        self.body = body
        self.id = new_id("resp")
        self.created = time.time()
        self.model = model
        self.inputs = inputs
        self.output: list[dict[str, Any]] = []
        self.status = "in_progress"
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.incomplete: dict[str, Any] | None = None
        self.sequence = 0
        self._open: dict[str, Any] | None = None  # the item being streamed
        self._calls: dict[int, dict[str, Any]] = {}  # the parser's call index -> its item

    def event(self, kind: str, **data: Any) -> tuple[str, dict[str, Any]]:
        out = (kind, {"type": kind, "sequence_number": self.sequence, **data})
        self.sequence += 1
        return out

    def obj(self) -> dict[str, Any]:
        """The response object as OpenAI documents it."""
        body = self.body
        text = "".join(
            part["text"]
            for item in self.output
            if item["type"] == "message"
            for part in item["content"]
            if part["type"] == "output_text"
        )
        fmt = body.text.format if body.text and body.text.format else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": int(self.created),
            "status": self.status,
            "background": False,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": self.model,
            "output": self.output,
            "output_text": text,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": body.reasoning.effort if body.reasoning else None, "summary": None},
            "store": body.store,
            "temperature": body.temperature,
            "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": body.tools or [],
            "top_p": body.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def stored(self) -> StoredResponse:
        return StoredResponse(
            self.id,
            self.model,
            self.created,
            self.status,
            self.obj(),
            self.inputs,
            self.output,
            self.usage,
            self.body.previous_response_id,
        )

    # -- items

    def _add(self, item: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        self.output.append(item)
        self._open = item
        yield self.event("response.output_item.added", output_index=len(self.output) - 1, item=dict(item))

    def close_item(self, status: str = "completed") -> Iterator[tuple[str, dict[str, Any]]]:
        item = self._open
        if item is None:
            return
        self._open = None
        index = self.output.index(item)
        at = {"item_id": item["id"], "output_index": index}
        if item["type"] == "message":
            part = item["content"][0]
            yield self.event(
                "response.output_text.done", **at, content_index=0, text=part["text"], logprobs=[]
            )
            yield self.event("response.content_part.done", **at, content_index=0, part=dict(part))
        elif item["type"] == "reasoning":
            text = item["content"][0]["text"]
            yield self.event("response.reasoning_text.done", **at, content_index=0, text=text)
        else:
            yield self.event("response.function_call_arguments.done", **at, arguments=item["arguments"])
        item["status"] = status
        yield self.event("response.output_item.done", output_index=index, item=item)

    def feed(self, deltas: list[ToolDelta]) -> Iterator[tuple[str, dict[str, Any]]]:
        for d in deltas:
            kind = "message" if d.kind == "content" else "reasoning" if d.kind == "reasoning" else "call"
            item = self._open
            if kind == "message":
                if item is None or item["type"] != "message":
                    yield from self.close_item()
                    empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    new = {
                        "type": "message",
                        "id": new_id("msg"),
                        "status": "in_progress",
                        "role": "assistant",
                    }
                    yield from self._add({**new, "content": []})
                    item = self._open
                    assert item is not None
                    item["content"].append(empty)
                    yield self.event(
                        "response.content_part.added",
                        item_id=item["id"],
                        output_index=len(self.output) - 1,
                        content_index=0,
                        part=dict(empty),
                    )
                item["content"][0]["text"] += d.text
                yield self.event(
                    "response.output_text.delta",
                    item_id=item["id"],
                    output_index=len(self.output) - 1,
                    content_index=0,
                    delta=d.text,
                    logprobs=[],
                )
            elif kind == "reasoning":
                if item is None or item["type"] != "reasoning":
                    yield from self.close_item()
                    thought: dict[str, Any] = {
                        "type": "reasoning",
                        "id": new_id("rs"),
                        "summary": [],
                        "status": "in_progress",
                    }
                    yield from self._add({**thought, "content": [{"type": "reasoning_text", "text": ""}]})
                    item = self._open
                    assert item is not None
                item["content"][0]["text"] += d.text
                yield self.event(
                    "response.reasoning_text.delta",
                    item_id=item["id"],
                    output_index=len(self.output) - 1,
                    content_index=0,
                    delta=d.text,
                )
            else:
                if d.id is not None:  # a call's first piece: its id and name
                    yield from self.close_item()
                    call: dict[str, Any] = {
                        "type": "function_call",
                        "id": new_id("fc"),
                        "call_id": d.id,
                        "name": d.name,
                        "arguments": "",
                        "status": "in_progress",
                    }
                    yield from self._add(call)
                    self._calls[d.index] = call
                call = self._calls[d.index]
                if d.text:
                    call["arguments"] += d.text
                    yield self.event(
                        "response.function_call_arguments.delta",
                        item_id=call["id"],
                        output_index=self.output.index(call),
                        delta=d.text,
                    )

    def end(self, final: TokenEvent, plan_calls: list[Any]) -> Iterator[tuple[str, dict[str, Any]]]:
        """The closing events: the open item's, then response.completed / incomplete / failed."""
        # a call the parser abandoned (cut off, invalid) is no call: its text became content
        complete = {c.id: c.arguments for c in plan_calls}
        for item in [i for i in self.output if i["type"] == "function_call"]:
            if item["call_id"] in complete:
                item["arguments"] = complete[item["call_id"]]
        length = final.finish_reason == "length"
        yield from self.close_item("incomplete" if length else "completed")
        self.output[:] = [i for i in self.output if i["type"] != "function_call" or i["call_id"] in complete]
        u = final.usage
        if u is not None:
            self.usage = {
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens,
            }
        if failed(final):
            self.status = "failed"
            self.error = {"code": "server_error", "message": final.error or "generation failed"}
            yield self.event("response.failed", response=self.obj())
        elif cancelled(final):
            self.status = "cancelled"
            message = f"The response was cancelled: {cancel_reason()}"
            yield self.event("error", code="cancelled", message=message, param=None)
        elif length:
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens"}
            yield self.event("response.incomplete", response=self.obj())
        else:
            self.status = "completed"
            yield self.event("response.completed", response=self.obj())


def run(
    turn: Turn, stream: Stream, plan: ToolPlan, store: ResponseStore | None, owner: str
) -> Iterator[tuple[str, dict[str, Any]]]:
    """The response's events from its token stream; stored in `store` (when given) however it ends. It runs
    outside the request's context when streamed: what it needs of the request comes as arguments."""
    parser = plan.parser()
    key = (owner, turn.id)
    with _RUNNING_LOCK:
        RUNNING[key] = (turn, stream)
    try:
        yield turn.event("response.created", response=turn.obj())
        yield turn.event("response.in_progress", response=turn.obj())
        for event in stream:
            deltas = parser.feed(event.text) if event.text else []
            if event.done:
                if not (failed(event) or cancelled(event)):
                    deltas += parser.finish()
                yield from turn.feed(deltas)
                yield from turn.end(event, parser.calls)
                return
            yield from turn.feed(deltas)
    finally:
        with _RUNNING_LOCK:
            RUNNING.pop(key, None)
        stream.close()
        if turn.status == "in_progress":  # the client went away mid-stream
            turn.status = "cancelled"
        if store is not None:
            store.save(turn.stored())


# ---- routes -------------------------------------------------------------------------------------------


@api_route(
    bp,
    "/responses",
    ("POST",),
    tag=TAG,
    summary="Create a response (OpenAI Responses)",
    body=p.ResponseRequest,
    response=p.ResponseObject,
    streams=True,
)
def create_response(body: p.ResponseRequest) -> Response:
    svc = services()
    items = normalized(body.input)
    history = svc.responses().conversation(body.previous_response_id) if body.previous_response_id else []
    messages = chat_messages(body.instructions, history, items)
    if not any(m["role"] != "system" for m in messages) and not any(m["content"] for m in messages):
        raise InvalidOptions("input is empty: send a message to answer", param="input")
    plan = svc.tool_plan(
        body.model,
        messages,
        chat_tools(body.tools),
        chat_tool_choice(body.tool_choice),
        parallel=body.parallel_tool_calls is not False,
    )
    guidance = guidance_of(body.text)
    if guidance is not None and plan.guidance is not None:
        raise InvalidOptions(
            "text.format cannot be combined with tools the answer may call (use tool_choice none)",
            param="text.format",
        )
    scheduler, chat = svc.chat(
        body.model,
        plan.messages,
        sampling(body),
        store=False,
        guidance=plan.guidance or guidance,
        tools=plan.tools,
    )
    turn = Turn(body, scheduler.model.name, items)
    events = run(turn, chat.stream, plan, svc.responses() if body.store else None, services().owner())
    if body.stream:
        return sse_named(events)
    for _ in events:
        pass
    return jsonify(turn.obj())


def _stored_object(stored: StoredResponse) -> dict[str, Any]:
    """A stored response's object as it was answered (its request part), with its final state."""
    return {**stored.request, "status": stored.status, "output": stored.output_items, "usage": stored.usage}


@api_route(bp, "/responses/<response_id>", ("GET",), tag=TAG, summary="Retrieve a stored response")
def get_response(response_id: str) -> Response:
    if request.args.get("stream") in ("true", "1"):
        raise InvalidOptions("stream=true on retrieve is not supported (the response is stored whole)")
    return jsonify(_stored_object(services().responses().get(response_id)))


@api_route(bp, "/responses/<response_id>", ("DELETE",), tag=TAG, summary="Delete a stored response")
def delete_response(response_id: str) -> Response:
    services().responses().delete(response_id)
    return jsonify(p.DeletedResponse(id=response_id).model_dump(mode="json"))


@api_route(
    bp, "/responses/<response_id>/input_items", ("GET",), tag=TAG, summary="List a response's input items"
)
def input_items(response_id: str) -> Response:
    stored = services().responses().get(response_id)
    args = request.args
    raw_limit = args.get("limit", "20")
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise InvalidOptions("limit must be an integer from 1 to 100", param="limit")
    order = args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidOptions("order must be asc or desc", param="order")
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    after = args.get("after")
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise InvalidOptions(f"after {after[:80]!r} is not an input item of this response", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[: int(raw_limit)]
    return jsonify(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > len(page),
        }
    )


@api_route(bp, "/responses/<response_id>/cancel", ("POST",), tag=TAG, summary="Cancel a running response")
def cancel_response(response_id: str) -> Response:
    with _RUNNING_LOCK:
        running = RUNNING.get((services().owner(), response_id))
    if running is None:
        services().responses().get(response_id)  # an unknown id is a 404
        raise InvalidOptions("Only background responses can be cancelled.", param="response_id")
    turn, stream = running
    stream.cancel()
    return jsonify({**turn.obj(), "status": "cancelled"})
