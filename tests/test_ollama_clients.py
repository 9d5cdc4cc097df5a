"""The Ollama listener proven with Ollama's own clients: the `ollama` Python package, langchain-ollama, the
`ollama` npm package, a replay of VS Code Copilot's Ollama provider, both listeners in one process, and auth."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ollama
import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ALICE_KEY, DEFAULT_MODEL, QUESTION, TOOL_MODEL, OllamaServer, sse_events

pytestmark = pytest.mark.slow

PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "num_predict": 12}
COPY = "smollm2-ollama-copy"
# RFC 3339 in UTC with a fraction of a second, as Ollama's created_at
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|\+00:00)$")
GET_WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city's name, e.g. London"}},
            "required": ["city"],
        },
    },
}


def get_weather(city: str) -> str:
    """Get the current weather in a city.

    Args:
      city: The city's name, e.g. London

    Returns:
      The weather there
    """
    return "18 degrees and sunny"


@pytest.fixture(scope="module")
def client(ollama_server: OllamaServer) -> ollama.Client:
    return ollama.Client(host=ollama_server.ollama_url, timeout=300)


def genai_config(model_dir: Path) -> dict[str, Any]:
    """The genai_config.json of a store entry's only variant."""
    [config] = model_dir.glob("*/genai_config.json")
    return dict(json.loads(config.read_text())["model"])


def assert_created_at(value: str | None) -> None:
    """`created_at` is RFC 3339 UTC with a fraction, and now (give or take a few minutes)."""
    assert value and RFC3339.match(value), value
    whole, fraction = value.rstrip("Z").removesuffix("+00:00").split(".")
    when = datetime.fromisoformat(f"{whole}.{fraction[:6]}").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - when).total_seconds()) < 600


def assert_done(final: Any) -> None:
    """The done line's counts and measured durations (nanoseconds)."""
    assert final.done is True and final.done_reason in ("stop", "length")
    assert final.prompt_eval_count > 0 and 0 < final.eval_count <= GREEDY["num_predict"]
    # nanoseconds: a real generation takes more than a microsecond, and well under the test's timeout
    assert 1_000 < final.eval_duration <= final.total_duration < 300 * 10**9
    assert final.prompt_eval_duration > 0 and final.load_duration >= 0


def version_supported(version: str, minimum: str = "0.6.4") -> bool:
    """Copilot's `_isVersionSupported`: dot parts compared as JavaScript's parseInt reads them."""
    if version == "0.0.0":
        return True

    def parts(v: str) -> list[int]:
        return [int(m.group()) if (m := re.match(r"\d+", p)) else 0 for p in v.split(".")]

    current, least = parts(version), parts(minimum)
    for i in range(max(len(current), len(least))):
        a = current[i] if i < len(current) else 0
        b = least[i] if i < len(least) else 0
        if a != b:
            return a > b
    return True


# --- the `ollama` Python package ---------------------------------------------------------------------------


def test_list(client: ollama.Client) -> None:
    models = {m.model: m for m in client.list().models}
    for name in (DEFAULT_MODEL, TOOL_MODEL):
        m = models[f"{name}:latest"]
        assert m.size and m.size > 10_000_000 and m.digest and m.modified_at
        assert m.details and m.details.format == "onnx" and m.details.quantization_level
        assert m.details.parameter_size and m.details.family


def test_show(client: ollama.Client, qwen: Path, pulled: Path) -> None:
    shown = client.show(TOOL_MODEL)
    info = shown.modelinfo or {}
    arch = info["general.architecture"]
    config = genai_config(qwen)
    assert info[f"{arch}.context_length"] == config["context_length"]
    assert info[f"{arch}.embedding_length"] == config["decoder"]["hidden_size"]
    assert info["general.parameter_count"] > 100_000_000
    # Qwen2.5-Coder's template has tools and its vocabulary the fill-in-the-middle tokens
    assert {"completion", "tools", "insert"} <= set(shown.capabilities or [])
    assert shown.details and shown.details.format == "onnx" and shown.template
    # the tag is optional, as with Ollama
    small = client.show(f"{DEFAULT_MODEL}:latest")
    arch = (small.modelinfo or {})["general.architecture"]
    assert (small.modelinfo or {})[f"{arch}.context_length"] == genai_config(pulled)["context_length"]
    assert "completion" in (small.capabilities or [])


def test_show_unknown_model_is_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        client.show("no-such-model")
    assert info.value.status_code == 404 and "no-such-model" in info.value.error


