"""Auth (API keys, HS256 JWTs), per key-or-IP rate limits (flask-limiter) and CORS (flask-cors)."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import jwt
from flask import Flask, Response, g, has_request_context, request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from ortllm.settings import ConfigError, Settings

from .errors import dialect_of, error_response
from .metrics import Metrics

log = logging.getLogger("ortllm.web")

# reachable without credentials: probes, the API description and the browser UI's files
OPEN_PREFIXES = ("/health", "/readiness", "/docs", "/openapi.json", "/ui/", "/static/")
WS_PATH = "/chat/ws"  # the one route that takes ?token=: browsers cannot give a WebSocket headers


@dataclass(frozen=True)
class Identity:
    """Who is calling: a key's name, a JWT subject, or the client address when auth is off."""

    name: str
    kind: str  # "key" | "jwt" | "anonymous"

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.name}"


def load_keys(settings: Settings) -> dict[str, str]:
    """API keys by name. Entries are `name:key` or a bare key (named key-1, key-2 …); a key file holds
    one entry per line (# comments allowed)."""
    entries = list(settings.auth.api_keys)
    if settings.auth.key_file:
        try:
            lines = Path(settings.auth.key_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"Cannot read auth.key_file {settings.auth.key_file}: {exc.strerror}") from exc
        entries += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    keys: dict[str, str] = {}
    for i, entry in enumerate(entries, 1):
        name, sep, key = entry.partition(":")
        name, key = (name.strip(), key.strip()) if sep else (f"key-{i}", entry.strip())
        if len(key) < 8:
            raise ConfigError(f"API key '{name}' is too short: use at least 8 characters")
        keys[name] = key
    return keys


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_enabled(settings: Settings) -> bool:
    return bool(settings.auth.api_keys or settings.auth.key_file or settings.auth.jwt_secret)


def rate_per_minute(settings: Settings) -> int:
    """The effective limit: explicit setting, else 60 whenever auth is on or the bind is not loopback."""
    if settings.rate_limit.per_minute is not None:
        return settings.rate_limit.per_minute
    exposed = not is_loopback(settings.server.host) or (
        settings.ollama.listen is not None and not is_loopback(settings.ollama.host)
    )
    return 60 if auth_enabled(settings) or exposed else 0


def check_exposure(settings: Settings) -> None:
    """Refuse to listen beyond this machine without authentication unless --insecure (either listener)."""
    hosts = [settings.server.host] + ([settings.ollama.host] if settings.ollama.listen else [])
    for host in hosts:
        if not is_loopback(host) and not auth_enabled(settings) and not settings.insecure:
            raise ConfigError(
                f"Refusing to listen on {host} without authentication: set --api-key "
                "(or auth.api_keys / auth.jwt_secret), or pass --insecure to serve it open"
            )


