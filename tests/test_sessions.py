"""SQLite sessions: durable, concurrent-safe, history/rollback/delete, and the chat-turn rule."""

import threading

import pytest

from ortllm.conversation import ChatSession, commit_turn, plan_turn
from ortllm.errors import GenerationFailed, InvalidOptions, SessionNotFound
from ortllm.runtime.job import Job, Stream
from ortllm.runtime.options import validate_options
from ortllm.runtime.types import CANCELLED, ERROR, GenerationRequest
from ortllm.sessions import SessionStore

from . import test_dialects_fast as fast


@pytest.fixture
def db(tmp_path):
    return tmp_path / "sessions.db"


def test_sessions_survive_reopening(db):
    store = SessionStore(db)
    s = store.create(model="m", system_prompt="Be brief.")
    store.append(s.id, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])
    reopened = SessionStore(db)
    assert reopened.history(s.id) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert [x.id for x in reopened.list()] == [s.id]


def test_rollback_and_delete(db):
    store = SessionStore(db)
    s = store.create(session_id="my-session")
    store.append(s.id, [{"role": "user", "content": str(i)} for i in range(5)])
    assert store.rollback(s.id, 2) == 2
    assert [m["content"] for m in store.messages(s.id)] == ["0", "1", "2"]
    assert store.rollback(s.id, 10) == 3
    store.delete(s.id)
    with pytest.raises(SessionNotFound):
        store.history(s.id)
    with pytest.raises(SessionNotFound):
        store.delete(s.id)


def test_bad_input_is_refused(db):
    store = SessionStore(db)
    s = store.create()
    with pytest.raises(InvalidOptions):
        store.append(s.id, [{"role": "robot", "content": "x"}])
    with pytest.raises(InvalidOptions):
        store.rollback(s.id, -1)
    with pytest.raises(InvalidOptions):
        store.create(session_id="x" * 500)


def test_concurrent_writers_lose_nothing(db):
    store = SessionStore(db)
    s = store.create()

    def writer(n):
        for i in range(20):
            SessionStore(db).append(s.id, [{"role": "user", "content": f"{n}-{i}"}])

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.messages(s.id)) == 80


def test_turn_with_only_the_new_message_uses_stored_history(db):
    store = SessionStore(db)
    turn = plan_turn(
        store, model="m", messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "a"}]
    )
    commit_turn(store, turn, "A")
    turn2 = plan_turn(
        store, model="m", messages=[{"role": "user", "content": "b"}], session_id=turn.session_id
    )
    assert turn2.messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "b"},
    ]


def test_turn_with_the_full_history_is_not_duplicated(db):
    store = SessionStore(db)
    first = [{"role": "user", "content": "a"}]
    turn = plan_turn(store, model="m", messages=first)
    commit_turn(store, turn, "A")
    full = first + [{"role": "assistant", "content": "A"}, {"role": "user", "content": "b"}]
    turn2 = plan_turn(store, model="m", messages=full, session_id=turn.session_id)
    assert turn2.messages == full and turn2.to_store == full[2:]
    commit_turn(store, turn2, "B")
    assert len(store.messages(turn.session_id)) == 4


def test_client_supplied_history_replaces_a_diverging_one(db):
    store = SessionStore(db)
    turn = plan_turn(store, model="m", messages=[{"role": "user", "content": "a"}], session_id="s1")
    commit_turn(store, turn, "A")
    branch = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "X"},
        {"role": "user", "content": "y"},
    ]
    turn2 = plan_turn(store, model="m", messages=branch, session_id="s1")
    commit_turn(store, turn2, "Y")
    assert [m["content"] for m in store.messages("s1")] == ["x", "X", "y", "Y"]


# ---- ChatSession: one rule for ending a turn, hooked on the runtime's Stream -----------------------------

WORDS = ["Hel", "lo"]


class Decoder:
    """A tokenizer's incremental decoder for the fake tokens: token i is WORDS[i]."""

    def decode(self, token: int) -> str:
        return WORDS[token]


def running(dropped: list[Job] | None = None) -> tuple[Job, Stream]:
    """A Job with its first token out and no final event yet, and the Stream reading it."""
    job = Job(GenerationRequest(validate_options({}), prompt="hi"), [0], 10, Decoder)
    job.take(0)
    return job, Stream(job, (dropped if dropped is not None else []).append)