def test_ps(client: ollama.Client) -> None:
    client.generate(model=DEFAULT_MODEL, prompt="Hi", options={"num_predict": 1})
    loaded = {m.model: m for m in client.ps().models}
    for name in (DEFAULT_MODEL, TOOL_MODEL):
        m = loaded.get(f"{name}:latest") or loaded[name]
        assert m.size and m.size > 10_000_000 and m.size_vram == 0  # CPU: nothing in VRAM
        assert m.expires_at and m.context_length and m.context_length > 0


def test_num_ctx_bounds_the_request_and_never_cuts_the_prompt(client: ollama.Client) -> None:
    prompt = "Once upon a time, in a land far away, there lived"
    capped = client.generate(model=DEFAULT_MODEL, prompt=prompt, raw=True, options={"num_ctx": 16, **GREEDY})
    assert capped.prompt_eval_count + capped.eval_count == 16  # the answer stops at the window
    with pytest.raises(ollama.ResponseError) as info:  # Ollama would cut the prompt silently
        client.generate(model=DEFAULT_MODEL, prompt=prompt, raw=True, options={"num_ctx": 5})
    assert (
        info.value.status_code == 400 and "Prompt too long for context window (5 tokens)" in info.value.error
    )


def test_chat_non_streamed_and_streamed_agree(client: ollama.Client) -> None:
    whole = client.chat(model=DEFAULT_MODEL, messages=QUESTION, options=GREEDY, stream=False)
    assert whole.message.role == "assistant" and whole.message.content and whole.model == DEFAULT_MODEL
    assert_created_at(whole.created_at)
    assert_done(whole)
    parts = list(client.chat(model=DEFAULT_MODEL, messages=QUESTION, options=GREEDY, stream=True))
    assert len(parts) > 2 and all(p.done is False for p in parts[:-1])
    for p in parts:
        assert p.message.role == "assistant"
        assert_created_at(p.created_at)
    assert_done(parts[-1])
    # greedy: the same answer, token for token
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate(client: ollama.Client) -> None:
    whole = client.generate(model=DEFAULT_MODEL, prompt="The capital of France is", options=GREEDY)
    assert whole.response and whole.model == DEFAULT_MODEL
    assert_done(whole)
    parts = list(
        client.generate(model=DEFAULT_MODEL, prompt="The capital of France is", options=GREEDY, stream=True)
    )
    assert parts[-1].done and "".join(p.response or "" for p in parts) == whole.response


def test_embed(client: ollama.Client, pulled: Path) -> None:
    r = client.embed(model=DEFAULT_MODEL, input=["The cat sat on the mat", "The quarterly tax report"])
    width = genai_config(pulled)["decoder"]["hidden_size"]
    assert len(r.embeddings) == 2 and all(len(v) == width for v in r.embeddings)
    assert all(math.isclose(math.hypot(*v), 1, abs_tol=1e-3) for v in r.embeddings)  # Ollama normalises
    assert r.embeddings[0] != r.embeddings[1] and r.prompt_eval_count and r.prompt_eval_count > 2
    [one] = client.embed(model=DEFAULT_MODEL, input="The cat sat on the mat").embeddings
    assert one == pytest.approx(r.embeddings[0], abs=1e-4)
    assert len(client.embeddings(model=DEFAULT_MODEL, prompt="The cat").embedding) == width


def test_copy_then_delete(client: ollama.Client, home: Path) -> None:
    try:
        assert client.copy(DEFAULT_MODEL, COPY).status == "success"
        assert f"{COPY}:latest" in {m.model for m in client.list().models}
        answer = client.generate(model=COPY, prompt="Hello", options={"num_predict": 2})
        assert answer.done and answer.eval_count
    finally:
        assert client.delete(COPY).status == "success"
    assert f"{COPY}:latest" not in {m.model for m in client.list().models}
    assert not (home / "models" / COPY).exists()
    with pytest.raises(ollama.ResponseError) as info:
        client.delete(COPY)
    assert info.value.status_code == 404
    # the original is untouched
    assert f"{DEFAULT_MODEL}:latest" in {m.model for m in client.list().models}


def test_pull_of_an_installed_model(client: ollama.Client) -> None:
    progress = list(client.pull(DEFAULT_MODEL, stream=True))
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success" and all(statuses), statuses
    for p in progress:
        if p.total is not None and p.completed is not None:
            assert 0 <= p.completed <= p.total
    # installed already: its layer is reported whole, as Ollama does for blobs it has
    layers = [p for p in progress if p.digest]
    assert layers and all(p.digest.startswith("sha256:") and p.completed == p.total for p in layers)
    assert client.pull(DEFAULT_MODEL).status == "success"


