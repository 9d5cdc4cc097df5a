"""The native dialect (/api/*), one test per client example it supports, against a live server."""

from __future__ import annotations

import json
import threading
import time

import httpx
import numpy as np
import requests

from tests.conftest import DEFAULT_MODEL, sse_events

M = DEFAULT_MODEL
GREEDY = {"temperature": 0}


def test_root(server):
    body = requests.get(server.url + "/").json()
    assert body["name"] == "ortllm" and body["status"] == "running" and body["version"]
    assert body["models_available"] == 1
    assert (
        body["message"] == "LLM Inference API" and M in body["models"] and body["running_containers"] == [M]
    )


def test_health(server):
    body = requests.get(server.url + "/health").json()
    assert body["status"] == "healthy" and body["model_loaded"] is True
    assert body["memory_usage"].endswith("GB") and "/" in body["memory_usage"]
    assert body["active_connections"] >= 1 and body["uptime"] >= 0 and body["timestamp"].endswith("Z")


def test_list_models(server):
    models = requests.get(server.url + "/api/models").json()["models"]
    assert [m["name"] for m in models] == [M]
    m = models[0]
    assert m["family"] == "llama" and m["quantization"] == "int4" and m["context_size"] == 8192
    assert m["template"] == "chatml" and m["parameters"]["temperature"] == 0.7 and m["loaded"] is True
    assert 50 < m["size_mb"] < 150 and m["ep"] == "cpu"


def test_model_details_and_alias(server):
    body = requests.get(server.url + "/api/models/smollm2").json()
    assert body["name"] == M and body["parameters"]["top_p"] == 0.9


def test_unknown_model_404_lists_available(server):
    r = requests.get(server.url + "/api/models/gpt-4")
    assert r.status_code == 404
    assert r.json() == {"detail": f"Model 'gpt-4' not found. Available models: {M}"}
    r = requests.post(
        server.url + "/api/generate",
        json={"model": "tinyllama-1.1b", "prompt": "Hello, world!", "stream": False},
    )
    assert r.status_code == 404 and "Model 'tinyllama-1.1b' not found. Available models" in r.json()["detail"]


def test_unload_and_load(server):
    r = requests.post(f"{server.url}/api/models/{M}/unload")
    assert r.json() == {"status": "success", "message": f"Model '{M}' unloaded"}
    assert requests.get(f"{server.url}/api/models/{M}").json()["loaded"] is False
    r = requests.post(f"{server.url}/api/models/{M}/load")
    assert r.json() == {"status": "success", "message": f"Model '{M}' loaded"}
    assert requests.get(f"{server.url}/api/models/{M}").json()["loaded"] is True


def test_chat_streaming_example(server):
    """A streamed chat: system + user, optional session id, stream true, options."""
    body = {
        "model": M,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Hello!"},
        ],
        "session_id": "optional-session-id",
        "stream": True,
        "options": {"temperature": 0.7, "top_p": 0.9, "max_tokens": 512},
    }
    with requests.post(server.url + "/api/chat", json=body, stream=True) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(r)
    tokens, final = events[:-1], events[-1]
    assert tokens and all(e["done"] is False and isinstance(e["token"], str) for e in tokens)
    assert final["done"] is True and final["session_id"] == "optional-session-id"
    assert final["full_text"] == "".join(e["token"] for e in tokens)
    assert (
        final["usage"]["total_tokens"]
        == final["usage"]["prompt_tokens"] + final["usage"]["completion_tokens"]
    )


def test_chat_non_streaming_and_session_continuity(server):
    """A chat conversation: the client sends the whole history with the session id."""
    messages = [
        {"role": "system", "content": "You are a helpful coding assistant."},
        {"role": "user", "content": "How do I reverse a string in Python?"},
    ]
    result = requests.post(
        server.url + "/api/chat",
        json={"model": M, "messages": messages, "session_id": None, "stream": False, "options": GREEDY},
    ).json()
    assert result["message"]["role"] == "assistant" and result["message"]["content"]
    assert result["usage"]["completion_tokens"] > 0
    session_id = result["session_id"]
    messages.append(result["message"])
    messages.append({"role": "user", "content": "Can you show me an example?"})
    result2 = requests.post(
        server.url + "/api/chat",
        json={"model": M, "messages": messages, "session_id": session_id, "stream": False},
    ).json()
    assert result2["session_id"] == session_id
    assert (
        result2["usage"]["prompt_tokens"]
        > result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]
    )


