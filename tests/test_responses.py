"""The OpenAI Responses API (/v1/responses): shapes, typed events, state and errors in process on a scripted
runner, then the openai SDK and the OpenAI Agents SDK against the real server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from ortllm.sessions import SessionStore
from ortllm.settings import Settings
from ortllm.web.app import create_app
from tests.conftest import ALICE_KEY, BOB_KEY, DEFAULT_MODEL, TOOL_MODEL, LiveServer
from tests.test_dialects_fast import FakeRegistry, M, install
from tests.test_openai_scripted import SCRIPT, ScriptedRunner

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = [
    "<tool_call>",
    '\n{"name": "get_',
    'weather", "arguments": {"ci',
    'ty": "Par',
    'is"}}\n',
    "</tool_call>",
]


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    import tests.test_dialects_fast as fast

    monkeypatch.setattr(fast, "FakeRunner", ScriptedRunner)
    install(tmp_path, M)
    registry = FakeRegistry(tmp_path)
    app = create_app(Settings(), registry=registry, sessions=SessionStore(tmp_path / "s.db"))  # type: ignore[arg-type]
    app.config["TESTING"] = True
    client = app.test_client()
    client.registry = registry  # type: ignore[attr-defined]
    return client


def post(client: Any, **body: Any) -> Any:
    return client.post("/v1/responses", json={"model": M, "input": "Hi", **body})


def named_events(response: Any) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) pairs of an SSE body with `event:` lines."""
    out = []
    for block in response.get_data(as_text=True).strip().split("\n\n"):
        lines = block.splitlines()
        name = lines[0].removeprefix("event: ")
        out.append((name, json.loads("".join(line[6:] for line in lines[1:]))))
    return out


def test_text_response_shape_and_store(client: Any) -> None:
    SCRIPT[:] = ["Hel", "lo", " there"]
    r = post(client, instructions="Be brief.", metadata={"k": "v"})
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["status"] == "completed"
    [item] = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["id"].startswith("msg_")
    assert item["content"][0] == {
        "type": "output_text",
        "text": "Hello there",
        "annotations": [],
        "logprobs": [],
    }
    assert body["output_text"] == "Hello there" and body["metadata"] == {"k": "v"}
    assert body["usage"]["input_tokens"] == 4 and body["usage"]["output_tokens"] == 3
    assert body["usage"]["input_tokens_details"] == {"cached_tokens": 0}
    sent = client.registry.get(M).requests[-1].messages
    assert sent == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    stored = client.get(f"/v1/responses/{body['id']}").get_json()
    assert stored["output"] == body["output"] and stored["status"] == "completed"
    items = client.get(f"/v1/responses/{body['id']}/input_items").get_json()
    assert items["object"] == "list" and items["data"][0]["content"] == [{"type": "input_text", "text": "Hi"}]
    gone = client.delete(f"/v1/responses/{body['id']}").get_json()
    assert gone == {"id": body["id"], "object": "response.deleted", "deleted": True}
    missing = client.get(f"/v1/responses/{body['id']}")
    assert missing.status_code == 404 and missing.get_json()["error"]["type"] == "not_found_error"
    unstored = post(client, store=False).get_json()
    assert client.get(f"/v1/responses/{unstored['id']}").status_code == 404


def test_previous_response_id_prepends_the_conversation(client: Any) -> None:
    SCRIPT[:] = ["Paris."]
    first = post(client, input="Capital of France?").get_json()
    post(client, input="And of Italy?", previous_response_id=first["id"])
    sent = client.registry.get(M).requests[-1].messages
    assert [m["content"] for m in sent] == ["Capital of France?", "Paris.", "And of Italy?"]
    r = post(client, previous_response_id="resp_unknown")
    assert r.status_code == 404 and "resp_unknown" in r.get_json()["error"]["message"]


