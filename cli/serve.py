"""`ortllm serve`: the HTTP server speaking every supported API dialect."""

from __future__ import annotations

import json

import click

from ortllm.settings import load_settings


@click.command()
@click.option("--host", help="Address to bind (default 127.0.0.1: this machine only).")
@click.option("--port", type=int, help="Port (default 8000).")
@click.option("--model", "models", multiple=True, help="Load this model at start (repeatable).")
@click.option("--config", "config", type=click.Path(dir_okay=False), help="config.toml (or ORTLLM_CONFIG).")
@click.option("--max-queue", type=int, help="Requests waiting per model before 503 (default 64).")
@click.option("--keep-alive", type=float, help="Unload a model after this many idle seconds (0 = never).")
@click.option("--generate-timeout", type=float, help="Seconds before TGI-style /generate answers 504 (default 60).")
@click.option("--print-config", is_flag=True, help="Print the effective settings as JSON and exit.")
def serve(host: str | None, port: int | None, models: tuple[str, ...], config: str | None, max_queue: int | None,
          keep_alive: float | None, generate_timeout: float | None, print_config: bool) -> None:  # fmt: skip
    """Serve models over HTTP: native /api, OpenAI /v1, SSE streaming, Swagger UI at /docs.

    \b
    Settings come from config.toml, then ORTLLM_* environment variables, then these flags.
    Example:
      ortllm serve --model smollm2-135m
      curl http://127.0.0.1:8000/api/generate -d '{"model":"smollm2-135m","prompt":"Hi","stream":false}'
    """
    settings = load_settings(config, {"server": {"host": host, "port": port, "models": models,
                                                 "max_queue": max_queue, "keep_alive": keep_alive,
                                                 "generate_timeout": generate_timeout}})  # fmt: skip
    if print_config:
        click.echo(json.dumps(settings.model_dump(), indent=2))
        return
    from ortllm.web.server import serve as run_server

    click.echo(f"ortllm serving on http://{settings.server.host}:{settings.server.port} (docs at /docs)", err=True)
    run_server(settings)


COMMANDS = [serve]