def turn_on(store, session_id="t1", text="Question?"):
    job, stream = running()
    turn = plan_turn(store, model="m", messages=[{"role": "user", "content": text}], session_id=session_id)
    return job, ChatSession.begin(store, turn, stream)


def test_stream_hooks_run_once_and_closing_an_unfinished_stream_cancels_it():
    dropped: list[Job] = []
    job, stream = running(dropped)
    finals, closes = [], []
    stream.on_final(finals.append)
    stream.on_close(lambda: closes.append(1))
    events = iter(stream)
    assert next(events).text == "Hel" and not job.cancelled.is_set()
    stream.close()
    stream.close()
    assert job.cancelled.is_set() and dropped == [job] and closes == [1] and finals == []
    job.finish(CANCELLED)  # what the worker does at its next step
    assert [e.finish_reason for e in stream if e.done] == [CANCELLED]
    assert [e.finish_reason for e in finals] == [CANCELLED] and closes == [1]


def test_a_stream_read_to_its_end_closes_itself_and_result_has_all_its_text():
    job, stream = running()
    closes = []
    stream.on_close(lambda: closes.append(1))
    events = iter(stream)
    assert next(events).text == "Hel"
    job.take(1)
    job.finish("stop")
    result = stream.result()
    assert result.text == "Hello" and result.usage.completion_tokens == 2 and closes == [1]
    assert not job.cancelled.is_set()


def test_a_completed_answer_is_stored(db):
    store = SessionStore(db)
    job, chat = turn_on(store)
    assert store.messages("t1") == [{"role": "user", "content": "Question?", "unanswered": True}]
    job.take(1)
    job.finish("stop")
    assert chat.stream.result().text == "Hello"
    assert store.messages("t1") == [
        {"role": "user", "content": "Question?"},
        {"role": "assistant", "content": "Hello"},
    ]


@pytest.mark.parametrize("how", ["cancel", "reader stops", "client gone"])
def test_a_turn_the_caller_stops_is_undone(db, how):
    store = SessionStore(db)
    first = plan_turn(store, model="m", messages=[{"role": "user", "content": "a"}], session_id="t1")
    commit_turn(store, first, "A")
    job, chat = turn_on(store)
    if how == "cancel":  # a client's cancel, Ctrl-C in the terminal
        chat.cancel()
        job.finish(CANCELLED)
        chat.stream.result()
    elif how == "reader stops":  # an SSE client disconnected (its generator closed), a failed WebSocket send
        events = iter(chat.stream)
        next(events)
        events.close()
    else:
        chat.client_gone = lambda: True
        job.finish(CANCELLED)
        chat.stream.result()
    assert store.messages("t1") == [{"role": "user", "content": "a"}, {"role": "assistant", "content": "A"}]
    _, fresh = turn_on(store, session_id="t2")
    fresh.stream.close()
    with pytest.raises(SessionNotFound):  # the session the withdrawn turn created is gone too
        store.get("t2")


@pytest.mark.parametrize("reason", [CANCELLED, ERROR])
def test_a_turn_the_server_could_not_finish_keeps_its_question(db, reason):
    store = SessionStore(db)
    job, chat = turn_on(store)
    if reason == CANCELLED:
        chat.cancel(withdrawn=False)  # shutdown (an unload cancels the job the same way)
    job.finish(reason, "generation failed: boom" if reason == ERROR else None)
    if reason == ERROR:
        with pytest.raises(GenerationFailed):
            chat.stream.result()
    else:
        assert chat.stream.result().finish_reason == CANCELLED
    assert store.messages("t1") == [{"role": "user", "content": "Question?", "unanswered": True}]


# ---- origin (the web UI's sidebar), stopped answers, titles of API sessions ---------------------------