def test_function_call_item_and_its_output(client: Any) -> None:
    SCRIPT[:] = CALL
    body = post(client, input="Weather in Paris?", tools=[WEATHER]).get_json()
    [call] = body["output"]
    assert call["type"] == "function_call" and call["id"].startswith("fc_") and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"} and call["call_id"].startswith("call_")
    request = client.registry.get(M).requests[-1]
    assert request.guidance[0] == "lark_grammar" and request.tools[0]["function"]["name"] == "get_weather"
    SCRIPT[:] = ["It is ", "sunny."]
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "18 degrees"}
    final = post(client, input=[result], previous_response_id=body["id"], tools=[WEATHER], tool_choice="none")
    assert final.get_json()["output_text"] == "It is sunny."
    sent = client.registry.get(M).requests[-1].messages
    assert sent[1]["tool_calls"][0]["id"] == call["call_id"]
    assert sent[-1] == {
        "role": "tool",
        "tool_call_id": call["call_id"],
        "content": "18 degrees",
        "name": "get_weather",
    }


def test_streamed_events_in_order(client: Any) -> None:
    SCRIPT[:] = ["<think>", "hm", "</think>", "It is ", "4."]
    events = named_events(post(client, stream=True))
    names = [n for n, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    assert [d["sequence_number"] for _, d in events] == list(range(len(events)))
    assert all(d["type"] == n for n, d in events)
    assert "response.content_part.added" in names and "response.output_text.done" in names
    text = "".join(d["delta"] for n, d in events if n == "response.output_text.delta")
    assert text == "It is 4."
    final = events[-1][1]["response"]
    assert [i["type"] for i in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"][0]["text"] == "hm"
    SCRIPT[:] = CALL
    events = named_events(post(client, stream=True, tools=[WEATHER]))
    args = [d["delta"] for n, d in events if n == "response.function_call_arguments.delta"]
    assert len(args) > 1 and json.loads("".join(args)) == {"city": "Paris"}
    done = [d for n, d in events if n == "response.function_call_arguments.done"]
    assert json.loads(done[0]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": [{"type": "image_generation_call", "id": "x"}]}, "input[0].type"),
        (
            {"input": [{"type": "function_call_output", "call_id": "call_9", "output": "x"}]},
            "input[0].call_id",
        ),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, None),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"frequency_penalty": 1}, "frequency_penalty"),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ],
)
def test_bad_input_is_400_and_stores_nothing(client: Any, body: dict[str, Any], param: str | None) -> None:
    r = client.post("/v1/responses", json={"model": M, "input": "Hi", **body})
    assert r.status_code == 400, r.get_json()
    error = r.get_json()["error"]
    assert error["type"] == "invalid_request_error"
    if param:
        assert error["param"] == param
    db = client.application.extensions["ortllm"].session_store.db
    with db.read() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM responses").scalar() == 0


def test_cancel_of_a_finished_response_is_400(client: Any) -> None:
    SCRIPT[:] = ["ok"]
    rid = post(client).get_json()["id"]
    r = client.post(f"/v1/responses/{rid}/cancel")
    assert r.status_code == 400 and "background" in r.get_json()["error"]["message"]
    assert client.post("/v1/responses/resp_nope/cancel").status_code == 404


# ---- real clients on the real server ------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(pulled: Path) -> Any:
    live = LiveServer("--model", DEFAULT_MODEL)
    yield live
    live.stop()


