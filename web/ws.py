"""`WS /chat/ws` (Rust service): a kebab-case JSON chat request in, one text frame per token out,
`__ERROR__:message` on errors; the socket closes when the answer is complete.

Multi-turn opt-in (`/chat/ws?mode=multi`, or `"multi-turn": true` in the first message): each answer is
framed by `__START__:{"session-id"}` and `__END__:{"session-id", "finish_reason", "usage", "timings"}`, the
socket stays open for the next request (without a `session-id` it continues the socket's conversation),
and `{"action": "cancel"}` ends the current answer ("cancelled"); `{"action": "close"}` or closing the
socket cancels it too."""

from __future__ import annotations

import json
import logging
import queue
import threading
import weakref
from typing import Any

from flask import Blueprint, request
from flask_sock import Sock
from pydantic import ValidationError
from simple_websocket import ConnectionClosed, Server

from ortllm.errors import InvalidOptions, OrtllmError
from ortllm.runtime.types import ERROR, TokenEvent

from . import protocol as p
from .errors import validation_message
from .native import usage_of
from .rust import start_chat
from .service import ChatSession

log = logging.getLogger("ortllm.web")
bp = Blueprint("rust_ws", __name__)
sock = Sock()
POLL_S = 1.0  # how often the reader checks that the handler is still running
OPEN: weakref.WeakSet[Connection] = weakref.WeakSet()  # sockets to end on shutdown
OPEN_LOCK = threading.Lock()
CLOSING = threading.Event()  # set on shutdown: a socket whose handler starts afterwards ends at once


def close_all() -> None:
    """End every open socket (server shutdown): idle multi-turn sockets must not hold the exit.

    A handler can still be between the handshake and registering its socket when this runs; the lock
    and the CLOSING flag make sure that socket ends too instead of holding the worker until gunicorn's
    graceful timeout."""
    with OPEN_LOCK:
        CLOSING.set()
        conns = list(OPEN)
    for conn in conns:
        conn.end()


def action_of(text: str) -> str | None:
    """The `action` of a control message (`cancel`, `close`), None for anything else."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return (
        data.get("action") if isinstance(data, dict) and data.get("action") in ("cancel", "close") else None
    )


def parse(text: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidOptions(f"Malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    if not isinstance(data, dict):
        raise InvalidOptions("Send a JSON object")
    if "action" in data:
        raise InvalidOptions(f"Unknown action {data['action']!r}: use cancel or close")
    return data


class Connection:
    """One socket's reader thread: cancel and close act at once (a closed socket cancels too); chat
    requests wait in `inbox` (None: the socket is gone or the client asked to close)."""

    def __init__(self, ws: Server) -> None:
        self.ws = ws
        self.inbox: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.current: ChatSession | None = None
        self.running = True
        with OPEN_LOCK:
            OPEN.add(self)
            closing = CLOSING.is_set()
        if closing:
            self.inbox.put(None)  # the server is shutting down: the handler returns at once
            return
        threading.Thread(target=self._read, name="ortllm-ws-reader", daemon=True).start()

    def end(self) -> None:
        """Cancel the current answer and let the handler return (it then closes the socket)."""
        self.cancel()
        self.inbox.put(None)

    def _read(self) -> None:
        try:
            while self.running:
                data = self.ws.receive(timeout=POLL_S)
                if data is None:
                    continue
                text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
                action = action_of(text)
                if action is None:
                    self.inbox.put(text)
                    continue
                self.cancel()
                if action == "close":
                    break
        except ConnectionClosed:
            self.cancel()
        self.inbox.put(None)

    def cancel(self) -> None:
        current = self.current
        if current is not None:
            current.cancel()

    def answer(self, session: ChatSession, multi: bool) -> None:
        """Send the answer's tokens as frames (framed by __START__/__END__ in multi-turn mode)."""
        final: TokenEvent | None = None
        self.current = session
        try:
            if multi:
                self.ws.send("__START__:" + json.dumps({"session-id": session.session_id}))
            for event in session:
                if event.text:
                    self.ws.send(event.text)
                if event.done:
                    final = event
        finally:
            self.current = None
            session.cancel()  # a no-op when finished; frees the slot when a send failed
        assert final is not None
        if final.finish_reason == ERROR:
            self.ws.send(f"__ERROR__:{final.error}")
        if multi:
            timings = final.timings.as_dict() if final.timings else {}
            self.ws.send("__END__:" + json.dumps({"session-id": session.session_id, "finish_reason": final.finish_reason,
                                                  "usage": usage_of(final), "timings": timings}))  # fmt: skip


@sock.route("/chat/ws", bp=bp)
def chat_ws(ws: Server) -> None:
    conn = Connection(ws)
    multi, first, last_session = request.args.get("mode") == "multi", True, None
    try:
        while (text := conn.inbox.get()) is not None:
            try:
                data = parse(text)
                if first:
                    multi = multi or data.get("multi-turn") is True
                first = False
                if multi and last_session and not (data.get("session-id") or data.get("session_id")):
                    data["session-id"] = last_session  # the socket's conversation goes on
                session = start_chat(p.RustChatRequest.model_validate(data))
                last_session = session.session_id
            except (OrtllmError, ValidationError) as exc:
                ws.send(
                    f"__ERROR__:{validation_message(exc)[0] if isinstance(exc, ValidationError) else exc}"
                )
                if multi:
                    continue
                return
            except Exception as exc:  # never close silently: say what failed
                log.exception("WebSocket chat request failed")
                ws.send(f"__ERROR__:Internal error: {type(exc).__name__}")
                return
            conn.answer(session, multi)
            if not multi:
                return
    finally:
        conn.running = False
        OPEN.discard(conn)
