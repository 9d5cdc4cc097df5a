"""The Flask app factory: shared services, one blueprint per API dialect (web/dialects/), one error mapper."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from flask import Flask
from werkzeug.middleware.proxy_fix import ProxyFix

from ortllm.sessions import SessionStore
from ortllm.settings import Settings, load_settings

from . import docs, errors, metrics, security, ui
from .dialects import api_v1, chat_ws, messages, native, ollama, openai, orchestrator, responses, sessions
from .dialects.ollama.manage import manage_bp
from .errors import CLIENT_PATH, OLLAMA_PREFIX
from .services import ModelRegistry, Services, make_registry

# every API dialect's blueprint: a new dialect is one package under web/dialects/ and one line here
DIALECTS = (
    native.bp,
    openai.bp,
    responses.bp,
    messages.bp,
    ollama.bp,
    chat_ws.bp,
    orchestrator.bp,
    api_v1.bp,
    sessions.bp,
    manage_bp,
)

log = logging.getLogger("ortllm.web")
LISTENER = "ortllm.listener"  # environ key: "ollama" for a request on the Ollama listener


class ConnectionCounter:
    """WSGI middleware: counts requests in flight, streams included, until their body is closed."""

    def __init__(self, app: Any, services: Services) -> None:
        self.app = app
        self.services = services

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.services.connection_opened()
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self.services.connection_closed()
            raise
        return _ClosingBody(body, self.services.connection_closed)


class _ClosingBody:
    def __init__(self, body: Iterable[bytes], on_close: Any) -> None:
        self.body = body
        self.on_close = on_close

    def __iter__(self):
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close:
                close()
        finally:
            self.on_close()


class Listeners:
    """WSGI middleware: the listener a request came in on decides what its path means. On the Ollama
    listener `/` and `/api/*` are the Ollama dialect's (registered under OLLAMA_PREFIX) and `/v1/*` the OpenAI
    dialect's; on the main port OLLAMA_PREFIX does not exist. A request is on the Ollama listener when its
    socket's local port is `ollama_port` (or, in process, when its environ says so: `ortllm.listener`)."""

    def __init__(self, app: Any, ollama_port: int | None) -> None:
        self.app = app
        self.ollama_port = ollama_port

    def on_ollama(self, environ: dict[str, Any]) -> bool:
        if environ.get(LISTENER) is not None:
            return bool(environ[LISTENER] == "ollama")
        sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
        if self.ollama_port is None or sock is None:
            return False
        try:
            return int(sock.getsockname()[1]) == self.ollama_port
        except (OSError, IndexError, TypeError, ValueError):
            return False

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or "/"
        environ[CLIENT_PATH] = path
        if self.on_ollama(environ):
            environ[LISTENER] = "ollama"
            if not (path == "/v1" or path.startswith("/v1/")):
                environ["PATH_INFO"] = OLLAMA_PREFIX + path
        elif path == OLLAMA_PREFIX or path.startswith(OLLAMA_PREFIX + "/"):
            environ["PATH_INFO"] = (
                "/main-port" + path
            )  # a 404 in this port's shape (its client sees its path)
        return self.app(environ, start_response)


def create_app(
    settings: Settings | None = None,
    *,
    registry: ModelRegistry | None = None,
    sessions: SessionStore | None = None,
) -> Flask:
    """Build the app; models in `settings.server.models` are loaded before it returns."""
    settings = settings or load_settings()
    app = Flask("ortllm")
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    # WebSockets (simple-websocket): pings find dead peers, so an abandoned /chat/ws frees its thread and stream
    app.config["SOCK_SERVER_OPTIONS"] = {
        "ping_interval": 25,
        "max_message_size": settings.server.max_body_bytes,
    }
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    registry = registry or make_registry(settings)
    services = Services(settings, registry, sessions or SessionStore(url=settings.database.url))
    app.extensions["ortllm"] = services
    errors.register(app)
    security.install(app, settings, services.metrics)
    for blueprint in DIALECTS:
        app.register_blueprint(blueprint)
    metrics.install(app, services.metrics)
    for blueprint in (docs.bp, docs.swagger, ui.bp):
        app.register_blueprint(blueprint)
    app.wsgi_app = ConnectionCounter(app.wsgi_app, services)  # type: ignore[method-assign]
    ollama_port = settings.ollama.port if settings.ollama.listen else None
    app.wsgi_app = Listeners(app.wsgi_app, ollama_port)  # type: ignore[method-assign]
    if settings.server.trusted_proxies:  # the client's address from X-Forwarded-For, as many hops as trusted
        hops = settings.server.trusted_proxies
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)  # type: ignore[method-assign]
    for name in settings.server.models:
        registry.load(name)
    if settings.server.keep_alive > 0:
        _start_idle_unloader(registry, settings.server.keep_alive)
    return app


def _start_idle_unloader(registry: ModelRegistry, idle_s: float) -> None:
    def loop() -> None:
        while True:
            threading.Event().wait(max(1.0, idle_s / 4))
            registry.unload_idle(idle_s)

    threading.Thread(target=loop, name="ortllm-idle-unloader", daemon=True).start()
