"""The /api/v1 dialect, one test per client example it supports: generate with
latency, the {token, finished} stream, models, load, batch generation. Errors are {"error": {code, ...}}."""

from __future__ import annotations

import json
import re

import requests

from ortllm.runtime.registry import ModelRegistry
from ortllm.sessions import SessionStore
from ortllm.settings import Settings
from ortllm.store import ModelStore
from ortllm.web.app import create_app
from tests.conftest import DEFAULT_MODEL, sse_events

M = DEFAULT_MODEL
QUESTION = "Please explain the concept of artificial intelligence"


def error_of(r: requests.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    return body["error"]


def test_generate_example(server):
    r = requests.post(
        server.url + "/api/v1/generate",
        json={"prompt": QUESTION, "model": M, "max_tokens": 512, "temperature": 0.7, "stream": False},
    )
    body = r.json()
    assert r.status_code == 200 and set(body) == {"text", "usage", "latency"} and body["text"]
    u = body["usage"]
    assert (
        u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] and 0 < u["completion_tokens"] <= 512
    )
    assert isinstance(body["latency"], float) and body["latency"] > 0


def test_python_client_example_with_the_default_model(server):
    """A client that sends model="default" gets the server's default (the first loaded model)."""

    def generate_text(prompt, model="default"):
        payload = {"prompt": prompt, "model": model, "max_tokens": 512, "temperature": 0.7}
        return requests.post(server.url + "/api/v1/generate", json=payload).json()

    assert generate_text("Write a poem about spring")["text"]
    r = requests.post(server.url + "/api/v1/generate", json={"prompt": "Hi", "max_tokens": 5})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 5


def test_stream_example(server):
    body = {"prompt": QUESTION, "model": M, "max_tokens": 40, "temperature": 0}
    with requests.post(
        server.url + "/api/v1/generate/stream",
        json=body,
        stream=True,
        headers={"Accept": "text/event-stream"},
    ) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(r)
    assert all(e["finished"] is False and e["token"] for e in events[:-1])
    last = events[-1]
    assert last["finished"] is True and last["token"] and last["usage"]["completion_tokens"] == 40
    whole = requests.post(server.url + "/api/v1/generate", json=body).json()["text"]
    assert "".join(e["token"] for e in events) == whole


def test_javascript_stream_client(server):
    """A JavaScript client parses each chunk after stripping 'data: ': every event is one JSON object."""
    with requests.post(
        server.url + "/api/v1/generate/stream",
        json={"prompt": "Hello", "max_tokens": 20},
        headers={"Accept": "text/event-stream"},
        stream=True,
    ) as r:
        raw = b"".join(r.iter_content(chunk_size=None)).decode()
    data = [json.loads(block.replace("data: ", "")) for block in raw.split("\n\n") if block]
    assert [d["finished"] for d in data] == [False] * (len(data) - 1) + [True]


def test_generate_with_stream_true_streams(server):
    with requests.post(
        server.url + "/api/v1/generate",
        json={"prompt": "Hello", "max_tokens": 5, "stream": True},
        stream=True,
    ) as r:
        events = sse_events(r)
    assert events[-1]["finished"] is True and events[-1]["usage"]["completion_tokens"] <= 5


def test_list_models(server):
    models = requests.get(server.url + "/api/v1/models").json()["models"]
    assert len(models) == 1
    m = models[0]
    assert m["name"] == M and m["format"] == "onnx" and m["loaded"] is True and m["quantization"] == "int4"
    assert re.fullmatch(r"\d+MB", m["size"]) and 50 < int(m["size"][:-2]) < 150
    assert m["memory_usage"] == m["size"]


def test_load_example(server):
    r = requests.post(
        f"{server.url}/api/v1/models/{M}/load", json={"quantization": "q4_0", "prefer_gpu": False}
    )
    assert r.status_code == 200 and r.json()["loaded"] is True and r.json()["device"] == "cpu"
    r = requests.post(f"{server.url}/api/v1/models/{M}/load", json={"prefer_gpu": True})  # no GPU build: cpu
    assert r.status_code == 200 and r.json()["device"] == "cpu"
    assert requests.post(f"{server.url}/api/v1/models/{M}/load").json()["name"] == M
    r = requests.post(f"{server.url}/api/v1/models/{M}/load", json={"quantization": "fp16"})
    assert r.status_code == 400
    assert error_of(r) == {
        "code": "INVALID_REQUEST",
        "message": f"Model '{M}' has no fp16 build (it has: int4)",
        "details": "The routes and their request schemas are described at /docs",
    }


