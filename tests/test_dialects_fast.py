"""Every dialect's main routes in process, through create_app(registry=...) with a fake runner: a dialect
change is checked in seconds, without the model (the end-to-end tests run the same routes on it)."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from ortllm.errors import ModelNotFound
from ortllm.runtime.job import Job, Stream
from ortllm.runtime.types import Embeddings, GenerationRequest, Result
from ortllm.sessions import SessionStore
from ortllm.settings import Settings
from ortllm.store import InstalledModel, ModelStore
from ortllm.web.app import create_app

M = "fake-chat"
E = "fake-embed"
REPLY = ["Hel", "lo", " there"]


class FakeDecoder:
    """The fake tokenizer's incremental decoder: token i is REPLY[i]."""

    def decode(self, token: int) -> str:
        return REPLY[token]


def fake_stream(request: GenerationRequest) -> Stream:
    """A real Stream over a finished Job: REPLY's tokens, then the final event (4 prompt tokens)."""
    job = Job(request, [0, 0, 0, 0], len(REPLY), FakeDecoder)
    for token in range(len(REPLY)):
        job.take(token)
    job.finish("stop")
    return Stream(job, lambda job: None)


class FakeFacts:
    """The ModelFacts of a fake loaded model."""

    def __init__(self, installed: InstalledModel) -> None:
        self.installed = installed
        self.name = installed.name
        self.variant = next(iter(installed.variants.values()))
        self.ep = "cpu"
        self.reason = "the fake runs anywhere"
        self.parameters: dict[str, Any] = {}
        self.context_length = 2048


class FakeRunner:
    """A Runner that Generates (REPLY, every time) and Embeds (2-d unit vectors); it records requests."""

    crashed: str | None = None
    queue_depth = 0
    active_count = 0

    def __init__(self, installed: InstalledModel) -> None:
        self.model = FakeFacts(installed)
        self.requests: list[GenerationRequest] = []

    @property
    def name(self) -> str:
        return self.model.name

    def submit(self, request: GenerationRequest) -> Stream:
        self.requests.append(request)
        return fake_stream(request)

    def generate(self, request: GenerationRequest) -> Result:
        raise NotImplementedError  # no route waits for a whole Result

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.embed_texts(texts).vectors

    def embed_texts(self, texts: list[str], client_gone: Any = None) -> Embeddings:
        return Embeddings([[1.0, 0.0] for _ in texts], tokens=2 * len(texts))

    def close(self, timeout: float = 10.0) -> None:
        pass


class EmbedOnly:
    """A Runner that Embeds and cannot generate (as an embedding model's Embedder)."""

    crashed: str | None = None
    queue_depth = 0
    active_count = 0

    def __init__(self, installed: InstalledModel) -> None:
        self.model = FakeFacts(installed)
        self.name = installed.name

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[0.0, 1.0] for _ in texts]

    def embed_texts(self, texts: list[str], client_gone: Any = None) -> Embeddings:
        return Embeddings(self.embed(texts), tokens=len(texts))

    def close(self, timeout: float = 10.0) -> None:
        pass


class FakeRegistry:
    """The registry interface the web layer uses, over a real ModelStore of fake model folders."""

    def __init__(self, root: Path) -> None:
        self.store = ModelStore(root)
        self._loaded: dict[str, Any] = {}
        self._lock = threading.Lock()

    def installed(self, name: str) -> InstalledModel:
        model = self.store.find(name)
        if model is None:
            raise ModelNotFound(f"Model '{name}' not found")
        return model

    def get(self, name: str, *, autoload: bool = True, ep: str | None = None) -> Any:
        name = self.installed(name).name
        return self._loaded.get(name) or self.load(name, ep=ep)

    def load(self, name: str, *, ep: str | None = None) -> Any:
        installed = self.installed(name)
        with self._lock:
            if installed.name not in self._loaded:
                runner = EmbedOnly if installed.kind == "embedding" else FakeRunner
                self._loaded[installed.name] = runner(installed)
            return self._loaded[installed.name]

    def unload(self, name: str) -> bool:
        with self._lock:
            return self._loaded.pop(name, None) is not None

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def loaded(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._loaded)

    def unload_idle(self, idle_s: float) -> list[str]:
        return []

    def close(self) -> None:
        self._loaded.clear()


