"""/v1/chat/completions over scripted token streams (no model): reasoning split from content, a tool call
streamed as OpenAI streams it (id and name first, then the arguments in pieces, no markup in content), and
n choices merged — in process, on test_dialects_fast's fake registry with a scripted runner."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ortllm.runtime.job import Job, Stream
from ortllm.runtime.types import GenerationRequest
from ortllm.sessions import SessionStore
from ortllm.settings import Settings
from ortllm.web.app import create_app
from tests.test_dialects_fast import FakeFacts, FakeRegistry, FakeRunner, M, install

HERMES_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if tools %}<tools>{{ tools | tojson }}</tools> answer with <tool_call></tool_call>{% endif %}"
    "<|im_start|>assistant\n"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCRIPT: list[str] = []  # the tokens the scripted runner streams


class ScriptDecoder:
    def decode(self, token: int) -> str:
        return SCRIPT[token]


class ScriptedRunner(FakeRunner):
    """Streams SCRIPT's tokens; its model has a Hermes-style chat template that reads `tools`."""

    def __init__(self, installed: Any) -> None:
        super().__init__(installed)
        facts: Any = FakeFacts(installed)
        facts.chat_template = HERMES_TEMPLATE
        self.model = facts

    def submit(self, request: GenerationRequest) -> Stream:
        self.requests.append(request)
        job = Job(request, [0, 0, 0, 0], len(SCRIPT), ScriptDecoder)
        for token in range(len(SCRIPT)):
            job.take(token)
        job.finish("stop")
        return Stream(job, lambda job: None)


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


def chunks(response: Any) -> list[dict[str, Any]]:
    lines = [line[6:] for line in response.get_data(as_text=True).splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def post(client: Any, **body: Any) -> Any:
    return client.post(
        "/v1/chat/completions", json={"model": M, "messages": [{"role": "user", "content": "Hi"}], **body}
    )


def test_reasoning_is_kept_out_of_content(client: Any) -> None:
    SCRIPT[:] = ["<think>", "2 and 2", " make 4", "</think>", "\n\n", "It is ", "4."]
    message = post(client).get_json()["choices"][0]["message"]
    assert message["content"] == "It is 4."
    assert message["reasoning_content"] == message["reasoning"] == "2 and 2 make 4"
    deltas = [c["choices"][0]["delta"] for c in chunks(post(client, stream=True))]
    assert "".join(d.get("content") or "" for d in deltas) == "It is 4."
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "2 and 2 make 4"
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert not any("think>" in (d.get("content") or "") for d in deltas)


def test_a_tool_call_streams_as_openai_streams_it(client: Any) -> None:
    SCRIPT[:] = [
        "<tool_call>",
        '\n{"name": "get_',
        'weather", "arguments": {"ci',
        'ty": "Par',
        'is"}}\n',
        "</tool_call>",
    ]
    events = chunks(post(client, stream=True, tools=[WEATHER]))
    calls = [d for c in events for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["id"].startswith("call_") and calls[0]["function"]["name"] == "get_weather"
    assert all("id" not in c and "name" not in c["function"] for c in calls[1:])
    assert len(calls) > 2  # the arguments came in pieces, as they were generated
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert not any(c["choices"][0]["delta"].get("content") for c in events)
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # the request carried the grammar that enforces the call and the tools for the template
    request = client.registry.get(M).requests[-1]
    assert request.guidance[0] == "lark_grammar" and request.tools[0]["function"]["name"] == "get_weather"
    reply = post(client, tools=[WEATHER]).get_json()["choices"][0]
    assert reply["finish_reason"] == "tool_calls" and reply["message"]["content"] is None
    assert json.loads(reply["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}


def test_tool_results_reach_the_template(client: Any) -> None:
    SCRIPT[:] = ["It is ", "sunny."]
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]
    r = client.post("/v1/chat/completions", json={"model": M, "messages": history, "tools": [WEATHER]})
    assert r.status_code == 200 and r.get_json()["choices"][0]["message"]["content"] == "It is sunny."
    sent = client.registry.get(M).requests[-1].messages
    assert (
        sent[-1]["role"] == "tool"
        and sent[-1]["content"] == "18 degrees"
        and sent[-1]["name"] == "get_weather"
    )
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_n_choices_are_merged_with_their_indexes(client: Any) -> None:
    SCRIPT[:] = ["a", "b"]
    body = post(client, n=3, seed=7).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2] and body["usage"]["prompt_tokens"] == 4
    assert body["usage"]["completion_tokens"] == 6
    seeds = [r.options.seed for r in client.registry.get(M).requests[-3:]]
    assert seeds == [7, 8, 9]
    events = chunks(post(client, n=2, stream=True))
    finished = [c["choices"][0]["index"] for c in events if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1]