def test_pull_of_an_unknown_model_is_an_error(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError, match="no-such-model"):
        list(client.pull("no-such-model", stream=True))
    with pytest.raises(ollama.ResponseError, match="no-such-model") as info:
        client.pull("no-such-model")
    assert info.value.status_code >= 400


def test_chat_with_a_python_function_as_tool(client: ollama.Client) -> None:
    r = client.chat(model=TOOL_MODEL, messages=PARIS, tools=[get_weather], options={"temperature": 0})
    assert r.done_reason == "stop" and "<tool_call>" not in (r.message.content or "")
    assert [(c.function.name, dict(c.function.arguments)) for c in r.message.tool_calls or []] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_streamed_chat_with_tools(client: ollama.Client) -> None:
    parts = list(
        client.chat(
            model=TOOL_MODEL, messages=PARIS, tools=[get_weather], options={"temperature": 0}, stream=True
        )
    )
    calls = [(c.function.name, dict(c.function.arguments)) for p in parts for c in p.message.tool_calls or []]
    assert calls == [("get_weather", {"city": "Paris"})] and parts[-1].done
    assert "<tool_call>" not in "".join(p.message.content or "" for p in parts)


# --- langchain-ollama ------------------------------------------------------------------------------------------


def test_langchain_chat_ollama_invoke_and_stream(ollama_server: OllamaServer) -> None:
    from langchain_ollama import ChatOllama

    llm = ChatOllama(
        base_url=ollama_server.ollama_url,
        model=DEFAULT_MODEL,
        temperature=0,
        num_predict=12,
        validate_model_on_init=True,  # reads /api/tags for the name
    )
    msg = llm.invoke("What is the capital of France?")
    assert isinstance(msg.content, str) and msg.content
    assert msg.usage_metadata and msg.usage_metadata["input_tokens"] > 0
    assert 0 < msg.usage_metadata["output_tokens"] <= 12
    assert msg.response_metadata["done_reason"] in ("stop", "length")
    chunks = list(llm.stream("What is the capital of France?"))
    assert len(chunks) > 2 and "".join(str(c.content) for c in chunks) == msg.content


def test_langchain_bind_tools(ollama_server: OllamaServer) -> None:
    from langchain_core.tools import tool
    from langchain_ollama import ChatOllama

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return "18 degrees and sunny"

    llm = ChatOllama(base_url=ollama_server.ollama_url, model=TOOL_MODEL, temperature=0, num_predict=64)
    msg = llm.bind_tools([get_weather]).invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_langchain_embeddings(ollama_server: OllamaServer, pulled: Path) -> None:
    from langchain_ollama import OllamaEmbeddings

    embedder = OllamaEmbeddings(base_url=ollama_server.ollama_url, model=DEFAULT_MODEL)
    vector = embedder.embed_query("The cat sat on the mat")
    assert len(vector) == genai_config(pulled)["decoder"]["hidden_size"]
    assert embedder.embed_documents(["a", "b"])[1] != vector


# --- the `ollama` npm package in Node ----------------------------------------------------------------------


