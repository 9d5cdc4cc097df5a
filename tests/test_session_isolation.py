"""Sessions belong to their caller: no key (or JWT subject) can read, list, continue or delete another's,
in any dialect; a foreign id answers exactly like one that does not exist. Turns keep the user's question
from the moment they start, and a broken sessions database is reported, not a 500."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import jwt
import pytest
import requests
from simple_websocket import Client, ConnectionClosed

from ortllm.conversation import abandon_turn, commit_turn, plan_turn, start_turn
from ortllm.errors import InvalidOptions, SessionNotFound, SessionStoreUnavailable
from ortllm.sessions import SessionStore
from tests.conftest import ALICE_KEY, BOB_KEY, DEFAULT_MODEL, JWT_SECRET, LiveServer

M = DEFAULT_MODEL
ALICE, BOB, SECRET = ALICE_KEY, BOB_KEY, JWT_SECRET
Q = [{"role": "user", "content": "My password is hunter2. Say OK."}]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def alice_jwt() -> str:
    """A JWT whose subject is `alice`, the same name as the API key `alice`: it must not share her sessions."""
    return jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


# ---- the store -------------------------------------------------------------------------------------


def test_each_owner_sees_only_its_own_sessions(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    alice, bob = store.scoped("key:alice"), store.scoped("key:bob")
    alice.create(session_id="secret-1", title="mine")
    alice.append("secret-1", Q)
    assert bob.find("secret-1") is None and bob.list() == [] and store.list() == []
    for call in (
        lambda: bob.messages("secret-1"),
        lambda: bob.history("secret-1"),
        lambda: bob.delete("secret-1"),
        lambda: bob.rollback("secret-1", 1),
        lambda: bob.update("secret-1", title="x"),
        lambda: bob.append("secret-1", Q),
    ):
        with pytest.raises(SessionNotFound, match="Session 'secret-1' not found"):
            call()
    # the same id under another owner is another session
    bob.create(session_id="secret-1")
    bob.append("secret-1", [{"role": "user", "content": "bob's"}])
    bob.delete("secret-1")
    assert alice.messages("secret-1") == Q and [s.id for s in alice.list()] == ["secret-1"]
    assert store.scoped("jwt:alice").list() == []


def test_a_version_1_database_migrates_with_owner_none(tmp_path):
    db_path = tmp_path / "old.db"
    db = sqlite3.connect(db_path)
    db.executescript("""
        CREATE TABLE sessions (id TEXT PRIMARY KEY, model TEXT, system_prompt TEXT, title TEXT,
                               created REAL NOT NULL, updated REAL NOT NULL);
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT,
                               session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
                               role TEXT NOT NULL, content TEXT NOT NULL, created REAL NOT NULL);
        INSERT INTO sessions VALUES ('old-1', 'm', 'Be brief.', 't', 1, 2), ('old-2', 'm', NULL, NULL, 1, 3);
        INSERT INTO messages(session_id, role, content, created) VALUES
            ('old-1', 'user', 'hi', 1), ('old-2', 'user', 'x', 1), ('old-1', 'assistant', 'hello', 1);
    """)
    db.close()
    store = SessionStore(db_path)
    assert [s.id for s in store.list()] == ["old-2", "old-1"]
    assert store.history("old-1") == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert store.scoped("key:alice").list() == []  # owned by nobody: visible only without auth
    assert SessionStore(db_path).get("old-1").message_count == 2  # opening again does not migrate twice


def test_session_ids_follow_one_pattern(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    for bad in ("abc\r\nX-Injected: 1", "a b", "../x", "é", "x" * 129):
        with pytest.raises(InvalidOptions, match="session id must be"):
            store.create(session_id=bad)
    assert store.create(session_id="550e8400-e29b-41d4-a716-446655440000").id.startswith("550e")
    assert store.create(session_id="user@example.com:chat_1+x=y~z").id == "user@example.com:chat_1+x=y~z"


def test_a_started_turn_keeps_the_question_until_it_is_answered(tmp_path):
    db = tmp_path / "s.db"
    store = SessionStore(db)
    turn = plan_turn(store, model="m", messages=Q, session_id="crash")
    assert store.find("crash") is None  # planning stores nothing
    start_turn(store, turn)
    # the process dies here; a new one finds the question, marked unanswered
    reopened = SessionStore(db)
    assert reopened.messages("crash") == [{**Q[0], "unanswered": True}]
    # the client retries the same question: it is not stored twice and the model sees it once
    retry = plan_turn(reopened, model="m", messages=Q, session_id="crash")
    assert retry.messages == Q
    commit_turn(reopened, retry, "OK")
    assert reopened.messages("crash") == [*Q, {"role": "assistant", "content": "OK"}]


def test_concurrent_turns_do_not_remove_each_others_questions(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    first = plan_turn(store, model="m", messages=[{"role": "user", "content": "one"}], session_id="s")
    start_turn(store, first)
    second = plan_turn(store, model="m", messages=[{"role": "user", "content": "two"}], session_id="s")
    start_turn(store, second)  # the first turn is still running: its question stays
    commit_turn(store, first, "ONE")
    commit_turn(store, second, "TWO")
    assert [m["content"] for m in store.messages("s")] == ["one", "two", "ONE", "TWO"]


def test_a_withdrawn_turn_is_undone_and_its_new_session_removed(tmp_path):
    store = SessionStore(tmp_path / "s.db")
    fresh = plan_turn(store, model="m", messages=Q, session_id="fresh")
    start_turn(store, fresh)
    abandon_turn(store, fresh, withdrawn=True)
    assert store.find("fresh") is None
    kept = plan_turn(store, model="m", messages=Q, session_id="kept")
    commit_turn(store, kept, "OK")
    again = plan_turn(store, model="m", messages=[{"role": "user", "content": "more"}], session_id="kept")
    start_turn(store, again)
    abandon_turn(store, again, withdrawn=True)
    assert store.messages("kept") == [*Q, {"role": "assistant", "content": "OK"}]
    # the server could not answer: the question stays for a retry
    failed = plan_turn(store, model="m", messages=[{"role": "user", "content": "more"}], session_id="kept")
    start_turn(store, failed)
    abandon_turn(store, failed)
    assert store.messages("kept")[-1] == {"role": "user", "content": "more", "unanswered": True}


def test_a_broken_database_is_a_503_error_naming_the_file(tmp_path):
    db = tmp_path / "s.db"
    store = SessionStore(db)
    store.check()
    db.write_bytes(b"this is not a database" * 100)
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    with pytest.raises(
        SessionStoreUnavailable, match=r"s\.db cannot be used: file is not a database — move it aside"
    ):
        store.check()
    with pytest.raises(SessionStoreUnavailable) as info:
        store.list()
    assert info.value.status == 503


# ---- over HTTP, every dialect ----------------------------------------------------------------------


def native_chat(url: str, token: str, sid: str, text: str) -> requests.Response:
    return requests.post(
        url + "/api/chat",
        headers=bearer(token),
        timeout=120,
        json={
            "model": M,
            "stream": False,
            "session_id": sid,
            "options": {"max_tokens": 8},
            "messages": [{"role": "user", "content": text}],
        },
    )


def chat_completions_chat(url: str, token: str, sid: str, text: str) -> requests.Response:
    r = requests.post(
        url + "/chat/completions",
        headers=bearer(token),
        timeout=120,
        json={"model-name": M, "prompt": text, "session-id": sid, "max-token": 8},
    )
    _ = r.text  # read to the end: the turn is stored when the stream ends
    return r


def ws_chat(url: str, token: str, sid: str, text: str) -> list[str]:
    ws = Client.connect(url.replace("http://", "ws://") + "/chat/ws", headers=bearer(token))
    ws.send(json.dumps({"model-name": M, "prompt": text, "session-id": sid, "max-token": 8}))
    frames = []
    try:
        while (frame := ws.receive(120)) is not None:
            frames.append(frame)
    except ConnectionClosed:
        pass
    return frames


def web_ui_session(url: str, token: str, sid_holder: list[str], text: str) -> requests.Response:
    r = requests.post(
        url + "/api/sessions",
        headers=bearer(token),
        json={
            "title": "ui",
            "messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "OK"}],
        },
    )
    sid_holder.append(r.json()["id"])
    return r


def assert_invisible(url: str, token: str, sid: str) -> None:
    """Every way to reach a session answers as if `sid` did not exist."""
    h = bearer(token)
    assert requests.get(f"{url}/chat/history/{sid}", headers=h).status_code == 404
    assert requests.get(f"{url}/api/sessions/{sid}", headers=h).status_code == 404
    assert requests.patch(f"{url}/api/sessions/{sid}", headers=h, json={"title": "x"}).status_code == 404
    assert (
        requests.post(f"{url}/chat/history/{sid}/rollback", headers=h, json={"amount": 1}).status_code == 404
    )
    assert requests.delete(f"{url}/chat/history/{sid}", headers=h).status_code == 404
    assert requests.delete(f"{url}/api/sessions/{sid}", headers=h).status_code == 404
    assert sid not in requests.get(f"{url}/sessions", headers=h).json()
    assert sid not in [s["id"] for s in requests.get(f"{url}/api/sessions", headers=h).json()["sessions"]]


def test_the_issue_reproduction(secured):
    url = secured.url
    assert native_chat(url, ALICE, "alice-secret-1", "my password is hunter2").ok
    r = requests.get(f"{url}/chat/history/alice-secret-1", headers=bearer(BOB))
    assert r.status_code == 404 and r.json() == {"error": "Session 'alice-secret-1' not found"}
    assert "hunter2" not in r.text
    assert requests.delete(f"{url}/chat/history/alice-secret-1", headers=bearer(BOB)).status_code == 404
    history = requests.get(f"{url}/chat/history/alice-secret-1", headers=bearer(ALICE)).json()
    assert history[0] == {"role": "user", "content": "my password is hunter2"} and len(history) == 2


@pytest.mark.parametrize("dialect", ["native", "chat-completions", "websocket", "web-ui"])
@pytest.mark.parametrize("owner, intruder", [(ALICE, BOB), (BOB, ALICE), (ALICE, "jwt")])
def test_no_caller_reaches_another_callers_session(secured, dialect, owner, intruder):
    url = secured.url
    intruder = alice_jwt() if intruder == "jwt" else intruder
    sid = f"{dialect}-{owner[:3]}-{intruder[:3]}-{time.monotonic_ns()}"
    secret = f"the secret of {sid}"
    if dialect == "native":
        assert native_chat(url, owner, sid, secret).ok
    elif dialect == "chat-completions":
        assert chat_completions_chat(url, owner, sid, secret).ok
    elif dialect == "websocket":
        assert ws_chat(url, owner, sid, secret)
    else:
        holder: list[str] = []
        assert web_ui_session(url, owner, holder, secret).status_code == 201
        sid = holder[0]
    mine = requests.get(f"{url}/api/sessions/{sid}", headers=bearer(owner)).json()
    assert mine["messages"][0]["content"] == secret
    assert_invisible(url, intruder, sid)
    # continuing "the same" id is a conversation of the intruder's own: the model never sees the secret
    r = native_chat(url, intruder, sid, "What is my password?")
    assert r.ok and r.json()["usage"]["prompt_tokens"] < 40
    theirs = requests.get(f"{url}/chat/history/{sid}", headers=bearer(intruder)).json()
    assert secret not in json.dumps(theirs)
    # ... and the owner's session is untouched by all of the above
    after = requests.get(f"{url}/api/sessions/{sid}", headers=bearer(owner)).json()
    assert after["messages"] == mine["messages"]
    assert sid in requests.get(f"{url}/sessions", headers=bearer(owner)).json()


def test_openai_and_stateless_routes_store_nothing_anyone_can_list(secured):
    url = secured.url
    before = requests.get(f"{url}/sessions", headers=bearer(BOB)).json()
    r = requests.post(
        url + "/v1/chat/completions",
        headers=bearer(ALICE),
        json={"model": M, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.ok
    assert requests.get(f"{url}/sessions", headers=bearer(BOB)).json() == before


# ---- turns that fail, crash or cannot be stored --------------------------------------------------------


def test_a_refused_turn_leaves_no_empty_session(server):
    too_long = "word " * 10000
    r = requests.post(
        server.url + "/api/chat",
        json={
            "model": M,
            "stream": False,
            "session_id": "refused-1",
            "messages": [{"role": "user", "content": too_long}],
        },
    )
    assert r.status_code == 400 and "Prompt too long" in r.json()["detail"]
    assert requests.get(server.url + "/api/sessions/refused-1").status_code == 404
    assert "refused-1" not in requests.get(server.url + "/sessions").json()


def test_a_client_that_goes_away_withdraws_its_turn(server):
    with requests.post(
        server.url + "/api/chat",
        stream=True,
        timeout=120,
        json={
            "model": M,
            "session_id": "went-away",
            "options": {"max_tokens": 500},
            "messages": [{"role": "user", "content": "Tell a long story."}],
        },
    ) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 30
    while requests.get(server.url + "/api/sessions/went-away").status_code != 404:
        assert time.monotonic() < deadline, "the withdrawn turn's session is still there"
        time.sleep(0.2)


@pytest.mark.slow
def test_kill_9_mid_answer_keeps_the_questions(pulled, home):
    live = LiveServer("--model", M)
    sids = [f"crash-{i}" for i in range(4)]
    started = threading.Barrier(len(sids) + 1, timeout=120)

    def stream(sid: str) -> None:
        try:
            with requests.post(
                live.url + "/api/chat",
                stream=True,
                timeout=120,
                json={
                    "model": M,
                    "session_id": sid,
                    "options": {"max_tokens": 500},
                    "messages": [{"role": "user", "content": f"Question {sid}: tell a long story."}],
                },
            ) as r:
                lines = r.iter_lines()  # one iterator: a second one may find the stream consumed
                next(lines)  # the first token has arrived
                started.wait()
                for _ in lines:
                    pass
        except (requests.RequestException, threading.BrokenBarrierError):
            pass

    threads = [threading.Thread(target=stream, args=(sid,), daemon=True) for sid in sids]
    try:
        for t in threads:
            t.start()
        started.wait()
        os.killpg(live.proc.pid, signal.SIGKILL)
        live.proc.wait()
    finally:
        live.stop()
    again = LiveServer()
    try:
        listed = requests.get(again.url + "/sessions").json()
        for sid in sids:
            assert sid in listed
            history = requests.get(f"{again.url}/chat/history/{sid}").json()
            assert history == [
                {"role": "user", "content": f"Question {sid}: tell a long story.", "unanswered": True}
            ]
        # the retry answers the question once; the unanswered copy is replaced
        r = requests.post(
            again.url + "/api/chat",
            json={
                "model": M,
                "stream": False,
                "session_id": sids[0],
                "options": {"max_tokens": 5},
                "messages": [{"role": "user", "content": f"Question {sids[0]}: tell a long story."}],
            },
        )
        assert r.ok
        history = requests.get(f"{again.url}/chat/history/{sids[0]}").json()
        assert [m["role"] for m in history] == ["user", "assistant"] and "unanswered" not in history[0]
    finally:
        again.stop()


def serve_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ortllm.cli.main", "serve", *args]


def test_a_corrupt_database_fails_the_start_in_one_line(tmp_path):
    (tmp_path / "sessions.db").write_bytes(b"garbage" * 1000)
    proc = subprocess.run(
        serve_cmd("--port", "1"),
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "ORTLLM_HOME": str(tmp_path)},
    )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "serving on" not in proc.stderr, proc.stderr
    assert lines[0].startswith(
        f"error: The sessions database {tmp_path / 'sessions.db'} cannot be used: "
        "file is not a database — move it aside"
    )


@pytest.fixture
def own_home(pulled, tmp_path):
    """A server home of its own (the models linked in), so its sessions database can be broken."""
    (tmp_path / "models").symlink_to(pulled.parent)
    return tmp_path


def test_a_database_that_breaks_while_serving_is_reported(own_home):
    live = LiveServer("--model", M, env={"ORTLLM_HOME": str(own_home)})
    db = own_home / "sessions.db"
    try:
        assert requests.get(live.url + "/health").json()["status"] == "healthy"
        assert native_chat(live.url, "", "before", "hi").ok
        shutil.copy(db, own_home / "backup.db")
        db.write_bytes(b"garbage" * 1000)
        for suffix in ("-wal", "-shm"):
            Path(str(db) + suffix).unlink(missing_ok=True)
        health = requests.get(live.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "unhealthy"
        assert "file is not a database" in health.json()["detail"]
        ready = requests.get(live.url + "/readiness")
        assert ready.status_code == 503 and "sessions database" in ready.json()["error"]
        r = requests.get(live.url + "/api/sessions")
        assert r.status_code == 503 and "file is not a database" in r.json()["detail"]
        r = requests.get(live.url + "/chat/history/before")
        assert r.status_code == 503 and "cannot be used" in r.json()["error"]
        assert native_chat(live.url, "", "during", "hi").status_code == 503
        # generation that needs no session keeps working
        r = requests.post(
            live.url + "/v1/chat/completions",
            json={"model": M, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.ok
        os.replace(own_home / "backup.db", db)  # repaired: everything is back, nothing lost
        assert requests.get(live.url + "/health").status_code == 200
        assert requests.get(live.url + "/chat/history/before").json()[0]["content"] == "hi"
    finally:
        live.stop()


def test_a_read_only_database_is_reported(own_home):
    live = LiveServer("--model", M, env={"ORTLLM_HOME": str(own_home)})
    db = own_home / "sessions.db"
    try:
        assert native_chat(live.url, "", "kept", "hi").ok
        frozen = subprocess.run(["chattr", "+i", str(db)], capture_output=True)
        if frozen.returncode != 0:
            pytest.skip(f"chattr cannot make the file read-only here: {frozen.stderr.decode().strip()}")
        try:
            health = requests.get(live.url + "/health")
            assert health.status_code == 503 and "readonly" in health.json()["detail"]
            r = native_chat(live.url, "", "kept", "again")
            assert r.status_code == 503 and "make the file and its folder writable" in r.json()["detail"]
            assert requests.get(live.url + "/chat/history/kept").ok  # reading still works
        finally:
            subprocess.run(["chattr", "-i", str(db)], check=True)
        assert requests.get(live.url + "/health").status_code == 200
    finally:
        live.stop()
