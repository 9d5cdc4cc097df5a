"""The Anthropic Messages dialect (/v1/messages, /v1/messages/count_tokens): shapes, streamed events and errors
in process over scripted token streams, then the real `anthropic` SDK against the real server (SmolLM2 for
text, Qwen2.5-Coder-0.5B for tools) with and without an API key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

import tests.test_openai_scripted as scripted
from ortllm.runtime.types import GenerationRequest
from ortllm.sessions import SessionStore
from ortllm.settings import Settings
from ortllm.web.app import create_app
from tests.conftest import ALICE_KEY, DEFAULT_MODEL, TOOL_MODEL
from tests.test_dialects_fast import FakeRegistry, M, install

WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city's name, e.g. London"}},
        "required": ["city"],
    },
}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


class CountingRunner(scripted.ScriptedRunner):
    """The scripted runner with the Scheduler's prompt tokenization (one token per character here)."""

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return [0] * len(json.dumps([request.messages, request.tools]))


def make_client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: Settings | None = None) -> Any:
    import tests.test_dialects_fast as fast

    monkeypatch.setattr(fast, "FakeRunner", CountingRunner)
    install(tmp_path, M)
    registry = FakeRegistry(tmp_path)
    app = create_app(settings or Settings(), registry=registry, sessions=SessionStore(tmp_path / "s.db"))  # type: ignore[arg-type]
    app.config["TESTING"] = True
    client = app.test_client()
    client.registry = registry  # type: ignore[attr-defined]
    return client


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    return make_client(tmp_path, monkeypatch)


def say(*tokens: str) -> None:
    scripted.SCRIPT[:] = list(tokens)


def post(client: Any, path: str = "/v1/messages", **body: Any) -> Any:
    base = {"model": M, "max_tokens": 32, "messages": [{"role": "user", "content": "Hi"}]}
    return client.post(path, json={**base, **body})


def named_events(response: Any) -> list[tuple[str, dict[str, Any]]]:
    out, name = [], None
    for line in response.get_data(as_text=True).splitlines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name  # Anthropic's event name repeats the data's type
            out.append((name, data))
    return out


def assert_anthropic_error(response: Any, status: int, kind: str, *words: str) -> None:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    for word in words:
        assert word in body["error"]["message"], body


# ---- in process -----------------------------------------------------------------------------------


def test_text_message_shape(client: Any) -> None:
    say("Hel", "lo")
    r = post(client, system=[{"type": "text", "text": "Be brief."}], metadata={"user_id": "u1"})
    assert r.status_code == 200, r.get_data(as_text=True)
    body = r.get_json()
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == M and body["content"] == [{"type": "text", "text": "Hello"}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"] == {
        "input_tokens": 4,
        "output_tokens": 2,
        "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0,
    }
    request = client.registry.get(M).requests[-1]
    assert request.messages[0] == {"role": "system", "content": "Be brief."}


def test_stop_sequence_is_named(client: Any) -> None:
    say("Hel", "lo", " EN", "D", " more")
    body = post(client, stop_sequences=["XYZ", " END"]).get_json()
    assert body["content"] == [{"type": "text", "text": "Hello"}]
    assert body["stop_reason"] == "stop_sequence" and body["stop_sequence"] == " END"


def test_forced_tool_use(client: Any) -> None:
    say(*CALL)  # one character per token: the call's arguments stream in pieces
    r = post(client, tools=[WEATHER_TOOL], tool_choice={"type": "tool", "name": "get_weather"})
    body = r.get_json()
    [use] = body["content"]
    assert use["type"] == "tool_use" and use["id"].startswith("toolu_") and use["name"] == "get_weather"
    assert use["input"] == {"city": "Paris"} and body["stop_reason"] == "tool_use"
    request = client.registry.get(M).requests[-1]
    assert request.guidance is not None and request.tools[0]["function"]["name"] == "get_weather"


