"""Server lifecycle: graceful SIGTERM mid-stream, sessions intact afterwards, idle unload, settings."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest
import requests

from ortllm.sessions import SessionStore
from ortllm.settings import ConfigError, load_settings
from tests.conftest import DEFAULT_MODEL, LiveServer, ortllm, sse_events


def test_sigterm_mid_stream_ends_the_stream_and_exits_cleanly(pulled):
    live = LiveServer("--model", DEFAULT_MODEL)
    try:
        done = requests.post(
            live.url + "/api/chat",
            json={
                "model": DEFAULT_MODEL,
                "stream": False,
                "session_id": "kept",
                "messages": [{"role": "user", "content": "Hello"}],
                "options": {"max_tokens": 5},
            },
        )
        assert done.ok
        events: list = []

        def stream() -> None:
            body = {
                "model": DEFAULT_MODEL,
                "prompt": "Tell a very long story.",
                # min_tokens: still generating when SIGTERM arrives, however fast the machine is
                "options": {"max_tokens": 3000, "min_tokens": 3000},
            }
            with requests.post(live.url + "/api/generate", json=body, stream=True, timeout=60) as r:
                events.extend(sse_events(r))

        client = threading.Thread(target=stream)
        client.start()
        time.sleep(1.5)  # streaming now
        live.proc.send_signal(signal.SIGTERM)
        client.join(30)
        assert live.proc.wait(30) == 0
        last = {k: v for k, v in events[-1].items() if k != "full_text"} if events else None
        assert last and last["done"] is True and last["finish_reason"] == "cancelled", (last, len(events))
        assert "Traceback" not in live.output()
    finally:
        live.stop()
    assert SessionStore().get("kept").message_count == 2  # the store survived the shutdown


def test_idle_models_are_unloaded(pulled):
    from ortllm.runtime.registry import ModelRegistry

    registry = ModelRegistry()
    registry.load(DEFAULT_MODEL)
    assert registry.unload_idle(3600) == []
    time.sleep(0.05)
    assert registry.unload_idle(0.01) == [DEFAULT_MODEL]
    assert not registry.is_loaded(DEFAULT_MODEL)


def test_settings_layering(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[server]\nport = 9000\nmax_queue = 5\n[cors]\norigins = ["http://a.example"]\n')
    settings = load_settings(config, {"server": {"port": 9100}}, env={"ORTLLM_MAX_QUEUE": "7"})
    assert settings.server.port == 9100 and settings.server.max_queue == 7
    assert settings.cors.origins == ["http://a.example"]
    with pytest.raises(ConfigError, match="Invalid setting server.port"):
        load_settings(None, {"server": {"port": 70000}}, env={})
    config.write_text("[server]\nbogus = 1\n")
    with pytest.raises(ConfigError, match="server.bogus"):
        load_settings(config, env={})


def test_print_config():
    out = json.loads(ortllm("serve", "--port", "8123", "--print-config", check=True).stdout)
    assert out["server"]["port"] == 8123 and out["server"]["host"] == "127.0.0.1"
    assert "bad.toml" in ortllm("serve", "--config", "bad.toml", "--print-config").stderr


def test_sample_config_is_valid():
    from tests.conftest import REPO

    settings = load_settings(REPO / "config.example.toml", env={})
    assert settings.server.models == ["smollm2-135m"] and settings.rate_limit.storage_uri == "memory://"


def test_sigterm_with_an_idle_websocket_exits_promptly(pulled):
    from simple_websocket import Client, ConnectionClosed

    live = LiveServer("--model", DEFAULT_MODEL)
    try:
        ws = Client.connect(live.url.replace("http", "ws", 1) + "/chat/ws?mode=multi")
        time.sleep(0.5)
        started = time.monotonic()
        live.proc.send_signal(signal.SIGTERM)
        assert live.proc.wait(30) == 0
        assert time.monotonic() - started < 8  # not gunicorn's whole grace period
        with pytest.raises(ConnectionClosed):  # the server ended the idle socket
            ws.receive(timeout=5)
    finally:
        live.stop()


def test_a_socket_registered_during_shutdown_ends_at_once(monkeypatch):
    """The CI race: SIGTERM's close_all ran while a handler was between the handshake and registering
    its socket, so that socket kept the worker alive for gunicorn's whole graceful timeout."""
    from ortllm.web.dialects.chat_ws import ws as wsmod

    class IdleSocket:  # a client that never sends anything
        def receive(self, timeout=None):
            time.sleep(timeout or 0)

    monkeypatch.setattr(wsmod, "CLOSING", threading.Event())
    before = wsmod.Connection(IdleSocket())  # registered before the shutdown: close_all ends it
    wsmod.close_all()
    after = wsmod.Connection(IdleSocket())  # the handler got here only after close_all
    assert before.inbox.get(timeout=2) is None and after.inbox.get(timeout=2) is None
    before.running = False
