"""The Flask app factory: shared services, one blueprint per API dialect (web/dialects/), one error mapper."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import Any

from flask import Flask

from ortllm.sessions import SessionStore
from ortllm.settings import Settings, load_settings

from . import docs, errors, metrics, security, ui
from .dialects import api_v1, chat_ws, native, openai, orchestrator, sessions
from .services import ModelRegistry, Services, make_registry

# every API dialect's blueprint: a new dialect is one package under web/dialects/ and one line here
DIALECTS = (
    native.bp,
    openai.bp,
    chat_ws.bp,
    orchestrator.bp,
    api_v1.bp,
    sessions.bp,
)

log = logging.getLogger("ortllm.web")


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
    services = Services(settings, registry, sessions or SessionStore())
    app.extensions["ortllm"] = services
    errors.register(app)
    security.install(app, settings, services.metrics)
    for blueprint in DIALECTS:
        app.register_blueprint(blueprint)
    metrics.install(app, services.metrics)
    for blueprint in (docs.bp, docs.swagger, ui.bp):
        app.register_blueprint(blueprint)
    app.wsgi_app = ConnectionCounter(app.wsgi_app, services)  # type: ignore[method-assign]
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
