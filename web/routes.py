"""Route declaration shared by the dialect blueprints: parse the body with a pydantic model and record
the route for /openapi.json, so the schemas that validate requests are the ones documented."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from itertools import accumulate
from typing import Any

from flask import Blueprint, request
from pydantic import BaseModel

from ortllm.errors import InvalidOptions, MalformedJSON

from . import wire as p
from .errors import OLLAMA_PREFIX, dialect_of


@dataclass(frozen=True)
class RouteDoc:
    rule: str
    methods: tuple[str, ...]
    tag: str
    summary: str
    body: type[BaseModel] | None
    response: type[BaseModel] | None
    streams: bool
    optional_body: bool = False


ROUTES: list[RouteDoc] = []


MAX_DEPTH = 64  # no schema here nests deeper than ~5; the stdlib decoder recurses once per level
MAX_INT_DIGITS = 100  # far above any int a field accepts (seed < 2**63), far below Python's 4300-digit limit
_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = re.compile(r"[^\[\]{}]+")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_HUGE_INT_KEY = re.compile(r'"([^"\\]{1,64})"\s*:\s*-?\d{%d}' % (MAX_INT_DIGITS + 1))  # noqa: UP031
_DEPTH_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _too_deep(text: str) -> bool:
    """Whether `text` nests arrays/objects deeper than MAX_DEPTH (a scan, no recursion)."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # the common case: not even that many brackets
        return False
    brackets = _NOT_BRACKETS.sub("", _STRINGS.sub("", text))
    return max(accumulate(map(_DEPTH_STEP.__getitem__, brackets)), default=0) > MAX_DEPTH


def _int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise _HugeInt
    return int(digits)


class _HugeInt(Exception):
    """Raised by the int hook: caught in decode_json, which names the field."""


def _encodable(data: Any) -> bool:
    """Whether every string in `data` is valid Unicode (a C-speed check before looking for where)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _lone_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _nul(text: str) -> bool:
    return "\x00" in text


def _string_path(data: Any, bad: Callable[[str], bool]) -> str | None:
    """Where the first string (or key) for which `bad` holds is, e.g. `messages[0].content`."""
    todo: list[tuple[str, Any]] = [("", data)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            if bad(value):
                return path or "(the body)"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                if bad(key):
                    return f"{path}.{key!a}".lstrip(".")
                todo.append((f"{path}.{key}".lstrip("."), item))
        elif isinstance(value, list):
            todo.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def decode_json(text: str) -> Any:
    """Parse a request body or WebSocket message: stdlib JSON plus the limits above, each a 400 naming it."""
    if _too_deep(text):
        raise MalformedJSON(f"JSON nested too deeply (limit {MAX_DEPTH})")
    try:
        data = json.loads(text, parse_int=_int)  # NaN/Infinity pass: each field's validator names them
    except json.JSONDecodeError as exc:
        raise MalformedJSON(f"Malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from exc
    except _HugeInt:
        key = _HUGE_INT_KEY.search(text)
        where = f" in `{key.group(1)}`" if key else ""
        raise MalformedJSON(f"Integer too large{where}: at most {MAX_INT_DIGITS} digits") from None
    except RecursionError:  # unreachable after _too_deep; kept so no input can make it a 500
        raise MalformedJSON(f"JSON nested too deeply (limit {MAX_DEPTH})") from None
    # \ud800-\udfff escapes decode to lone surrogates, which no encoder (UTF-8, sqlite, tokenizer) accepts
    if _SURROGATE_ESCAPE.search(text) and not _encodable(data):
        where = _string_path(data, _lone_surrogate) or "(the body)"
        raise MalformedJSON(
            f"Lone surrogate (\\ud800-\\udfff without its pair) in `{where}`: not valid Unicode"
        )
    # the tokenizer stops reading at U+0000: whatever follows would be dropped without a word
    if "\\u0000" in text and (nul_at := _string_path(data, _nul)):
        raise MalformedJSON(f"NUL character (\\u0000) in `{nul_at}`: the tokenizer cannot read past it")
    return data


def read_json() -> Any:
    """The request body as JSON, or a 400 naming what is wrong with it."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        raise InvalidOptions("Request body is empty: send a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedJSON(f"Request body is not valid UTF-8 (byte {exc.start})") from exc
    return decode_json(text)


def parse(model: type[BaseModel]) -> Any:
    data = read_json()
    if not isinstance(data, dict):
        raise InvalidOptions("Request body must be a JSON object")
    return model.model_validate(data, strict=True)  # strict: "1" is not 1, as the JSON schema says


