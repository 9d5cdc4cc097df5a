"""The browser chat: `web/static` served under `/ui/`; `GET /` hands browsers its index.html.

Everything the page needs ships inside the package (vendored libraries included), so it works
offline and nothing is fetched from a CDN. The files are open (no API key): the page asks for the
key and sends it on its own API calls.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from flask import Blueprint, Response, request, send_from_directory

STATIC = Path(__file__).resolve().parent / "static"

# ES modules must be served with a JavaScript type; some platforms' mime tables lack .mjs
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")

bp = Blueprint("ui", __name__, static_folder=None)


def wants_html() -> bool:
    """A browser navigating to the page (Accept names text/html), not an API client."""
    return "text/html" in request.headers.get("Accept", "")


def index() -> Response:
    response = send_from_directory(STATIC, "index.html", max_age=0)
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Content-Type-Options"] = "nosniff"
    # the page runs only its own scripts; the model's answers are data, never code
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'self'"
    )
    return response


@bp.get("/ui/")
def ui_index() -> Response:
    return index()


@bp.get("/ui/<path:filename>")
def ui_file(filename: str) -> Response:
    response = send_from_directory(STATIC, filename, max_age=0)
    response.headers["Cache-Control"] = "no-cache"  # revalidate (ETag) so an upgrade is picked up at once
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
