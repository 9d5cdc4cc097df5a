"""`WS /chat/ws` (chat service dialect): a kebab-case JSON chat request in, one text frame per token out,
`__ERROR__:message` on errors; the socket closes when the answer is complete.

Multi-turn opt-in (`/chat/ws?mode=multi`, or `"multi-turn": true` in the first message): each answer is
framed by `__START__:{"session-id"}` and `__END__:{"session-id", "finish_reason", "usage", "timings"}`, the
socket stays open for the next request (without a `session-id` it continues the socket's conversation),
and `{"action": "cancel"}` ends the current answer ("cancelled"); `{"action": "close"}` or closing the
socket cancels it too. An answer cut short by the server (shutdown, model unloaded) ends with
`__ERROR__:cancelled` (then `__END__` in multi-turn mode); at most MAX_PENDING requests wait behind the
answer in progress, more get `__ERROR__:too many pending messages`; a message over server.max_body_bytes
closes the socket with 1009."""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, current_app, request
from pydantic import ValidationError
from simple_websocket import ConnectionClosed, Server

from ortllm.errors import InvalidOptions, OrtllmError

from ...errors import validation_message
from ...routes import decode_json
from ...services import ChatSession, Stream
from ...streaming import SHUTDOWN_HOOKS, cancelled, failed, usage_of
from . import protocol as p

log = logging.getLogger("ortllm.web")
# routes.start_chat: one turn of the kebab-case body
StartChat = Callable[[p.RustChatRequest], ChatSession[Stream]]
POLL_S = 1.0  # how often the reader checks that the handler is still running
MAX_PENDING = 8  # chat requests one socket may queue behind the answer in progress
TOO_MANY = "__ERROR__:too many pending messages"
LINGER_S, LINGER_IDLE_S = 5.0, 0.5  # how long to read away the rest of a too-big message
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
        data = decode_json(text)  # json.loads would raise RecursionError on deep nesting, killing the reader
    except OrtllmError:
        return None
    return (
        data.get("action") if isinstance(data, dict) and data.get("action") in ("cancel", "close") else None
    )


def parse(text: str) -> dict[str, Any]:
    data = decode_json(text)  # the HTTP bodies' decoder: depth, huge integers, lone surrogates → 400
    if not isinstance(data, dict):
        raise InvalidOptions("Send a JSON object")
    if "action" in data:
        raise InvalidOptions(f"Unknown action {data['action']!r}: use cancel or close")
    return data


class LingeringServer(Server):
    """simple-websocket's server, but a message over max_message_size is read away (bounded in time) after
    the 1009 close frame is sent: closing a socket with unread data sends a TCP reset, and a client still
    sending would never see the close frame."""

    def _handle_events(self) -> bool:
        keep_going: bool = super()._handle_events()
        if not keep_going and self.max_message_size and self.incoming_message_len > self.max_message_size:
            self._drain()
        return keep_going

    def _drain(self) -> None:
        deadline = time.monotonic() + LINGER_S
        try:
            self.sock.settimeout(LINGER_IDLE_S)
            while time.monotonic() < deadline and self.sock.recv(1 << 16):
                pass
        except OSError:  # idle (the client has stopped sending) or gone: close now
            pass


