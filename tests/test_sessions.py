"""SQLite sessions: durable, concurrent-safe, history/rollback/delete, and the chat-turn rule."""

import threading

import pytest

from ortllm.conversation import commit_turn, plan_turn
from ortllm.errors import InvalidOptions, SessionNotFound
from ortllm.sessions import SessionStore


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