def test_sessions_remember_their_origin_and_stopped_answers(db):
    store = SessionStore(db)
    ui = store.create(title="Mine", origin="ui")
    api = store.create()
    assert (store.get(ui.id).origin, store.get(api.id).origin) == ("ui", "api")
    with pytest.raises(InvalidOptions, match="origin must be one of ui, api"):
        store.create(origin="browser")
    stopped = [
        {"role": "user", "content": "Tell me"},
        {"role": "assistant", "content": "Once", "stopped": True},
    ]
    store.append(ui.id, stopped)
    assert store.messages(ui.id) == [
        {"role": "user", "content": "Tell me"},
        {"role": "assistant", "content": "Once", "stopped": True},
    ]
    assert store.get(ui.id).message_count == 2
    # the model's history of the next turn carries the stopped answer without the mark
    turn = plan_turn(store, model="m", messages=[{"role": "user", "content": "More"}], session_id=ui.id)
    assert turn.messages == [
        *[{"role": m["role"], "content": m["content"]} for m in stopped],
        turn.messages[-1],
    ]


def test_a_session_an_api_turn_creates_is_titled_from_its_first_question(db):
    store = SessionStore(db)
    question = "What is the capital of France?\nAnswer in one word."
    commit_turn(store, plan_turn(store, model="m", messages=[{"role": "user", "content": question}]), "Paris")
    long = "x" * 80
    commit_turn(store, plan_turn(store, model="m", messages=[{"role": "user", "content": long}]), "y")
    titles = {s.title for s in store.list()}
    assert titles == {"What is the capital of France?", "x" * 47 + "…"}
    assert {s.origin for s in store.list()} == {"api"}


def test_a_version_2_database_gains_origin_and_stopped_columns(tmp_path):
    import sqlite3

    path = tmp_path / "v2.db"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE sessions (pk INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL DEFAULT '',
            id TEXT NOT NULL, model TEXT, system_prompt TEXT, title TEXT, created REAL NOT NULL,
            updated REAL NOT NULL, UNIQUE (owner, id));
        CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT,
            session_pk INTEGER NOT NULL REFERENCES sessions(pk) ON DELETE CASCADE, role TEXT NOT NULL,
            content TEXT NOT NULL, created REAL NOT NULL, answered INTEGER NOT NULL DEFAULT 1);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
        INSERT INTO sessions(owner, id, model, title, created, updated) VALUES
            ('', 'made-in-ui', 'm', 'Trip plans', 1, 2), ('', 'made-by-curl', 'm', NULL, 1, 3);
        INSERT INTO messages(session_pk, role, content, created) VALUES (1, 'user', 'hi', 1);
        PRAGMA user_version = 2;
    """)
    old.close()
    store = SessionStore(path)
    assert {s.id: s.origin for s in store.list()} == {"made-in-ui": "ui", "made-by-curl": "api"}
    assert store.messages("made-in-ui") == [{"role": "user", "content": "hi"}]
    store.append("made-in-ui", [{"role": "assistant", "content": "he", "stopped": True}])
    assert SessionStore(path).messages("made-in-ui")[-1] == {
        "role": "assistant",
        "content": "he",
        "stopped": True,
    }


@pytest.fixture
def client(tmp_path):
    """The app on a fake model registry (tests/test_dialects_fast.py), with a fresh sessions database."""
    fast.install(tmp_path, fast.M)
    app = fast.create_app(
        fast.Settings(), registry=fast.FakeRegistry(tmp_path), sessions=SessionStore(tmp_path / "s.db")
    )
    return app.test_client()


def test_the_sessions_api_takes_origin_and_stopped_turns(client):
    r = client.post("/api/sessions", json={"title": "t", "origin": "ui"})
    assert r.status_code == 201 and r.get_json()["origin"] == "ui"
    sid = r.get_json()["id"]
    assert client.post("/api/sessions", json={}).get_json()["origin"] == "api"
    r = client.post("/api/sessions", json={"origin": "browser"})
    assert r.status_code == 400 and r.get_json()["detail"].startswith("origin: ")
    turn = [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "Once", "stopped": True}]
    r = client.post(f"/api/sessions/{sid}/messages", json={"messages": turn})
    assert r.status_code == 200 and r.get_json()["message_count"] == 2
    assert client.get(f"/api/sessions/{sid}").get_json()["messages"] == turn[:1] + [turn[1]]
    for bad, field in (
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "assistant", "content": "x", "stopped": "yes"}]}, "messages.0.stopped"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages"),
    ):
        r = client.post(f"/api/sessions/{sid}/messages", json=bad)
        assert r.status_code == 400 and r.get_json()["detail"].startswith(field), r.get_json()
    assert client.post("/api/sessions/nope/messages", json={"messages": turn}).status_code == 404