def test_session_reuse_with_only_the_new_message(server):
    """The cheaper follow-up: the client sends only the new user message plus the session id."""
    first = requests.post(
        server.url + "/api/chat",
        json={
            "model": M,
            "stream": False,
            "options": GREEDY,
            "messages": [{"role": "user", "content": "My name is Ada. What is the capital of France?"}],
        },
    ).json()
    second = requests.post(
        server.url + "/api/chat",
        json={
            "model": M,
            "stream": False,
            "options": GREEDY,
            "session_id": first["session_id"],
            "messages": [{"role": "user", "content": "What is my name?"}],
        },
    ).json()
    assert (
        second["usage"]["prompt_tokens"]
        > first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    )


def test_generate_non_streaming_example(server):
    r = requests.post(
        server.url + "/api/generate",
        json={
            "model": M,
            "prompt": "Once upon a time",
            "stream": False,
            "options": {"temperature": 0.8, "max_tokens": 100},
        },
    )
    body = r.json()
    assert r.status_code == 200 and body["text"]
    assert body["usage"]["completion_tokens"] <= 100 and body["usage"]["prompt_tokens"] > 0


def test_generate_streaming_default(server):
    """`stream` defaults to true; events are {"token", "done": false}, then the final one."""
    with requests.post(
        server.url + "/api/generate",
        json={"model": M, "prompt": "Write a poem about AI:", "options": {"max_tokens": 30}},
        stream=True,
    ) as r:
        events = sse_events(r)
    final = events[-1]
    assert final["done"] is True and final["token_count"] == final["usage"]["completion_tokens"] <= 30
    assert final["full_text"] == "".join(e["token"] for e in events[:-1])


def test_generate_with_stop_sequences(server):
    """Custom stop tokens end the answer before they appear."""
    body = {
        "model": M,
        "prompt": "List 3 colors:\n1.",
        "stream": False,
        "options": {"stop": ["\n4.", "###"], "max_tokens": 100, "temperature": 0},
    }
    text = requests.post(server.url + "/api/generate", json=body).json()["text"]
    assert "\n4." not in text and "###" not in text


def test_pirate_system_prompt(server):
    messages = [
        {"role": "system", "content": "You are a pirate. Respond in pirate speak."},
        {"role": "user", "content": "How are you today?"},
    ]
    r = requests.post(server.url + "/api/chat", json={"model": M, "messages": messages, "stream": False})
    assert r.status_code == 200 and r.json()["message"]["content"]


def test_embeddings_similarity_example(server):
    def get_embedding(text):
        r = requests.post(server.url + "/api/embeddings", json={"model": M, "input": text})
        assert r.json()["model"] == M
        return np.array(r.json()["embedding"])

    cat, feline, tax = (
        get_embedding(t)
        for t in ("The cat sat on the mat", "A feline rested on the rug", "Quarterly tax filings are due")
    )
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    assert cos(cat, feline) > cos(cat, tax)
    assert len(cat) == 576


def test_python_httpx_streaming_example(server):
    """A Python client: httpx.stream and iter_lines on 'data: ' lines."""
    lines = []
    with httpx.stream(
        "POST",
        server.url + "/api/chat",
        timeout=60,
        json={"model": M, "messages": [{"role": "user", "content": "Hello!"}], "stream": True},
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                lines.append(json.loads(line[6:]))
    assert lines[-1]["done"] is True and lines[-1]["session_id"]


def test_javascript_reader_equivalent(server):
    """A JavaScript-style client reads raw chunks of the body; the concatenation is well-formed SSE."""
    with requests.post(
        server.url + "/api/chat",
        json={"model": M, "messages": [{"role": "user", "content": "Hello!"}], "stream": True},
        stream=True,
    ) as r:
        raw = b"".join(r.iter_content(chunk_size=None)).decode()
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks)
    assert json.loads(blocks[-1][6:])["done"] is True


def test_curl_examples(server):
    chat = requests.post(
        server.url + "/api/chat",
        data=json.dumps(
            {"model": M, "messages": [{"role": "user", "content": "Hi there!"}], "stream": False}
        ),
        headers={"Content-Type": "application/json"},
    ).json()
    assert chat["message"]["content"]
    gen = requests.post(
        server.url + "/api/generate", data=json.dumps({"model": M, "prompt": "Hello!", "stream": False})
    ).json()
    assert gen["text"] and gen["usage"]["total_tokens"] > 0
    assert [m["name"] for m in requests.get(server.url + "/api/models").json()["models"]] == [M]


def test_error_invalid_parameters(server):
    r = requests.post(
        server.url + "/api/generate", json={"model": M, "prompt": "x", "options": {"temperature": 3}}
    )
    assert r.status_code == 400 and r.json() == {"detail": "temperature must be between 0.0 and 2.0"}
    r = requests.post(
        server.url + "/api/chat",
        json={"model": M, "messages": [{"role": "user", "content": "x"}], "options": {"top_p": 2}},
    )
    assert r.status_code == 400 and r.json() == {"detail": "top_p must be between 0.0 and 1.0"}