def install(root: Path, name: str, kind: str = "chat") -> None:
    """A store entry with one complete cpu variant (no weights: the fake runner needs none)."""
    variant = root / "models" / name / "cpu-int4"
    variant.mkdir(parents=True)
    (variant / "genai_config.json").write_text("{}")
    manifest = {
        "kind": kind,
        "family": "fake",
        "context_size": 2048,
        "hf_name": f"example/{name}",
        "variants": {"cpu-int4": {"ep": "cpu", "precision": "int4", "size_bytes": 1_000_000}},
    }
    (root / "models" / name / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def registry(tmp_path: Path) -> FakeRegistry:
    install(tmp_path, M)
    install(tmp_path, E, kind="embedding")
    return FakeRegistry(tmp_path)


@pytest.fixture
def client(tmp_path: Path, registry: FakeRegistry) -> Any:
    app = create_app(Settings(), registry=registry, sessions=SessionStore(tmp_path / "sessions.db"))  # type: ignore[arg-type]
    app.config["TESTING"] = True
    return app.test_client()


def sse(response: Any) -> list[str]:
    """The `data:` payloads of an SSE body."""
    text = response.get_data(as_text=True)
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


# ---- native -------------------------------------------------------------------------------------


def test_native_health_models_generate_chat_embeddings(client: Any, registry: FakeRegistry) -> None:
    health = client.get("/health").get_json()
    assert health["status"] == "healthy" and health["models_loaded"] == [] and "detail" not in health
    models = client.get("/api/models").get_json()["models"]
    assert [m["name"] for m in models] == [M, E]
    chat_model = models[0]
    assert chat_model["hf_name"] == f"example/{M}" and chat_model["variants"] == ["cpu-int4"]

    r = client.post("/api/generate", json={"model": M, "prompt": "Hi", "stream": False})
    assert r.status_code == 200, r.get_json()
    assert r.get_json() == {
        "text": "Hello there",
        "usage": {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7},
        "finish_reason": "stop",
    }
    assert registry.loaded()[M].requests[-1].messages == [{"role": "user", "content": "Hi"}]

    r = client.post("/api/chat", json={"model": M, "messages": [{"role": "user", "content": "Hi"}]})
    events = [json.loads(e) for e in sse(r)]
    assert [e["token"] for e in events[:-1]] == REPLY
    assert events[-1]["done"] and events[-1]["full_text"] == "Hello there"
    sid = events[-1]["session_id"]
    r = client.post(
        "/api/chat",
        json={
            "model": M,
            "session_id": sid,
            "stream": False,
            "messages": [{"role": "user", "content": "Again"}],
        },
    )
    body = r.get_json()
    assert body["message"]["content"] == "Hello there" and body["finish_reason"] == "stop"
    # the stored turn is the history of the next one
    assert [m["content"] for m in registry.loaded()[M].requests[-1].messages] == [
        "Hi",
        "Hello there",
        "Again",
    ]

    r = client.post("/api/embeddings", json={"model": E, "input": ["a", "b"]})
    assert r.get_json() == {"embeddings": [[0.0, 1.0], [0.0, 1.0]], "model": E}
    r = client.post("/api/generate", json={"model": E, "prompt": "Hi", "stream": False})
    assert r.status_code == 400 and "embedding model" in r.get_json()["detail"]
    r = client.post("/api/generate", json={"model": "nope", "prompt": "Hi"})
    assert r.status_code == 404 and "detail" in r.get_json()


# ---- openai -------------------------------------------------------------------------------------


def test_openai_chat_completions_models_embeddings(client: Any) -> None:
    body = {"model": M, "messages": [{"role": "user", "content": "Hi"}]}
    r = client.post("/v1/chat/completions", json=body)
    out = r.get_json()
    assert out["object"] == "chat.completion" and out["choices"][0]["message"]["content"] == "Hello there"
    assert out["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}

    chunks = sse(client.post("/v1/chat/completions", json={**body, "stream": True}))
    assert chunks[-1] == "[DONE]"
    deltas = [json.loads(c)["choices"][0]["delta"].get("content", "") for c in chunks[:-1]]
    assert "".join(deltas) == "Hello there"

    r = client.post("/v1/completions", json={"model": M, "prompt": "Hi", "echo": True})
    assert r.get_json()["choices"][0]["text"] == "HiHello there"
    assert [m["id"] for m in client.get("/v1/models").get_json()["data"]] == [M, E]
    r = client.post("/v1/embeddings", json={"model": E, "input": "a"})
    assert r.get_json()["data"][0]["embedding"] == [0.0, 1.0]
    r = client.post("/v1/chat/completions", json={**body, "n": 9})  # n is 1 to 8
    assert r.status_code == 400 and r.get_json()["error"]["type"] == "invalid_request_error"


# ---- chat service (chat_ws) ---------------------------------------------------------------------


def test_chat_service_completions_chat_sessions_history(client: Any) -> None:
    assert client.get("/readiness").status_code == 503  # nothing loaded yet
    r = client.post("/completions", json={"model": M, "prompt": "Hi"})
    assert r.get_json() == {"text": "Hello there", "model": M, "tokens": 3}
    assert client.get("/readiness").get_json()["status"] == "ready"

    r = client.post("/chat/completions", json={"model-name": M, "prompt": "Hi", "system-prompt": "Be brief"})
    assert sse(r) == REPLY
    sid = r.headers["X-Session-Id"]
    assert client.get("/sessions").get_json() == [sid]
    history = client.get(f"/chat/history/{sid}").get_json()
    assert [m["role"] for m in history] == ["system", "user", "assistant"]
    r = client.post(f"/chat/history/{sid}/rollback", json={"amount": 1})
    assert r.get_json() == {"status": "ok"} and len(client.get(f"/chat/history/{sid}").get_json()) == 2
    assert client.delete(f"/chat/history/{sid}").status_code == 204
    r = client.post("/chat/completions", json={"model-name": M, "prompt": "Hi", "device": "metal"})
    assert r.status_code == 400 and "Metal" in r.get_json()["error"]


# ---- orchestrator -------------------------------------------------------------------------------


def test_orchestrator_models_start_generate_stop(client: Any) -> None:
    models = client.get("/models").get_json()["models"]
    assert {m["id"]: m["running"] for m in models} == {E: False, M: False}
    r = client.post(f"/models/{M}/start")
    assert r.get_json()["container_name"] == f"ortllm-{M}" and "started" in r.get_json()["message"]
    assert client.get(f"/models/{M}").get_json()["running"] is True
    r = client.post("/generate", json={"model_id": M, "prompt": "Hi"})
    assert r.get_json() == {"generated_text": "Hello there", "model_id": M}
    assert client.post(f"/models/{M}/stop").status_code == 200
    r = client.post(f"/models/{M}/stop")
    assert r.status_code == 404 and "not running" in r.get_json()["detail"]


# ---- /api/v1 ------------------------------------------------------------------------------------


def test_api_v1_generate_stream_batch_models(client: Any) -> None:
    r = client.post("/api/v1/generate", json={"model": M, "prompt": "Hi"})
    out = r.get_json()
    assert out["text"] == "Hello there" and out["usage"]["total_tokens"] == 7 and out["latency"] >= 0
    events = [json.loads(e) for e in sse(client.post("/api/v1/generate/stream", json={"prompt": "Hi"}))]
    assert [e["finished"] for e in events] == [False, False, True] and events[-1]["token"] == " there"
    r = client.post("/api/v1/batch/generate", json={"requests": [{"prompt": "a"}, {"prompt": "b"}]})
    assert [x["text"] for x in r.get_json()["results"]] == ["Hello there"] * 2
    models = client.get("/api/v1/models").get_json()["models"]
    assert {m["name"]: m["size"] for m in models} == {E: "1MB", M: "1MB"}
    r = client.post(f"/api/v1/models/{M}/load", json={"quantization": "fp16"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "INVALID_REQUEST"
    r = client.post("/api/v1/generate", json={"model": "nope", "prompt": "Hi"})
    error = r.get_json()["error"]
    assert (
        r.status_code == 404 and error["code"] == "MODEL_NOT_FOUND" and "/api/v1/models" in error["details"]
    )


# ---- sessions (web UI) --------------------------------------------------------------------------


def test_sessions_create_read_patch_delete(client: Any) -> None:
    seed = [{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]
    r = client.post("/api/sessions", json={"title": "t", "model": M, "messages": seed})
    assert r.status_code == 201
    session = r.get_json()
    assert session["system_prompt"] == "S" and session["message_count"] == 1
    sid = session["id"]
    assert client.get(f"/api/sessions/{sid}").get_json()["messages"] == [{"role": "user", "content": "u"}]
    assert client.patch(f"/api/sessions/{sid}", json={"title": "new"}).get_json()["title"] == "new"
    assert [s["id"] for s in client.get("/api/sessions").get_json()["sessions"]] == [sid]
    assert client.delete(f"/api/sessions/{sid}").status_code == 204
    r = client.get(f"/api/sessions/{sid}")
    assert r.status_code == 404 and sid in r.get_json()["detail"]


# ---- shared: the documented responses are the sent ones, metrics ------------------------------------


def test_openapi_documents_the_fields_sent(client: Any) -> None:
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    assert {"models_loaded", "detail"} <= set(schemas["Health"]["properties"])
    assert "finish_reason" in schemas["ChatResponse"]["properties"]
    assert {"hf_name", "variants"} <= set(schemas["ModelObject"]["properties"])
    stop = schemas["InferenceOptions"]["properties"]["stop"]["anyOf"][0]
    assert stop["maxItems"] >= 1  # the runtime's bound, written in by docs.py


def test_metrics_count_generations_and_requests(client: Any) -> None:
    client.post("/api/generate", json={"model": M, "prompt": "Hi", "stream": False})
    text = client.get("/metrics").get_data(as_text=True)
    assert f'completions_requests_total{{model="{M}"}} 1.0' in text
    assert f'completions_tokens_total{{model="{M}"}} 3.0' in text
    assert 'http_requests_total{dialect="detail",identity="anonymous",status="200"}' in text


def test_chat_service_websocket_multi_turn(tmp_path: Path, registry: FakeRegistry) -> None:
    """`WS /chat/ws` (which the test client cannot speak): a threaded werkzeug server on 127.0.0.1."""
    from simple_websocket import Client
    from werkzeug.serving import make_server

    app = create_app(Settings(), registry=registry, sessions=SessionStore(tmp_path / "sessions.db"))  # type: ignore[arg-type]
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ws = Client.connect(f"ws://127.0.0.1:{server.server_port}/chat/ws?mode=multi")
    try:
        frames: list[str] = []
        for prompt in ("Hi", "Again"):
            ws.send(json.dumps({"model-name": M, "prompt": prompt}))
            while not (frame := ws.receive(timeout=10)).startswith("__END__:"):
                frames.append(frame)
            end = json.loads(frame[len("__END__:") :])
            assert end["finish_reason"] == "stop" and end["usage"]["completion_tokens"] == 3
        assert frames[0].startswith("__START__:") and frames[1:4] == REPLY
        assert (
            json.loads(frames[4][len("__START__:") :])["session-id"] == end["session-id"]
        )  # one conversation
        ws.send(json.dumps({"model-name": M}))
        assert ws.receive(timeout=10) == "__ERROR__:Missing required field: prompt"
    finally:
        ws.close()
        server.shutdown()