def test_javascript_ollama_package_streams_a_chat(
    ollama_server: OllamaServer, client: ollama.Client, node_client: Path
) -> None:
    env = {**os.environ, "OLLAMA_HOST": ollama_server.ollama_url, "OLLAMA_MODEL": DEFAULT_MODEL}
    proc = subprocess.run(
        ["node", "ollama_chat.mjs"], cwd=node_client, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert version_supported(result["version"]) and result["parts"] > 2
    assert result["done_reason"] in ("stop", "length") and 0 < result["eval_count"] <= 12
    assert result["prompt_eval_count"] > 0 and result["total_duration"] >= result["eval_duration"] > 0
    # the same greedy question through the Python package: the same answer
    same = client.chat(model=DEFAULT_MODEL, messages=QUESTION, options=GREEDY)
    assert result["content"] == same.message.content


# --- VS Code Copilot's Ollama provider, replayed ------------------------------------------------------------


def test_vscode_copilot_sequence(ollama_server: OllamaServer, qwen: Path) -> None:
    base = ollama_server.ollama_url
    version = requests.get(f"{base}/api/version", timeout=30)
    assert version.status_code == 200 and version_supported(version.json()["version"])
    tags = requests.get(f"{base}/api/tags", timeout=30)
    assert tags.status_code == 200
    names = [m["model"] for m in tags.json()["models"]]
    model = f"{TOOL_MODEL}:latest"
    assert model in names
    # Copilot shows each model by the name /api/show gives and sizes its prompts by the context length
    shown = requests.post(f"{base}/api/show", json={"model": model}, timeout=30)
    assert shown.status_code == 200
    info = shown.json()
    arch = info["model_info"]["general.architecture"]
    assert info["model_info"][f"{arch}.context_length"] == genai_config(qwen)["context_length"]
    assert info["model_info"]["general.basename"] and "tools" in info["capabilities"]
    assert isinstance(info["template"], str) and info["details"]["family"]
    # then the OpenAI endpoint on the same host, with the model id from /api/tags (tag included)
    body = {
        "model": model,
        "messages": [{"role": "system", "content": "You are a helpful assistant."}, *PARIS],
        "tools": [GET_WEATHER_TOOL],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": 64,
    }
    with requests.post(f"{base}/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream"), r.text
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    usage = [c for c in chunks if c.get("usage")]
    assert len(usage) == 1 and usage[0]["choices"] == [] and usage[0]["usage"]["prompt_tokens"] > 0
    assert usage[0]["usage"]["completion_tokens"] > 0
    name, arguments, finish = "", "", None
    for c in chunks:
        for choice in c["choices"]:
            finish = choice.get("finish_reason") or finish
            for part in choice["delta"].get("tool_calls") or []:
                name += part.get("function", {}).get("name") or ""
                arguments += part.get("function", {}).get("arguments") or ""
    assert finish == "tool_calls" and name == "get_weather" and json.loads(arguments) == {"city": "Paris"}


# --- both listeners in one process -----------------------------------------------------------------------------


def ollama_requests(metrics_url: str) -> float:
    """The main port's /metrics count of requests in the Ollama dialect (all callers and statuses)."""
    text = requests.get(metrics_url, timeout=30).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "http_requests_total" and s.labels.get("dialect") == "ollama"
    )


def test_both_listeners_at_once(ollama_server: OllamaServer) -> None:
    before = ollama_requests(ollama_server.url + "/metrics")
    # the main port's native /api/chat keeps its SSE {token, done} events
    native = {"model": DEFAULT_MODEL, "messages": QUESTION, "stream": True, "options": {"max_tokens": 8}}
    with requests.post(ollama_server.url + "/api/chat", json=native, stream=True, timeout=300) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(r)
    assert all(e["done"] is False and isinstance(e["token"], str) for e in events[:-1]) and events[-1]["done"]
    # the Ollama port's /api/chat: newline-delimited JSON
    body = {"model": DEFAULT_MODEL, "messages": QUESTION, "options": GREEDY}
    with requests.post(ollama_server.ollama_url + "/api/chat", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert len(lines) > 2 and lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])
    assert all(line["message"]["role"] == "assistant" for line in lines)
    assert ollama_requests(ollama_server.url + "/metrics") >= before + 1


# --- auth on the Ollama listener -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured_ollama(pulled: Path):
    """SmolLM2 behind an API key, with the Ollama listener."""
    live = OllamaServer("--model", DEFAULT_MODEL, "--api-key", f"alice:{ALICE_KEY}", "--rate-limit", "1000")
    yield live
    live.stop()


def test_auth_applies_on_the_ollama_port(
    secured_ollama: OllamaServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)  # the ollama package would send it
    base = secured_ollama.ollama_url
    for path in ("/api/tags", "/v1/models"):
        refused = requests.get(base + path, timeout=30)
        assert refused.status_code == 401, (path, refused.text)
    refused = requests.get(base + "/api/tags", timeout=30)
    assert set(refused.json()) == {"error"}  # Ollama's error shape
    bearer = {"Authorization": f"Bearer {ALICE_KEY}"}
    assert requests.get(base + "/api/tags", headers=bearer, timeout=30).status_code == 200
    wrong = requests.get(base + "/api/tags", headers={"Authorization": "Bearer sk-wrong"}, timeout=30)
    assert wrong.status_code == 401
    with pytest.raises(ollama.ResponseError) as info:
        ollama.Client(host=base).list()
    assert info.value.status_code == 401
    keyed = ollama.Client(host=base, headers=bearer, timeout=300)
    assert f"{DEFAULT_MODEL}:latest" in {m.model for m in keyed.list().models}
    answer = keyed.chat(model=DEFAULT_MODEL, messages=QUESTION, options={"num_predict": 2})
    assert answer.done and answer.eval_count
