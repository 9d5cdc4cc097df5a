"""Auth (API keys, HS256 JWTs), per key-or-IP rate limits (flask-limiter) and CORS (flask-cors)."""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import jwt
from flask import Flask, Response, g, request
from flask_cors import CORS
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address

from ortllm.settings import ConfigError, Settings

from .errors import error_response

# reachable without credentials: probes, the API description and the browser UI's files
OPEN_PREFIXES = ("/health", "/readiness", "/docs", "/openapi.json", "/ui/", "/static/")


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
    return 60 if auth_enabled(settings) or not is_loopback(settings.server.host) else 0


def check_exposure(settings: Settings) -> None:
    """Refuse to listen beyond this machine without authentication unless --insecure."""
    if not is_loopback(settings.server.host) and not auth_enabled(settings) and not settings.insecure:
        raise ConfigError(
            f"Refusing to listen on {settings.server.host} without authentication: set --api-key "
            "(or auth.api_keys / auth.jwt_secret), or pass --insecure to serve it open"
        )


class Authenticator:
    """Checks `Authorization: Bearer …` (or `?token=` on WebSocket upgrades) before every request."""

    def __init__(self, settings: Settings) -> None:
        self.keys = load_keys(settings)
        self.jwt_secret = settings.auth.jwt_secret
        self.audience = settings.auth.jwt_audience
        self.protect_metrics = settings.auth.protect_metrics
        self.enabled = bool(self.keys or self.jwt_secret)

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
                claims = jwt.decode(token, self.jwt_secret, algorithms=["HS256"], audience=self.audience,
                                    options={"require": ["exp"], "verify_aud": self.audience is not None})  # fmt: skip
            except jwt.PyJWTError:
                return None
            return Identity(str(claims.get("sub") or "jwt"), "jwt")
        return None

    def before_request(self) -> Response | None:
        g.identity = Identity(get_remote_address() or "unknown", "anonymous")
        if not self.enabled or self.is_open():
            return None
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else request.args.get("token", "")
        identity = self.identify(token) if token else None
        if identity is None:
            response = error_response(401, "Invalid or missing API key (send Authorization: Bearer <key>)",
                                      "AUTHENTICATION_FAILED")  # fmt: skip
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        g.identity = identity
        return None


def count_request(response: Response) -> Response:
    """Count the request under its dialect, caller name (not the client address) and status."""
    from .errors import dialect_of
    from .service import services

    identity = getattr(g, "identity", None)
    who = identity.name if identity and identity.kind != "anonymous" else "anonymous"
    services().metrics.requests.labels(dialect_of(request.path), who, str(response.status_code)).inc()
    return response


def cache_scope() -> str | None:
    """The prefix-cache scope of this request: its API key or JWT subject, None when auth is off (one
    local user: everything may share). Outside a request (tests, the CLI) None as well."""
    from flask import has_request_context

    identity = getattr(g, "identity", None) if has_request_context() else None
    return identity.key if identity and identity.kind != "anonymous" else None


def rate_key() -> str:
    identity = getattr(g, "identity", None)
    return identity.key if identity else get_remote_address() or "unknown"


def install(app: Flask, settings: Settings) -> Authenticator:
    """Wire auth, rate limiting and CORS into the app (in that order: limits are per identity)."""
    auth = Authenticator(settings)
    app.before_request(auth.before_request)
    app.after_request(count_request)
    per_minute = rate_per_minute(settings)
    limiter = Limiter(
        rate_key,
        app=app,
        application_limits=[f"{per_minute} per minute"] if per_minute else [],  # one budget across all routes
        storage_uri=settings.rate_limit.storage_uri,
        headers_enabled=True,
        enabled=per_minute > 0,
    )
    limiter.request_filter(lambda: request.path.startswith(OPEN_PREFIXES) or request.path == "/metrics")
    app.extensions["ortllm_limiter"] = limiter
    CORS(app, origins=settings.cors.origins,
         expose_headers=["X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "Retry-After",
                         "X-Session-Id"])  # fmt: skip
    return auth
