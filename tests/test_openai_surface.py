"""The OpenAI request surface: every field of OpenAI's chat, completions and embeddings requests is honoured,
accepted (no effect on the output) or refused with a 400 naming it; unknown fields are refused as OpenAI
refuses them. In process, on test_dialects_fast's fake runner, plus one request to the real model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import ValidationError

from ortllm.sessions import SessionStore
from ortllm.settings import Settings
from ortllm.web.app import create_app
from ortllm.web.dialects.openai import protocol as p
from ortllm.web.errors import validation_message
from tests.conftest import DEFAULT_MODEL
from tests.test_dialects_fast import E, FakeRegistry, M, install

CHAT = {"model": M, "messages": [{"role": "user", "content": "Hi"}], "stream": False}
COMPLETION = {"model": M, "prompt": "Hi"}
EMBEDDINGS = {"model": E, "input": "a"}
BASES = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION, "/v1/embeddings": EMBEDDINGS}


@pytest.fixture
def client(tmp_path: Path) -> Any:
    """The app in process over test_dialects_fast's fake chat and embedding models."""
    install(tmp_path, M)
    install(tmp_path, E, kind="embedding")
    registry = FakeRegistry(tmp_path)
    app = create_app(Settings(), registry=registry, sessions=SessionStore(tmp_path / "sessions.db"))  # type: ignore[arg-type]
    app.config["TESTING"] = True
    return app.test_client()


def error_of(response: Any) -> dict[str, Any]:
    """The OpenAI error object of a 400."""
    assert response.status_code == 400, (response.status_code, response.get_data(as_text=True)[:300])
    body = response.get_json()
    assert body["error"]["type"] == "invalid_request_error", body
    return body["error"]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("audio", {"voice": "alloy", "format": "wav"}, "text only"),
        ("prediction", {"type": "content", "content": "x"}, "not supported"),
        ("web_search_options", {}, "web"),
        ("moderation", {"model": "omni-moderation-latest"}, "moderation"),
        ("functions", [{"name": "f", "parameters": {}}], "send `tools`"),
        ("function_call", "auto", "send `tool_choice`"),
        ("store", True, "false"),
        ("metadata", {"k": "v"}, "store"),
        ("service_tier", "flex", '"auto" or "default"'),
        ("modalities", ["text", "audio"], '["text"]'),
        ("verbosity", "low", '"medium"'),
        ("top_logprobs", 2, "logprobs: true"),
        ("logit_bias", {"hello": 5}, "token ids"),
        ("tool_choice", "any", "'required'"),
    ],
)
def test_a_refused_chat_field_is_a_400_naming_it(client: Any, field: str, value: Any, words: str) -> None:
    error = error_of(client.post("/v1/chat/completions", json={**CHAT, field: value}))
    assert error["param"] == field and field in error["message"] and words in error["message"], error
    assert "Value error" not in error["message"]


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("suffix", "}", "fill-in-the-middle"),
        ("best_of", 2, "send n"),
        ("logprobs", 6, "less than or equal to 5"),
        ("prompt", [1, 2, 3], "token arrays"),
        ("prompt", ["a", "b"], "one string"),
        ("n", 9, "less than or equal to 8"),
    ],
)
def test_a_refused_completions_field_is_a_400_naming_it(
    client: Any, field: str, value: Any, words: str
) -> None:
    error = error_of(client.post("/v1/completions", json={**COMPLETION, field: value}))
    assert error["param"] == field and field in error["message"] and words in error["message"], error


@pytest.mark.parametrize("kind", ["image_url", "input_audio", "file"])
def test_a_content_part_that_is_not_text_is_a_400_naming_where(client: Any, kind: str) -> None:
    parts = [{"type": "text", "text": "What is this?"}, {"type": kind, kind: {"data": "…"}}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]
    error = error_of(client.post("/v1/chat/completions", json={**CHAT, "messages": messages}))
    assert error["param"] == "messages[1].content[1].type", error
    assert f"'{kind}'" in error["message"] and "not supported" in error["message"]


@pytest.mark.parametrize("path", list(BASES))
def test_an_unknown_field_is_refused_as_openai_refuses_it(client: Any, path: str) -> None:
    error = error_of(client.post(path, json={**BASES[path], "temprature": 0.5}))
    assert (
        error["message"] == "Unrecognized request argument supplied: temprature"
        and error["param"] == "temprature"
    )


def test_other_dialects_keep_ignoring_unknown_fields(client: Any) -> None:
    r = client.post("/api/generate", json={"model": M, "prompt": "Hi", "stream": False, "temprature": 0.5})
    assert r.status_code == 200, r.get_json()


ACCEPTED = {
    "user": "user-1",
    "safety_identifier": "hash-of-user-1",
    "prompt_cache_key": "conversation-7",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"mode": "implicit", "ttl": "30m"},
    "reasoning_effort": "low",
    "store": False,
    "metadata": {},
    "service_tier": "auto",
    "modalities": ["text"],
    "verbosity": "medium",
    "parallel_tool_calls": True,
    "stream_options": None,
}


