"""The chat-completions dialect (/completions, /chat/*, /sessions, WS /chat/ws), one test per client example
it supports, against a live server: completions, kebab-case chat, the WebSocket client (reproduced with a
Python WebSocket client), sessions and history."""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
import requests
from simple_websocket import Client, ConnectionClosed

from ortllm.runtime.loaded import available_eps
from tests.conftest import DEFAULT_MODEL

M = DEFAULT_MODEL
# clients of this dialect name models by their hub id: a catalog alias here
HF = "HuggingFaceTB/SmolLM2-135M-Instruct"


def raw_events(response) -> list[str]:
    """SSE events as text, as an EventSource reads them: `data:` lines of one event joined by newlines."""
    events, data = [], []
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if data:
                events.append("\n".join(data))
            data = []
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
    return events + (["\n".join(data)] if data else [])


def chat_body(**extra) -> dict:
    return {
        "model-name": M,
        "prompt": "What is Rust?",
        "session-id": str(uuid.uuid4()),
        "max-token": 40,
        "temperature": 0.7,
        "top-p": 0.95,
        "top-k": 40,
        "repeat-penalty": 1.1,
        "device": "cpu",
        **extra,
    }


def cuda_usable(server) -> bool:
    """Whether this machine runs cuda and the test model has a cuda build (the pulled one is cpu-int4)."""
    variants = requests.get(f"{server.url}/api/models/{M}").json()["variants"]
    return "cuda" in available_eps() and any(v.startswith("cuda") for v in variants)


