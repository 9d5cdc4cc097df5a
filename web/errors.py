"""One error mapper: each dialect's error body, chosen by the request path, and the hints that name routes."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from ortllm.errors import Busy, OrtllmError, SessionStoreUnavailable

log = logging.getLogger("ortllm.web")

# routes of the chat service dialect answer {"error": "..."}
CHAT_SERVICE_PREFIXES = ("/completions", "/chat/", "/sessions", "/readiness")
# where the Ollama dialect's routes live inside the app: the Ollama listener (web.app.ollama_listener) maps its
# `/` and `/api/*` here, so they never meet the native dialect's `/api/*`; errors there are {"error": "..."}
OLLAMA_PREFIX = "/_ollama"
CLIENT_PATH = "ortllm.client_path"  # the WSGI environ key of a request's path before the listener mapped it


def dialect_of(path: str) -> str:
    """The error-body family of a path (also the `dialect` label of /metrics, kept as dashboards know it)."""
    if path.startswith(OLLAMA_PREFIX):
        return "ollama"
    if path.startswith("/api/v1/"):
        return "spec"
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return "anthropic"
    if path.startswith("/v1/"):
        return "openai"
    if path.startswith(CHAT_SERVICE_PREFIXES):
        return "rust"
    return "detail"  # /api/*, the orchestrator routes (/models, /generate) and everything else


OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}
# Anthropic's error types by status (its 529 "overloaded" is our 503: a full queue)
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}
SPEC_CODES = {
    400: "INVALID_REQUEST",
    401: "AUTHENTICATION_FAILED",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
    504: "TIMEOUT",
}
# what to do about an OrtllmError whose answer names a route or a header, by its code (the core's errors
# know no HTTP: where their own `hint` is empty, this one is sent)
HINTS = {
    "INVALID_REQUEST": "The routes and their request schemas are described at /docs",
    "MODEL_NOT_FOUND": "GET /api/v1/models lists the installed models; `ortllm pull NAME` installs a catalog model",
    "SERVICE_UNAVAILABLE": "Retry after the number of seconds in the Retry-After header",
    "SESSION_NOT_FOUND": "GET /api/sessions lists the sessions; omit the session id to start a new one",
}


def hint_of(exc: OrtllmError) -> str:
    """What to do about `exc`: its own hint, else the route-naming one for its code (else: read /docs)."""
    return exc.hint or HINTS.get(exc.code, HINTS["INVALID_REQUEST"])


# what to do about an error, by status: the `details` of the /api/v1 dialect (OrtllmErrors bring their own)
SPEC_DETAILS = {
    400: HINTS["INVALID_REQUEST"],
    401: "Send Authorization: Bearer <key> (on the WebSocket: ?token=<key>)",
    404: "The routes are listed at /docs",
    405: "The routes and their methods are listed at /docs",
    413: "Send a smaller body (the limit is server.max_body_bytes)",
    429: "Wait until the time in X-RateLimit-Reset (Retry-After says how long)",
    500: "The server log has the cause",
    503: "Retry shortly",
}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    *,
    details: str | None = None,
    param: str | None = None,
    path: str | None = None,
) -> Response:
    """The error body of the dialect that owns `path` (default: the current request's)."""
    dialect = dialect_of(path if path is not None else request.path)
    body: dict[str, Any]
    if dialect == "openai":
        body = {
            "error": {
                "message": message,
                "type": OPENAI_TYPES.get(status, "server_error"),
                "param": param,
                "code": (code or "").lower() or None,
            }
        }
    elif dialect == "anthropic":
        body = {
            "type": "error",
            "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
        }
    elif dialect == "spec":
        body = {
            "error": {
                "code": code or SPEC_CODES.get(status, "ERROR"),
                "message": message,
                "details": SPEC_DETAILS.get(status, "") if details is None else details,
            }
        }
    elif dialect in ("rust", "ollama"):
        body = {"error": message}
    else:
        body = {"detail": message}
    response = jsonify(body)
    response.status_code = status
    return response


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """First pydantic error as 'field: message' (and the field name, for OpenAI's `param`)."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    # pydantic's prefixes of a validator's own words ("Value error, ...") are not for clients
    msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    ctx = err.get("ctx") or {}
    if isinstance(ctx.get("param"), str):  # a refusal written whole, naming its field (openai/protocol.py)
        return msg, ctx["param"]
    if err["type"] == "extra_forbidden" and len(err["loc"]) == 1:  # OpenAI's own words for an unknown field
        return f"Unrecognized request argument supplied: {loc}", loc
    if err["type"] == "extra_forbidden":
        return f"{loc} is not a supported field here", loc
    if err["type"] == "missing":
        return f"Missing required field: {loc}", loc
    return (f"{loc}: {msg}" if loc else msg), loc or None


def register(app: Flask) -> None:
    @app.errorhandler(OrtllmError)
    def ortllm_error(exc: OrtllmError) -> Response:
        response = error_response(exc.status, str(exc), exc.code, details=hint_of(exc), param=exc.param)
        if isinstance(exc, (Busy, SessionStoreUnavailable)):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.errorhandler(ValidationError)
    def invalid(exc: ValidationError) -> Response:
        message, param = validation_message(exc)
        details = f"Check `{param}`; the request schema is described at /docs" if param else None
        return error_response(400, message, "INVALID_REQUEST", param=param, details=details)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        path = request.environ.get(CLIENT_PATH, request.path)  # as the client sent it (see web.app.Listeners)
        messages = {
            404: f"Not found: {path}",
            405: f"Method {request.method} not allowed on {path}",
            413: "Request body too large",
            429: f"Rate limit exceeded: {exc.description}",
        }
        response = error_response(status, messages.get(status, exc.description or exc.name))
        for name, value in exc.get_headers():  # werkzeug's own headers: Allow on 405, Retry-After on 429
            if name.lower() not in ("content-type", "content-length"):
                response.headers[name] = value
        return response

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, f"Internal error: {type(exc).__name__}", "INTERNAL_ERROR")