def sdk(url: str, key: str = "any-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


@pytest.mark.slow
def test_sdk_create_stream_retrieve_delete_items(smol: Any) -> None:
    client = sdk(smol.url)
    r = client.responses.create(model=DEFAULT_MODEL, input="Say hello.", temperature=0, max_output_tokens=16)
    assert r.status in ("completed", "incomplete") and r.output_text and r.usage.input_tokens > 0
    with client.responses.stream(
        model=DEFAULT_MODEL, input="Say hello.", temperature=0, max_output_tokens=16
    ) as stream:
        events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    # 16 tokens may cut the answer: the SDK's get_final_response wants response.completed, so read the last event
    final = events[-1].response  # type: ignore[union-attr]
    assert events[-1].type == f"response.{r.status}" and final.status == r.status
    assert "".join(deltas) == final.output_text == r.output_text
    assert client.responses.retrieve(r.id).output_text == r.output_text
    items = client.responses.input_items.list(r.id)
    assert items.data[0].type == "message" and items.data[0].content[0].text == "Say hello."
    assert client.responses.delete(r.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}},
        "required": ["name"],
        "additionalProperties": False,
    }
    fmt = {"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}}
    j = client.responses.create(
        model=DEFAULT_MODEL,
        input="Invent a person.",
        text=fmt,
        temperature=0,
        max_output_tokens=40,  # type: ignore[arg-type]
    )
    assert isinstance(json.loads(j.output_text)["name"], str)


@pytest.mark.slow
def test_previous_response_id_survives_a_restart(pulled: Path) -> None:
    live = LiveServer("--model", DEFAULT_MODEL)
    port = live.port
    try:
        first = sdk(live.url).responses.create(
            model=DEFAULT_MODEL, input="My name is Zorblat.", temperature=0, max_output_tokens=8
        )
    finally:
        live.stop()
    again = LiveServer("--model", DEFAULT_MODEL, port=port)
    try:
        client = sdk(again.url)
        alone = client.responses.create(
            model=DEFAULT_MODEL, input="What is my name?", temperature=0, max_output_tokens=8
        )
        second = client.responses.create(
            model=DEFAULT_MODEL,
            input="What is my name?",
            previous_response_id=first.id,
            temperature=0,
            max_output_tokens=8,
        )
        # the earlier turn is in the prompt: its answer and its question ("My name is Zorblat." > 5 tokens)
        assert second.usage.input_tokens >= alone.usage.input_tokens + first.usage.output_tokens + 5
        with pytest.raises(openai.NotFoundError):
            client.responses.create(model=DEFAULT_MODEL, input="x", previous_response_id="resp_nothing")
    finally:
        again.stop()


@pytest.mark.slow
def test_function_tool_loop_on_qwen(tool_server: Any) -> None:
    client = sdk(tool_server.url)
    first = client.responses.create(
        model=TOOL_MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        temperature=0,
        max_output_tokens=64,  # type: ignore[list-item]
    )
    [call] = [i for i in first.output if i.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    final = client.responses.create(
        model=TOOL_MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "18 degrees and sunny"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",  # the 0.5B model calls again otherwise (tests/test_tool_clients.py FINAL)
        temperature=0,
        max_output_tokens=64,
    )
    assert final.status == "completed" and "18" in final.output_text


@pytest.mark.slow
def test_openai_agents_sdk_runs_a_tool(tool_server: Any) -> None:
    agents = pytest.importorskip("agents")
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        seen.append(city)
        return "18 degrees and sunny"

    agents.set_default_openai_client(openai.AsyncOpenAI(base_url=tool_server.url + "/v1", api_key="any-key"))
    agents.set_default_openai_api("responses")
    agents.set_tracing_disabled(True)
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the tool's result.",
        model=TOOL_MODEL,
        tools=[get_weather],
        model_settings=agents.ModelSettings(temperature=0, max_tokens=64),
        # the 0.5B model calls the tool again and again when it is offered (see the FINAL note above)
        tool_use_behavior="stop_on_first_tool",
    )
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?")
    assert seen == ["Paris"] and "18" in str(result.final_output)


@pytest.mark.slow
def test_a_response_of_one_key_is_404_for_another(secured: Any) -> None:
    alice, bob = sdk(secured.url, ALICE_KEY), sdk(secured.url, BOB_KEY)
    r = alice.responses.create(model=DEFAULT_MODEL, input="Hi", max_output_tokens=4, temperature=0)
    assert alice.responses.retrieve(r.id).id == r.id
    for attempt in (
        lambda: bob.responses.retrieve(r.id),
        lambda: bob.responses.delete(r.id),
        lambda: bob.responses.input_items.list(r.id),
        lambda: bob.responses.create(model=DEFAULT_MODEL, input="Hi", previous_response_id=r.id),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
