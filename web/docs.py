"""`/openapi.json` from the routes' pydantic schemas and the server's limits; Swagger UI at `/docs`."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify
from flask_swagger_ui import get_swaggerui_blueprint

from ortllm import __version__
from ortllm.catalog import load_catalog

from .routes import DocPolicy, openapi_spec
from .security import OPEN_PREFIXES, auth_enabled, rate_per_minute
from .services import MAX_STOP_STRINGS, services

bp = Blueprint("openapi", __name__)
swagger = get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "ortllm API"})

MODEL = "{model}"  # replaced by a model this server has, so "Try it out" never answers 404
QUESTION = "What is the capital of France?"
CHAT = [{"role": "user", "content": QUESTION}]
# a body that works as is for each documented request body (Swagger's own would send "string")
EXAMPLES: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/api/chat"): {"model": MODEL, "messages": CHAT, "stream": False},
    ("post", "/api/generate"): {"model": MODEL, "prompt": "Once upon a time", "raw": True, "stream": False},
    ("post", "/api/embeddings"): {"model": MODEL, "input": "Hello world"},
    ("post", "/v1/chat/completions"): {"model": MODEL, "messages": CHAT, "max_tokens": 50},
    ("post", "/v1/completions"): {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 50},
    ("post", "/v1/embeddings"): {"model": MODEL, "input": "Hello world"},
    ("post", "/v1/responses"): {"model": MODEL, "input": QUESTION, "max_output_tokens": 50},
    ("post", "/v1/messages"): {"model": MODEL, "messages": CHAT, "max_tokens": 50},
    ("post", "/v1/messages/count_tokens"): {"model": MODEL, "messages": CHAT},
    ("post", "/generate"): {"model_id": MODEL, "prompt": QUESTION, "max_new_tokens": 50},
    ("post", "/completions"): {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 50},
    ("post", "/chat/completions"): {"model-name": MODEL, "prompt": QUESTION, "max-token": 50},
    ("post", "/chat/history/{session_id}/rollback"): {"amount": 1},
    ("post", "/api/v1/generate"): {"model": MODEL, "prompt": QUESTION, "max_tokens": 50},
    ("post", "/api/v1/generate/stream"): {"model": MODEL, "prompt": QUESTION, "max_tokens": 50},
    ("post", "/api/v1/batch/generate"): {
        "requests": [
            {"model": MODEL, "prompt": QUESTION, "max_tokens": 20},
            {"model": MODEL, "prompt": "Name a colour.", "max_tokens": 20},
        ]
    },
    ("post", "/api/v1/models/{model_name}/load"): {"prefer_gpu": False},
    ("post", "/api/sessions"): {"title": "My chat", "model": MODEL},
    ("patch", "/api/sessions/{session_id}"): {"title": "Renamed chat"},
    ("post", "/api/sessions/{session_id}/messages"): {
        "messages": [
            {"role": "user", "content": "Tell me a long story."},
            {"role": "assistant", "content": "Once upon a time", "stopped": True},
        ]
    },
}
MODEL_PARAMS = {"model_id", "model_name", "model"}  # path parameters that name a model
TOKEN_FIELDS = {"max_tokens", "max-token", "max_new_tokens", "max_output_tokens"}


def example_model() -> str:
    """The model the examples name: the first one loaded at start, else the first installed, else the default."""
    svc = services()
    if svc.settings.server.models:
        return svc.settings.server.models[0]
    installed = svc.installed()
    return installed[0].name if installed else load_catalog().default


def _fill(value: Any, model: str, max_tokens: int) -> Any:
    """The example with this server's model, its token counts within this server's max_tokens_limit."""
    if value == MODEL:
        return model
    if isinstance(value, dict):
        return {
            k: min(v, max_tokens) if k in TOKEN_FIELDS else _fill(v, model, max_tokens)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_fill(v, model, max_tokens) for v in value]
    return value


def add_examples(spec: dict[str, Any], model: str, max_tokens: int) -> None:
    """Write a working example into each request body and model path parameter, in place."""
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for param in op.get("parameters", []):
                if param["name"] in MODEL_PARAMS:
                    param["example"] = model
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is not None and (method, path) in EXAMPLES:
                body["example"] = _fill(EXAMPLES[method, path], model, max_tokens)


@bp.get("/openapi.json")
def openapi() -> Response:
    settings = services().settings
    auth = auth_enabled(settings)
    policy = DocPolicy(
        limits={
            **{k: v for k, v in settings.server.model_dump().items() if isinstance(v, int)},
            "max_stop_strings": MAX_STOP_STRINGS,  # the runtime's bound, not a setting
        },
        auth=auth,
        rate_limited=rate_per_minute(settings) > 0,
        open_prefixes=OPEN_PREFIXES,
        protect_metrics=auth and settings.auth.protect_metrics is not False,
    )
    spec = openapi_spec("ortllm", __version__, policy)
    add_examples(spec, example_model(), settings.server.max_tokens_limit)
    return jsonify(spec)
