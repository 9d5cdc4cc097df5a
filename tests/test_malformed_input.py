"""Malformed bodies get a 400 naming the problem in each dialect's error body, never a 500 (issue 13 item 3):
deep nesting, lone surrogates, huge integers, header-breaking session ids and model names, over HTTP and
on the WebSocket; 405 answers carry `Allow`."""

from __future__ import annotations

import json
import time

import pytest
import requests
from simple_websocket import Client, ConnectionClosed

from ortllm.errors import MalformedJSON
from ortllm.web.routes import MAX_DEPTH, decode_json
from tests.conftest import DEFAULT_MODEL

M = DEFAULT_MODEL
DEEP = "[" * 100_000 + "]" * 100_000
DEEP_TEXT = "JSON nested too deeply (limit 64)"


def post(server, path: str, text: str) -> requests.Response:
    """POST `text` as is (escapes like \\ud800 stay escapes, as curl sends them)."""
    return requests.post(
        f"{server.url}{path}", data=text.encode(), timeout=60, headers={"Content-Type": "application/json"}
    )


def raw_json(body: dict, **raw: str) -> str:
    """`body` as JSON with `raw` values spliced in unquoted (a 5000-digit integer) and \\uXXXX kept as escapes."""
    text = json.dumps({**body, **{k: f"@{k}@" for k in raw}}).replace("\\\\u", "\\u")
    for key, value in raw.items():
        text = text.replace(f'"@{key}@"', value)
    return text


def message(response: requests.Response) -> str:
    """The error message of any dialect's error body."""
    body = response.json()
    if "detail" in body:
        return body["detail"]
    error = body["error"]
    return error if isinstance(error, str) else error["message"]


# each dialect's shape, so a 400 is in the body its clients parse
SHAPES = {
    "/api/chat": {"detail"},
    "/api/generate": {"detail"},
    "/api/sessions": {"detail"},
    "/v1/chat/completions": {"error"},
    "/api/v1/generate": {"error"},
    "/chat/completions": {"error"},
}


def assert_400(response: requests.Response, path: str, *parts: str) -> None:
    assert response.status_code == 400, (response.status_code, response.text[:300])
    assert set(response.json()) == SHAPES[path]
    if path.startswith("/v1/"):
        assert response.json()["error"]["type"] == "invalid_request_error"
    if path.startswith("/api/v1/"):
        assert response.json()["error"]["code"] == "INVALID_REQUEST"
    for part in parts:
        assert part in message(response), message(response)


@pytest.mark.parametrize("path", list(SHAPES))
def test_deep_nesting_is_400(server, path):
    started = time.monotonic()
    assert_400(post(server, path, DEEP), path, DEEP_TEXT)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    "path, body, where",
    [
        (
            "/api/chat",
            {"model": M, "messages": [{"role": "user", "content": "a\\ud800b"}]},
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            {"model": M, "messages": [{"role": "user", "content": "a\\ud800b"}]},
            "messages[0].content",
        ),
        ("/api/sessions", {"title": "\\ud800"}, "title"),
        ("/api/generate", {"model": "\\ud800", "prompt": "hi"}, "model"),
        ("/chat/completions", {"model-name": M, "prompt": "hi", "session-id": "abc\\udfff"}, "session-id"),
        ("/api/v1/generate", {"prompt": "\\udc00 alone"}, "prompt"),
    ],
)
def test_lone_surrogate_is_400_naming_the_field(server, path, body, where):
    assert_400(post(server, path, raw_json(body)), path, "Lone surrogate", f"`{where}`")


@pytest.mark.parametrize(
    "path, field",
    [
        ("/api/v1/generate", "max_tokens"),
        ("/v1/chat/completions", "max_tokens"),
        ("/chat/completions", "max-token"),
    ],
)
def test_huge_integer_is_400_naming_the_field(server, path, field):
    bodies = {
        "/api/v1/generate": {"prompt": "hi"},
        "/chat/completions": {"model-name": M, "prompt": "hi"},
        "/v1/chat/completions": {"model": M, "messages": [{"role": "user", "content": "hi"}]},
    }
    text = raw_json(bodies[path], **{field: "9" * 5000})
    assert_400(post(server, path, text), path, f"Integer too large in `{field}`")


def test_session_id_cannot_inject_a_header(server):
    body = {"model-name": M, "prompt": "hi", "session-id": "abc\r\nX-Injected: 1"}
    response = post(server, "/chat/completions", json.dumps(body))
    assert_400(response, "/chat/completions", "session")
    assert "X-Injected" not in response.headers
    response = post(
        server,
        "/api/chat",
        json.dumps(
            {
                "model": M,
                "session_id": "a\nb",
                "stream": False,
                "messages": [{"role": "user", "content": "hi"}],
            }
        ),
    )
    assert_400(response, "/api/chat", "session")


