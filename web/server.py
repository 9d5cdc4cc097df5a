"""Run the app: gunicorn (gthread, one process so each model loads once) on POSIX; werkzeug's
threaded server where gunicorn cannot run (Windows). Both serve the WebSocket (simple-websocket).

Shutdown (SIGTERM, SIGINT/Ctrl-C, SIGQUIT) cancels every answer at once, so each stream ends with its
dialect's cancelled marker, refuses new requests with 503, and the worker exits within EXIT_DEADLINE_S
even if a handler cannot be cancelled (it is named in the log)."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from flask import Flask, Response
from werkzeug.wsgi import ClosingIterator

from ortllm.sessions import configure_instance
from ortllm.settings import ConfigError, Settings

from .access_log import AccessLog
from .errors import error_response
from .streaming import SHUTDOWN_HOOKS, STOPPING

log = logging.getLogger("ortllm.server")
EXIT_DEADLINE_S = 2.5  # after a stop signal the worker is gone by then, whatever its handlers do
GRACEFUL_TIMEOUT_S = 5  # gunicorn's own limit: only a worker wedged beyond the deadline meets it
_shutdown_once = threading.Lock()
_deadline: float | None = None  # when the worker exits at the latest, once a stop signal came


class InFlight:
    """WSGI middleware: the requests being answered now (a stream until its body is closed), by path."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lock = threading.Lock()
        self.requests: dict[int, tuple[str, float]] = {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        key = id(environ)
        with self.lock:
            self.requests[key] = (
                f"{environ.get('REQUEST_METHOD')} {environ.get('PATH_INFO')}",
                time.monotonic(),
            )
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self._done(key)
            raise
        return ClosingIterator(body, [lambda: self._done(key)])

    def _done(self, key: int) -> None:
        with self.lock:
            self.requests.pop(key, None)

    def describe(self) -> list[str]:
        now = time.monotonic()
        with self.lock:
            return [f"{what} ({now - since:.1f} s)" for what, since in self.requests.values()]


def prepare(app: Flask) -> InFlight:
    """Refuse requests once shutdown has begun and track those in flight (to name stragglers)."""

    def refuse_while_stopping() -> Response | None:
        if not STOPPING.is_set():
            return None
        response = error_response(503, "The server is shutting down; retry when it is back", "SHUTTING_DOWN")
        response.headers["Connection"] = "close"
        return response

    app.before_request_funcs.setdefault(None, []).insert(0, refuse_while_stopping)
    if app.extensions["ortllm"].settings.server.access_log:
        app.wsgi_app = AccessLog(app.wsgi_app)  # type: ignore[method-assign]
    inflight = InFlight(app.wsgi_app)
    app.wsgi_app = inflight  # type: ignore[method-assign]
    return inflight


def shutdown(app: Any) -> None:
    """Cancel every stream, end open WebSockets and unload the models (streams end 'cancelled')."""
    STOPPING.set()  # before anything is cancelled: the markers then say why
    if not _shutdown_once.acquire(blocking=False):
        return  # SIGTERM and SIGINT (Ctrl-C reaches master and worker) both ask: once is enough
    for hook in app.extensions.get(SHUTDOWN_HOOKS, []):
        hook()  # e.g. end every open WebSocket: idle multi-turn sockets must not hold the exit
    registry = app.extensions["ortllm"].registry
    # all models at once: each unload cancels its answers first, then waits for its worker thread
    threads = [
        threading.Thread(target=registry.unload, args=(name,), daemon=True) for name in registry.loaded()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _watch_exit(app: Any, inflight: InFlight, deadline: float) -> None:
    """Unload models a request loaded after shutdown began; at `deadline` exit, naming what still runs."""
    registry = app.extensions["ortllm"].registry
    while time.monotonic() < deadline:
        for name in registry.loaded():  # a request past the 503 check was loading it: cancel its answer too
            threading.Thread(target=registry.unload, args=(name,), daemon=True).start()
        time.sleep(0.1)
    _exit_now(inflight)


def _exit_now(inflight: InFlight) -> None:
    stragglers = inflight.describe()
    if stragglers:
        log.warning(
            "exiting with %d request(s) that did not end after %.1f s: %s",
            len(stragglers),
            EXIT_DEADLINE_S,
            "; ".join(stragglers),
        )
    logging.shutdown()
    # neither a handler that cannot be cancelled nor a thread left behind (simple-websocket's reader waits
    # for the peer's close or its next ping) may hold the exit; the answers are written, the store committed
    os._exit(0)


def _on_worker_exit(arbiter: Any, worker: Any) -> None:
    """gunicorn's loop has ended (no connection left, or its timeout): after a stop signal, exit as soon as
    the requests still in flight end (or at the deadline) rather than wait for every thread to finish."""
    if _deadline is None:
        return
    inflight: InFlight = worker.wsgi.extensions["ortllm.inflight"]
    while inflight.requests and time.monotonic() < _deadline:
        time.sleep(0.05)
    _exit_now(inflight)


def check_ports(settings: Settings) -> None:
    """Bind each address the server will listen on (as gunicorn does, with SO_REUSEADDR) and let it go:
    a port in use is one line naming the flag that moves it, before the banner and before gunicorn retries."""
    listeners = [(settings.server.host, settings.server.port, "--port")]
    if settings.ollama.listen:
        listeners.append((settings.ollama.host, settings.ollama.port, "--ollama"))
    for host, port, flag in listeners:
        address = _bind(host, port)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from None
        family, kind, proto, _, sockaddr = infos[0]
        try:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(f"{address} is in use — pick another with {flag}") from None
            reason = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
            raise ConfigError(f"cannot listen on {address}: {reason}") from None


def configure_logging() -> None:
    """ortllm's own lines on stderr beside gunicorn's: each model as it loads, the access log, warnings."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] %(message)s", "%Y-%m-%d %H:%M:%S"))
    ours = logging.getLogger("ortllm")
    ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False  # a root handler (if any) would print each line twice


def serve(settings: Settings) -> None:
    configure_logging()
    # a restarted server on this host and port takes over the turns its crashed predecessor left pending
    configure_instance(f"{socket.gethostname()}:{settings.server.port}")
    if os.name == "posix":
        try:
            import gunicorn  # noqa: F401
        except ImportError:
            log.warning("gunicorn is not installed; using werkzeug's threaded server")
        else:
            return _serve_gunicorn(settings)
    return _serve_werkzeug(settings)


def _serve_werkzeug(settings: Settings) -> None:
    from werkzeug.serving import run_simple

    from .app import create_app

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # the access log is ours (AccessLog)

    app = create_app(settings)
    prepare(app)
    if settings.ollama.listen:  # the Ollama listener: the same app on a second port, in a thread
        from werkzeug.serving import make_server

        second = make_server(settings.ollama.host, settings.ollama.port, app, threaded=True)
        threading.Thread(target=second.serve_forever, name="ortllm-ollama-listener", daemon=True).start()
    try:
        run_simple(settings.server.host, settings.server.port, app, threaded=True, use_reloader=False)
    finally:
        shutdown(app)


def _serve_gunicorn(settings: Settings) -> None:
    from gunicorn.app.base import BaseApplication

    from .app import create_app

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            binds = [_bind(settings.server.host, settings.server.port)]
            if (
                settings.ollama.listen
            ):  # the Ollama listener: the same app (web.app.Listeners tells them apart)
                binds.append(_bind(settings.ollama.host, settings.ollama.port))
            cfg = {
                "bind": binds,
                "workers": 1,  # one process: the model is loaded once and shared by all threads
                "worker_class": "gthread",
                "threads": settings.server.threads,
                "timeout": 0,  # streams can be long; the worker heartbeat runs in its own thread
                "graceful_timeout": GRACEFUL_TIMEOUT_S,
                "keepalive": 5,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "warning",
                "post_worker_init": _on_worker_start,
                "worker_exit": _on_worker_exit,
            }
            for key, value in cfg.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            app = create_app(settings)
            app.extensions["ortllm.inflight"] = prepare(app)
            return app

    Server().run()


def _bind(host: str, port: int) -> str:
    """gunicorn's address syntax ([v6]:port)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _on_worker_start(worker: Any) -> None:
    """On SIGTERM (graceful) and SIGINT/SIGQUIT (Ctrl-C, quick), cancel every answer at once so the
    handlers end with their cancelled markers, then let gunicorn stop the worker; a watchdog makes sure
    it is gone within EXIT_DEADLINE_S."""
    app = worker.wsgi

    def wrap(signum: int) -> None:
        previous = signal.getsignal(signum)

        def on_stop(sig: int, frame: Any) -> None:
            global _deadline
            if _deadline is None:
                _deadline = deadline = time.monotonic() + EXIT_DEADLINE_S
                threading.Thread(target=shutdown, args=(app,), name="ortllm-shutdown", daemon=True).start()
                threading.Thread(
                    target=_watch_exit,
                    args=(app, app.extensions["ortllm.inflight"], deadline),
                    name="ortllm-exit-watchdog",
                    daemon=True,
                ).start()
            if callable(previous):
                previous(sig, frame)

        signal.signal(signum, on_stop)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        wrap(signum)
