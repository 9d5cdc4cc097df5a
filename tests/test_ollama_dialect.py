"""The Ollama dialect's inference and model-facts routes: shapes, errors and option mapping in process with the
fake runner (fast), then chat, generate, format, fill-in-the-middle and tools on the real models."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from ortllm.sessions import SessionStore
from ortllm.settings import Settings
from ortllm.web.app import create_app
from tests.conftest import DEFAULT_MODEL, TOOL_MODEL
from tests.test_dialects_fast import E, FakeFacts, FakeRegistry, M, install

OLLAMA = {"ortllm.listener": "ollama"}
DONE_FIELDS = (
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
)


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    # ModelFacts.encode, which the fake lacks: one token per character
    monkeypatch.setattr(FakeFacts, "encode", lambda self, text: [0] * len(text), raising=False)
    install(tmp_path, M)
    install(tmp_path, E, kind="embedding")
    return FakeRegistry(tmp_path)


@pytest.fixture
def client(tmp_path: Path, registry: FakeRegistry) -> Any:
    app = create_app(Settings(), registry=registry, sessions=SessionStore(tmp_path / "s.db"))  # type: ignore[arg-type]
    app.config["TESTING"] = True
    return app.test_client()


def post(client: Any, path: str, body: dict[str, Any]) -> Any:
    return client.post(path, json=body, environ_base=OLLAMA)


def lines(response: Any) -> list[dict[str, Any]]:
    assert response.mimetype == "application/x-ndjson"
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines() if line.strip()]


def test_root_version_tags_show(client: Any) -> None:
    root = client.get("/", environ_base=OLLAMA)
    assert root.get_data(as_text=True) == "Ollama is running"
    assert client.head("/", environ_base=OLLAMA).status_code == 200
    version = client.get("/api/version", environ_base=OLLAMA).get_json()
    assert tuple(int(x) for x in version["version"].split(".")) >= (0, 6, 4) and version["ortllm"]

    models = client.get("/api/tags", environ_base=OLLAMA).get_json()["models"]
    assert [m["name"] for m in models] == [f"{M}:latest", f"{E}:latest"]
    first = models[0]
    assert len(first["digest"]) == 64 and int(first["digest"], 16) >= 0
    assert first["details"]["format"] == "onnx" and first["details"]["quantization_level"] == "INT4"
    assert first["size"] == 1_000_000 and first["modified_at"].endswith("Z")

    for name in (M, f"{M}:latest"):
        shown = post(client, "/api/show", {"model": name})
        assert shown.status_code == 200, shown.get_json()
    shown = post(client, "/api/show", {"name": M}).get_json()  # the older field
    assert shown["capabilities"] == ["completion"]
    assert shown["model_info"]["general.basename"] == M
    arch = shown["model_info"]["general.architecture"]
    assert shown["model_info"][f"{arch}.context_length"] == 2048
    assert post(client, "/api/show", {"model": E}).get_json()["capabilities"] == ["embedding"]


@pytest.mark.parametrize("name", [f"{M}:q8", "nope", "nope:latest"])
def test_unknown_names_are_ollamas_404(client: Any, name: str) -> None:
    for path in ("/api/show", "/api/chat", "/api/generate", "/api/embed"):
        r = post(client, path, {"model": name, "prompt": "x", "input": "x"})
        assert r.status_code == 404, (path, r.get_json())
        assert r.get_json() == {"error": f'model "{name}" not found, try pulling it first'}


def test_chat_streams_json_lines_and_answers_one_object(client: Any) -> None:
    body = {"model": M, "messages": [{"role": "user", "content": "Hi"}]}
    got = lines(post(client, "/api/chat", body))
    assert "".join(line["message"]["content"] for line in got) == "Hello there"
    assert all(line["done"] is False for line in got[:-1]) and got[-1]["done"] is True
    final = got[-1]
    assert final["done_reason"] == "stop" and final["model"] == M
    assert final["prompt_eval_count"] == 4 and final["eval_count"] == 3
    assert all(isinstance(final[k], int) and final[k] >= 0 for k in DONE_FIELDS)
    assert final["total_duration"] > 0 and final["created_at"].endswith("Z")

    single = post(client, "/api/chat", {**body, "stream": False}).get_json()
    assert single["message"] == {"role": "assistant", "content": "Hello there"} and single["done"] is True
    generated = post(client, "/api/generate", {"model": f"{M}:latest", "prompt": "Hi", "stream": False})
    assert generated.get_json()["response"] == "Hello there"
    assert generated.get_json()["model"] == f"{M}:latest"  # echoed as sent, as Ollama does


def test_options_map_to_the_runtime(client: Any, registry: FakeRegistry) -> None:
    options = {
        "num_predict": 7,
        "temperature": 0,
        "top_k": 5,
        "top_p": 0.5,
        "min_p": 0.1,
        "repeat_penalty": 1.2,
        "repeat_last_n": 32,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "seed": 42,
        "stop": ["\n"],
        "num_ctx": 10**6,  # above the model's context: clamped, as Ollama does
        "mirostat": 2,  # Ollama's own, ignored
        "no_such_option": True,
    }
    r = post(client, "/api/generate", {"model": M, "prompt": "Hi", "stream": False, "options": options})
    assert r.status_code == 200, r.get_json()
    got = registry.get(M).requests[-1].options
    assert (got.max_tokens, got.temperature, got.top_k, got.top_p, got.min_p) == (7, 0.0, 5, 0.5, 0.1)
    assert (got.repeat_penalty, got.repeat_last_n, got.seed, got.stop) == (1.2, 32, 42, ("\n",))
    assert (got.presence_penalty, got.frequency_penalty) == (0.5, 0.25)

    for predict in (-1, -2):
        r = post(client, "/api/generate", {"model": M, "prompt": "Hi", "options": {"num_predict": predict}})
        assert r.status_code == 200
        assert registry.get(M).requests[-1].options.max_tokens == 2048  # up to the context
    post(
        client, "/api/generate", {"model": M, "prompt": "Hi", "options": {"num_ctx": 100, "num_predict": -1}}
    )
    assert registry.get(M).requests[-1].options.max_tokens == 100
    assert (
        registry.get(M).requests[-1].options.num_ctx == 100
    )  # the window bounds the prompt too (400 if longer)
    post(client, "/api/generate", {"model": M, "prompt": "Hi", "options": {"seed": -1}})
    assert registry.get(M).requests[-1].options.seed is None


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"temperature": "hot"}, 'option "temperature" must be of type float'),
        ({"num_predict": 1.5}, 'option "num_predict" must be of type integer'),
        ({"top_k": True}, 'option "top_k" must be of type integer'),
        ({"stop": [1]}, 'option "stop" must be of type array'),
        ({"num_predict": 0}, "num_predict"),
        ({"temperature": 9}, "temperature must be between"),
    ],
)
def test_bad_options_are_400_naming_them(client: Any, options: dict[str, Any], words: str) -> None:
    r = post(
        client, "/api/chat", {"model": M, "messages": [{"role": "user", "content": "x"}], "options": options}
    )
    assert r.status_code == 400 and words in r.get_json()["error"]


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        ("/api/generate", {"template": "{{ .Prompt }}"}, "template overrides are not supported"),
        ("/api/generate", {"context": [1, 2]}, "context"),
        ("/api/generate", {"images": ["aGk="]}, "does not support images"),
        ("/api/generate", {"suffix": "return x"}, "does not support insert"),
        ("/api/generate", {"raw": True, "system": "be brief"}, "raw mode does not support"),
        ("/api/generate", {"think": True}, "does not support thinking"),
        ("/api/generate", {"format": "yaml"}, "invalid format"),
        ("/api/generate", {"format": {"type": "nope"}}, "format"),
        ("/api/generate", {"keep_alive": "5 minutes"}, "keep_alive"),
        ("/api/generate", {"stream": "yes"}, "stream"),
        ("/api/chat", {"messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
        ("/api/chat", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("/api/chat", {"messages": [{"role": "tool", "content": "4"}]}, "no earlier assistant message"),
        ("/api/chat", {"messages": "hi"}, "messages"),
    ],
)
def test_refusals_are_400_in_ollamas_shape(client: Any, path: str, body: dict[str, Any], words: str) -> None:
    r = post(client, path, {"model": M, "prompt": "Hi", **body})
    assert r.status_code == 400, r.get_json()
    assert set(r.get_json()) == {"error"} and words in r.get_json()["error"]


def test_bad_json_and_missing_model_are_400(client: Any) -> None:
    r = client.post("/api/chat", data="{nope", content_type="application/json", environ_base=OLLAMA)
    assert r.status_code == 400 and "error" in r.get_json()
    r = post(client, "/api/chat", {"messages": []})
    assert r.status_code == 400 and "model" in r.get_json()["error"]


def test_format_json_and_schema_become_guidance(client: Any, registry: FakeRegistry) -> None:
    post(client, "/api/chat", {"model": M, "messages": [{"role": "user", "content": "x"}], "format": "json"})
    assert registry.get(M).requests[-1].guidance == ("json_schema", '{"type": "object"}')
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    post(client, "/api/generate", {"model": M, "prompt": "x", "format": schema})
    kind, text = registry.get(M).requests[-1].guidance
    assert kind == "json_schema" and json.loads(text) == schema


def test_tool_history_in_ollamas_shape(client: Any, registry: FakeRegistry) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "22 C", "tool_name": "get_weather"},
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather of a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    r = post(client, "/api/chat", {"model": M, "messages": messages, "tools": tools, "stream": False})
    assert r.status_code == 200, r.get_json()
    sent = json.dumps(registry.get(M).requests[-1].messages)
    # the fake has no chat template: the call and its result are written into the history as text
    assert "get_weather" in sent and "Paris" in sent and "22 C" in sent
    assert registry.get(M).requests[-1].guidance is not None  # the tool grammar


def test_keep_alive_loads_and_unloads(client: Any, registry: FakeRegistry) -> None:
    assert not registry.is_loaded(M)
    r = post(client, "/api/chat", {"model": M, "messages": []})
    assert r.get_json()["done_reason"] == "load" and r.get_json()["message"]["content"] == ""
    assert registry.is_loaded(M)
    ps = client.get("/api/ps", environ_base=OLLAMA).get_json()["models"]
    assert [m["name"] for m in ps] == [f"{M}:latest"] and ps[0]["size_vram"] == 0
    assert ps[0]["context_length"] == 2048 and ps[0]["expires_at"].endswith("Z")
    r = post(client, "/api/generate", {"model": M, "keep_alive": 0})
    assert r.get_json()["done_reason"] == "unload" and not registry.is_loaded(M)

    # keep_alive 0 with an answer: unloaded once the answer is complete
    post(client, "/api/generate", {"model": M, "prompt": "Hi", "keep_alive": "0s", "stream": False})
    deadline = time.monotonic() + 5
    while registry.is_loaded(M) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not registry.is_loaded(M)
    post(client, "/api/generate", {"model": M, "prompt": "Hi", "keep_alive": -1, "stream": False})
    ps = client.get("/api/ps", environ_base=OLLAMA).get_json()["models"]
    assert ps[0]["expires_at"] > "2200"  # kept loaded
    post(client, "/api/generate", {"model": M, "prompt": "Hi", "keep_alive": "1h30m", "stream": False})
    expires = client.get("/api/ps", environ_base=OLLAMA).get_json()["models"][0]["expires_at"]
    assert expires[:4] < "2200"


def test_embed_and_embeddings(client: Any) -> None:
    r = post(client, "/api/embed", {"model": E, "input": ["a", "b"]}).get_json()
    assert r["model"] == E and r["embeddings"] == [[0.0, 1.0], [0.0, 1.0]] and r["prompt_eval_count"] == 2
    assert r["total_duration"] > 0 and "load_duration" in r
    r = post(client, "/api/embed", {"model": M, "input": "a", "dimensions": 1}).get_json()
    assert r["embeddings"] == [[1.0]]
    r = post(client, "/api/embed", {"model": M, "input": "a", "dimensions": 5})
    assert r.status_code == 400 and "dimensions" in r.get_json()["error"]
    assert post(client, "/api/embeddings", {"model": E, "prompt": "a"}).get_json() == {
        "embedding": [0.0, 1.0]
    }
    assert post(client, "/api/embed", {"model": E, "input": []}).get_json()["embeddings"] == []


def test_ollama_routes_are_not_on_the_main_port(client: Any) -> None:
    assert client.get("/api/tags").status_code == 404
    assert client.get("/_ollama/api/tags").status_code == 404


# ---- on the real models ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real(pulled: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    app = create_app(Settings(), sessions=SessionStore(tmp_path_factory.mktemp("ollama") / "s.db"))
    app.config["TESTING"] = True
    yield app.test_client()
    app.extensions["ortllm"].registry.close()


@pytest.mark.slow
def test_real_chat_streams_measured_timings(real: Any) -> None:
    post(real, "/api/generate", {"model": DEFAULT_MODEL, "keep_alive": 0})  # unloaded: this request loads it
    body = {
        "model": f"{DEFAULT_MODEL}:latest",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "options": {"num_predict": 12, "temperature": 0},
    }
    got = lines(post(real, "/api/chat", body))
    assert "".join(line["message"]["content"] for line in got).strip()
    final = got[-1]
    assert final["done"] is True and final["done_reason"] in ("stop", "length")
    assert all(final[k] > 0 for k in DONE_FIELDS), final
    assert final["total_duration"] >= final["load_duration"] + final["prompt_eval_duration"]
    again = post(real, "/api/chat", {**body, "stream": False}).get_json()
    assert again["load_duration"] == 0 and again["eval_count"] > 0  # loaded already

    shown = post(real, "/api/show", {"model": DEFAULT_MODEL}).get_json()
    info = shown["model_info"]
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == 8192
    assert info["llama.embedding_length"] == 576 and 130e6 < info["general.parameter_count"] < 140e6
    assert "insert" not in shown["capabilities"] and "completion" in shown["capabilities"]


@pytest.mark.slow
def test_real_format_json_gives_json(real: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    body = {
        "model": DEFAULT_MODEL,
        "prompt": "Name a city in France as JSON.",
        "format": schema,
        "stream": False,
        "options": {"temperature": 0, "num_predict": 60},
    }
    r = post(real, "/api/generate", body).get_json()
    assert isinstance(json.loads(r["response"])["city"], str), r


@pytest.mark.slow
def test_real_embed_with_a_chat_model(real: Any) -> None:
    r = post(real, "/api/embed", {"model": DEFAULT_MODEL, "input": ["hello", "x " * 9000]}).get_json()
    assert len(r["embeddings"]) == 2 and len(r["embeddings"][0]) == 576  # the long one truncated
    r = post(real, "/api/embed", {"model": DEFAULT_MODEL, "input": "x " * 9000, "truncate": False})
    assert r.status_code == 400 and "context length" in r.get_json()["error"]


@pytest.mark.slow
def test_qwen_fill_in_the_middle_and_tools(qwen: Path, real: Any) -> None:
    shown = post(real, "/api/show", {"model": TOOL_MODEL}).get_json()
    assert {"completion", "tools", "insert"} <= set(shown["capabilities"])
    body = {
        "model": TOOL_MODEL,
        "prompt": "def add(a, b):\n    ",
        "suffix": "\n\nprint(add(2, 3))\n",
        "stream": False,
        "options": {"temperature": 0, "num_predict": 24},
    }
    r = post(real, "/api/generate", body).get_json()
    assert "return" in r["response"] and "a + b" in r["response"].replace("a+b", "a + b"), r

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather of a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    ask = {
        "model": TOOL_MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Paris? Use the tool."}],
        "tools": tools,
        "options": {"temperature": 0, "num_predict": 80},
    }
    single = post(real, "/api/chat", {**ask, "stream": False}).get_json()
    calls = single["message"]["tool_calls"]
    assert calls[0]["function"]["name"] == "get_weather"
    assert isinstance(calls[0]["function"]["arguments"], dict) and "city" in calls[0]["function"]["arguments"]
    streamed = [line for line in lines(post(real, "/api/chat", ask)) if line["message"].get("tool_calls")]
    assert (
        streamed
        and streamed[0]["message"]["tool_calls"][0]["function"]["arguments"]
        == calls[0]["function"]["arguments"]
    )