def test_batch_example(server):
    body = {
        "requests": [{"prompt": "Question 1", "max_tokens": 100}, {"prompt": "Question 2", "max_tokens": 150}]
    }
    results = requests.post(server.url + "/api/v1/batch/generate", json=body).json()["results"]
    assert len(results) == 2 and all(r["text"] and r["usage"]["total_tokens"] > 0 for r in results)
    assert results[0]["usage"]["completion_tokens"] <= 100 and results[1]["usage"]["completion_tokens"] <= 150


def test_batch_results_keep_request_order(server):
    prompts = [
        "Write a long essay about the ocean.",
        "Count from one to twenty, separating the numbers with commas.",
        "Explain in detail how computers work.",
    ]
    sizes = [7, 3, 11]
    single = [
        requests.post(server.url + "/api/v1/generate", json={"prompt": p, "max_tokens": 1}).json()["usage"]
        for p in prompts
    ]
    body = {
        "requests": [
            {"prompt": p, "max_tokens": n, "temperature": 0, "model": M}
            for p, n in zip(prompts, sizes, strict=True)
        ]
    }
    results = requests.post(server.url + "/api/v1/batch/generate", json=body).json()["results"]
    assert [r["usage"]["prompt_tokens"] for r in results] == [u["prompt_tokens"] for u in single]
    assert [r["usage"]["completion_tokens"] for r in results] == sizes
    assert all(r["latency"] > 0 for r in results)


def test_errors_are_error_objects(server):
    r = requests.post(server.url + "/api/v1/generate", json={"prompt": "x", "model": "qwen-7b-chat"})
    assert r.status_code == 404 and error_of(r)["code"] == "MODEL_NOT_FOUND"
    assert "ortllm pull NAME" in error_of(r)["details"]  # what to do about it, not only what went wrong
    assert error_of(r)["message"].startswith("Model 'qwen-7b-chat' not found")
    r = requests.post(server.url + "/api/v1/models/llama-2-7b-chat/load", json={})
    assert r.status_code == 404 and error_of(r)["code"] == "MODEL_NOT_FOUND"
    r = requests.post(server.url + "/api/v1/generate", json={"prompt": "x", "temperature": 3})
    assert r.status_code == 400
    assert error_of(r) == {
        "code": "INVALID_REQUEST",
        "message": "temperature must be between 0.0 and 2.0",
        "details": "The routes and their request schemas are described at /docs",
    }
    r = requests.post(
        server.url + "/api/v1/generate", data="{bad", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and error_of(r)["message"].startswith("Malformed JSON")
    r = requests.post(server.url + "/api/v1/generate", json={"model": M})
    assert r.status_code == 400 and error_of(r)["message"] == "Missing required field: prompt"
    assert error_of(r)["details"].startswith("Check `prompt`")
    r = requests.get(server.url + "/api/v1/nowhere")
    assert r.status_code == 404 and error_of(r)["details"] == "The routes are listed at /docs"
    r = requests.post(server.url + "/api/v1/batch/generate", json={"requests": []})
    assert r.status_code == 400 and error_of(r)["code"] == "INVALID_REQUEST"
    r = requests.post(
        server.url + "/api/v1/batch/generate", json={"requests": [{"prompt": "a"}, {"prompt": "b " * 9000}]}
    )
    assert r.status_code == 400 and error_of(r)["code"] == "CONTEXT_LENGTH_EXCEEDED"
    assert error_of(r)["message"] == "requests[1]: Prompt too long for context window (8192 tokens)"
    r = requests.get(server.url + "/api/v1/nothing")
    assert r.status_code == 404 and error_of(r)["code"] == "NOT_FOUND"


def test_model_not_loaded(tmp_path):
    """With nothing loaded and the catalog default not installed, a request without a model says so."""
    app = create_app(
        Settings(), registry=ModelRegistry(ModelStore(tmp_path)), sessions=SessionStore(tmp_path / "s.db")
    )
    r = app.test_client().post("/api/v1/generate", json={"prompt": "Hello"})
    assert r.status_code == 503 and r.json["error"]["code"] == "MODEL_NOT_LOADED"
    assert r.json["error"]["details"].startswith(
        "Please call the load endpoint first"
    )  # the wording clients of this dialect match on
