"""Run the app: gunicorn (gthread, one process so each model loads once) on POSIX; werkzeug's
threaded server where gunicorn cannot run (Windows). Both serve flask-sock WebSockets."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from ortllm.settings import Settings

log = logging.getLogger("ortllm.server")


def shutdown(app: Any) -> None:
    """Cancel every stream, end open WebSockets and unload the models (streams end 'cancelled')."""
    from .ws import close_all

    close_all()
    app.extensions["ortllm"].registry.close()


def serve(settings: Settings) -> None:
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

    app = create_app(settings)
    try:
        run_simple(settings.server.host, settings.server.port, app, threaded=True, use_reloader=False)
    finally:
        shutdown(app)


def _serve_gunicorn(settings: Settings) -> None:
    from gunicorn.app.base import BaseApplication

    from .app import create_app

    class Server(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            cfg = {
                "bind": f"{settings.server.host}:{settings.server.port}",
                "workers": 1,  # one process: the model is loaded once and shared by all threads
                "worker_class": "gthread",
                "threads": settings.server.threads,
                "timeout": 0,  # streams can be long; the worker heartbeat runs in its own thread
                "graceful_timeout": 15,
                "keepalive": 5,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": "warning",
                "post_worker_init": _on_worker_start,
            }
            for key, value in cfg.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return create_app(settings)

    Server().run()


def _on_worker_start(worker: Any) -> None:
    """On SIGTERM, cancel streams at once so the graceful shutdown finishes them, then stop."""
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        threading.Thread(target=shutdown, args=(worker.wsgi,), daemon=True).start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