@pytest.mark.parametrize("name", ["smollm2\r\nX-Injected: 1", "a\\ud800", "../../etc/passwd"])
@pytest.mark.parametrize("path", ["/api/generate", "/v1/chat/completions", "/chat/completions"])
def test_odd_model_names_are_4xx(server, path, name):
    body = {
        "/api/generate": {"model": name, "prompt": "hi", "stream": False},
        "/v1/chat/completions": {"model": name, "messages": [{"role": "user", "content": "hi"}]},
        "/chat/completions": {"model-name": name, "prompt": "hi"},
    }[path]
    response = post(server, path, raw_json(body))
    assert response.status_code in (400, 404), response.text[:300]
    assert set(response.json()) == SHAPES[path] and "X-Injected" not in response.headers


def test_nan_and_non_object_bodies_are_400(server):
    text = '{"prompt":"hi","temperature":NaN}'  # not JSON, but Python's dialect: the field's check names it
    assert_400(
        post(server, "/api/v1/generate", text), "/api/v1/generate", "temperature must be a finite number"
    )
    assert_400(post(server, "/api/chat", "[1, 2]"), "/api/chat", "JSON object")
    assert_400(post(server, "/api/chat", '{"model": "x", '), "/api/chat", "Malformed JSON")


def test_what_is_within_the_limits_still_passes(server):
    """64 levels, a surrogate pair (one emoji) and a 100-digit integer in an unknown field are fine:
    the request gets past the decoder to the model lookup (404)."""
    nested = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    text = raw_json({"model": "no-such-model", "prompt": "\\ud83d\\ude00"}, extra=nested, n="9" * 100)
    response = post(server, "/api/generate", text)
    assert response.status_code == 404, response.text[:300]


def test_405_carries_allow(server):
    response = requests.request("TRACE", f"{server.url}/api/chat", timeout=30)
    assert response.status_code == 405 and response.json() == {
        "detail": "Method TRACE not allowed on /api/chat"
    }
    assert {m.strip() for m in response.headers["Allow"].split(",")} >= {"POST", "OPTIONS"}
    response = requests.put(f"{server.url}/v1/chat/completions", timeout=30)
    assert response.status_code == 405 and "POST" in response.headers["Allow"]
    assert response.json()["error"]["message"] == "Method PUT not allowed on /v1/chat/completions"


@pytest.mark.parametrize(
    "text, expected",
    [
        (DEEP, f"__ERROR__:{DEEP_TEXT}"),
        (raw_json({"model-name": M, "prompt": "a\\ud800b"}), "__ERROR__:Lone surrogate"),
        (
            raw_json({"model-name": M, "prompt": "hi"}, **{"max-token": "9" * 5000}),
            "__ERROR__:Integer too large",
        ),
    ],
)
def test_websocket_answers_malformed_messages_with_an_error_frame(server, text, expected):
    ws = Client.connect(server.url.replace("http://", "ws://") + "/chat/ws")
    ws.send(text)
    frames = []
    try:
        while (frame := ws.receive(30)) is not None:
            frames.append(frame)
    except ConnectionClosed:
        pass
    assert len(frames) == 1 and frames[0].startswith(expected), frames


# ---- the decoder itself -----------------------------------------------------------------------


def test_decoder_scans_depth_without_recursing_and_ignores_brackets_in_strings():
    assert decode_json('{"a":"' + "[" * 10_000 + '"}') == {"a": "[" * 10_000}
    assert decode_json('{"a":"\\"' + "{" * 100 + '"}')["a"].startswith('"{')
    started = time.monotonic()
    for text in ("[" * 500_000 + "]" * 500_000, "[" + "[1]," * 250_000 + "[1]]"):  # 1 MiB each
        try:
            decode_json(text)
        except MalformedJSON as exc:
            assert str(exc) == DEEP_TEXT
    assert time.monotonic() - started < 2


def test_decoder_names_each_problem():
    cases = {
        '{"a": {"b": ["x", "\\udbff"]}}': "Lone surrogate (\\ud800-\\udfff without its pair) in `a.b[1]`",
        '{"seed": -%s}' % ("1" * 101): "Integer too large in `seed`: at most 100 digits",
    }
    for text, expected in cases.items():
        with pytest.raises(MalformedJSON) as info:
            decode_json(text)
        assert str(info.value).startswith(expected), str(info.value)
    assert decode_json('"\\ud83d\\ude00"') == "\U0001f600"


# ---- inputs the runtime cannot take: refused up front, never a 500 ----------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/embeddings", {"model": M, "input": ["\u0000abc"]}),
        ("/v1/embeddings", {"model": M, "input": "abc\u0000def"}),
        ("/api/chat", {"model": M, "stream": False, "messages": [{"role": "user", "content": "a\u0000b"}]}),
        ("/v1/chat/completions", {"model": M, "messages": [{"role": "user", "content": "\u0000"}]}),
    ],
)
def test_a_nul_character_is_refused_not_silently_cut(server, path, body):
    """The tokenizer stops reading at U+0000: text after it would be dropped without a word."""
    r = requests.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert "NUL character (\\u0000)" in message(r)


@pytest.mark.parametrize("stream", [False, True])
def test_a_json_schema_the_grammar_cannot_take_is_a_400(server, stream):
    body = {
        "model": M,
        "max_tokens": 8,
        "stream": stream,
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "frobnicate"}},
        },
    }
    r = requests.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format" and "frobnicate" in message(r)