def test_streamed_events(client: Any) -> None:
    say(*CALL)
    r = post(client, tools=[WEATHER_TOOL], tool_choice={"type": "any"}, stream=True)
    assert r.mimetype == "text/event-stream"
    events = named_events(r)
    names = [n for n, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["usage"]["input_tokens"] == 4
    [block] = [d["content_block"] for n, d in events if n == "content_block_start"]
    assert block["type"] == "tool_use" and block["name"] == "get_weather" and block["input"] == {}
    parts = [d["delta"]["partial_json"] for n, d in events if n == "content_block_delta"]
    assert len(parts) > 1 and json.loads("".join(parts)) == {"city": "Paris"}
    assert names.count("content_block_stop") == 1
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == len(CALL)


def test_thinking_blocks_only_when_enabled(client: Any) -> None:
    say("<think>", "Easy.", "</think>", "Hi!")
    body = post(client, thinking={"type": "enabled", "budget_tokens": 1024}).get_json()
    assert body["content"] == [
        {"type": "thinking", "thinking": "Easy.", "signature": ""},
        {"type": "text", "text": "Hi!"},
    ]
    assert post(client).get_json()["content"] == [{"type": "text", "text": "Hi!"}]
    events = named_events(post(client, thinking={"type": "enabled", "budget_tokens": 1024}, stream=True))
    deltas = [d["delta"] for n, d in events if n == "content_block_delta"]
    assert deltas == [{"type": "thinking_delta", "thinking": "Easy."}, {"type": "text_delta", "text": "Hi!"}]


def test_tool_history_becomes_chat_messages(client: Any) -> None:
    say("Sunny.")
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
            {"type": "text", "text": "And so?"},
        ]},
    ]  # fmt: skip
    r = post(client, messages=history, tools=[WEATHER_TOOL], tool_choice={"type": "none"})
    assert r.status_code == 200, r.get_data(as_text=True)
    prompt = json.dumps(client.registry.get(M).requests[-1].messages)
    for piece in ('"Checking."', "get_weather", "Paris", "18C", "And so?"):
        assert piece in prompt


def test_count_tokens_matches_usage(client: Any) -> None:
    say("ok")
    body = {"system": "Be brief.", "tools": [WEATHER_TOOL]}
    counted = client.post(
        "/v1/messages/count_tokens",
        json={"model": M, "messages": [{"role": "user", "content": "Hi"}], **body},
    )
    assert counted.status_code == 200, counted.get_data(as_text=True)
    post(client, **body)
    request = client.registry.get(M).requests[-1]
    assert counted.get_json() == {"input_tokens": len(client.registry.get(M).prompt_ids(request))}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"max_tokens": None}, ["max_tokens: Field required"]),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, ["messages.0.content.0", "image"]),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, ["messages.0.content.0", "'audio'"]),
        ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}]}, ["toolu_x", "tool_use"]),
        ({"frequency_penalty": 1}, ["frequency_penalty: Extra inputs are not permitted"]),
        ({"service_tier": "auto"}, ["service_tier"]),
        ({"mcp_servers": [{"url": "x"}]}, ["mcp_servers"]),
        ({"temperature": 1.5}, ["temperature"]),
        ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "tool"}}, ["tool_choice.name"]),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, ["tools.0.type", "web_search_20250305"]),
        ({"tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER_TOOL]}, ["nope"]),
    ],
)  # fmt: skip
def test_bad_input_is_an_anthropic_400(client: Any, body: dict[str, Any], words: list[str]) -> None:
    base: dict[str, Any] = {"model": M, "max_tokens": 32, "messages": [{"role": "user", "content": "Hi"}]}
    sent = {k: v for k, v in {**base, **body}.items() if v is not None}
    before = len(client.registry.get(M).requests)
    assert_anthropic_error(client.post("/v1/messages", json=sent), 400, "invalid_request_error", *words)
    assert len(client.registry.get(M).requests) == before  # nothing ran


def test_unknown_model_and_route_are_anthropic_shaped(client: Any) -> None:
    assert_anthropic_error(post(client, model="nope"), 404, "not_found_error", "nope")
    assert_anthropic_error(client.get("/v1/messages"), 405, "not_found_error")


def test_x_api_key_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    say("ok")
    keyed = make_client(tmp_path, monkeypatch, Settings(auth={"api_keys": [f"alice:{ALICE_KEY}"]}))
    assert_anthropic_error(post(keyed), 401, "authentication_error", "x-api-key")
    r = keyed.post(
        "/v1/messages",
        json={"model": M, "max_tokens": 8, "messages": [{"role": "user", "content": "Hi"}]},
        headers={"x-api-key": ALICE_KEY, "anthropic-version": "2023-06-01"},
    )
    assert r.status_code == 200, r.get_data(as_text=True)
    wrong = keyed.get("/v1/models", headers={"x-api-key": "sk-wrong-0123456789"})
    assert wrong.status_code == 401 and wrong.get_json()["error"]["type"] == "authentication_error"
    assert keyed.get("/v1/models", headers={"x-api-key": ALICE_KEY}).status_code == 200


def test_openapi_lists_messages(client: Any) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    assert "/v1/messages" in paths and "/v1/messages/count_tokens" in paths


# ---- the anthropic SDK on the real server ---------------------------------------------------------

