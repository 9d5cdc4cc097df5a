"""The one SSE writer: JSON events or raw text (multi-line text split into several `data:` lines)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from typing import Any

from flask import Response

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


STOPPING = threading.Event()  # set when the server starts shutting down: cancellations then say so


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


def sse_response(events: Iterable[Any], on_close: Callable[[], None] | None = None) -> Response:
    """Stream `events` as SSE; `on_close` runs when the stream ends or the client goes away."""

    def body():
        try:
            for event in events:
                yield format_event(event)
        finally:
            close = getattr(events, "close", None)
            if close:
                close()  # a generator's finally blocks (stream cancellation) run now
            if on_close:
                on_close()

    return Response(body(), mimetype="text/event-stream", headers=SSE_HEADERS)
