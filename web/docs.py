"""`/openapi.json` generated from the routes' pydantic schemas, and Swagger UI at `/docs` (bundled, no CDN)."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from flask_swagger_ui import get_swaggerui_blueprint

from ortllm import __version__

from .routes import openapi_spec

bp = Blueprint("openapi", __name__)
swagger = get_swaggerui_blueprint("/docs", "/openapi.json", config={"app_name": "ortllm API"})


@bp.get("/openapi.json")
def openapi() -> Response:
    return jsonify(openapi_spec("ortllm", __version__))