class Authenticator:
    """Checks `Authorization: Bearer …` or `x-api-key: …` (or `?token=` on the WebSocket upgrade) before every request and
    answers 429 to a client address that keeps sending wrong credentials."""

    def __init__(self, settings: Settings, metrics: Metrics | None = None) -> None:
        self.metrics = metrics  # requests are counted there by dialect, caller and status
        self.keys = load_keys(settings)
        self.jwt_secret = settings.auth.jwt_secret
        self.audience = settings.auth.jwt_audience
        self.enabled = bool(self.keys or self.jwt_secret)
        protect = settings.auth.protect_metrics
        self.protect_metrics = self.enabled if protect is None else protect
        # keyed by the configured secrets: a label cannot be reversed by hashing guessed names
        secrets = "\n".join([*sorted(self.keys.values()), self.jwt_secret or ""])
        self.label_key = hashlib.sha256(secrets.encode()).digest()
        # flask-limiter's own machinery (the limits package) on the same storage: Redis shares these counts too
        per_minute = settings.auth.failed_per_minute if self.enabled else 0
        self.failed_limit = RateLimitItemPerMinute(per_minute) if per_minute else None
        self.failures = (
            FixedWindowRateLimiter(storage_from_string(settings.rate_limit.storage_uri))
            if per_minute
            else None
        )

    def is_open(self) -> bool:
        path = request.path
        if path.startswith(OPEN_PREFIXES) or request.method == "OPTIONS":
            return True
        if path == "/metrics":
            return not self.protect_metrics
        return path == "/" and "text/html" in request.headers.get("Accept", "")

    def identify(self, token: str) -> Identity | None:
        for name, key in self.keys.items():
            if hmac.compare_digest(token.encode(), key.encode()):
                return Identity(name, "key")
        if self.jwt_secret and token.count(".") == 2:
            try:
                claims = jwt.decode(
                    token,
                    self.jwt_secret,
                    algorithms=["HS256"],
                    audience=self.audience,
                    options={"require": ["exp"], "verify_aud": self.audience is not None},
                )
            except jwt.PyJWTError:
                return None
            return Identity(str(claims.get("sub") or "jwt"), "jwt")
        return None

    def before_request(self) -> Response | None:
        g.identity = Identity(get_remote_address() or "unknown", "anonymous")
        if not self.enabled or self.is_open():
            return None
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer ":
            token = header[7:].strip()
        elif request.headers.get("x-api-key", "").strip():  # Anthropic's SDKs and Claude Code send this
            token = request.headers["x-api-key"].strip()
        elif request.path == WS_PATH and request.headers.get("Upgrade", "").lower() == "websocket":
            token = request.args.get("token", "")
        else:
            token = ""
        if not token:
            message = "Missing API key: send Authorization: Bearer <key> (or x-api-key: <key>)"
            if "token" in request.args:
                message += f" (?token= is accepted only on the WebSocket upgrade {WS_PATH})"
            return unauthorized(message)
        identity = self.identify(token)
        if identity is None:
            return self.failed()
        g.identity = identity
        return None

    def failed(self) -> Response:
        """A wrong key or token: 401, or 429 once this address has spent its budget of failures."""
        address = get_remote_address() or "unknown"
        refused = unauthorized("Invalid API key (send Authorization: Bearer <key>)")
        if self.failed_limit is None or self.failures is None:
            return refused
        try:
            if self.failures.hit(self.failed_limit, "auth-failed", address):
                return refused
            reset_at = self.failures.get_window_stats(self.failed_limit, "auth-failed", address).reset_time
        except Exception as exc:  # an unreachable rate-limit storage must not turn a 401 into a 500
            log.warning(
                "cannot count failed authentications in %s: %s", type(self.failures.storage).__name__, exc
            )
            return refused
        retry_after = max(1, math.ceil(reset_at - time.time()))
        response = error_response(
            429,
            f"Too many failed authentications from this address "
            f"({self.failed_limit.amount} per minute): retry in {retry_after} s",
            "RATE_LIMITED",
        )
        response.headers["Retry-After"] = str(retry_after)
        return response

    def count_request(self, response: Response) -> Response:
        """Count the request under its dialect, caller and status. Callers are named (never the client
        address); on a /metrics that anyone may read while auth is on, by a stable hash of the name."""
        if self.metrics is None:
            return response
        identity = getattr(g, "identity", None)
        who = "anonymous"
        if identity and identity.kind != "anonymous":
            who = identity.name if self.protect_metrics else self.pseudonym(identity)
        self.metrics.requests.labels(dialect_of(request.path), who, str(response.status_code)).inc()
        return response

    def pseudonym(self, identity: Identity) -> str:
        """A caller's stable label on an open /metrics: the same key or subject always gets the same one."""
        return "hmac:" + hmac.new(self.label_key, identity.key.encode(), hashlib.sha256).hexdigest()[:12]


def unauthorized(message: str) -> Response:
    response = error_response(401, message, "AUTHENTICATION_FAILED")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def cache_scope() -> str | None:
    """Who this request acts for, as `key:NAME` / `jwt:SUB`: the scope of its prefix caches and the owner of
    its sessions. None when auth is off (one local user: everything is shared) and outside a request."""
    identity = getattr(g, "identity", None) if has_request_context() else None
    return identity.key if identity and identity.kind != "anonymous" else None


def rate_key() -> str:
    identity = getattr(g, "identity", None)
    return identity.key if identity else get_remote_address() or "unknown"


def install(app: Flask, settings: Settings, metrics: Metrics) -> Authenticator:
    """Wire auth, rate limiting and CORS into the app (in that order: limits are per identity); requests
    are counted in `metrics`."""
    auth = Authenticator(settings, metrics)
    app.before_request(auth.before_request)
    app.after_request(auth.count_request)
    per_minute = rate_per_minute(settings)
    limiter = Limiter(
        rate_key,
        app=app,
        application_limits=[f"{per_minute} per minute"] if per_minute else [],  # one budget across all routes
        storage_uri=settings.rate_limit.storage_uri,
        headers_enabled=True,
        enabled=per_minute > 0,
        # Redis gone: each replica counts in memory until it is back, rather than refusing every request
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    limiter.request_filter(lambda: request.path.startswith(OPEN_PREFIXES) or request.path == "/metrics")
    app.extensions["ortllm_limiter"] = limiter
    CORS(
        app,
        origins=settings.cors.origins,
        expose_headers=[
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset",
            "Retry-After",
            "X-Session-Id",
        ],
    )
    return auth