def test_identifiers_and_hints_are_accepted(client: Any) -> None:
    r = client.post("/v1/chat/completions", json={**CHAT, **ACCEPTED})
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["choices"][0]["message"]["content"] == "Hello there"
    r = client.post("/v1/completions", json={**COMPLETION, "user": "u", "best_of": 1, "echo": False})
    assert r.status_code == 200, r.get_json()
    r = client.post("/v1/embeddings", json={**EMBEDDINGS, "user": "u"})
    assert r.status_code == 200, r.get_json()


def test_a_tool_loop_history_is_accepted_and_a_tool_message_needs_its_call_id(client: Any) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history = [
        {"role": "user", "content": "Weather in Paris?", "name": "ann"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call],
            "reasoning_content": "I should call it.",
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    assert p.ChatCompletionRequest.model_validate({**CHAT, "messages": history}, strict=True)
    error = error_of(
        client.post(
            "/v1/chat/completions",
            json={**CHAT, "messages": [*history[:2], {"role": "tool", "content": "21"}]},
        )
    )
    assert error["param"] == "messages[2].tool_call_id" and "without tool_call_id" in error["message"]
    error = error_of(
        client.post("/v1/chat/completions", json={**CHAT, "messages": [{**history[0], "tool_calls": [call]}]})
    )
    assert error["param"] == "messages[0].tool_calls" and "only assistant" in error["message"]


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2], [3]]])
def test_token_array_embeddings_input_says_how_to_send_text(client: Any, tokens: list[Any]) -> None:
    error = error_of(client.post("/v1/embeddings", json={**EMBEDDINGS, "input": tokens}))
    assert error["param"] == "input" and error["message"] == (
        "input as token arrays is not supported; send text "
        "(with LangChain: OpenAIEmbeddings(..., check_embedding_ctx_length=False))"
    )


BAD_BODIES = [  # each fails a validator of the dialect's own ("Value error, ..." in pydantic's words)
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "system", "content": ""}]}),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "tool", "content": "x"}]}),
    ("/api/chat", {"model": M, "messages": [{"role": "system", "content": ""}]}),
    ("/api/generate", {"model": M, "prompt": "", "raw": True}),
]


@pytest.mark.parametrize("path, body", BAD_BODIES)
def test_no_value_error_prefix_reaches_a_client(client: Any, path: str, body: dict[str, Any]) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 400, r.get_json()
    text = r.get_data(as_text=True)
    assert "Value error" not in text and "Assertion failed" not in text, text


def test_validation_message_strips_the_prefix_and_keeps_the_field() -> None:
    with pytest.raises(ValidationError) as caught:
        p.ChatCompletionRequest.model_validate(
            {**CHAT, "response_format": {"type": "json_schema"}}, strict=True
        )
    assert validation_message(caught.value) == (
        "response_format: response_format.json_schema is required when type is json_schema",
        "response_format",
    )


def test_openapi_documents_the_surface(client: Any) -> None:
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]
    assert (
        chat["additionalProperties"] is False
        and schemas["OpenAIEmbeddingsRequest"]["additionalProperties"] is False
    )
    props = chat["properties"]
    for field in ("audio", "prediction", "web_search_options", "functions", "function_call", "moderation"):
        assert props[field]["type"] == "null", field
    for field in (
        "tools",
        "tool_choice",
        "logprobs",
        "top_logprobs",
        "n",
        "logit_bias",
        "min_p",
        "repeat_last_n",
    ):
        assert field in props, field
    assert (props["n"]["minimum"], props["n"]["maximum"], props["top_logprobs"]["anyOf"][0]["maximum"]) == (
        1,
        8,
        20,
    )
    assert chat["allOf"][0]["then"] == {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]}
    assert "tool_calls" in schemas["ChatChoice"]["properties"]["finish_reason"]["enum"]
    assert {"content", "refusal"} <= set(schemas["ChatLogprobs"]["properties"])
    assert {"tokens", "token_logprobs", "top_logprobs", "text_offset"} <= set(
        schemas["CompletionLogprobs"]["properties"]
    )
    message = schemas["AssistantMessage"]["properties"]
    assert {"tool_calls", "reasoning_content", "reasoning", "refusal"} <= set(message)


def test_a_reply_leaves_out_unset_tool_calls_and_reasoning() -> None:
    message = p.AssistantMessage(content="Hi").model_dump(mode="json")
    assert message == {"role": "assistant", "content": "Hi", "refusal": None}


def test_the_real_model_answers_with_every_accepted_field(server: Any) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": "Say hi."}],
        "max_tokens": 4,
        **ACCEPTED,
    }
    r = requests.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["message"]["content"]
