"""Property-based bad input: schemathesis fuzzes every operation of /openapi.json against a live server with
all its checks (no 5xx, statuses/headers/bodies as documented, valid data accepted, invalid data rejected,
405 with `Allow`, auth enforced where the document says so).

The server is the test's own (own store, so its sessions, loads and unloads touch no other test), with API
keys on and every generation capped at MAX_TOKENS tokens (server limit, model default and schema maximum),
so 50 examples per operation fit CI's time. ORTLLM_FUZZ_EXAMPLES overrides the count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import DEFAULT_MODEL, LiveServer

MAX_TOKENS = 8
KEYS = {
    "alice": "alice-key-0123456789",
    "bob": "bob-key-9876543210",
}  # two callers: object-level authorization
KEY = KEYS["alice"]
# Model names and session ids are `<path:...>` in these routes, so GET /api/models/{name} also matches
# /api/models/{name}/load (name "x/load": 404) and GET /chat/history/{id} matches .../rollback (400): OPTIONS
# rightly lists GET there and GET is not a 405. Hub ids (the orchestrator dialect's) hold a slash; model
# names and session ids do not, so a plain `<name>` converter would end the ambiguity for all but
# /models/{id}/start|stop.
AMBIGUOUS_PATHS = r"^/(api/models|models)/\{\w+\}/(load|unload|start|stop)$|^/chat/history/\{\w+\}/rollback$|^/api/sessions/\{\w+\}/messages$"
MODEL_FIELDS = {"model", "model-name", "model_id"}
TOKEN_FIELDS = {"max_tokens", "max-token", "max_new_tokens", "max_completion_tokens"}


@pytest.fixture(scope="module")
def fuzz_server(pulled: Path, tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("fuzz-home")
    model = home / "models" / pulled.name
    shutil.copytree(pulled, model, copy_function=os.link)  # hard links: no copy of the weights
    manifest = json.loads((model / "manifest.json").read_text())
    manifest["parameters"]["max_tokens"] = MAX_TOKENS  # the default of requests that name no max_tokens
    (model / "manifest.json").unlink()  # a new file: the hard-linked one is the shared store's
    (model / "manifest.json").write_text(json.dumps(manifest))
    config = home / "config.toml"
    keys = json.dumps([f"{name}:{key}" for name, key in KEYS.items()])
    config.write_text(
        f"[server]\nmax_tokens_limit = {MAX_TOKENS}\nmax_embedding_inputs = 16\n[auth]\nfailed_per_minute = 0\napi_keys = {keys}\n"
        "[rate_limit]\nper_minute = 0\n"
    )
    live = LiveServer("--model", DEFAULT_MODEL, env={"ORTLLM_HOME": str(home), "ORTLLM_CONFIG": str(config)})
    yield live
    live.stop()


def fuzzable(spec: dict[str, Any], model: str, builds: list[str]) -> dict[str, Any]:
    """The served document narrowed to requests that are quick here; every one still valid by the original.

    - a max-token field whose default exceeds MAX_TOKENS is required: the server answers 400 for the
      chat-completions and orchestrator dialects' defaults (128-512) and the legacy /v1/completions one
      (16, in code) under this limit;
    - `device` is cpu and `quantization` one of the model's builds: the others answer 400 on a machine or
      model without that execution provider or build, which no schema can know in advance;
    - model names get the installed model as an example, so the examples phase reaches past the 404;
    - `logit_bias` keys are token ids below 10000 (every model's vocabulary is larger); `tools` is one tool
      with no `parameters` or an object one and `tool_choice` names no function: a bigger id, two tools of
      one name, a schema llguidance cannot compile or a name not in `tools` are 400s no schema can state, and so is a tool
      message without an earlier call of that id (no tool messages, then), or an earlier call whose
      arguments are not a JSON object's text; `num_ctx` is the model's context or a large part of it; Responses input items and Anthropic content blocks, whose rules
      depend on their type and role, are fuzzed as text.
    """
    spec = json.loads(json.dumps(spec))
    for operations in spec["paths"].values():
        for operation in operations.values():
            for param in operation["parameters"]:
                if param["name"].startswith("model"):
                    param["schema"]["examples"] = [model]
    for name, schema in spec["components"]["schemas"].items():
        props = schema.get("properties", {})
        for field in TOKEN_FIELDS & props.keys():
            if (props[field].get("default") or 0) > MAX_TOKENS or name == "CompletionRequest":
                props[field] = {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
                schema["required"] = sorted({*schema.get("required", []), field})
        if "num_ctx" in props:  # a window smaller than the prompt is a 400 no schema can state
            props["num_ctx"] = {"enum": [None, 2048, 8192]}
        if "device" in props:
            props["device"] = {"type": "string", "enum": ["cpu"]}
        if "quantization" in props:
            props["quantization"] = {"enum": [*builds, None]}
        for field in MODEL_FIELDS & props.keys():
            props[field]["examples"] = [model]
        if "logit_bias" in props:
            props["logit_bias"]["anyOf"][0]["propertyNames"] = {"pattern": "^[0-9]{1,4}$"}
        if "tools" in props and name != "ChatCompletionRequest":
            # the Responses and Messages dialects' tools share chat's 400s (one name twice, a schema llguidance
            # cannot compile, a choice naming no tool): chat's tools are fuzzed, theirs are left out
            for field in ("tools", "tool_choice"):
                props.pop(field, None)
            schema["required"] = [r for r in schema.get("required", []) if r not in ("tools", "tool_choice")]
        elif "tools" in props:
            tools = props["tools"]["anyOf"][0]
            tools["maxItems"] = 1
            function = tools["items"]["properties"]["function"]["properties"]
            function["parameters"] = {"enum": [None, {"type": "object"}]}
            props["tool_choice"] = {"enum": ["none", "auto", "required", None]}
        if name == "OpenAIMessage":  # a tool message answers a call of an earlier message: a 400 otherwise
            props["role"]["enum"].remove("tool")
        if name == "ResponseRequest":  # input items follow rules by type (a call output needs its call)
            props["input"] = {"type": "string", "minLength": 1}
        if name == "InputMessage":  # Anthropic's blocks follow rules by role (no thinking in a user turn)
            props["content"] = {"type": "string"}
        if name == "FunctionCall":  # a call's arguments are a JSON object's text: a 400 otherwise
            props["arguments"] = {"type": "string", "enum": ["{}", '{"city": "Paris"}']}
    return spec


def test_document_states_limits_statuses_and_auth(fuzz_server):
    spec = requests.get(f"{fuzz_server.url}/openapi.json", timeout=30).json()
    schemas = spec["components"]["schemas"]
    options = schemas["InferenceOptions"]["properties"]
    assert options["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": MAX_TOKENS}
    assert (
        options["temperature"]["anyOf"][0] | {"minimum": 0.0, "maximum": 2.0}
        == options["temperature"]["anyOf"][0]
    )
    assert spec["paths"]["/api/sessions"]["post"]["requestBody"]["required"] is False
    assert set(spec["paths"]["/api/sessions"]["post"]["responses"]) >= {"201", "400", "401", "413"}
    assert "204" in spec["paths"]["/chat/history/{session_id}"]["delete"]["responses"]
    generate = spec["paths"]["/generate"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "429", "503", "504"} <= set(generate)
    assert generate["404"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/DetailError"
    }
    assert (
        spec["paths"]["/health"]["get"].get("security") is None
        and "401" not in spec["paths"]["/health"]["get"]
    )
    assert spec["paths"]["/v1/models"]["get"]["security"] == [{"bearer": []}]


@pytest.mark.slow
def test_fuzzing_with_all_checks_finds_nothing(fuzz_server, home: Path):
    headers = {"Authorization": f"Bearer {KEY}"}
    spec = requests.get(f"{fuzz_server.url}/openapi.json", timeout=30).json()
    model = requests.get(f"{fuzz_server.url}/api/v1/models", headers=headers, timeout=30).json()["models"][0]
    work = home / "schemathesis"
    work.mkdir(exist_ok=True)
    (work / "openapi.json").write_text(json.dumps(fuzzable(spec, model["name"], [model["quantization"]])))
    users = [
        {"name": n, "fixedHeaders": [{"name": "Authorization", "value": f"Bearer {k}"}]}
        for n, k in KEYS.items()
    ]
    (work / "auth.json").write_text(json.dumps({"auth": users}))
    # Every check is on unless a config turns it off (the CLI's `--checks all` would override the one
    # exclusion below, so the checks are left at that default).
    (work / "schemathesis.toml").write_text(
        f"""
# the document says no request string may hold U+0000 (a 400 everywhere: the tokenizer stops reading there)
[generation]
allow-x00 = false

[auth.wfc]
path = "{work / "auth.json"}"
peers = {json.dumps(list(KEYS))}

# 413 is how the server refuses more texts than server.max_embedding_inputs (the schema's maxItems)
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]

[[operations]]
include-path-regex = '{AMBIGUOUS_PATHS}'
checks.allow_header_conformance.enabled = false
checks.unsupported_method.enabled = false
"""
    )
    examples = os.environ.get("ORTLLM_FUZZ_EXAMPLES", "50")
    cmd = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(work / "schemathesis.toml"), "run",
        str(work / "openapi.json"), "--url", fuzz_server.url, "--max-examples", examples,
        "--seed", "20261122", "--request-timeout", "60",
        "--report", "junit", "--report-dir", str(work / "report"),
    ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    summary = proc.stdout[proc.stdout.rfind("SUMMARY") :]
    print(f"schemathesis: {examples} examples per operation, {time.monotonic() - started:.0f} s\n{summary}")
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-2000:]
    assert "No issues found" in summary or "failures" not in summary.lower(), summary