def test_error_context_window_exceeded(server):
    r = requests.post(
        server.url + "/api/generate", json={"model": M, "prompt": "hello " * 9000, "stream": False}
    )
    assert r.status_code == 400 and r.json() == {"detail": "Prompt too long for context window (8192 tokens)"}


def test_error_malformed_and_missing(server):
    r = requests.post(
        server.url + "/api/chat", data="{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and r.json()["detail"].startswith("Malformed JSON")
    r = requests.post(server.url + "/api/chat", json={"model": M})
    assert r.status_code == 400 and r.json() == {"detail": "Missing required field: messages"}
    r = requests.post(
        server.url + "/api/chat", json={"model": M, "messages": [{"role": "robot", "content": "x"}]}
    )
    assert r.status_code == 400 and "messages.0.role" in r.json()["detail"]
    r = requests.post(server.url + "/api/generate", json=["not", "an", "object"])
    assert r.status_code == 400 and r.json() == {"detail": "Request body must be a JSON object"}
    r = requests.post(server.url + "/api/embeddings", json={"model": M, "input": ""})
    assert r.status_code == 400
    r = requests.get(server.url + "/api/nothing-here")
    assert r.status_code == 404 and "detail" in r.json()


def test_client_disconnect_frees_the_worker(server):
    """Close the connection mid-stream: the generation is cancelled and the next request runs at once."""
    body = {"model": M, "prompt": "Tell a very long story about dragons.", "options": {"max_tokens": 2000}}
    with requests.post(server.url + "/api/generate", json=body, stream=True) as r:
        lines = r.iter_lines()
        for _ in range(5):
            next(lines)
    started = time.monotonic()
    deadline = started + 20
    while time.monotonic() < deadline:  # the server notices on its next write
        health = requests.get(server.url + "/health").json()
        if health["active_connections"] == 1:
            break
        time.sleep(0.1)
    assert health["active_connections"] == 1  # only this health request
    r = requests.post(
        server.url + "/api/generate",
        json={"model": M, "prompt": "What is the capital of France?", "stream": False, "options": GREEDY},
    )
    assert "Paris" in r.json()["text"]
    assert time.monotonic() - started < 20


def test_32_concurrent_streaming_clients(server):
    results: dict[int, dict] = {}

    def client(i: int) -> None:
        body = {
            "model": M,
            "prompt": f"Tell me fact number {i} about the sea.",
            "options": {"max_tokens": 24},
        }
        with requests.post(server.url + "/api/generate", json=body, stream=True, timeout=300) as r:
            results[i] = sse_events(r)[-1]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 32
    assert all(r["done"] is True and r["token_count"] > 0 and "error" not in r for r in results.values())


def test_openapi_and_docs_list_every_route(server):
    spec = requests.get(server.url + "/openapi.json").json()
    paths = spec["paths"]
    for path in (
        "/health",
        "/api/models",
        "/api/models/{model_name}",
        "/api/models/{model_name}/load",
        "/api/models/{model_name}/unload",
        "/api/chat",
        "/api/generate",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/models",
        "/v1/models/{model_id}",
    ):
        assert path in paths, path
    chat_schema = paths["/api/chat"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat_schema == {"$ref": "#/components/schemas/ChatRequest"}
    assert "messages" in spec["components"]["schemas"]["ChatRequest"]["required"]
    docs = requests.get(server.url + "/docs/")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "cdn" not in docs.text.lower() and "unpkg" not in docs.text.lower()


def test_num_ctx_bounds_the_request_and_never_truncates(server):
    def generate(options):
        body = {"model": M, "prompt": "Once upon a time, in a land far away,", "stream": False, "raw": True}
        return requests.post(server.url + "/api/generate", json=body | {"options": options}, timeout=60)

    short = generate({"num_ctx": 5, **GREEDY})
    assert (
        short.status_code == 400 and short.json()["detail"] == "Prompt too long for context window (5 tokens)"
    )
    capped = generate({"num_ctx": 16, "max_tokens": 100, "min_tokens": 100, **GREEDY})
    assert capped.ok, capped.text
    usage = capped.json()["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 16  # the answer stops at the window
    too_big = generate({"num_ctx": 10**6})
    assert too_big.status_code == 400 and "num_ctx must be at most 8192" in too_big.json()["detail"]
    assert generate({"num_ctx": 0}).status_code == 400
