"""The Ollama listener's plumbing: `--ollama [HOST:]PORT` / ollama.listen / ORTLLM_OLLAMA, one process on two
ports, and which routes each port has (the Ollama dialect's own routes are tested in test_ollama_dialect.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests

from ortllm.benchmark import free_port
from ortllm.sessions import SessionStore
from ortllm.settings import ConfigError, Settings, load_settings
from ortllm.web.app import create_app
from tests.conftest import DEFAULT_MODEL, LiveServer, ortllm
from tests.test_dialects_fast import FakeRegistry, M, install

OLLAMA = {"ortllm.listener": "ollama"}


@pytest.mark.parametrize(
    ("value", "listen"),
    [("11434", "127.0.0.1:11434"), ("0.0.0.0:1234", "0.0.0.0:1234"), ("[::1]:5", "::1:5"), ("", None)],
)
def test_listen_addresses(value: str, listen: str | None) -> None:
    settings = load_settings(env={"ORTLLM_OLLAMA": value} if value else {})
    assert settings.ollama.listen == listen
    if listen:
        assert settings.ollama.port == int(listen.rpartition(":")[2])


@pytest.mark.parametrize(
    ("value", "words"),
    [("abc", "HOST:PORT"), ("127.0.0.1:70000", "1 to 65535"), ("8000", "another port than server.port")],
)
def test_bad_listen_addresses_are_one_clear_error(value: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words) as info:
        load_settings(overrides={"ollama": {"listen": value}})
    assert "Value error" not in str(info.value)


def test_cli_flag_alone_means_ollamas_default_port() -> None:
    proc = ortllm("serve", "--ollama", "--print-config", check=True)
    assert '"listen": "127.0.0.1:11434"' in proc.stdout
    proc = ortllm("serve", "--ollama", "0.0.0.0:11434", "--print-config", check=True)
    assert '"listen": "0.0.0.0:11434"' in proc.stdout
    # beyond this machine without auth: refused, as for the main port
    refused = ortllm("serve", "--ollama", "0.0.0.0:11434")
    assert refused.returncode != 0 and "Refusing to listen on 0.0.0.0" in refused.stderr


@pytest.fixture
def app(tmp_path: Path) -> Any:
    install(tmp_path, M)
    app = create_app(Settings(), registry=FakeRegistry(tmp_path), sessions=SessionStore(tmp_path / "s.db"))  # type: ignore[arg-type]
    app.config["TESTING"] = True
    return app


def test_each_port_has_its_own_routes(app: Any) -> None:
    client = app.test_client()
    # /v1 is shared: the OpenAI dialect answers on both listeners
    assert client.get("/v1/models").status_code == 200
    assert client.get("/v1/models", environ_base=OLLAMA).status_code == 200
    # the native /api/models exists on the main port only; the Ollama listener answers in Ollama's shape
    assert client.get("/api/models").status_code == 200
    missing = client.get("/api/models", environ_base=OLLAMA)
    assert missing.status_code == 404 and missing.get_json() == {"error": "Not found: /api/models"}
    # the Ollama dialect's internal prefix does not exist on the main port (nor in its OpenAPI document)
    hidden = client.get("/_ollama/api/tags")
    assert hidden.status_code == 404 and hidden.get_json() == {"detail": "Not found: /_ollama/api/tags"}
    assert not any(path.startswith("/_ollama") for path in client.get("/openapi.json").get_json()["paths"])


def test_one_process_two_ports(pulled: Path) -> None:
    port = free_port()
    live = LiveServer("--model", DEFAULT_MODEL, "--ollama", f"127.0.0.1:{port}")
    try:
        ollama = f"http://127.0.0.1:{port}"
        listed = [
            sorted(m["id"] for m in requests.get(f"{base}/v1/models", timeout=30).json()["data"])
            for base in (live.url, ollama)
        ]
        assert listed[0] == listed[1] and DEFAULT_MODEL in listed[0]
        # the same process: a request on one port shows in the other's metrics
        requests.get(f"{ollama}/v1/models", timeout=30)
        metrics = requests.get(f"{live.url}/metrics", timeout=30).text
        assert 'dialect="openai"' in metrics
        live.log.flush()
        live.log.seek(0)
        assert f"Ollama's API on http://127.0.0.1:{port}" in live.log.read()
    finally:
        live.stop()
