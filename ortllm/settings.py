"""Server settings: `config.toml`, then `ORTLLM_*` environment variables, then CLI flags (each overrides
the one before). Validated once at start with messages that name the setting."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import OrtllmError


class ConfigError(OrtllmError):
    """A configuration file or value that cannot be used."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    models: list[str] = Field(default_factory=list, description="models to load at start")
    max_queue: int = Field(64, ge=1, description="requests waiting per model before 503")
    generate_timeout: float = Field(
        60.0, gt=0, description="seconds before the orchestrator dialect's /generate answers 504"
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="larger request bodies get 413")
    keep_alive: float = Field(0, ge=0, description="unload a model idle this many seconds (0 = never)")
    access_log: bool = Field(True, description="log a line per request (method, path, status, time, tokens)")
    trusted_proxies: int = Field(
        0,
        ge=0,
        le=5,
        description="balancers in front that set X-Forwarded-For (HAProxy: 1): rate limits and logs then see "
        "the client's address, not the balancer's; 0 = the header is ignored (a client could forge it)",
    )
    threads: int = Field(128, ge=4, description="HTTP worker threads (each stream holds one)")
    max_tokens_limit: int = Field(8192, ge=1, description="largest max_tokens a request may ask for")
    max_embedding_inputs: int = Field(
        2048, ge=1, description="texts in one embeddings request; more get 413 (every dialect)"
    )
    max_embedding_tokens: int = Field(
        32768, ge=1, description="tokens of all texts of one embeddings request; more get 413"
    )


class AuthSettings(_Section):
    api_keys: list[str] = Field(default_factory=list)
    key_file: str | None = None
    jwt_secret: str | None = None
    jwt_audience: str | None = None
    protect_metrics: bool | None = Field(
        None, description="/metrics needs a key; default: whenever keys or a JWT secret are set"
    )
    failed_per_minute: int = Field(
        20, ge=0, description="wrong keys per client IP per minute before 429; 0 = unlimited"
    )


class RateLimitSettings(_Section):
    per_minute: int | None = Field(None, ge=0, description="requests per minute per key or IP; 0 = off")
    storage_uri: str = "memory://"


class DatabaseSettings(_Section):
    url: str | None = Field(
        None,
        description="sessions and stored responses: postgresql://USER:PASSWORD@HOST/DB to share them between "
        "replicas, sqlite:///PATH for a file; unset: sessions.db under the ortllm home",
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        if not value.startswith(("sqlite:///", "postgresql://", "postgres://", "postgresql+psycopg://")):
            raise ValueError(f"must start with postgresql:// or sqlite:/// (got {value.split(':')[0]!r}://…)")
        return value.strip()


class CorsSettings(_Section):
    origins: list[str] = Field(
        default_factory=lambda: [r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"],
        description="allowed origins (regular expressions or exact origins)",
    )


DEFAULT_OLLAMA = "127.0.0.1:11434"  # where Ollama's clients look by default


class OllamaSettings(_Section):
    listen: str | None = Field(
        None,
        description='the Ollama-compatible listener, "HOST:PORT" or "PORT" (127.0.0.1); unset: off',
    )

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        host, _, port = value.strip().rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f'must be "HOST:PORT" or "PORT" with a port from 1 to 65535 (got {value!r})')
        return f"{host}:{int(port)}"

    @property
    def host(self) -> str:
        return (self.listen or DEFAULT_OLLAMA).rpartition(":")[0]

    @property
    def port(self) -> int:
        return int((self.listen or DEFAULT_OLLAMA).rpartition(":")[2])


class Settings(_Section):
    server: ServerSettings = ServerSettings()  # pydantic copies model defaults per instance
    ollama: OllamaSettings = OllamaSettings()
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    database: DatabaseSettings = DatabaseSettings()
    cors: CorsSettings = CorsSettings()
    insecure: bool = False

    @field_validator("server")
    @classmethod
    def _check_host(cls, value: ServerSettings) -> ServerSettings:
        if not value.host:
            raise ValueError("server.host must not be empty")
        return value

    @model_validator(mode="after")
    def _two_listeners(self) -> Settings:
        if self.ollama.listen and self.ollama.port == self.server.port and self.server.port != 0:
            raise ValueError(f"ollama.listen must use another port than server.port ({self.server.port})")
        return self


# environment variable → (section, key); lists are comma-separated
ENV = {
    "ORTLLM_HOST": ("server", "host"),
    "ORTLLM_PORT": ("server", "port"),
    "ORTLLM_MODELS": ("server", "models"),
    "ORTLLM_MAX_QUEUE": ("server", "max_queue"),
    "ORTLLM_GENERATE_TIMEOUT": ("server", "generate_timeout"),
    "ORTLLM_MAX_BODY_BYTES": ("server", "max_body_bytes"),
    "ORTLLM_KEEP_ALIVE": ("server", "keep_alive"),
    "ORTLLM_ACCESS_LOG": ("server", "access_log"),
    "ORTLLM_TRUSTED_PROXIES": ("server", "trusted_proxies"),
    "ORTLLM_API_KEYS": ("auth", "api_keys"),
    "ORTLLM_JWT_SECRET": ("auth", "jwt_secret"),
    "ORTLLM_RATE_LIMIT": ("rate_limit", "per_minute"),
    "ORTLLM_CORS_ORIGINS": ("cors", "origins"),
    "ORTLLM_OLLAMA": ("ollama", "listen"),
    "ORTLLM_DATABASE_URL": ("database", "url"),
    "ORTLLM_RATE_LIMIT_STORAGE": ("rate_limit", "storage_uri"),
}
LIST_KEYS = {("server", "models"), ("auth", "api_keys"), ("cors", "origins")}


def load_settings(
    config: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Layer config.toml (path from the argument or `ORTLLM_CONFIG`), env vars and `overrides`."""
    env = dict(os.environ if env is None else env)
    data: dict[str, Any] = {}
    path = config or env.get("ORTLLM_CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"Config file {path} does not exist") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Config file {path} is not valid TOML: {exc}") from exc
    for var, (section, key) in ENV.items():
        if var in env and env[var] != "":
            value: Any = env[var]
            if (section, key) in LIST_KEYS:
                value = [v.strip() for v in value.split(",") if v.strip()]
            data.setdefault(section, {})[key] = value
    for section, values in (overrides or {}).items():
        if section == "insecure":
            if values is not None:
                data["insecure"] = values
            continue
        for key, value in values.items():
            if value is not None and value != () and value != []:
                data.setdefault(section, {})[key] = list(value) if isinstance(value, tuple) else value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        message = str(err["msg"]).removeprefix("Value error, ")
        raise ConfigError(
            f"Invalid setting {where}: {message}" if where else f"Invalid settings: {message}"
        ) from exc
