"""Issue 13 items 4–5: failed-auth throttling, ?token only on the WebSocket, /metrics behind the key,
WebSocket limits (message size, pending requests) and the cancelled marker."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import uuid

import pytest
import requests
from simple_websocket import Client, ConnectionClosed
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage

from tests.conftest import DEFAULT_MODEL, LiveServer

M = DEFAULT_MODEL
ALICE, BOB = "alicekey-123456", "bobkey-7654321"
AS_ALICE = {"Authorization": f"Bearer {ALICE}"}
AS_BOB = {"Authorization": f"Bearer {BOB}"}
WRONG = {"Authorization": "Bearer wrongkey-0000000"}
TOO_MANY = "__ERROR__:too many pending messages"


@pytest.fixture(scope="module")
def live(pulled):
    server = LiveServer("--model", M, "--api-key", f"alice:{ALICE}", "--api-key", f"bob:{BOB}")
    yield server
    server.stop()


def ws_url(server: LiveServer, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/chat/ws" + query


def get_from(
    address: str, server: LiveServer, path: str, headers: dict[str, str]
) -> http.client.HTTPResponse:
    """A GET sent from another loopback address (127.0.0.x): failed authentications count per address."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30, source_address=(address, 0))
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_wrong_key_flood_is_429_after_the_budget_while_right_keys_work(live):
    statuses = [get_from("127.0.0.2", live, "/api/models", WRONG).status for _ in range(30)]
    assert statuses == [401] * 20 + [429] * 10  # auth.failed_per_minute defaults to 20
    r = requests.get(live.url + "/v1/models", headers=WRONG)  # another address: its own budget
    assert r.status_code == 401
    limited = get_from("127.0.0.2", live, "/v1/models", WRONG)
    assert limited.status == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60
    # a valid key is served from the same address (no lockout of callers sharing it, e.g. behind a proxy)
    assert get_from("127.0.0.2", live, "/api/models", AS_ALICE).status == 200
    assert requests.get(live.url + "/api/models", headers=AS_BOB).status_code == 200


