"""One access log line per request (`ortllm serve`, off with --quiet): who, what, status, time, tokens."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from flask import has_request_context, request
from werkzeug.wsgi import ClosingIterator

log = logging.getLogger("ortllm.access")
RECORD = "ortllm.access"  # environ key: the request's AccessRecord, where generation adds its tokens


class AccessRecord:
    """Tokens generated while answering one request (a WebSocket may generate several answers)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens: int | None = None

    def add(self, final: Any) -> None:
        usage = getattr(final, "usage", None)
        with self.lock:
            self.tokens = (self.tokens or 0) + (usage.completion_tokens if usage else 0)


def count_tokens(stream: Any) -> None:
    """Add `stream`'s generated tokens to the current request's access log line (when it has one)."""
    record = request.environ.get(RECORD) if has_request_context() else None
    if record is not None:
        stream.on_final(record.add)


class AccessLog:
    """WSGI middleware: logs each request once its body is closed, so a stream's time is all of it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        started = time.perf_counter()
        record = environ[RECORD] = AccessRecord()
        status: list[str] = ["-"]
        # read now: the listener middleware rewrites PATH_INFO; the query string may carry secrets
        what = f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}"
        client = environ.get("REMOTE_ADDR", "-")

        def start(code: str, headers: list[tuple[str, str]], *exc: Any) -> Any:
            status[0] = code.split(" ", 1)[0]
            return start_response(code, headers, *exc)

        def done() -> None:
            tokens = "" if record.tokens is None else f" {record.tokens} tokens"
            log.info('%s "%s" %s %.3f s%s', client, what, status[0], time.perf_counter() - started, tokens)

        try:
            body = self.app(environ, start)
        except BaseException:
            status[0] = "500"
            done()
            raise
        return ClosingIterator(body, [done])
