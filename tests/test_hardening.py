"""Production hardening: auth, rate limits, CORS, backpressure, metrics, bad input, faults."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import threading
import time

import jwt
import openai
import pytest
import requests

from tests.conftest import ALICE_KEY, BOB_KEY, DEFAULT_MODEL, JWT_SECRET, LiveServer, ortllm

M = DEFAULT_MODEL
KEY, OTHER_KEY, SECRET = ALICE_KEY, BOB_KEY, JWT_SECRET
AUTH = {"Authorization": f"Bearer {KEY}"}


# one route per dialect: (path, method, body, how its error body names the message)
DIALECT_ROUTES = [
    ("/api/models", "GET", None, lambda b: b["detail"]),
    ("/v1/models", "GET", None, lambda b: b["error"]["message"]),
    (
        "/v1/chat/completions",
        "POST",
        {"model": M, "messages": [{"role": "user", "content": "hi"}]},
        lambda b: b["error"]["message"],
    ),
    (
        "/api/chat",
        "POST",
        {"model": M, "messages": [{"role": "user", "content": "hi"}]},
        lambda b: b["detail"],
    ),
    ("/api/v1/models", "GET", None, lambda b: b["error"]["message"]),
    ("/sessions", "GET", None, lambda b: b["error"]),
    ("/completions", "POST", {"model": M, "prompt": "hi"}, lambda b: b["error"]),
    ("/models", "GET", None, lambda b: b["detail"]),
    ("/generate", "POST", {"model_id": M, "prompt": "hi"}, lambda b: b["detail"]),
]


@pytest.mark.parametrize(("path", "method", "body", "message"), DIALECT_ROUTES)
def test_missing_or_wrong_key_is_401_in_the_dialects_format(secured, path, method, body, message):
    for headers in ({}, {"Authorization": "Bearer sk-wrong-0123456789"}, {"Authorization": "Basic abc"}):
        r = requests.request(method, secured.url + path, json=body, headers=headers)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
        assert "API key" in message(r.json())


def test_websocket_needs_the_key_on_connect(secured):
    from simple_websocket import Client, ConnectionClosed
    from simple_websocket import ConnectionError as WSConnectionError

    ws_url = secured.url.replace("http", "ws", 1) + "/chat/ws"
    with pytest.raises(WSConnectionError) as info:
        Client.connect(ws_url)
    assert info.value.status_code == 401
    ws = Client.connect(f"{ws_url}?token={KEY}")
    try:
        ws.send(json.dumps({"model-name": M, "prompt": "What is the capital of France?", "temperature": 0}))
        frames = []
        while True:
            try:
                frame = ws.receive(timeout=60)
            except Exception:  # the server closes the socket when the answer is complete
                break
            if frame is None:
                break
            frames.append(frame)
        assert "Paris" in "".join(frames) and not any(f.startswith("__ERROR__") for f in frames)
    finally:
        with contextlib.suppress(ConnectionClosed):  # the server already closed it after the answer
            ws.close()


def test_valid_key_and_jwt_are_accepted(secured):
    assert requests.get(secured.url + "/api/models", headers=AUTH).status_code == 200
    token = jwt.encode({"sub": "carol", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    assert (
        requests.get(secured.url + "/api/models", headers={"Authorization": f"Bearer {token}"}).status_code
        == 200
    )
    expired = jwt.encode({"sub": "carol", "exp": int(time.time()) - 5}, SECRET, algorithm="HS256")
    assert (
        requests.get(secured.url + "/api/models", headers={"Authorization": f"Bearer {expired}"}).status_code
        == 401
    )
    no_exp = jwt.encode({"sub": "carol"}, SECRET, algorithm="HS256")
    assert (
        requests.get(secured.url + "/api/models", headers={"Authorization": f"Bearer {no_exp}"}).status_code
        == 401
    )
    forged = jwt.encode(
        {"sub": "carol", "exp": int(time.time()) + 60},
        "another-secret-that-is-long-enough-0123456789",
        algorithm="HS256",
    )
    assert (
        requests.get(secured.url + "/api/models", headers={"Authorization": f"Bearer {forged}"}).status_code
        == 401
    )


def test_probes_stay_open_and_metrics_need_the_key(secured):
    assert requests.get(secured.url + "/health").status_code == 200
    assert requests.get(secured.url + "/openapi.json").status_code == 200
    requests.get(secured.url + "/api/models", headers=AUTH)
    assert requests.get(secured.url + "/metrics").status_code == 401  # it names the callers
    text = requests.get(secured.url + "/metrics", headers=AUTH).text
    assert 'http_requests_total{dialect="detail",identity="alice",status="200"}' in text  # per-key names


def test_prefix_caches_are_not_shared_between_keys(secured):
    """Alice's prompt is cached for Alice only: Bob sending the same text computes it himself (usage
    reports it), so response times cannot tell Bob what Alice asked."""
    body = {
        "model": M,
        "messages": [{"role": "user", "content": "Alice's secret plan: Paris in May?"}],
        "max_tokens": 2,
    }

    def cached(key):
        r = requests.post(
            secured.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"], r.json()["usage"]["prompt_tokens"]

    cached(KEY)  # (Alice's earlier requests in this module may already cover the chat template)
    bob, prompt = cached(OTHER_KEY)
    assert bob < prompt - 8  # none of Alice's text (about 10 tokens) came from her cache
    assert cached(KEY)[0] == prompt  # Alice herself reuses all of it


def test_openai_sdk_with_a_key(secured):
    good = openai.OpenAI(base_url=secured.url + "/v1", api_key=KEY)
    assert M in [m.id for m in good.models.list()]  # (other tests may have installed more)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=secured.url + "/v1", api_key="sk-nope-0123456789").models.list()


def test_rate_limit_headers_and_429(pulled):
    live = LiveServer("--api-key", KEY, "--api-key", OTHER_KEY, "--rate-limit", "3")
    try:
        other = {"Authorization": f"Bearer {OTHER_KEY}"}
        for expected_remaining in (2, 1, 0):
            r = requests.get(live.url + "/api/models", headers=AUTH)
            assert r.status_code == 200
            assert r.headers["X-RateLimit-Limit"] == "3"
            assert r.headers["X-RateLimit-Remaining"] == str(expected_remaining)
            assert int(r.headers["X-RateLimit-Reset"]) > time.time() - 1
        r = requests.get(live.url + "/api/models", headers=AUTH)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["detail"].startswith("Rate limit exceeded")
        r = requests.get(live.url + "/v1/models", headers=AUTH)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
        assert requests.get(live.url + "/api/models", headers=other).status_code == 200  # per key
        assert requests.get(live.url + "/health").status_code == 200  # probes are not limited
    finally:
        live.stop()


def test_plain_local_use_has_no_rate_limit(server):
    r = requests.get(server.url + "/api/models")
    assert "X-RateLimit-Limit" not in r.headers


def test_cors_allows_localhost_origins_only(server):
    ok = requests.get(server.url + "/api/models", headers={"Origin": "http://localhost:5173"})
    assert ok.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    preflight = requests.options(
        server.url + "/api/chat",
        headers={
            "Origin": "http://127.0.0.1:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:3000"
    evil = requests.get(server.url + "/api/models", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in evil.headers


def test_exposed_bind_without_auth_is_refused():
    proc = ortllm("serve", "--host", "0.0.0.0", "--port", "1")
    assert proc.returncode == 1
    assert "Refusing to listen on 0.0.0.0 without authentication" in proc.stderr
    assert "--insecure" in proc.stderr
    shown = json.loads(
        ortllm("serve", "--host", "0.0.0.0", "--insecure", "--print-config", check=True).stdout
    )
    assert shown["insecure"] is True
    shown = json.loads(
        ortllm("serve", "--api-key", "a:sk-secret-0123456789", "--print-config", check=True).stdout
    )
    assert shown["auth"]["api_keys"] == ["a:***"]  # never echo secrets
    assert "too short" in ortllm("serve", "--api-key", "short", "--port", "1").stderr


def test_full_queue_answers_503_with_retry_after(pulled):
    live = LiveServer("--model", M, "--max-queue", "1")
    try:
        statuses: list[int] = []
        bodies: list[dict] = []

        def client() -> None:
            body = {
                "model": M,
                "prompt": "Tell a long story.",
                "stream": False,
                "options": {"max_tokens": 200},
            }
            r = requests.post(live.url + "/api/generate", json=body, timeout=300)
            statuses.append(r.status_code)
            if r.status_code == 503:
                bodies.append(r.json())
                assert int(r.headers["Retry-After"]) >= 1

        threads = [
            threading.Thread(target=client) for _ in range(24)
        ]  # 16 running (4 Engines x 4) + 1 queued fit
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert 503 in statuses and 200 in statuses and set(statuses) <= {200, 503}
        assert "busy" in bodies[0]["detail"]
        assert requests.post(
            live.url + "/api/generate", json={"model": M, "prompt": "Hi", "stream": False}
        ).ok
    finally:
        live.stop()


def test_metrics_have_the_native_and_openai_names(server):
    requests.get(server.url + "/health")
    requests.post(
        server.url + "/api/generate",
        json={"model": M, "prompt": "Hi", "stream": False, "options": {"max_tokens": 3}},
    )
    requests.post(
        server.url + "/v1/chat/completions",
        json={"model": M, "max_tokens": 3, "messages": [{"role": "user", "content": "Hi"}]},
    )
    text = requests.get(server.url + "/metrics").text
    for name in (
        "health_check_requests_total",
        "completions_requests_total",
        "chat_completions_requests_total",
        "completions_duration_seconds_bucket",
        "completions_tokens_total",
        "completions_errors_total",
        "model_inference_seconds_bucket",
        "active_connections",
        "queue_depth",
        "batch_size",
        "time_to_first_token_seconds_bucket",
        "decode_tokens_per_second_bucket",
    ):
        assert name in text, name
    assert f'completions_tokens_total{{model="{M}"}}' in text


@pytest.mark.parametrize(
    ("path", "data", "status", "fragment"),
    [
        ("/api/generate", b'{"model": "m", "prompt": "\xff\xfe"}', 400, "not valid UTF-8"),
        (
            "/api/generate",
            b'{"model": "smollm2-135m", "prompt": "x", "options": {"temperature": NaN}}',
            400,
            "temperature must be a finite number",
        ),
        ("/api/generate", b'{"model": "smollm2-135m", "prompt": 42}', 400, "prompt"),
        (
            "/api/generate",
            b'{"model": "smollm2-135m", "prompt": "x", "options": {"max_tokens": -5}}',
            400,
            "max_tokens must be >= 1",
        ),
        (
            "/api/generate",
            b'{"model": "smollm2-135m", "prompt": "x", "options": {"max_tokens": 100000000}}',
            400,
            "max_tokens must be at most",
        ),
        ("/api/models/..%2F..%2Fetc", None, 404, "not found"),
        ("/api/models/%2e%2e%2f%2e%2e%2fetc%2fpasswd", None, 404, "not found"),
    ],
)
def test_bad_input_is_a_clear_4xx(server, path, data, status, fragment):
    if data is None:
        r = requests.get(server.url + path)
    else:
        r = requests.post(server.url + path, data=data, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    assert fragment.lower() in r.json()["detail"].lower()


def test_unknown_top_level_fields_are_ignored_but_unknown_options_refused(server):
    body = {"model": M, "prompt": "Hi", "stream": False, "bogus": [1], "options": {"max_tokens": 2}}
    assert requests.post(server.url + "/api/generate", json=body).status_code == 200
    # a sampling option the runtime does not have would change nothing: a 400 naming it, never dropped unseen
    body["options"]["mirostat"] = 2
    r = requests.post(server.url + "/api/generate", json=body)
    assert r.status_code == 400 and "options.mirostat" in r.json()["detail"]


def test_huge_body_is_413(server):
    r = requests.post(
        server.url + "/api/generate",
        data=b'{"prompt": "' + b"x" * (2 << 20) + b'"}',
        headers={"Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json() == {"detail": "Request body too large"}
    r = requests.post(
        server.url + "/v1/completions", data=b"x" * (2 << 20), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_kill_9_then_restart_keeps_sessions(pulled, home):
    live = LiveServer("--model", M)
    try:
        r = requests.post(
            live.url + "/api/chat",
            json={
                "model": M,
                "stream": False,
                "session_id": "survivor",
                "messages": [{"role": "user", "content": "Remember me."}],
                "options": {"max_tokens": 5},
            },
        )
        assert r.ok

        def stream() -> None:  # a write in flight when the process dies
            try:
                requests.post(
                    live.url + "/api/chat",
                    json={
                        "model": M,
                        "session_id": "survivor",
                        "messages": [{"role": "user", "content": "Tell a long story."}],
                    },
                    timeout=30,
                )
            except requests.RequestException:
                pass

        threading.Thread(target=stream, daemon=True).start()
        time.sleep(1)
        os.killpg(live.proc.pid, signal.SIGKILL)
        live.proc.wait()
    finally:
        live.stop()
    db = sqlite3.connect(home / "sessions.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    again = LiveServer()
    try:
        r = requests.post(
            again.url + "/api/chat",
            json={
                "model": M,
                "stream": False,
                "session_id": "survivor",
                "messages": [{"role": "user", "content": "Again."}],
                "options": {"max_tokens": 5},
            },
        )
        assert r.ok and r.json()["usage"]["prompt_tokens"] > 20  # the stored turn was prepended
    finally:
        again.stop()


def test_model_dir_deleted_while_loaded(pulled, home):
    copy = home / "models" / "doomed-copy"
    shutil.copytree(pulled, copy)
    live = LiveServer("--model", M, "--model", "doomed-copy")
    try:
        body = {"model": "doomed-copy", "prompt": "Hi", "stream": False, "options": {"max_tokens": 3}}
        assert requests.post(live.url + "/api/generate", json=body).ok
        shutil.rmtree(copy)
        r = requests.post(live.url + "/api/generate", json=body)
        assert r.status_code == 404 and "Model 'doomed-copy' not found" in r.json()["detail"]
        assert "doomed-copy" not in requests.get(live.url + "/").json()["running_containers"]
        ok = requests.post(live.url + "/api/generate", json={**body, "model": M})
        assert ok.status_code == 200
    finally:
        live.stop()
        shutil.rmtree(copy, ignore_errors=True)


def test_a_crashed_worker_is_replaced_on_the_next_request(pulled):
    """A bug that kills a model's worker thread fails what it held with the cause, and the next request
    loads the model afresh instead of getting "being unloaded" until a restart."""
    from ortllm.runtime.options import validate_options
    from ortllm.runtime.registry import ModelRegistry
    from ortllm.runtime.types import GenerationRequest

    registry = ModelRegistry()
    try:
        broken = registry.get(M)

        def crash(*args, **kwargs):
            raise RuntimeError("injected worker bug")

        broken._next_work = crash  # the worker calls it on its next round
        long = validate_options({"max_tokens": 50, "min_tokens": 50})  # still running when it crashes
        stream = broken.submit(GenerationRequest(long, prompt="Hello"))
        events = list(stream)
        assert events[-1].finish_reason == "error" and "injected worker bug" in events[-1].error
        broken._thread.join(10)
        assert broken.crashed == "injected worker bug"
        fresh = registry.get(M)
        assert fresh is not broken and fresh.crashed is None
        assert fresh.generate(GenerationRequest(prompt="Hello")).usage.completion_tokens > 0
    finally:
        registry.close()


def test_worker_exception_fails_one_request_and_keeps_serving(pulled, monkeypatch):
    from ortllm.runtime.job import Job
    from ortllm.web.app import create_app

    real = Job.take

    def flaky(self, token, eos_ids=(), logprob=None):
        if self.request.prompt == "boom":
            raise RuntimeError("injected fault")
        return real(self, token, eos_ids, logprob)

    monkeypatch.setattr(Job, "take", flaky)
    app = create_app()
    client = app.test_client()
    try:
        r = client.post("/api/generate", json={"model": M, "prompt": "boom", "raw": True, "stream": False})
        assert r.status_code == 500 and "injected fault" in r.get_json()["detail"]
        r = client.post("/v1/completions", json={"model": M, "prompt": "boom", "max_tokens": 3})
        assert r.status_code == 500 and r.get_json()["error"]["type"] == "server_error"
        r = client.post(
            "/api/generate",
            json={
                "model": M,
                "prompt": "What is the capital of France?",
                "stream": False,
                "options": {"temperature": 0},
            },
        )
        assert r.status_code == 200 and "Paris" in r.get_json()["text"]
    finally:
        app.extensions["ortllm"].registry.close()
