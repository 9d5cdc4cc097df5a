"""all-MiniLM-L6-v2 served by plain onnxruntime in the main environment.

The model is exported by the optimum environment's run (tests/test_optimum.py, `make
test-optimum`), which leaves it in `$ORTLLM_TEST_CACHE/prebuilt/all-minilm-l6-v2` together with
sentence-transformers' reference vectors (`all-minilm-l6-v2.json`); `make test` runs this file
right after that run. Without such an export the tests are skipped with the reason.
"""

from __future__ import annotations

import numpy as np
import pytest
import requests

from tests.conftest import LiveServer, import_prebuilt, ortllm, prebuilt_dir

M = "all-minilm-l6-v2"
CAT, FELINE, TAX = (
    "The cat sat on the mat",
    "A feline rested on the rug",
    "The quarterly tax report is due on Friday.",
)


@pytest.fixture(scope="module")
def reference(home) -> dict:
    found = import_prebuilt(M, home)
    if found is None or "vectors" not in found:
        pytest.skip(
            f"no optimum export of {M} in {prebuilt_dir()}: run `make test-optimum` first (it exports it)"
        )
    return {text: np.asarray(vector) for text, vector in zip(found["texts"], found["vectors"], strict=True)}


@pytest.fixture(scope="module")
def embedder(reference):
    from ortllm.runtime.registry import ModelRegistry

    registry = ModelRegistry()
    yield registry.get(M)
    registry.close()


@pytest.fixture(scope="module")
def live(reference):
    server = LiveServer("--model", M)
    yield server
    server.stop()


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_the_registry_serves_it_with_onnxruntime(embedder):
    from ortllm.runtime.embedder import Embedder

    assert isinstance(embedder, Embedder) and embedder.model.variant.id == "cpu-fp32"
    assert embedder.model.pooling == "mean" and embedder.model.normalize and embedder.model.max_length == 256


def test_vectors_match_sentence_transformers(embedder, reference):
    texts = list(reference)
    ours = np.asarray(embedder.embed(texts))
    ref = np.stack([reference[t] for t in texts])
    assert ours.shape == (len(texts), 384)
    assert np.abs(ours - ref).max() < 1e-3
    assert np.allclose(np.linalg.norm(ours, axis=1), 1, atol=1e-5)


def test_similar_sentences_score_above_unrelated(embedder):
    cat, feline, tax = embedder.embed([CAT, FELINE, TAX])
    assert cosine(cat, feline) > cosine(cat, tax) + 0.2


def test_api_embeddings(live, reference):
    r = requests.post(live.url + "/api/embeddings", json={"model": M, "input": CAT}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == M and len(body["embedding"]) == 384
    assert np.abs(np.asarray(body["embedding"]) - reference[CAT]).max() < 1e-3
    r = requests.post(
        live.url + "/api/embeddings", json={"model": "all-MiniLM-L6-v2", "input": [CAT, FELINE]}, timeout=60
    )
    assert r.status_code == 200 and len(r.json()["embeddings"]) == 2


def test_v1_embeddings(live, reference):
    r = requests.post(live.url + "/v1/embeddings", json={"model": M, "input": [CAT, FELINE, TAX]}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    vectors = [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]
    assert np.abs(np.asarray(vectors[1]) - reference[FELINE]).max() < 1e-3
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert body["usage"]["prompt_tokens"] > 0


def test_generation_requests_are_refused_with_400(live):
    expected = f"Model '{M}' is an embedding model"
    r = requests.post(
        live.url + "/api/generate", json={"model": M, "prompt": "Hi", "stream": False}, timeout=60
    )
    assert r.status_code == 400 and expected in r.json()["detail"]
    r = requests.post(
        live.url + "/v1/chat/completions",
        json={"model": M, "messages": [{"role": "user", "content": "Hi"}]},
        timeout=60,
    )
    assert r.status_code == 400 and expected in r.json()["error"]["message"]
    r = requests.post(
        live.url + "/api/chat", json={"model": M, "messages": [{"role": "user", "content": "Hi"}]}, timeout=60
    )
    assert r.status_code == 400 and expected in r.json()["detail"]
    assert requests.get(live.url + "/sessions", timeout=60).json() in (
        [],
        {"sessions": []},
    )  # no session left behind


def test_cli_run_refuses_with_one_line(reference):
    proc = ortllm("run", M, "Hello")
    assert proc.returncode == 1 and f"error: Model '{M}' is an embedding model" in proc.stderr
    assert "Traceback" not in proc.stderr
