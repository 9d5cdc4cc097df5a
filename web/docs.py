"""`/openapi.json` from the routes' pydantic schemas and the server's limits; Swagger UI at `/docs`."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from flask_swagger_ui import get_swaggerui_blueprint

from ortllm import __version__

from .routes import DocPolicy, openapi_spec
from .security import OPEN_PREFIXES, auth_enabled, rate_per_minute
from .services import MAX_STOP_STRINGS, services

bp = Blueprint("openapi", __name__)
swagger = get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "ortllm API"})


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
    return jsonify(openapi_spec("ortllm", __version__, policy))