def ws_url(server, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/chat/ws" + query


def frames_until_closed(ws: Client, timeout: float = 120) -> list[str]:
    frames = []
    try:
        while True:
            frame = ws.receive(timeout)
            assert frame is not None, "no frame and no close within the timeout"
            frames.append(frame)
    except ConnectionClosed:
        return frames


def frames_until_end(ws: Client, timeout: float = 120) -> tuple[list[str], dict]:
    """One multi-turn answer: __START__, the token frames, __END__ (returned parsed)."""
    start = ws.receive(timeout)
    assert start.startswith("__START__:"), start
    tokens = []
    while not (frame := ws.receive(timeout)).startswith("__END__:"):
        tokens.append(frame)
    end = json.loads(frame[len("__END__:") :])
    assert end["session-id"] == json.loads(start[len("__START__:") :])["session-id"]
    return tokens, end


# ---- health, models ---------------------------------------------------------------------------


def test_readiness_503_until_a_model_is_loaded(server):
    ready = requests.get(server.url + "/readiness")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready" and body["models_available"] == 1 and body["timestamp"].endswith("Z")
    assert requests.post(f"{server.url}/models/{M}/stop").status_code == 200
    try:
        r = requests.get(server.url + "/readiness")
        assert r.status_code == 503 and r.json() == {"error": "Not ready: no model is loaded yet"}
    finally:
        assert requests.post(f"{server.url}/models/{M}/start").status_code == 200
    assert requests.get(server.url + "/readiness").status_code == 200


def test_model_details_by_hub_id(server):
    body = requests.get(f"{server.url}/models/{HF}").json()
    assert body == {
        "id": M,
        "name": M,
        "hf_name": HF,
        "running": True,
        "context_length": 8192,
        "quantization": "int4",
    }


# ---- /completions -----------------------------------------------------------------------------


def test_completion_request_body_example(server):
    body = {
        "model": HF,
        "prompt": "Once upon a time",
        "max_tokens": 100,
        "temperature": 0.7,
        "top_p": 0.95,
        "stop": ["\n\n"],
        "stream": False,
    }
    r = requests.post(server.url + "/completions", json=body)
    out = r.json()
    assert r.status_code == 200 and set(out) == {"text", "model", "tokens"}
    assert out["text"] and "\n\n" not in out["text"] and out["model"] == HF and 0 < out["tokens"] <= 100


def test_simple_completion_curl_example_and_defaults(server):
    r = requests.post(
        server.url + "/completions",
        data=json.dumps({"model": HF, "prompt": "Explain Rust in one sentence:", "max_tokens": 50}),
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 200 and r.json()["text"] and r.json()["tokens"] <= 50
    counting = requests.post(
        server.url + "/completions",
        json={"model": M, "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,", "temperature": 0},
    )
    assert counting.json()["tokens"] == 128  # the dialect's default max_tokens


def test_completion_stream_is_raw_token_text(server):
    body = {"model": M, "prompt": "Once upon a time", "max_tokens": 30, "temperature": 0}
    whole = requests.post(server.url + "/completions", json=body).json()["text"]
    with requests.post(server.url + "/completions", json={**body, "stream": True}, stream=True) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = raw_events(r)
    assert len(events) > 5 and "".join(events) == whole
    assert not any(e.startswith("{") for e in events)


def test_multiline_token_becomes_several_data_lines(server):
    body = {
        "model": M,
        "prompt": "List three colors, one per line:\n1. red\n2.",
        "max_tokens": 30,
        "temperature": 0,
        "stream": True,
    }
    with requests.post(server.url + "/completions", json=body, stream=True) as r:
        raw = b"".join(r.iter_content(chunk_size=None)).decode()
    blocks = [b for b in raw.split("\n\n") if b]
    multi = [b for b in blocks if b.count("\n") >= 1]
    assert multi, raw  # a token holding "\n" is sent as two data lines
    assert all(line.startswith("data: ") or line == "data:" for b in blocks for line in b.split("\n"))
    whole = requests.post(server.url + "/completions", json={**body, "stream": False}).json()["text"]
    texts = [
        "\n".join(line[6:] if line.startswith("data: ") else line[5:] for line in b.split("\n"))
        for b in blocks
    ]
    assert "".join(texts) == whole and "\n" in whole


def test_python_example(server):
    """A Python client: a completion, then a chat read line by line with stream=True."""
    response = requests.post(
        server.url + "/completions",
        json={"model": HF, "prompt": "Write a haiku about Rust:", "max_tokens": 50, "temperature": 0.8},
    )
    assert response.json()["text"]
    response = requests.post(
        server.url + "/chat/completions",
        json=chat_body(
            **{
                "prompt": "Explain ownership in Rust",
                "session-id": f"my-session-{uuid.uuid4()}",
                "max-token": 60,
                "system-prompt": "You are a Rust teacher",
            }
        ),
        stream=True,
    )
    printed = "".join(line.decode("utf-8").replace("data: ", "") for line in response.iter_lines() if line)
    assert printed.strip()


# ---- /chat/completions and history ------------------------------------------------------------


def test_chat_full_parameters_streams_and_stores_history(server):
    body = chat_body(
        prompt="What is async/await in Rust?", temperature=0.8, **{"system-prompt": "You are a Rust expert"}
    )
    with requests.post(server.url + "/chat/completions", json=body, stream=True) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        assert r.headers["X-Session-Id"] == body["session-id"]
        events = raw_events(r)
    assert events and not any(e.startswith("__ERROR__") for e in events)
    history = requests.get(f"{server.url}/chat/history/{body['session-id']}").json()
    assert history == [
        {"role": "system", "content": "You are a Rust expert"},
        {"role": "user", "content": "What is async/await in Rust?"},
        {"role": "assistant", "content": "".join(events)},
    ]


def test_chat_without_session_id_creates_one(server):
    body = chat_body()
    del body["session-id"]
    with requests.post(server.url + "/chat/completions", json=body, stream=True) as r:
        sid = r.headers["X-Session-Id"]
        raw_events(r)
    assert sid in requests.get(server.url + "/sessions").json()
    assert [m["role"] for m in requests.get(f"{server.url}/chat/history/{sid}").json()] == [
        "user",
        "assistant",
    ]


def test_session_context_carries_over(server):
    first = chat_body(prompt="My name is Ada.", temperature=0)
    with requests.post(server.url + "/chat/completions", json=first, stream=True) as r:
        raw_events(r)
    second = chat_body(prompt="What is my name?", temperature=0, **{"session-id": first["session-id"]})
    with requests.post(server.url + "/chat/completions", json=second, stream=True) as r:
        raw_events(r)
    history = requests.get(f"{server.url}/chat/history/{first['session-id']}").json()
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[0]["content"] == "My name is Ada." and history[2]["content"] == "What is my name?"


def test_javascript_streaming_chat_reader(server):
    """A JavaScript client: raw chunks split on newlines, `data: ` lines printed from column 6."""
    body = {"model-name": HF, "prompt": "What is Rust?", "max-token": 40, "temperature": 0.7, "device": "cpu"}
    with requests.post(server.url + "/chat/completions", json=body, stream=True) as r:
        out = "".join(
            line[6:]
            for chunk in r.iter_content(chunk_size=None)
            for line in chunk.decode().split("\n")
            if line.startswith("data: ")
        )
        sid = r.headers["X-Session-Id"]
    assert out.strip()
    assert requests.get(f"{server.url}/chat/history/{sid}").json()[-1]["role"] == "assistant"


def test_sessions_history_rollback_and_delete(server):
    body = chat_body()
    sid = body["session-id"]
    for prompt in ("Hello", "Tell me more"):
        with requests.post(
            server.url + "/chat/completions", json={**body, "prompt": prompt}, stream=True
        ) as r:
            raw_events(r)
    sessions = requests.get(server.url + "/sessions").json()
    assert isinstance(sessions, list) and sessions[0] == sid and all(isinstance(s, str) for s in sessions)
    assert len(requests.get(f"{server.url}/chat/history/{sid}").json()) == 4
    r = requests.post(f"{server.url}/chat/history/{sid}/rollback", json={"amount": 2})
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert [m["content"] for m in requests.get(f"{server.url}/chat/history/{sid}").json()][:1] == ["Hello"]
    assert len(requests.get(f"{server.url}/chat/history/{sid}").json()) == 2
    r = requests.delete(f"{server.url}/chat/history/{sid}")
    assert r.status_code == 204 and r.content == b""
    r = requests.get(f"{server.url}/chat/history/{sid}")
    assert r.status_code == 404 and r.json() == {"error": f"Session '{sid}' not found"}
    assert requests.delete(f"{server.url}/chat/history/{sid}").status_code == 404
    assert sid not in requests.get(server.url + "/sessions").json()


def test_device_cuda_example(server):
    """A request for device cuda: used when this machine and model have it, else a clear 400."""
    r = requests.post(server.url + "/chat/completions", json=chat_body(device="cuda"))
    if cuda_usable(server):
        assert r.status_code == 200
    else:
        assert r.status_code == 400 and "cuda" in r.json()["error"]
    r = requests.post(server.url + "/chat/completions", json=chat_body(device="metal"))
    assert r.status_code == 400 and r.json()["error"].startswith("device 'metal' is not supported")
    r = requests.post(server.url + "/chat/completions", json=chat_body(device="tpu"))
    assert r.status_code == 400 and r.json() == {
        "error": "Unknown device 'tpu': use cpu, cuda, dml or webgpu"
    }


# ---- WS /chat/ws ------------------------------------------------------------------------------


def test_websocket_client_example(server):
    """A JS WebSocket client: one JSON message, tokens as separate text frames, then the server closes."""
    body = chat_body(
        prompt="Tell me a joke about Rust",
        temperature=0.8,
        **{"max-token": 100, "system-prompt": "You are a funny comedian"},
    )
    ws = Client.connect(ws_url(server))
    ws.send(json.dumps(body))
    frames = frames_until_closed(ws)
    assert len(frames) > 3 and not any(f.startswith("__") for f in frames)
    history = requests.get(f"{server.url}/chat/history/{body['session-id']}").json()
    assert history[0] == {"role": "system", "content": "You are a funny comedian"}
    assert history[1:] == [
        {"role": "user", "content": "Tell me a joke about Rust"},
        {"role": "assistant", "content": "".join(frames)},
    ]


@pytest.mark.parametrize(
    "message, error",
    [
        (
            {"model-name": "gpt-4", "prompt": "Hello!"},
            "__ERROR__:Model 'gpt-4' not found. Available models: smollm2-135m",
        ),
        ({"prompt": "Hello!"}, "__ERROR__:Missing required field: model-name"),
        (
            "{not json",
            "__ERROR__:Malformed JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        (
            {"model-name": M, "prompt": "Hello!", "temperature": 3},
            "__ERROR__:temperature must be between 0.0 and 2.0",
        ),
    ],
)
def test_websocket_errors_then_close(server, message, error):
    ws = Client.connect(ws_url(server))
    ws.send(message if isinstance(message, str) else json.dumps(message))
    assert frames_until_closed(ws, 30) == [error]


def test_websocket_cuda_example_is_an_error_frame(server):
    ws = Client.connect(ws_url(server))
    ws.send(json.dumps(chat_body(device="cuda")))
    frames = frames_until_closed(ws, 30)
    assert cuda_usable(server) or (
        len(frames) == 1 and frames[0].startswith("__ERROR__:") and "cuda" in frames[0]
    )


def test_websocket_multi_turn_keeps_history_and_survives_errors(server):
    ws = Client.connect(ws_url(server, "?mode=multi"))
    sid = str(uuid.uuid4())
    ws.send(json.dumps(chat_body(prompt="My name is Ada.", temperature=0, **{"session-id": sid})))
    tokens, end = frames_until_end(ws)
    assert end["session-id"] == sid and end["finish_reason"] in ("stop", "length")
    assert end["usage"]["completion_tokens"] > 0 and end["timings"]["total_s"] > 0 and tokens
    ws.send(json.dumps({"model-name": "gpt-4", "prompt": "x"}))
    assert ws.receive(30).startswith("__ERROR__:Model 'gpt-4' not found")
    second = chat_body(prompt="What is my name?", temperature=0)
    del second["session-id"]  # continues the socket's conversation
    ws.send(json.dumps(second))
    tokens2, end2 = frames_until_end(ws)
    assert end2["session-id"] == sid
    assert end2["usage"]["prompt_tokens"] > end["usage"]["prompt_tokens"] + end["usage"]["completion_tokens"]
    ws.close()
    history = requests.get(f"{server.url}/chat/history/{sid}").json()
    assert [m["content"] for m in history] == [
        "My name is Ada.",
        "".join(tokens),
        "What is my name?",
        "".join(tokens2),
    ]


def test_websocket_multi_turn_cancel_and_close(server):
    ws = Client.connect(ws_url(server))
    body = chat_body(
        prompt="Tell me a very long story about dragons.", **{"multi-turn": True, "max-token": 2000}
    )
    ws.send(json.dumps(body))
    assert ws.receive(60).startswith("__START__:")
    for _ in range(3):
        assert not ws.receive(60).startswith("__")
    ws.send(json.dumps({"action": "cancel"}))
    started = time.monotonic()
    while not (frame := ws.receive(30)).startswith("__END__:"):
        pass
    assert (
        json.loads(frame[len("__END__:") :])["finish_reason"] == "cancelled"
        and time.monotonic() - started < 5
    )
    # withdrawn by the client: nothing stored, not even the session the turn created
    assert requests.get(f"{server.url}/chat/history/{body['session-id']}").status_code == 404
    ws.send(json.dumps(chat_body(prompt="Hi", **{"session-id": body["session-id"], "max-token": 5})))
    _, end = frames_until_end(ws)
    assert end["finish_reason"] in ("stop", "length")
    ws.send(json.dumps({"action": "close"}))
    assert frames_until_closed(ws, 30) == []


def test_websocket_closed_by_the_client_cancels_the_generation(server):
    ws = Client.connect(ws_url(server))
    ws.send(json.dumps(chat_body(prompt="Tell me a very long story about dragons.", **{"max-token": 2000})))
    for _ in range(3):
        ws.receive(60)
    ws.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        metrics = requests.get(server.url + "/metrics").text
        running = re.search(rf'^batch_size{{model="{M}"}} (\S+)$', metrics, re.M)
        if (
            requests.get(server.url + "/health").json()["active_connections"] == 1
            and running
            and float(running[1]) == 0
        ):
            break
        time.sleep(0.2)
    assert running and float(running[1]) == 0, metrics


# ---- errors -----------------------------------------------------------------------------------


def test_errors_are_error_strings(server):
    r = requests.post(server.url + "/completions", json={"model": M})
    assert r.status_code == 400 and r.json() == {"error": "Missing required field: prompt"}
    r = requests.post(server.url + "/completions", data="{oops", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"].startswith("Malformed JSON")
    r = requests.post(server.url + "/completions", json={"model": M, "prompt": "x", "temperature": 3})
    assert r.status_code == 400 and r.json() == {"error": "temperature must be between 0.0 and 2.0"}
    r = requests.post(server.url + "/completions", json={"model": "gpt-4", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"].startswith("Model 'gpt-4' not found")
    r = requests.post(server.url + "/chat/completions", json={"prompt": "x"})
    assert r.status_code == 400 and r.json() == {"error": "Missing required field: model-name"}
    r = requests.post(server.url + "/chat/completions", json=chat_body(**{"max-token": 0}))
    assert r.status_code == 400 and r.json() == {
        "error": "max-token: Input should be greater than or equal to 1"
    }
    r = requests.post(server.url + "/chat/completions", json=chat_body(prompt="hello " * 9000))
    assert r.status_code == 400 and r.json() == {"error": "Prompt too long for context window (8192 tokens)"}
    r = requests.post(f"{server.url}/chat/history/{uuid.uuid4()}/rollback", json={"amount": 1})
    assert r.status_code == 404 and "not found" in r.json()["error"]
    r = requests.post(f"{server.url}/chat/history/x/rollback", json={"amount": -1})
    assert r.status_code == 400 and r.json() == {
        "error": "amount: Input should be greater than or equal to 0"
    }
    r = requests.get(server.url + "/chat/nothing")
    assert r.status_code == 404 and "error" in r.json()