# the SDK has no temperature argument any more: sent as an extra field, which the server honours
GREEDY = {"temperature": 0}
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def sdk(tool_server: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=tool_server.url, api_key="any-key", max_retries=0)


@pytest.mark.slow
def test_sdk_create_text(sdk: anthropic.Anthropic) -> None:
    question = [{"role": "user", "content": "What is the capital of France?"}]
    m = sdk.messages.create(model=DEFAULT_MODEL, max_tokens=24, extra_body=GREEDY, messages=question)  # type: ignore[arg-type]
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.content and m.content[0].type == "text" and m.content[0].text.strip()
    assert m.stop_reason in ("end_turn", "max_tokens") and m.usage.output_tokens > 0
    counted = sdk.messages.count_tokens(model=DEFAULT_MODEL, messages=question)  # type: ignore[arg-type]
    # Anthropic's input_tokens leaves out the prompt tokens read from the cache
    assert counted.input_tokens == m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0)


@pytest.mark.slow
def test_sdk_stop_sequence(sdk: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {"model": DEFAULT_MODEL, "extra_body": GREEDY, "messages": PARIS}
    free = sdk.messages.create(max_tokens=24, **kwargs).content[0].text  # type: ignore[union-attr]
    words = free.split()
    assert len(words) > 2, free
    stop = " " + words[1]
    m = sdk.messages.create(max_tokens=24, stop_sequences=[stop], **kwargs)
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == stop


@pytest.mark.slow
def test_sdk_tool_loop(sdk: anthropic.Anthropic) -> None:
    kwargs: dict[str, Any] = {
        "model": TOOL_MODEL,
        "max_tokens": 64,
        "extra_body": GREEDY,
        "tools": [WEATHER_TOOL],
    }
    first = sdk.messages.create(messages=PARIS, **kwargs)  # type: ignore[arg-type]
    assert first.stop_reason == "tool_use", first
    [use] = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == {"city": "Paris"}
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees and sunny"}
    history = [*PARIS, {"role": "assistant", "content": first.content}, {"role": "user", "content": [result]}]
    # the 0.5B model calls the tool again while it is offered (tests/test_tool_clients.py FINAL)
    final = sdk.messages.create(messages=history, tool_choice={"type": "none"}, **kwargs)  # type: ignore[arg-type]
    assert final.stop_reason == "end_turn" and final.content[0].type == "text"
    assert "18" in final.content[0].text


@pytest.mark.slow
def test_sdk_stream_text_and_input_json(sdk: anthropic.Anthropic) -> None:
    with sdk.messages.stream(model=DEFAULT_MODEL, max_tokens=24, extra_body=GREEDY, messages=PARIS) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text and message.content[0].text == text and message.usage.output_tokens > 0  # type: ignore[union-attr]
    forced = {"type": "tool", "name": "get_weather"}
    kwargs: dict[str, Any] = {"model": TOOL_MODEL, "max_tokens": 64, "extra_body": GREEDY}
    with sdk.messages.stream(messages=PARIS, tools=[WEATHER_TOOL], tool_choice=forced, **kwargs) as stream:  # type: ignore[arg-type]
        parts = [e.partial_json for e in stream if e.type == "input_json"]
        message = stream.get_final_message()
    assert parts and json.loads("".join(parts)) == {"city": "Paris"}
    [use] = message.content
    assert use.type == "tool_use" and use.input == {"city": "Paris"} and message.stop_reason == "tool_use"


@pytest.mark.slow
def test_sdk_bad_input(sdk: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        sdk.messages.create(model=DEFAULT_MODEL, max_tokens=8, messages=[  # type: ignore[list-item]
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "1"}]}
        ])  # fmt: skip
    assert err.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    missing = httpx.post(f"{sdk.base_url}/v1/messages", json={"model": DEFAULT_MODEL, "messages": PARIS})
    assert missing.status_code == 400 and missing.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }


@pytest.mark.slow
def test_sdk_x_api_key(secured: Any) -> None:
    question = [{"role": "user", "content": "Hi"}]
    keyed = anthropic.Anthropic(base_url=secured.url, api_key=ALICE_KEY, max_retries=0)
    m = keyed.messages.create(model=DEFAULT_MODEL, max_tokens=4, messages=question)  # type: ignore[arg-type]
    assert m.usage.output_tokens > 0
    wrong = anthropic.Anthropic(base_url=secured.url, api_key="sk-nobody-0123456789", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as err:
        wrong.messages.create(model=DEFAULT_MODEL, max_tokens=4, messages=question)  # type: ignore[arg-type]
    assert err.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
