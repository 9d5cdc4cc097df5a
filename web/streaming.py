"""Stream → wire helpers every dialect shares: the one SSE writer (JSON events or raw text, multi-line text
split into several `data:` lines), usage and the outcome of a final event or a whole Result."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any, TypeVar

from flask import Response

from ortllm.errors import RequestCancelled

from .services import CANCELLED, ERROR, Result, TokenEvent, TokenLogprob

# how a generation ended: its final event, or the whole Result (stream.result())
Outcome = TokenEvent | Result
Ended = TypeVar("Ended", bound=Outcome)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


STOPPING = threading.Event()  # set when the server starts shutting down: cancellations then say so
# the app.extensions key of what server.shutdown runs besides unloading, e.g. ending open WebSockets
SHUTDOWN_HOOKS = "ortllm_shutdown_hooks"


def cancel_reason() -> str:
    """Why a stream the client did not cancel ended early: the server's shutdown or a model unload."""
    if STOPPING.is_set():
        return "the server is shutting down"
    return "the model was unloaded or the request was cancelled"


def format_event(data: Any) -> str:
    """`data: ...` lines for one event; a string with line breaks becomes several data lines (SSE spec)."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    # CRLF, CR and LF all end a line in SSE: each line of the text becomes its own data: field
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "".join(f"data: {line}\n" for line in lines) + "\n"


def sse_response(events: Iterable[Any]) -> Response:
    """Stream `events` as SSE; a generator is closed when the client goes away (its streams close then)."""

    def body() -> Iterable[str]:
        try:
            for event in events:
                yield format_event(event)
        finally:
            close = getattr(events, "close", None)
            if close:
                close()  # a generator's finally blocks run now: the stream it reads closes, freeing its slot

    return Response(body(), mimetype="text/event-stream", headers=SSE_HEADERS)


def sse_named(events: Iterable[tuple[str, Any]]) -> Response:
    """Stream (event_name, data) pairs as SSE with `event:` lines (Anthropic's Messages, OpenAI's Responses);
    a generator is closed when the client goes away, as in `sse_response`."""

    def body() -> Iterable[str]:
        try:
            for name, data in events:
                yield f"event: {name}\n" + format_event(data)
        finally:
            close = getattr(events, "close", None)
            if close:
                close()

    return Response(body(), mimetype="text/event-stream", headers=SSE_HEADERS)


def complete(final: Ended) -> Ended:
    """`final`, or a 503 when the server cut the answer short (shutdown, unload): a part is not an answer."""
    if final.finish_reason == CANCELLED:
        raise RequestCancelled(f"The answer was cancelled: {cancel_reason()}")
    return final


def usage_of(event: Outcome, *, cached: bool = False) -> dict[str, Any]:
    """The token counts; `cached` adds OpenAI's prompt_tokens_details.cached_tokens."""
    u = event.usage
    assert u is not None
    usage: dict[str, Any] = {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
    }
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": u.cached_prompt_tokens}
    return usage


def failed(event: TokenEvent) -> bool:
    """Whether a final event ends a failed generation (its `error` says why)."""
    return event.finish_reason == ERROR


def cancelled(event: Outcome) -> bool:
    """Whether a final event ends an answer that was cut short (client, shutdown, unload or timeout)."""
    return event.finish_reason == CANCELLED


def logprob_items(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Tokens' log-probabilities as OpenAI's `logprobs.content` items (Ollama uses the same shape)."""
    return [
        {
            "token": e.text,
            "logprob": e.logprob,
            "bytes": list(e.raw),
            "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(b)} for t, b, lp in e.top],
        }
        for e in entries
    ]
