"""The server's own output (a line per loaded model, an access log line per request, --quiet), doctor and
chat agreeing on who batches, Swagger's working examples and the README's API examples."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import DEFAULT_MODEL, REPO, LiveServer, ortllm

pytestmark = pytest.mark.slow
RUNTIME = r"\S+ on \w+, (?:native batcher|og\.Engine \(.+\)|og\.Generator \(.+\))"


@pytest.fixture(scope="module")
def live(pulled: Path):
    server = LiveServer("--model", DEFAULT_MODEL)
    yield server
    server.stop()


def wait_for(server: LiveServer, pattern: str) -> str:
    """The server's output once a line matches `pattern` (its access lines follow the response closely)."""
    deadline = time.monotonic() + 10
    while not re.search(pattern, output := server.output()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return output


def test_start_logs_each_model_with_its_variant_provider_and_batcher(live):
    assert re.search(rf"loaded {DEFAULT_MODEL} {RUNTIME}", live.output())


def test_an_access_line_per_request_with_status_time_and_tokens(live):
    body = {"model": DEFAULT_MODEL, "prompt": "Hi", "stream": False, "options": {"max_tokens": 5}}
    r = requests.post(live.url + "/api/generate", json=body, timeout=60)
    tokens = r.json()["usage"]["completion_tokens"]
    line = rf'127\.0\.0\.1 "POST /api/generate" 200 \d+\.\d{{3}} s {tokens} tokens'
    assert re.search(line, wait_for(live, line))
    streamed = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    with requests.post(
        live.url + "/v1/chat/completions", json={**streamed, "stream": True}, stream=True
    ) as r:
        assert r.status_code == 200 and "[DONE]" in r.text
    line = r'"POST /v1/chat/completions" 200 \d+\.\d{3} s 4 tokens'
    assert re.search(line, wait_for(live, line))
    assert requests.get(live.url + "/no-such-route", timeout=10).status_code == 404
    line = r'"GET /no-such-route" 404 \d+\.\d{3} s\n'  # nothing generated: no token count
    assert re.search(line, wait_for(live, line))


def test_quiet_turns_the_access_log_off(pulled):
    server = LiveServer("--model", DEFAULT_MODEL, "--quiet")
    try:
        assert requests.get(server.url + "/api/models", timeout=10).status_code == 200
        time.sleep(0.3)
        output = server.output()
        assert re.search(rf"loaded {DEFAULT_MODEL} {RUNTIME}", output)  # the model line stays
        assert "GET /api/models" not in output and "GET /health" not in output
    finally:
        server.stop()


def test_the_access_log_setting_comes_from_config_and_environment(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[server]\naccess_log = false\n")
    shown = json.loads(ortllm("serve", "--config", str(config), "--print-config", check=True).stdout)
    assert shown["server"]["access_log"] is False
    shown = json.loads(ortllm("serve", "--print-config", env={"ORTLLM_ACCESS_LOG": "0"}, check=True).stdout)
    assert shown["server"]["access_log"] is False
    assert json.loads(ortllm("serve", "--print-config", check=True).stdout)["server"]["access_log"] is True


@pytest.mark.parametrize("batcher", ["auto", "engine"])
def test_doctor_and_chat_agree_on_who_batches(pulled, batcher):
    env = {"ORTLLM_BATCHER": batcher}
    report = json.loads(ortllm("doctor", "--json", env=env, check=True).stdout)
    entry = next(m for m in report["models"] if m["name"] == DEFAULT_MODEL)
    chat = ortllm("chat", DEFAULT_MODEL, env=env, input="/exit\n", timeout=120, check=True)
    assert f"{entry['variant']} on cpu, {entry['runtime']}" in chat.stdout.replace("\n", " ")
    assert (
        entry["runtime"] == "native batcher"
        if batcher == "auto"
        else entry["runtime"].startswith("og.Engine")
    )


def test_doctor_lists_only_providers_that_can_run_here(pulled):
    report = json.loads(ortllm("doctor", "--json", check=True).stdout)
    available, absent = report["execution_providers"], report["unavailable_providers"]
    assert "cpu" in available and set(available) | set(absent) == {"cpu", "cuda", "dml", "webgpu"}
    assert not set(available) & set(absent) and all(absent.values())  # each absent one says why
    gpu = list(Path("/dev").glob("dri/renderD*")) + list(Path("/dev").glob("nvidia[0-9]*"))
    if not gpu:  # no GPU device on this machine: WebGPU cannot run, whatever the build has
        assert "webgpu" not in available and "no GPU device" in absent["webgpu"]
    text = ortllm("doctor", check=True).stdout
    for ep in absent:
        assert f"not {ep}" in text


def test_every_swagger_example_body_works_as_is(live):
    spec = requests.get(live.url + "/openapi.json", timeout=10).json()
    session = requests.post(
        live.url + "/api/sessions",
        json={"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
        timeout=10,
    ).json()
    tried = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json")
            if body is None:
                continue
            assert "example" in body, f"{method.upper()} {path} documents no example body"
            example = body["example"]
            assert "string" not in json.dumps(example)
            url = live.url + path.replace("{session_id}", session["id"])
            for param in op["parameters"]:
                if param["name"] != "session_id":
                    url = url.replace(f"{{{param['name']}}}", param["example"])
            r = requests.request(method, url, json=example, timeout=120)
            assert r.status_code < 400, f"{method.upper()} {path}: {r.status_code} {r.text[:300]}"
            tried.append(path)
    assert {"/api/chat", "/v1/chat/completions", "/generate", "/api/v1/generate"} <= set(tried)


def test_readme_generate_example_is_a_continuation(live):
    readme = (REPO / "README.md").read_text()
    line = next(x for x in readme.splitlines() if "/api/generate" in x and "Once upon a time" in x)
    body = json.loads(re.search(r"-d '(\{.*\})'", line).group(1))
    assert body["raw"] is True  # the chat template would make it a question: the reply a greeting
    answer = requests.post(live.url + "/api/generate", json={**body, "stream": False}, timeout=60).json()
    templated = {**body, "raw": False, "stream": False}
    as_chat = requests.post(live.url + "/api/generate", json=templated, timeout=60).json()
    # raw: the model reads the four words alone, not wrapped in a system prompt and chat turns
    assert answer["usage"]["prompt_tokens"] < 8 < as_chat["usage"]["prompt_tokens"]
