"""Shutdown with answers in flight: SIGTERM and Ctrl-C (SIGINT to the process group) exit within 3 s,
and every dialect's stream ends with its cancelled marker (never a normal ending)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.conftest import DEFAULT_MODEL, LiveServer

pytestmark = pytest.mark.slow
M = DEFAULT_MODEL
EXIT_LIMIT_S = 3.0
COUNT = "Write the numbers from 1 to 500: 1, 2, 3, 4, 5,"  # greedy SmolLM2 keeps going for hundreds of tokens
LONG = 3000


class Client(threading.Thread):
    """One request in a thread: `tokens` counts what arrived before the end, `events` what the server sent."""

    def __init__(self, name: str, run: Callable[[Client], None]) -> None:
        super().__init__(name=name, daemon=True)
        self.run_fn = run
        self.events: list[Any] = []
        self.tokens = 0
        self.status: int | None = None
        self.body: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.run_fn(self)
        except BaseException as exc:  # kept for the assertion message
            self.error = exc


def sse(path: str, body: dict[str, Any], url: str) -> Callable[[Client], None]:
    def run(c: Client) -> None:
        with requests.post(url + path, json=body, stream=True, timeout=60) as r:
            c.status = r.status_code
            for event in sse_events_live(r, c):
                c.events.append(event)

    return run


def sse_events_live(response: requests.Response, client: Client):
    """conftest.sse_events, one event at a time (counting tokens as they come)."""
    data: list[str] = []
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    yield json.loads(text)
                except ValueError:
                    yield text
                client.tokens += 1
                data = []
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])


def plain(path: str, body: dict[str, Any], url: str) -> Callable[[Client], None]:
    def run(c: Client) -> None:
        r = requests.post(url + path, json=body, timeout=60)
        c.status, c.body = r.status_code, r.json()

    return run


def websocket(url: str) -> Callable[[Client], None]:
    def run(c: Client) -> None:
        from simple_websocket import Client as WS
        from simple_websocket import ConnectionClosed

        ws = WS.connect(url.replace("http", "ws", 1) + "/chat/ws")
        ws.send(json.dumps({"model-name": M, "prompt": COUNT, "max-token": LONG, "temperature": 0}))
        try:
            while (frame := ws.receive(timeout=60)) is not None:
                c.events.append(frame)
                c.tokens += 1
        except ConnectionClosed:
            c.events.append("<closed>")

    return run


def openai_sdk(url: str) -> Callable[[Client], None]:
    def run(c: Client) -> None:
        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        stream = client.chat.completions.create(
            model=M,
            messages=[{"role": "user", "content": COUNT}],
            max_tokens=LONG,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        try:
            for chunk in stream:
                c.events.append(chunk.choices[0].finish_reason if chunk.choices else None)
                c.tokens += 1
        except openai.APIError as exc:
            c.events.append(exc)

    return run


def clients(url: str) -> dict[str, Client]:
    chat = [{"role": "user", "content": COUNT}]
    greedy = {"max_tokens": LONG, "temperature": 0}
    kebab = {"model-name": M, "prompt": COUNT, "max-token": LONG, "temperature": 0}
    specs: dict[str, Callable[[Client], None]] = {
        "native-chat": sse("/api/chat", {"model": M, "messages": chat, "options": greedy}, url),
        "native-generate": sse("/api/generate", {"model": M, "prompt": COUNT, "options": greedy}, url),
        "openai-chat": sse(
            "/v1/chat/completions",
            {"model": M, "messages": chat, "stream": True, "ignore_eos": True, **greedy},
            url,
        ),
        "openai-completions": sse(
            "/v1/completions",
            {"model": M, "prompt": COUNT, "stream": True, "ignore_eos": True, **greedy},
            url,
        ),
        "openai-sdk": openai_sdk(url),
        "chat-completions-chat": sse("/chat/completions", kebab, url),
        "chat-completions-completions": sse(
            "/completions", {"model": M, "prompt": COUNT, "stream": True, **greedy}, url
        ),
        "spec-stream": sse("/api/v1/generate/stream", {"model": M, "prompt": COUNT, **greedy}, url),
        "openai-plain": plain(
            "/v1/chat/completions", {"model": M, "messages": chat, "ignore_eos": True, **greedy}, url
        ),
        "orchestrator-plain": plain(
            "/generate", {"model_id": M, "prompt": COUNT, "max_new_tokens": LONG, "temperature": 0.01}, url
        ),
        "ws": websocket(url),
    }
    return {name: Client(name, run) for name, run in specs.items()}


def stop_with_answers_in_flight(signum: int) -> tuple[float, dict[str, Client], str]:
    """Start a server, open every dialect's answer, signal it once all streams have tokens: (exit s, clients)."""
    live = LiveServer("--model", M)
    try:
        running = clients(live.url)
        for c in running.values():
            c.start()
        deadline = time.monotonic() + 60
        streams = [c for name, c in running.items() if "plain" not in name]
        while time.monotonic() < deadline and not all(c.tokens >= 2 for c in streams):
            time.sleep(0.1)
        assert all(c.tokens >= 2 for c in streams), {c.name: (c.tokens, c.error) for c in streams}
        assert all(c.is_alive() for c in running.values()), [
            c.name for c in running.values() if not c.is_alive()
        ]
        started = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(live.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the whole process group
        else:
            live.proc.send_signal(signum)
        code = live.proc.wait(30)
        elapsed = time.monotonic() - started
        for c in running.values():
            c.join(10)
        assert code == 0
        return elapsed, running, live.output()
    finally:
        live.stop()


def check_markers(running: dict[str, Client]) -> None:
    """Each dialect's way of saying that the answer was cut short."""
    ev = {name: c.events for name, c in running.items()}
    for name, c in running.items():
        assert c.error is None, f"{name}: {c.error!r}"
    for name in ("native-chat", "native-generate"):
        assert ev[name][-1]["done"] is True and ev[name][-1]["finish_reason"] == "cancelled", ev[name][-1]
    for name in ("openai-chat", "openai-completions"):
        assert "[DONE]" not in ev[name]
        assert ev[name][-1]["error"]["code"] == "cancelled", ev[name][-1]
        assert "shutting down" in ev[name][-1]["error"]["message"]
        assert all(
            not (isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"])
            for e in ev[name]
        )
    import openai

    assert isinstance(ev["openai-sdk"][-1], openai.APIError) and "cancelled" in str(ev["openai-sdk"][-1])
    assert set(ev["openai-sdk"][:-1]) == {None}  # no chunk said "stop"
    for name in ("chat-completions-chat", "chat-completions-completions"):
        assert ev[name][-1] == "__ERROR__:cancelled", ev[name][-3:]
    last = ev["spec-stream"][-1]
    assert (
        last["finished"] is True
        and last["finish_reason"] == "cancelled"
        and last["error"]["code"] == "CANCELLED"
    )
    plain_openai, plain_orchestrator = running["openai-plain"], running["orchestrator-plain"]
    assert plain_openai.status == 503 and plain_openai.body["error"]["code"] == "cancelled", plain_openai.body
    assert plain_orchestrator.status == 503 and "cancelled" in plain_orchestrator.body["detail"], (
        plain_orchestrator.body
    )
    assert ev["ws"][-1] == "<closed>" and running["ws"].tokens >= 2


@pytest.mark.parametrize(
    "signum",
    [signal.SIGTERM, signal.SIGTERM, signal.SIGTERM, signal.SIGINT, signal.SIGINT],
    ids=["term-1", "term-2", "term-3", "ctrl-c-1", "ctrl-c-2"],
)
def test_stop_cancels_every_dialect_and_exits_promptly(pulled, signum):
    elapsed, running, output = stop_with_answers_in_flight(signum)
    check_markers(running)
    assert elapsed <= EXIT_LIMIT_S, f"exit took {elapsed:.1f} s"
    assert "Traceback" not in output and "did not end" not in output, output[-3000:]


def test_an_embeddings_request_in_flight_does_not_hold_the_exit(pulled):
    """The issue's straggler: a big embeddings request on the model's worker at SIGTERM. It is cut short
    (an error, not vectors), the stream beside it ends cancelled, and the worker exits within the limit."""
    live = LiveServer("--model", M)
    try:
        texts = [f"sentence number {i} about the weather today" for i in range(1024)]  # ~30-60 s of work
        embed = Client("embed", plain("/v1/embeddings", {"model": M, "input": texts}, live.url))
        body = {"model": M, "prompt": COUNT, "options": {"max_tokens": LONG, "temperature": 0}}
        stream = Client("stream", sse("/api/generate", body, live.url))
        stream.start()
        while stream.tokens < 2 and stream.is_alive():
            time.sleep(0.05)
        embed.start()
        time.sleep(1.0)
        assert embed.is_alive() and stream.is_alive()
        started = time.monotonic()
        live.proc.send_signal(signal.SIGTERM)
        assert live.proc.wait(30) == 0
        elapsed = time.monotonic() - started
        embed.join(10)
        stream.join(10)
        assert elapsed <= EXIT_LIMIT_S, f"exit took {elapsed:.1f} s"
        assert embed.status != 200 or embed.error is not None, embed.body
        assert stream.events[-1]["finish_reason"] == "cancelled"
        assert "did not end" not in live.output(), live.output()[-2000:]
    finally:
        live.stop()


def test_the_exit_watchdog_names_what_it_cuts(monkeypatch, caplog):
    """A handler that cannot be cancelled is cut at the deadline, and the log names it."""
    from ortllm.web import server

    exits: list[int] = []
    monkeypatch.setattr(server.os, "_exit", exits.append)
    monkeypatch.setattr(server.logging, "shutdown", lambda: None)
    inflight = server.InFlight(lambda environ, start_response: [b""])
    inflight.requests[1] = ("POST /v1/embeddings", time.monotonic() - 12)

    class App:
        extensions = {
            "ortllm": type("Services", (), {"registry": type("Registry", (), {"loaded": dict})()})()
        }

    started = time.monotonic()
    with caplog.at_level("WARNING", logger="ortllm.server"):
        server._watch_exit(App(), inflight, time.monotonic() + 0.3)
    assert exits == [0] and 0.3 <= time.monotonic() - started < 2
    assert "POST /v1/embeddings (12." in caplog.text and "1 request(s) that did not end" in caplog.text


def test_requests_after_shutdown_began_get_503_and_load_nothing(pulled, monkeypatch):
    """Once shutdown began, a request (e.g. on a kept-alive connection) gets 503 naming the shutdown in its
    dialect's body, and does not load a model afresh (which would answer in full, uncancelled)."""
    from ortllm.web import server
    from ortllm.web import streaming as sse
    from ortllm.web.app import create_app
    from ortllm.web.dialects.chat_ws import ws

    stopping = threading.Event()  # the process-wide flags, fresh for this in-process app
    monkeypatch.setattr(sse, "STOPPING", stopping)
    monkeypatch.setattr(server, "STOPPING", stopping)
    monkeypatch.setattr(server, "_shutdown_once", threading.Lock())
    monkeypatch.setattr(ws, "CLOSING", threading.Event())
    app = create_app()
    server.prepare(app)
    client = app.test_client()
    registry = app.extensions["ortllm"].registry
    try:
        assert client.get("/health").status_code == 200
        server.shutdown(app)
        r = client.post("/api/generate", json={"model": M, "prompt": "Hi", "stream": False})
        assert r.status_code == 503 and "shutting down" in r.get_json()["detail"]
        assert r.headers["Connection"] == "close"
        r = client.post(
            "/v1/chat/completions", json={"model": M, "messages": [{"role": "user", "content": "Hi"}]}
        )
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "shutting_down"
        assert not registry.loaded()
    finally:
        registry.close()


def test_an_unload_cuts_streams_short_with_their_markers(pulled):
    """An unload (not only a shutdown) ends the model's streams with the dialect's cancelled marker."""
    from ortllm.web.app import create_app

    app = create_app()
    client = app.test_client()
    registry = app.extensions["ortllm"].registry
    cases = [
        (
            "/v1/chat/completions",
            {
                "model": M,
                "messages": [{"role": "user", "content": COUNT}],
                "stream": True,
                "ignore_eos": True,
                "max_tokens": LONG,
            },
        ),
        ("/completions", {"model": M, "prompt": COUNT, "stream": True, "max_tokens": LONG, "temperature": 0}),
    ]
    tails = []
    try:
        for path, body in cases:
            chunks = iter(client.post(path, json=body, buffered=False).response)
            next(chunks), next(chunks)  # streaming now
            registry.unload(M)
            tails.append(b"".join(chunks).decode())
    finally:
        registry.close()
    openai_tail, chat_completions_tail = tails
    assert '"code":"cancelled"' in openai_tail and "unloaded" in openai_tail and "[DONE]" not in openai_tail
    assert chat_completions_tail.endswith("data: __ERROR__:cancelled\n\n")
