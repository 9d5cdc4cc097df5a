"""The orchestrator dialect (/models/*/start|stop, /generate), one test per client example it supports:
models, start/stop, /generate (auto-load, 404, 504 after the configured timeout).
Errors are {"detail": ...}."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import requests

from tests.conftest import DEFAULT_MODEL, LiveServer

M = DEFAULT_MODEL
HF = "HuggingFaceTB/SmolLM2-135M-Instruct"
TIMEOUT_S = 2.0
COUNTING = {
    "model_id": M,
    # a count the test model keeps going with (greedy: past 47 within 128 tokens), never an EOS
    "prompt": "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,",
    "temperature": 0.0,
}  # greedy counting never stops early


@pytest.fixture(scope="module")
def cold(pulled):
    """A second server with no model loaded and a short generation timeout (ORTLLM_GENERATE_TIMEOUT)."""
    live = LiveServer(env={"ORTLLM_GENERATE_TIMEOUT": str(TIMEOUT_S)})
    yield live
    live.stop()


def card(running: bool) -> dict:
    return {
        "id": M,
        "name": M,
        "hf_name": HF,
        "running": running,
        "context_length": 8192,
        "quantization": "int4",
    }


def test_api_info(server):
    body = requests.get(server.url + "/").json()
    assert (
        body["message"] == "LLM Inference API" and M in body["models"] and body["running_containers"] == [M]
    )


def test_list_models(server):
    assert requests.get(server.url + "/models").json() == {"models": [card(True)]}


def test_start_returns_existing_info_when_running(server):
    r = requests.post(f"{server.url}/models/{M}/start")
    assert r.status_code == 200
    assert r.json() == {
        "message": f"Container for {M} started",
        "port": server.port,
        "container_name": f"ortllm-{M}",
        "already_running": True,
    }


def test_stop_and_start_by_hub_id(cold):
    """Ids may contain '/': the hub id is a catalog alias of the installed model."""
    r = requests.post(f"{cold.url}/models/{HF}/stop")
    assert r.status_code == 404 and r.json() == {"detail": f"Container for {HF} is not running"}
    r = requests.post(f"{cold.url}/models/{HF}/start")
    assert r.json() == {
        "message": f"Container for {HF} started",
        "port": cold.port,
        "container_name": f"ortllm-{M}",
        "already_running": False,
    }
    assert requests.get(cold.url + "/models").json() == {"models": [card(True)]}
    assert requests.get(cold.url + "/").json()["running_containers"] == [M]
    r = requests.post(f"{cold.url}/models/{HF}/stop")
    assert r.status_code == 200 and r.json() == {"message": f"Container for {HF} stopped"}
    assert requests.get(f"{cold.url}/models/{HF}").json() == card(False)


def test_generate_example(server):
    body = {
        "model_id": M,
        "prompt": "Once upon a time",
        "max_new_tokens": 200,
        "temperature": 0.7,
        "top_p": 0.95,
    }
    r = requests.post(server.url + "/generate", json=body)
    assert r.status_code == 200 and set(r.json()) == {"generated_text", "model_id"}
    assert r.json()["generated_text"] and r.json()["model_id"] == M


def test_python_httpx_async_example(server):
    async def generate():
        async with httpx.AsyncClient(timeout=120) as client:
            # the documented example, greedy: sampled at the default 0.7 the raw prompt "What is AI?" ends at
            # once (an end-of-sequence first) in about 1 of 6 requests on the test model
            body = {"model_id": M, "prompt": "What is AI?", "max_new_tokens": 100, "temperature": 0}
            response = await client.post(server.url + "/generate", json=body)
            return response.json()

    assert asyncio.run(generate())["generated_text"]


def test_curl_example_and_max_new_tokens(server):
    r = requests.post(
        server.url + "/generate", json={"model_id": M, "prompt": "Hello world", "max_new_tokens": 50}
    )
    assert r.status_code == 200 and r.json()["generated_text"]
    short = requests.post(server.url + "/generate", json={**COUNTING, "max_new_tokens": 6}).json()[
        "generated_text"
    ]
    assert short.strip().startswith("16") and len(short) < 24


def test_generate_auto_loads_the_model(cold):
    requests.post(f"{cold.url}/models/{M}/stop")
    assert requests.get(cold.url + "/readiness").status_code == 503
    r = requests.post(cold.url + "/generate", json={**COUNTING, "max_new_tokens": 4})
    assert r.status_code == 200 and r.json()["generated_text"].strip().startswith("16")
    assert requests.get(cold.url + "/models").json()["models"][0]["running"] is True
    assert requests.get(cold.url + "/readiness").status_code == 200


def test_generation_timeout_is_504_and_cancels(cold):
    requests.post(f"{cold.url}/models/{M}/start")
    started = time.monotonic()
    r = requests.post(cold.url + "/generate", json={**COUNTING, "max_new_tokens": 4000})
    elapsed = time.monotonic() - started
    assert r.status_code == 504 and r.json() == {
        "detail": f"Generation did not finish within {TIMEOUT_S:g} seconds"
    }
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 3
    metrics = requests.get(cold.url + "/metrics").text
    assert f'batch_size{{model="{M}"}} 0.0' in metrics  # the generation was cancelled, not left running
    assert requests.post(cold.url + "/generate", json={**COUNTING, "max_new_tokens": 4}).status_code == 200


def test_errors_are_detail_objects(server):
    r = requests.post(server.url + "/generate", json={"model_id": "gpt-2", "prompt": "Hello"})
    assert r.status_code == 404 and r.json()["detail"].startswith(
        "Model 'gpt-2' not found. Available models: "
    )
    r = requests.get(server.url + "/models/gpt-2")
    assert r.status_code == 404 and r.json()["detail"].startswith("Model 'gpt-2' not found")
    r = requests.post(server.url + "/models/gpt-2/start")
    assert r.status_code == 404 and "detail" in r.json()
    r = requests.post(server.url + "/generate", json={"model_id": M})
    assert r.status_code == 400 and r.json() == {"detail": "Missing required field: prompt"}
    r = requests.post(server.url + "/generate", json={"model_id": M, "prompt": "x", "temperature": 2.5})
    assert r.status_code == 400 and r.json() == {"detail": "temperature must be between 0.0 and 2.0"}
    r = requests.post(server.url + "/generate", json={"model_id": M, "prompt": "x", "max_new_tokens": "many"})
    assert r.status_code == 400 and r.json()["detail"].startswith("max_new_tokens: ")
    r = requests.post(server.url + "/generate", json={"model_id": M, "prompt": "x", "max_new_tokens": 0})
    assert r.status_code == 400 and r.json() == {
        "detail": "max_new_tokens: Input should be greater than or equal to 1"
    }
    r = requests.get(server.url + "/models/x/stop")
    assert r.status_code == 404 and "detail" in r.json()