def test_wrong_key_429_is_in_the_dialects_format(pulled, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[auth]\nfailed_per_minute = 3\nprotect_metrics = false\n")
    server = LiveServer("--api-key", f"alice:{ALICE}", env={"ORTLLM_CONFIG": str(config)})
    try:
        for _ in range(3):
            assert requests.get(server.url + "/v1/models", headers=WRONG).status_code == 401
        r = requests.get(server.url + "/v1/models", headers=WRONG)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert "failed authentications" in r.json()["error"]["message"]
        r = requests.get(server.url + "/api/v1/models", headers=WRONG)
        assert r.status_code == 429 and r.json()["error"]["code"] == "RATE_LIMITED"
        # protect_metrics = false opens /metrics, and callers are labelled by a stable hash, not by name
        assert requests.get(server.url + "/api/models", headers=AS_ALICE).status_code == 200
        text = requests.get(server.url + "/metrics").text
        assert 'identity="hmac:' in text and "alice" not in text
    finally:
        server.stop()


def test_query_token_is_accepted_only_on_the_websocket_upgrade(live):
    r = requests.get(f"{live.url}/api/models?token={ALICE}")
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert "Authorization" in r.json()["detail"] and "WebSocket" in r.json()["detail"]
    r = requests.post(f"{live.url}/v1/chat/completions?token={ALICE}", json={"model": M, "messages": []})
    assert r.status_code == 401 and "Authorization" in r.json()["error"]["message"]
    ws = Client.connect(ws_url(live, f"?token={ALICE}"))  # browsers cannot set headers on a WebSocket
    ws.send(json.dumps({"model-name": "no-such-model", "prompt": "hi"}))
    assert ws.receive(30).startswith("__ERROR__:Model 'no-such-model' not found")  # then the server closes


def test_metrics_need_the_key_when_auth_is_on(live):
    assert requests.get(live.url + "/health").status_code == 200
    r = requests.get(live.url + "/metrics")
    assert r.status_code == 401 and "API key" in r.json()["detail"]
    requests.get(live.url + "/api/models", headers=AS_BOB)
    r = requests.get(live.url + "/metrics", headers=AS_ALICE)
    assert r.status_code == 200 and 'identity="bob"' in r.text


def test_a_too_big_websocket_message_gets_close_1009(live):
    """A blocking client that sends 10 MB and only then reads sees the close frame, not a TCP reset."""
    ws = WSConnection(ConnectionType.CLIENT)
    sock = socket.create_connection(("127.0.0.1", live.port), timeout=30)
    try:
        sock.sendall(
            ws.send(
                Request(
                    host="127.0.0.1",
                    target="/chat/ws",
                    extra_headers=[(b"authorization", f"Bearer {ALICE}".encode())],
                )
            )
        )
        events = []
        while not events:
            ws.receive_data(sock.recv(4096))
            events = list(ws.events())
        assert isinstance(events[0], AcceptConnection)
        sock.sendall(ws.send(TextMessage(data="x" * 10_000_000)))  # today: ConnectionResetError
        close = None
        while close is None:
            data = sock.recv(65536)
            assert data, "the server closed the connection without a close frame"
            ws.receive_data(data)
            close = next((e for e in ws.events() if isinstance(e, CloseConnection)), None)
        assert close.code == 1009 and "too big" in close.reason
    finally:
        sock.close()


def test_a_burst_of_messages_is_bounded_and_the_socket_stays_usable(live):
    ws = Client.connect(ws_url(live, "?mode=multi"), headers=AS_ALICE)
    body = {"model-name": M, "prompt": "Say hi.", "max-token": 3, "temperature": 0}
    try:
        started = time.monotonic()
        for _ in range(50):
            ws.send(json.dumps({**body, "session-id": str(uuid.uuid4())}))
        refused, ends, last_refusal = 0, 0, 0.0
        while refused + ends < 50:
            frame = ws.receive(60)
            assert frame is not None and time.monotonic() - started < 90, (refused, ends)
            if frame == TOO_MANY:
                refused, last_refusal = refused + 1, time.monotonic() - started
            elif frame.startswith("__END__:"):
                ends += 1
            else:
                assert not frame.startswith("__ERROR__"), frame
        assert refused >= 30 and last_refusal < 10, (refused, ends, last_refusal)  # at once, not one by one
        ws.send(json.dumps({**body, "session-id": str(uuid.uuid4())}))
        assert ws.receive(60).startswith("__START__:")
        while not (frame := ws.receive(60)).startswith("__END__:"):
            pass
        assert json.loads(frame[len("__END__:") :])["finish_reason"] in ("stop", "length")
    finally:
        ws.close()


def test_websocket_answers_cut_short_by_an_unload_say_cancelled(live):
    body = {"model-name": M, "prompt": "Tell me a very long story about dragons.", "max-token": 2000}
    single = Client.connect(ws_url(live), headers=AS_ALICE)
    multi = Client.connect(ws_url(live, "?mode=multi"), headers=AS_BOB)
    single.send(json.dumps(body))
    multi.send(json.dumps(body))
    for ws in (single, multi):
        for _ in range(3):
            assert not ws.receive(60).startswith("__ERROR__")
    frames: dict[str, list[str]] = {"single": [], "multi": []}

    def collect(name: str, ws: Client) -> None:
        try:
            while (frame := ws.receive(30)) is not None:
                frames[name].append(frame)
                if frame.startswith("__END__:"):
                    return
        except ConnectionClosed:
            pass

    readers = [threading.Thread(target=collect, args=item) for item in (("single", single), ("multi", multi))]
    for reader in readers:
        reader.start()
    assert requests.post(f"{live.url}/api/models/{M}/unload", headers=AS_ALICE).status_code == 200
    for reader in readers:
        reader.join(40)
    multi.close()
    assert frames["single"] and frames["single"][-1] == "__ERROR__:cancelled"  # then the socket closed
    assert frames["multi"][-2] == "__ERROR__:cancelled"
    assert json.loads(frames["multi"][-1][len("__END__:") :])["finish_reason"] == "cancelled"
