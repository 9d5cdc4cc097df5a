"""Tool calling proven with real clients (openai SDK, LangChain/LangGraph, the `openai` npm package) on
Qwen2.5-Coder-0.5B-Instruct, plus SmolLM2 forced to call, and the 400s for bad tool input."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import jsonschema_rs
import openai
import pytest
import requests

from tests.conftest import DEFAULT_MODEL, TOOL_MODEL

PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "description": "The city's name, e.g. London"}},
    "required": ["city"],
}
GET_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": WEATHER_SCHEMA,
    },
}
GET_TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the current local time in a timezone",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "description": "IANA timezone, e.g. Europe/Paris"}},
            "required": ["timezone"],
        },
    },
}
WEATHER_RESULT = "18 degrees and sunny"
# Qwen2.5-Coder-0.5B, given a tool result with its tools still offered, calls the same tool again (greedy,
# whatever the wording; the fp32 model under transformers does the same): the final turn of each loop asks
# for the answer with tool_choice="none", which ortllm enforces as a prose answer. benchmarks/TOOLS.md has
# the measurements.
FINAL = {"tool_choice": "none"}


@pytest.fixture(scope="module")
def client(tool_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tool_server.url + "/v1", api_key="any-key", max_retries=0)


def ask(client: openai.OpenAI, messages: list, **kwargs: Any) -> Any:
    """One chat completion on the tool model, greedy."""
    return client.chat.completions.create(model=TOOL_MODEL, messages=messages, temperature=0, **kwargs)


def reassemble(stream: Any) -> tuple[str, dict[int, dict[str, str]], list[str | None]]:
    """The content, the tool calls (by index: id, name, arguments) and the finish reasons of a stream."""
    content, calls, finishes = [], {}, []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finishes.append(choice.finish_reason)
        if choice.delta.content:
            assert "<tool_call>" not in choice.delta.content, "tool-call markup leaked into content"
            content.append(choice.delta.content)
        for part in choice.delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
            if part.id:
                assert not call["id"], "a call's id is sent once, in its first delta"
                call["id"] = part.id
            if part.function and part.function.name:
                call["name"] += part.function.name
            if part.function and part.function.arguments:
                assert call["name"], "the name comes before the arguments"
                call["arguments"] += part.function.arguments
    return "".join(content), calls, finishes


def test_tool_loop(client):
    first = ask(client, PARIS, tools=[GET_WEATHER], max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content in (None, "")
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # as OpenAI's docs do: the assistant message goes back as it came, then the tool's result
    history = [*PARIS, choice.message, {"role": "tool", "tool_call_id": call.id, "content": WEATHER_RESULT}]
    final = ask(client, history, tools=[GET_WEATHER], max_tokens=64, **FINAL)
    assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls
    assert "18" in final.choices[0].message.content


def test_tool_loop_streamed(client):
    content, calls, finishes = reassemble(ask(client, PARIS, tools=[GET_WEATHER], max_tokens=64, stream=True))
    assert content == "" and list(calls) == [0] and finishes[-1] == "tool_calls"
    call = calls[0]
    assert call["id"] and call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Paris"}
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": call["id"],
                "type": "function",
                "function": {"name": "get_weather", "arguments": call["arguments"]},
            }
        ],
    }
    history = [*PARIS, assistant, {"role": "tool", "tool_call_id": call["id"], "content": WEATHER_RESULT}]
    answer, calls, finishes = reassemble(
        ask(client, history, tools=[GET_WEATHER], max_tokens=64, stream=True, **FINAL)
    )
    assert not calls and finishes[-1] == "stop" and "18" in answer


def test_required_forces_one_call(client):
    # a greeting needs no tool: only enforcement makes the model call one; parallel off: exactly one
    hello = [{"role": "user", "content": "Hello!"}]
    r = ask(
        client, hello, tools=[GET_WEATHER], tool_choice="required", parallel_tool_calls=False, max_tokens=48
    )
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema_rs.validate(WEATHER_SCHEMA, json.loads(call.function.arguments))


def test_required_parallel_calls_keep_markup_out_of_content(client):
    # parallel calls allowed: however many the model makes, each is whole and none leaks into content
    hello = [{"role": "user", "content": "Hello!"}]
    r = ask(client, hello, tools=[GET_WEATHER], tool_choice="required", max_tokens=48)
    choice = r.choices[0]
    assert choice.message.tool_calls and "<tool_call>" not in (choice.message.content or "")
    for call in choice.message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema_rs.validate(WEATHER_SCHEMA, json.loads(call.function.arguments))


def test_named_function_is_the_one_called(client):
    # the question is about the weather, yet the named function is the one called
    named = {"type": "function", "function": {"name": "get_time"}}
    r = ask(client, PARIS, tools=[GET_WEATHER, GET_TIME], tool_choice=named, max_tokens=48)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == ["get_time"]
    assert isinstance(json.loads(calls[0].function.arguments)["timezone"], str)


def test_none_never_calls(client):
    r = ask(client, PARIS, tools=[GET_WEATHER], tool_choice="none", max_tokens=32)
    choice = r.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason in ("stop", "length")
    assert choice.message.content and "<tool_call>" not in choice.message.content


def test_two_cities_two_calls(client):
    """Parallel calls in one answer, each with its own id. With "auto" this model makes one call per answer
    (unconstrained too); with "required" it calls for both cities — and then goes on with other cities until
    max_tokens (it never ends a list of calls by itself), so the test reads the first two."""
    question = [{"role": "user", "content": "What is the weather in Paris and in London?"}]
    r = ask(client, question, tools=[GET_WEATHER], tool_choice="required", max_tokens=96)
    calls = r.choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls[:2]] == ["Paris", "London"]
    assert {c.function.name for c in calls} == {"get_weather"} and len({c.id for c in calls}) == len(calls)
    assert "<tool_call>" not in (r.choices[0].message.content or "")


def test_logprobs_with_alternatives(client):
    r = ask(
        client,
        [{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert (
        len(content) == r.usage.completion_tokens
        and "".join(t.token for t in content) == r.choices[0].message.content
    )
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode("utf-8", "replace") == t.token
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        # greedy: the chosen token is the most likely one
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == pytest.approx(t.logprob)


def test_n_choices_count_the_prompt_once(client):
    question = [{"role": "user", "content": "Name a colour."}]
    one = ask(client, question, max_tokens=4)
    two = ask(client, question, max_tokens=4, n=2)
    assert sorted(c.index for c in two.choices) == [0, 1] and all(c.message.content for c in two.choices)
    assert two.usage.prompt_tokens == one.usage.prompt_tokens
    assert two.usage.completion_tokens > one.usage.completion_tokens


def test_smollm2_required_call_is_schema_valid(tool_server):
    # SmolLM2-135M is not trained for tools: a schema-valid call is enforcement, not luck
    schema = {
        "type": "object",
        "properties": {
            # bounded: a free string is the one thing a grammar cannot make a small model close
            "city": {"type": "string", "maxLength": 24},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 7},
        },
        "required": ["city", "unit", "days"],
        "additionalProperties": False,
    }
    tool = {
        "type": "function",
        "function": {"name": "forecast", "description": "Weather forecast", "parameters": schema},
    }
    small = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="any-key", max_retries=0)
    r = small.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=PARIS,
        tools=[tool],
        tool_choice="required",
        parallel_tool_calls=False,  # one call, then the grammar ends the turn (else it may start a second)
        temperature=0,
        max_tokens=64,
    )
    [call] = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "forecast"
    jsonschema_rs.validate(schema, json.loads(call.function.arguments))


def test_langchain_bind_tools(tool_server):
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return WEATHER_RESULT

    llm = ChatOpenAI(
        base_url=tool_server.url + "/v1", api_key="x", model=TOOL_MODEL, temperature=0, max_tokens=64
    )
    msg = llm.bind_tools([get_weather]).invoke("What is the weather in Paris?")
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_langgraph_agent_calls_observes_answers(tool_server):
    """A LangGraph tool-calling agent: model → tools → model, the last step asked to answer (tool_choice
    "none", see FINAL) once the tool has been observed."""
    from langchain_core.messages import AIMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from langgraph.graph import END, START, MessagesState, StateGraph
    from langgraph.prebuilt import ToolNode, tools_condition

    asked: list[str] = []

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        asked.append(city)
        return WEATHER_RESULT

    llm = ChatOpenAI(
        base_url=tool_server.url + "/v1", api_key="x", model=TOOL_MODEL, temperature=0, max_tokens=64
    )
    acting, answering = llm.bind_tools([get_weather]), llm.bind_tools([get_weather], tool_choice="none")

    def model(state: MessagesState) -> dict:
        observed = isinstance(state["messages"][-1], ToolMessage)
        return {"messages": [(answering if observed else acting).invoke(state["messages"])]}

    graph = StateGraph(MessagesState)
    graph.add_node("model", model)
    graph.add_node("tools", ToolNode([get_weather]))
    graph.add_edge(START, "model")
    graph.add_conditional_edges("model", tools_condition, {"tools": "tools", END: END})
    graph.add_edge("tools", "model")
    agent = graph.compile()
    messages = agent.invoke(
        {"messages": [("user", "What is the weather in Paris?")]}, {"recursion_limit": 6}
    )["messages"]
    assert asked == ["Paris"]
    assert any(isinstance(m, ToolMessage) and m.content == WEATHER_RESULT for m in messages)
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls and "18" in final.content


def test_javascript_openai_package_tool_loop(tool_server, node_client):
    env = {**os.environ, "ORTLLM_URL": tool_server.url + "/v1", "ORTLLM_MODEL": TOOL_MODEL}
    proc = subprocess.run(
        ["node", "tool_loop.mjs"], cwd=node_client, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["call"]["name"] == "get_weather" and json.loads(result["call"]["arguments"]) == {
        "city": "Paris"
    }
    assert result["finish_reasons"] == ["tool_calls", "stop"] and "18" in result["answer"]


def bad_request(tool_server, body: dict) -> dict:
    """POST a chat completion expected to fail with 400; its OpenAI error object."""
    r = requests.post(
        tool_server.url + "/v1/chat/completions", json={"model": TOOL_MODEL, **body}, timeout=60
    )
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_invalid_tool_schema_is_400(tool_server):
    broken = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "nope"}}}
    error = bad_request(tool_server, {"messages": PARIS, "tools": [broken]})
    assert error["type"] == "invalid_request_error" and "tools" in f"{error['param']} {error['message']}"


def test_tool_choice_unknown_function_is_400(tool_server):
    choice = {"type": "function", "function": {"name": "get_stock_price"}}
    error = bad_request(tool_server, {"messages": PARIS, "tools": [GET_WEATHER], "tool_choice": choice})
    assert "tool_choice" in f"{error['param']} {error['message']}" and "get_stock_price" in error["message"]


def test_tool_message_without_matching_call_is_400(tool_server):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history = [
        *PARIS,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_999", "content": WEATHER_RESULT},
    ]
    error = bad_request(tool_server, {"messages": history, "tools": [GET_WEATHER]})
    assert "tool_call_id" in f"{error['param']} {error['message']}" and "call_999" in error["message"]


def test_streamed_chat_logprobs_follow_the_content(client):
    stream = ask(
        client,
        [{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=8,
        logprobs=True,
        top_logprobs=1,
        stream=True,
    )
    text, tokens = "", []
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        tokens += [t.token for t in (choice.logprobs.content if choice.logprobs else None) or []]
    assert text and "".join(tokens) == text


def test_completions_logprobs(tool_server):
    small = openai.OpenAI(base_url=tool_server.url + "/v1", api_key="any-key", max_retries=0)
    r = small.completions.create(
        model=DEFAULT_MODEL,
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0,
        logprobs=2,
        echo=True,
    )
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == r.usage.completion_tokens
    start = len("The capital of France is")  # offsets count from the echoed prompt
    assert choice.text[start:] == "".join(lp.tokens) and lp.text_offset[0] == start
    assert all(
        len(top) <= 2 and max(top.values()) == pytest.approx(v)
        for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
