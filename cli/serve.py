"""`ortllm serve`: the HTTP server speaking every supported API dialect."""

from __future__ import annotations

import json

import click

from ortllm.sessions import SessionStore
from ortllm.settings import DEFAULT_OLLAMA, load_settings


@click.command()
@click.option("--host", help="Address to bind (default 127.0.0.1: this machine only).")
@click.option("--port", type=int, help="Port (default 8000).")
@click.option("--model", "models", multiple=True, help="Load this model at start (repeatable).")
@click.option("--config", "config", type=click.Path(dir_okay=False), help="config.toml (or ORTLLM_CONFIG).")
@click.option("--max-queue", type=int, help="Requests waiting per model before 503 (default 64).")
@click.option("--keep-alive", type=float, help="Unload a model after this many idle seconds (0 = never).")
@click.option(
    "--generate-timeout",
    type=float,
    help="Seconds before the orchestrator dialect's /generate answers 504 (default 60).",
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    help="Require this key as 'Authorization: Bearer KEY' (repeatable; NAME:KEY names it in logs).",
)
@click.option(
    "--rate-limit",
    type=int,
    help="Requests per minute per key or IP (0 = off; default 60 with auth "
    "or a non-loopback host, else off).",
)
@click.option(
    "--insecure", is_flag=True, default=None, help="Allow a non-loopback host without authentication."
)
@click.option(
    "--ollama",
    "ollama",
    is_flag=False,
    flag_value=DEFAULT_OLLAMA,
    default=None,
    metavar="[HOST:]PORT",
    help=f"Also serve Ollama's API (and /v1) here, for Ollama's clients (alone: {DEFAULT_OLLAMA}).",
)
@click.option("--quiet", is_flag=True, help="No access log line per request (server.access_log = false).")
@click.option("--print-config", is_flag=True, help="Print the effective settings as JSON and exit.")
def serve(
    host: str | None,
    port: int | None,
    models: tuple[str, ...],
    config: str | None,
    max_queue: int | None,
    keep_alive: float | None,
    generate_timeout: float | None,
    api_keys: tuple[str, ...],
    rate_limit: int | None,
    insecure: bool | None,
    ollama: str | None,
    quiet: bool,
    print_config: bool,
) -> None:
    """Serve models over HTTP: native /api, OpenAI /v1, SSE streaming, Swagger UI at /docs; with
    --ollama, Ollama's API on a second port for Ollama's clients.

    \b
    Settings come from config.toml, then ORTLLM_* environment variables, then these flags.
    Example:
      ortllm serve --model smollm2-135m
      curl http://127.0.0.1:8000/api/generate -d '{"model":"smollm2-135m","prompt":"Hi","stream":false}'
    """
    settings = load_settings(
        config,
        {
            "server": {
                "host": host,
                "port": port,
                "models": models,
                "max_queue": max_queue,
                "keep_alive": keep_alive,
                "generate_timeout": generate_timeout,
                "access_log": False if quiet else None,
            },
            "auth": {"api_keys": api_keys},
            "rate_limit": {"per_minute": rate_limit},
            "ollama": {"listen": ollama},
            "insecure": insecure,
        },
    )
    if print_config:
        shown = settings.model_dump()
        shown["auth"]["api_keys"] = [
            k.partition(":")[0] + ":***" if ":" in k else "***" for k in settings.auth.api_keys
        ]
        shown["auth"]["jwt_secret"] = "***" if settings.auth.jwt_secret else None
        if settings.database.url:  # a database URL may carry a password
            from ortllm.db import redact

            shown["database"]["url"] = redact(settings.database.url)
        click.echo(json.dumps(shown, indent=2))
        return
    from ortllm.runtime.loaded import check_runtime_env
    from ortllm.web.security import check_exposure, load_keys
    from ortllm.web.server import check_ports
    from ortllm.web.server import serve as run_server

    check_runtime_env()  # ORTLLM_KV_CACHE, ORTLLM_PREFILL, ORTLLM_SPECULATION, ORTLLM_BATCHER: one line if wrong
    check_exposure(settings)
    load_keys(settings)  # a bad key file or a too-short key fails here, before binding
    SessionStore(
        url=settings.database.url
    ).check()  # a corrupt or read-only sessions database fails here, in one line, before the banner
    check_ports(settings)  # a port in use is one line, not a banner then gunicorn's retries

    click.echo(
        f"ortllm serving on http://{settings.server.host}:{settings.server.port} "
        "(a browser chat at /, API docs at /docs)",
        err=True,
    )
    if settings.ollama.listen:
        click.echo(
            f"Ollama's API on http://{settings.ollama.host}:{settings.ollama.port} (and /v1 there too)",
            err=True,
        )
    run_server(settings)


COMMANDS = [serve]