def api_route(
    bp: Blueprint,
    rule: str,
    methods: tuple[str, ...] = ("GET",),
    *,
    tag: str,
    summary: str,
    body: type[BaseModel] | None = None,
    response: type[BaseModel] | None = None,
    streams: bool = False,
    optional_body: bool = False,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a view on `bp`; when `body` is set the view receives the parsed model first."""

    def decorate(view: Callable[..., Any]) -> Callable[..., Any]:
        ROUTES.append(
            RouteDoc(
                (bp.url_prefix or "") + rule, methods, tag, summary, body, response, streams, optional_body
            )
        )

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


@dataclass(frozen=True)
class DocPolicy:
    """What this server enforces beyond the schemas: written into /openapi.json so it says the truth."""

    # server settings that bound fields (protocol.LIMIT_MARK), e.g. max_tokens_limit
    limits: dict[str, int] = field(default_factory=dict)
    auth: bool = False  # 401 (and 429 for repeated wrong keys) on every route but the open ones
    rate_limited: bool = False  # 429 past the per-minute budget
    open_prefixes: tuple[str, ...] = ()  # routes that never ask for a key
    protect_metrics: bool = False


STATUS_TEXT = {
    400: "Invalid request: malformed JSON or a field out of range (the message names it)",
    401: "Missing or wrong API key",
    404: "No such model, session or route",
    413: "Request body too large (server.max_body_bytes), or more work than the server's limits",
    429: "Rate limit exceeded (see Retry-After)",
    503: "The server is shutting down, or (as the route applies) the model is busy (see Retry-After), "
    "cannot load or was unloaded mid-answer, or the sessions database is unusable",
    504: "Generation timed out",
}
# body fields that name a model or a session: an unknown one answers 404, and a model may be busy (503)
REFERENCES = {"model", "model_id", "model-name", "model_name", "session_id", "session-id", "requests"}


def _success_status(summary: str) -> int:
    """A non-200 success status stated in the route's summary, e.g. 'Delete a session (204)'."""
    found = re.search(r"\((2\d\d)\)", summary)
    return int(found.group(1)) if found else 200


def _error_statuses(route: RouteDoc, params: list[str], policy: DocPolicy) -> set[int]:
    """The error statuses a route can answer, from what it takes and the server's policy."""
    fields = set(route.body.model_json_schema(by_alias=True).get("properties", {})) if route.body else set()
    uses_model = bool(fields & REFERENCES) or any(n.startswith("model") for n in params)
    statuses = {int(n) for n in re.findall(r"\b([45]\d\d)\b", route.summary)}  # stated: "504 after..."
    if route.body is not None or params:
        statuses.add(400)
    if route.body is not None:
        statuses.add(413)
    if uses_model or params:
        statuses.add(404)
    statuses.add(503)  # every route refuses requests once shutdown has begun (web/server.py)
    is_open = route.rule.startswith(policy.open_prefixes) and route.rule != "/"
    if policy.auth and not is_open and (route.rule != "/metrics" or policy.protect_metrics):
        statuses |= {401, 429}
    if policy.rate_limited and not is_open and route.rule != "/metrics":
        statuses.add(429)
    return statuses


NO_NUL = (
    "No string in a request body may contain the NUL character U+0000: it is refused with a 400 naming the "
    "field, because the tokenizer stops reading there."
)


def openapi_spec(title: str, version: str, policy: DocPolicy | None = None) -> dict[str, Any]:
    """OpenAPI 3.1 from the declared routes and their pydantic models, with the statuses each can answer."""
    policy = policy or DocPolicy()
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, str]:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error_bodies: dict[str, type[BaseModel]] = {
        "openai": p.OpenAIError,
        "anthropic": p.AnthropicError,
        "spec": p.SpecError,
        "rust": p.RustError,
        "detail": p.DetailError,
    }
    paths: dict[str, Any] = {}
    for route in ROUTES:
        if route.rule.startswith(OLLAMA_PREFIX):  # served on the Ollama listener, not on this port
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", route.rule)
        names = re.findall(r"{(\w+)}", path)
        params = [{"name": n, "in": "path", "required": True, "schema": _param_schema(n)} for n in names]
        error = {"application/json": {"schema": ref(error_bodies[dialect_of(route.rule)])}}
        for method in route.methods:
            success = _success_status(route.summary)
            ok: dict[str, Any] = {"description": "OK"}
            op: dict[str, Any] = {
                "tags": [route.tag],
                "summary": route.summary,
                "parameters": params,
                "responses": {str(success): ok},
            }
            if route.body is not None:
                op["requestBody"] = {
                    "required": not route.optional_body,
                    "content": {"application/json": {"schema": ref(route.body)}},
                }
            content: dict[str, Any] = {}
            if route.response is not None:
                content["application/json"] = {"schema": ref(route.response)}
            elif route.streams and route.body is not None and "stream" in route.body.model_fields:
                content["application/json"] = {}  # `"stream": false` answers one JSON object
            if route.streams:  # SSE: a sequence of `data:` events, described per route in its summary
                content["text/event-stream"] = {}
            if content and success != 204:
                ok["content"] = content
            for status in sorted(_error_statuses(route, names, policy)):
                op["responses"][str(status)] = {
                    "description": STATUS_TEXT.get(status, "Error"),
                    "content": error,
                }
            if policy.auth and "401" in op["responses"]:
                op["security"] = [{"bearer": []}]
            paths.setdefault(path, {})[method.lower()] = op
    components: dict[str, Any] = {"schemas": schemas}
    if policy.auth:
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    _write_limits(schemas, policy)
    info = {"title": title, "version": version, "description": NO_NUL}
    return {"openapi": "3.1.0", "info": info, "paths": paths, "components": components}


def _param_schema(name: str) -> dict[str, Any]:
    """A path parameter's schema: session ids have one pattern everywhere (ortllm.sessions.ID_PATTERN)."""
    if name == "session_id":
        return {"type": "string", "pattern": p.SESSION_ID_PATTERN}
    return {"type": "string"}


def _write_limits(node: Any, policy: DocPolicy) -> None:
    """Replace each protocol.LIMIT_MARK [keyword, setting] by `keyword: <this server's setting>`, in place."""
    if isinstance(node, dict):
        mark = node.pop(p.LIMIT_MARK, None)
        if mark and mark[1] in policy.limits:
            node[mark[0]] = policy.limits[mark[1]]
        for value in node.values():
            _write_limits(value, policy)
    elif isinstance(node, list):
        for value in node:
            _write_limits(value, policy)
