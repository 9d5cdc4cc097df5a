"""Route declaration shared by the dialect blueprints: parse the body with a pydantic model and record
the route for /openapi.json, so the schemas that validate requests are the ones documented."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

from flask import Blueprint, request
from pydantic import BaseModel

from ortllm.errors import InvalidOptions


@dataclass(frozen=True)
class RouteDoc:
    rule: str
    methods: tuple[str, ...]
    tag: str
    summary: str
    body: type[BaseModel] | None
    response: type[BaseModel] | None
    streams: bool


ROUTES: list[RouteDoc] = []


def read_json() -> Any:
    """The request body as JSON, or a 400 naming what is wrong with it."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise InvalidOptions("Request body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidOptions("Request body is not valid UTF-8") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidOptions(f"Malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc


def parse(model: type[BaseModel]) -> Any:
    data = read_json()
    if not isinstance(data, dict):
        raise InvalidOptions("Request body must be a JSON object")
    return model.model_validate(data)


def api_route(bp: Blueprint, rule: str, methods: tuple[str, ...] = ("GET",), *, tag: str, summary: str,
              body: type[BaseModel] | None = None, response: type[BaseModel] | None = None,
              streams: bool = False, optional_body: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:  # fmt: skip
    """Register a view on `bp`; when `body` is set the view receives the parsed model first."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        ROUTES.append(RouteDoc((bp.url_prefix or "") + rule, methods, tag, summary, body, response, streams))

        @wraps(view)
        def wrapper(**kwargs: Any) -> Any:
            if body is None:
                return view(**kwargs)
            if optional_body and not request.get_data(cache=True).strip():
                return view(body.model_validate({}), **kwargs)
            return view(parse(body), **kwargs)

        bp.add_url_rule(rule, view.__name__, wrapper, methods=list(methods))
        return wrapper

    return decorate


def openapi_spec(title: str, version: str) -> dict[str, Any]:
    """OpenAPI 3.1 from the declared routes and their pydantic models."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    paths: dict[str, Any] = {}
    for route in ROUTES:
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route.rule)
        params = [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
                  for n in re.findall(r"{(\w+)}", path)]  # fmt: skip
        for method in route.methods:
            op: dict[str, Any] = {"tags": [route.tag], "summary": route.summary, "parameters": params,
                                  "responses": {"200": {"description": "OK"}}}  # fmt: skip
            if route.body is not None:
                op["requestBody"] = {
                    "required": True,
                    "content": {"application/json": {"schema": ref(route.body)}},
                }
            content: dict[str, Any] = {}
            if route.response is not None:
                content["application/json"] = {"schema": ref(route.response)}
            if route.streams:  # SSE: a sequence of `data:` events, described per route in its summary
                content["text/event-stream"] = {}
            if content:
                op["responses"]["200"]["content"] = content
            op["responses"]["400"] = {"description": "Bad request (the dialect's error body)"}
            paths.setdefault(path, {})[method.lower()] = op
    return {"openapi": "3.1.0", "info": {"title": title, "version": version}, "paths": paths,
            "components": {"schemas": schemas}}  # fmt: skip
