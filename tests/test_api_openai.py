"""The OpenAI dialect under /v1, driven by the official `openai` SDK and LangChain's ChatOpenAI."""

from __future__ import annotations

import openai
import pytest
import requests

from tests.conftest import DEFAULT_MODEL, sse_events

M = DEFAULT_MODEL
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="any-key")


def test_chat_completion(client):
    r = client.chat.completions.create(model=M, messages=QUESTION, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == M
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_seed_example_with_system_prompt(client):
    r = client.chat.completions.create(
        model=M,
        messages=[
            {"role": "system", "content": "You are a helpful assistant"},
            {"role": "user", "content": "Please explain the concept of artificial intelligence"},
        ],
        max_tokens=64,
    )
    assert r.choices[0].message.content and r.usage.completion_tokens <= 64


def test_stream_with_usage(client):
    stream = client.chat.completions.create(
        model=M, messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_raw_stream_ends_with_done(server):
    with requests.post(
        server.url + "/v1/chat/completions",
        stream=True,
        json={"model": M, "messages": QUESTION, "stream": True, "max_tokens": 5, "temperature": 0},
    ) as r:
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_max_completion_tokens_and_stop(client):
    r = client.chat.completions.create(model=M, messages=QUESTION, temperature=0, max_completion_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=M, messages=QUESTION, temperature=0, stop="Paris")
    assert "Paris" not in r.choices[0].message.content


def test_content_parts_are_accepted(client):
    r = client.chat.completions.create(
        model=M,
        temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}],
    )
    assert "Paris" in r.choices[0].message.content


def test_completions(client):
    r = client.completions.create(model=M, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 5
    chunks = list(client.completions.create(model=M, prompt="Once upon a time", max_tokens=8, stream=True))
    assert "".join(c.choices[0].text for c in chunks)


def test_embeddings_string_and_list(client):
    one = client.embeddings.create(model=M, input="hello world")  # the SDK asks for base64 by default
    assert len(one.data) == 1 and len(one.data[0].embedding) == 576
    many = client.embeddings.create(
        model=M, input=["The cat sat on the mat", "A feline rested on the rug"], encoding_format="float"
    )
    assert [d.index for d in many.data] == [0, 1]
    assert (
        many.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1) and many.usage.prompt_tokens > 0
    )


def test_models(client):
    assert [m.id for m in client.models.list()] == [M]
    assert client.models.retrieve(M).owned_by == "ortllm"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_unknown_model_is_a_404_error_object(client, server):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    assert "gpt-4" in str(info.value)
    body = requests.post(
        server.url + "/v1/chat/completions", json={"model": "gpt-4", "messages": QUESTION}
    ).json()
    assert body["error"]["type"] == "not_found_error" and body["error"]["code"] == "model_not_found"


def test_bad_requests_are_400_error_objects(client, server):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=M, messages=QUESTION, temperature=5)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=M, messages=QUESTION, n=9)  # n is 1 to 8
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=M, messages=QUESTION, response_format={"type": "json_schema", "json_schema": {"name": "x"}}
        )
    body = requests.post(server.url + "/v1/chat/completions", json={"model": M}).json()
    assert (
        body["error"]["message"] == "Missing required field: messages"
        and body["error"]["param"] == "messages"
    )


def test_langchain_invoke_and_stream(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.url + "/v1", api_key="any-key", model=M, temperature=0)
    assert "Paris" in llm.invoke("What is the capital of France?").content
    assert "Paris" in "".join(chunk.content for chunk in llm.stream("What is the capital of France?"))


def test_response_format_json_schema_constrains_the_output(client):
    import json

    # bounded strings: the 135M model otherwise loops inside a string until max_tokens
    text = {"type": "string", "maxLength": 40}
    schema = {
        "type": "object",
        "properties": {"city": text, "country": text},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    r = client.chat.completions.create(
        model=M,
        temperature=0,
        max_tokens=300,
        messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
    )
    assert r.choices[0].finish_reason == "stop"
    data = json.loads(r.choices[0].message.content)
    assert set(data) == {"city", "country"} and all(isinstance(v, str) for v in data.values())
    # an open object lets the small model add keys until max_tokens; the output is still JSON, not prose
    r = client.chat.completions.create(
        model=M, temperature=0, max_tokens=40, messages=QUESTION, response_format={"type": "json_object"}
    )
    assert r.choices[0].message.content.lstrip().startswith("{")
    assert not r.choices[0].message.content.startswith("The capital")
