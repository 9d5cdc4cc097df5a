"""The web UI's sessions API under /api/sessions: list, create (seeded = a branched conversation), read,
rename, delete. Errors are {"detail": ...}."""

from __future__ import annotations

import requests

from tests.conftest import DEFAULT_MODEL

M = DEFAULT_MODEL
KEYS = {"id", "title", "model", "system_prompt", "created", "updated", "message_count", "origin"}


def test_create_read_rename_delete(server):
    r = requests.post(server.url + "/api/sessions", json={"title": "Trip plans", "model": M})
    assert r.status_code == 201
    session = r.json()
    assert set(session) == KEYS and session["title"] == "Trip plans" and session["model"] == M
    assert session["message_count"] == 0 and session["system_prompt"] is None
    sid = session["id"]
    listed = requests.get(server.url + "/api/sessions").json()["sessions"]
    assert listed[0] == session and all(set(s) == KEYS for s in listed)
    r = requests.patch(
        f"{server.url}/api/sessions/{sid}", json={"title": "Paris trip", "system_prompt": "Be brief."}
    )
    assert (
        r.status_code == 200
        and r.json()["title"] == "Paris trip"
        and r.json()["system_prompt"] == "Be brief."
    )
    assert r.json()["updated"] >= session["updated"]
    full = requests.get(f"{server.url}/api/sessions/{sid}").json()
    assert full == {**r.json(), "messages": []}
    assert requests.delete(f"{server.url}/api/sessions/{sid}").status_code == 204
    r = requests.get(f"{server.url}/api/sessions/{sid}")
    assert r.status_code == 404 and r.json() == {"detail": f"Session '{sid}' not found"}


def test_create_without_a_body(server):
    r = requests.post(server.url + "/api/sessions")
    assert r.status_code == 201 and r.json()["title"] is None
    requests.delete(f"{server.url}/api/sessions/{r.json()['id']}")


def test_branch_a_conversation_then_continue_it(server):
    """The UI branches by creating a session seeded with the messages up to the edited one."""
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "Nice to meet you, Ada!"},
    ]
    r = requests.post(
        server.url + "/api/sessions", json={"title": "branch", "model": M, "messages": messages}
    )
    session = r.json()
    assert session["system_prompt"] == "You are a helpful assistant." and session["message_count"] == 2
    sid = session["id"]
    assert requests.get(f"{server.url}/api/sessions/{sid}").json()["messages"] == messages[1:]
    reply = requests.post(
        server.url + "/api/chat",
        json={
            "model": M,
            "session_id": sid,
            "stream": False,
            "messages": [{"role": "user", "content": "What is my name?"}],
            "options": {"temperature": 0},
        },
    )
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] > 30
    stored = requests.get(f"{server.url}/api/sessions/{sid}").json()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert (
        requests.get(f"{server.url}/chat/history/{sid}").json()[0] == messages[0]
    )  # the same store as /chat/*


def test_errors_are_detail_objects(server):
    r = requests.post(server.url + "/api/sessions", json={"messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["detail"].startswith("messages.0.role")
    r = requests.post(server.url + "/api/sessions", json={"title": 5})
    assert r.status_code == 400 and r.json()["detail"].startswith("title: ")
    r = requests.patch(server.url + "/api/sessions/nope", json={"title": "x"})
    assert r.status_code == 404 and r.json() == {"detail": "Session 'nope' not found"}
    assert requests.delete(server.url + "/api/sessions/nope").status_code == 404
    r = requests.post(server.url + "/api/sessions", data="[1", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"].startswith("Malformed JSON")