class Connection:
    """One socket's reader thread: cancel and close act at once (a closed socket cancels too); chat
    requests wait in `inbox` (None: the socket is gone or the client asked to close), at most MAX_PENDING."""

    def __init__(self, ws: Server) -> None:
        self.ws = ws
        self.inbox: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self.current: ChatSession[Stream] | None = None
        self.running = True
        self.pending = 0  # chat requests in the inbox
        self.client_cancelled = False  # the client's own {"action": "cancel"} ended the current answer
        self.lock = threading.Lock()  # the reader and the handler both send: one frame at a time
        with OPEN_LOCK:
            OPEN.add(self)
            closing = CLOSING.is_set()
        if closing:
            self.inbox.put(None)  # the server is shutting down: the handler returns at once
            return
        threading.Thread(target=self._read, name="ortllm-ws-reader", daemon=True).start()

    def send(self, text: str) -> None:
        with self.lock:
            self.ws.send(text)

    def next_request(self) -> str | None:
        """The next chat request (blocking); None when the socket is done."""
        text = self.inbox.get()
        if text is not None:
            with self.lock:
                self.pending -= 1
        return text

    def end(self) -> None:
        """Cancel the current answer and let the handler return (it then closes the socket): the server is
        shutting down, so the turn's question stays stored for a retry."""
        self.cancel(withdrawn=False)
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
                    self._enqueue(text)
                    continue
                self.client_cancelled = True
                self.cancel()
                if action == "close":
                    break
        except ConnectionClosed:
            self.cancel()
        self.inbox.put(None)

    def _enqueue(self, text: str) -> None:
        """Queue a chat request, or refuse it at once when MAX_PENDING already wait."""
        with self.lock:
            accepted = self.pending < MAX_PENDING
            if accepted:
                self.pending += 1
                self.inbox.put(text)
            else:
                self.ws.send(TOO_MANY)

    def cancel(self, *, withdrawn: bool = True) -> None:
        current = self.current
        if current is not None:
            current.cancel(withdrawn=withdrawn)

    def answer(self, session: ChatSession[Stream], multi: bool) -> None:
        """Send the answer's tokens as frames (framed by __START__/__END__ in multi-turn mode)."""
        self.client_cancelled = False
        self.current = session
        try:
            with session.stream as stream:  # a failed send closes it: the slot is freed, the turn withdrawn
                if multi:
                    self.send("__START__:" + json.dumps({"session-id": session.session_id}))
                for event in stream:
                    if event.text:
                        self.send(event.text)
        finally:
            self.current = None
        final = stream.final
        assert final is not None
        if failed(final):
            self.send(f"__ERROR__:{final.error}")
        elif cancelled(final) and not (multi and self.client_cancelled):
            self.send("__ERROR__:cancelled")  # cut short by the server: the text is not the whole answer
        if multi:
            timings = final.timings.as_dict() if final.timings else {}
            self.send(
                "__END__:"
                + json.dumps(
                    {
                        "session-id": session.session_id,
                        "finish_reason": final.finish_reason,
                        "usage": usage_of(final),
                        "timings": timings,
                    }
                )
            )


def ws_route(bp: Blueprint, start_chat: StartChat) -> None:
    """Add `WS /chat/ws` to `bp`, answering each request with `start_chat`; open sockets end on shutdown."""
    bp.add_url_rule("/chat/ws", "chat_ws", lambda: chat_ws(start_chat), websocket=True)
    bp.record_once(lambda state: state.app.extensions.setdefault(SHUTDOWN_HOOKS, []).append(close_all))


def chat_ws(start_chat: StartChat) -> Response:
    """The upgrade (as flask-sock does it, with LingeringServer): run the socket, then hand the connection
    back to the WSGI server without a response of its own."""
    ws = LingeringServer(request.environ, **current_app.config.get("SOCK_SERVER_OPTIONS", {}))
    try:
        serve_socket(ws, start_chat)
    except ConnectionClosed:
        pass
    try:
        ws.close()
    except (ConnectionClosed, OSError):  # already closed by either side
        pass

    class WebSocketResponse(Response):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            if ws.mode == "gunicorn":
                raise StopIteration()  # gunicorn's gthread worker: the socket was already answered
            if ws.mode == "werkzeug":
                return super().__call__(*args, **kwargs)
            return []

    return WebSocketResponse()


def serve_socket(ws: Server, start_chat: StartChat) -> None:
    """Read chat requests and answer them until the socket closes (after one answer unless multi-turn)."""
    conn = Connection(ws)
    multi, first, last_session = request.args.get("mode") == "multi", True, None
    try:
        while (text := conn.next_request()) is not None:
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
                conn.send(
                    f"__ERROR__:{validation_message(exc)[0] if isinstance(exc, ValidationError) else exc}"
                )
                if multi:
                    continue
                return
            except Exception as exc:  # never close silently: say what failed
                log.exception("WebSocket chat request failed")
                conn.send(f"__ERROR__:Internal error: {type(exc).__name__}")
                return
            conn.answer(session, multi)
            if not multi:
                return
    finally:
        conn.running = False
        OPEN.discard(conn)
