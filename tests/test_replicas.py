"""Replicas sharing state: two real `ortllm serve` processes on one PostgreSQL and one Redis, behind HAProxy
with deploy/haproxy.cfg (Debian's packages, on loopback; skipped with a message where they are missing)."""

from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from ortllm.sessions import SessionStore

from .conftest import DEFAULT_MODEL as M
from .conftest import REPO, LiveServer, free_port, ortllm
from .services import Postgres, Redis, haproxy_exe

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    server = Postgres()
    yield server
    server.close()


@pytest.fixture(scope="module")
def redis() -> Iterator[Redis]:
    server = Redis()
    yield server
    server.close()


def replica(pg: Postgres, redis: Redis, *args: str) -> LiveServer:
    env = {"ORTLLM_DATABASE_URL": pg.url, "ORTLLM_RATE_LIMIT_STORAGE": redis.url}
    return LiveServer("--model", M, *args, env=env)


@pytest.fixture(scope="module")
def replicas(pulled: Path, pg: Postgres, redis: Redis) -> Iterator[list[LiveServer]]:
    pair = [replica(pg, redis), replica(pg, redis)]
    yield pair
    for live in pair:
        live.stop()


class Balancer:
    """HAProxy with the shipped configuration (deploy/haproxy.cfg) in front of replicas."""

    def __init__(self, replicas: list[LiveServer], log_path: Path) -> None:
        port = free_port()
        env = {
            **os.environ,
            "ORTLLM_LB_BIND": f"127.0.0.1:{port}",
            "ORTLLM_REPLICA_1": f"127.0.0.1:{replicas[0].port}",
            "ORTLLM_REPLICA_2": f"127.0.0.1:{replicas[1].port}",
        }
        self.log = log_path.open("w")
        config = str(REPO / "deploy" / "haproxy.cfg")
        self.proc = subprocess.Popen(
            [haproxy_exe(), "-db", "-f", config], env=env, stdout=self.log, stderr=self.log
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:  # until both replicas passed their health checks
            try:
                if all(requests.get(self.url + "/readiness", timeout=2).ok for _ in range(4)):
                    break
            except requests.RequestException:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def balancer(replicas: list[LiveServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    lb = Balancer(replicas, tmp_path_factory.mktemp("haproxy") / "log")
    yield lb.url
    lb.close()


def chat(url: str, session_id: str, question: str, **extra: object) -> requests.Response:
    body = {
        "model": M,
        "stream": False,
        "session_id": session_id,
        "options": {"max_tokens": 4, "temperature": 0},
    }
    body["messages"] = [{"role": "user", "content": question}]
    return requests.post(url + "/api/chat", json=body | extra, timeout=120)


def questions(url: str, session_id: str) -> list[str]:
    history = requests.get(f"{url}/chat/history/{session_id}", timeout=30)
    assert history.ok, history.text
    return [m["content"] for m in history.json() if m["role"] == "user"]


def test_a_chat_continued_on_the_other_replica_keeps_its_history(replicas: list[LiveServer]) -> None:
    a, b = (r.url for r in replicas)
    assert chat(a, "hop", "One?").ok
    assert chat(b, "hop", "Two?").ok  # the second replica sees the first one's turn
    assert chat(a, "hop", "Three?").ok
    for url in (a, b):
        assert questions(url, "hop") == ["One?", "Two?", "Three?"]
        history = requests.get(f"{url}/chat/history/hop", timeout=30).json()
        assert [m["role"] for m in history] == ["user", "assistant"] * 3
    listed = [
        sorted(s["id"] for s in requests.get(u + "/api/sessions", timeout=30).json()["sessions"])
        for u in (a, b)
    ]
    assert listed[0] == listed[1] and "hop" in listed[0]


def test_a_chat_through_the_balancer_stays_on_one_replica_and_is_seen_by_both(
    balancer: str, replicas: list[LiveServer]
) -> None:
    before = [chats_served(live) for live in replicas]
    for n in range(5):
        r = chat(balancer, "via-lb", f"Turn {n}?")
        assert r.ok, r.text
    assert questions(balancer, "via-lb") == [f"Turn {n}?" for n in range(5)]
    for live in replicas:
        assert questions(live.url, "via-lb") == [f"Turn {n}?" for n in range(5)]
    # affinity: one replica answered every turn (its KV cache holds the conversation), the other none
    served = sorted(chats_served(live) - n for live, n in zip(replicas, before, strict=True))
    assert served == [0, 5]


def chats_served(live: LiveServer) -> int:
    """Chat turns a replica answered, from its access log."""
    assert live.log is not None
    return Path(live.log.name).read_text().count('"POST /api/chat" 200')


def test_two_replicas_racing_on_one_session_lose_no_turn(replicas: list[LiveServer]) -> None:
    urls = [r.url for r in replicas]
    created = requests.post(urls[0] + "/api/sessions", json={"title": "race"}, timeout=30)
    assert created.status_code in (200, 201), created.text
    sid = created.json()["id"]

    def append(n: int) -> int:
        body = {"messages": [{"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"}]}
        return requests.post(f"{urls[n % 2]}/api/sessions/{sid}/messages", json=body, timeout=60).status_code

    def turn(n: int) -> int:
        return chat(urls[n % 2], sid, f"turn {n}").status_code

    with ThreadPoolExecutor(8) as pool:
        appended = list(pool.map(append, range(24)))
        answered = list(pool.map(turn, range(6)))
    assert appended == [200] * 24 and answered == [200] * 6
    history = requests.get(f"{urls[1]}/chat/history/{sid}", timeout=30).json()
    contents = [m["content"] for m in history]
    for n in range(24):  # each appended pair is whole and in order
        assert contents.index(f"a{n}") == contents.index(f"q{n}") + 1
    asked = [c for c in contents if c.startswith("turn ")]
    assert sorted(asked) == sorted(f"turn {n}" for n in range(6))
    assert len(history) == 48 + 12 and not any(m.get("unanswered") for m in history)


def test_the_rate_limit_is_one_budget_across_replicas(pulled: Path, pg: Postgres, redis: Redis) -> None:
    pair = [replica(pg, redis, "--rate-limit", "10"), replica(pg, redis, "--rate-limit", "10")]
    try:
        codes = [requests.get(pair[n % 2].url + "/v1/models", timeout=30).status_code for n in range(11)]
        assert codes == [200] * 10 + [429]
        assert requests.get(pair[0].url + "/v1/models", timeout=30).status_code == 429
        assert requests.get(pair[0].url + "/health", timeout=30).status_code == 200  # health stays open
    finally:
        for live in pair:
            live.stop()


def status_from(address: str, url: str, path: str, headers: dict[str, str] | None = None) -> int:
    """A GET's status, sent from the loopback `address` (127.0.0.2 is another client to the balancer)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30, source_address=(address, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        return conn.getresponse().status
    finally:
        conn.close()


def test_behind_the_balancer_each_client_has_its_own_budget(
    pulled: Path, pg: Postgres, redis: Redis, tmp_path: Path
) -> None:
    # trusted_proxies = 1: the client's address from HAProxy's X-Forwarded-For
    env = {
        "ORTLLM_DATABASE_URL": pg.url,
        "ORTLLM_RATE_LIMIT_STORAGE": redis.url,
        "ORTLLM_TRUSTED_PROXIES": "1",
    }
    pair = [LiveServer("--model", M, "--rate-limit", "3", env=env) for _ in range(2)]
    lb = Balancer(pair, tmp_path / "haproxy.log")
    try:
        first = [status_from("127.0.0.1", lb.url, "/v1/models") for _ in range(4)]
        assert first == [200, 200, 200, 429]
        # a forged X-Forwarded-For is not believed: HAProxy appends the real address, which is the one used
        assert status_from("127.0.0.1", lb.url, "/v1/models", {"X-Forwarded-For": "10.9.8.7"}) == 429
        assert status_from("127.0.0.2", lb.url, "/v1/models") == 200  # another client, its own budget
    finally:
        lb.close()
        for live in pair:
            live.stop()


def test_redis_away_falls_back_to_per_replica_limits(pulled: Path, pg: Postgres) -> None:
    gone = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    live = LiveServer(
        "--model",
        M,
        "--rate-limit",
        "3",
        env={"ORTLLM_DATABASE_URL": pg.url, "ORTLLM_RATE_LIMIT_STORAGE": gone},
    )
    try:
        codes = [requests.get(live.url + "/v1/models", timeout=30).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]  # counted in memory meanwhile: served, and still limited
    finally:
        live.stop()


def test_postgres_restarted_under_load(replicas: list[LiveServer], pg: Postgres) -> None:
    a, b = (r.url for r in replicas)
    assert chat(a, "outage", "Before?").ok
    pg.stop()
    try:
        for url in (a, b):
            start = time.monotonic()
            r = requests.get(url + "/api/sessions", timeout=60)
            assert r.status_code == 503 and int(r.headers["Retry-After"]) > 0, r.text
            assert "cannot be used" in r.json()["detail"] and "postgresql" in r.json()["detail"]
            assert time.monotonic() - start < 15  # answered within the connect timeout, not hung
            assert chat(url, "outage", "During?").status_code == 503
            # generation without a session needs no database; the replica stays alive and routable
            generated = requests.post(
                url + "/api/generate",
                json={"model": M, "prompt": "Hi", "stream": False, "options": {"max_tokens": 3}},
                timeout=120,
            )
            assert generated.ok, generated.text
            health = requests.get(url + "/health", timeout=30)
            assert health.status_code == 200 and health.json()["status"] == "degraded"
            assert requests.get(url + "/readiness", timeout=30).status_code == 200
    finally:
        pg.start()
    for url in (a, b):
        assert chat(url, "outage", f"After {url[-5:]}?").ok
    assert questions(b, "outage") == ["Before?", f"After {a[-5:]}?", f"After {b[-5:]}?"]
    assert requests.get(a + "/health", timeout=30).json()["status"] == "healthy"


def test_kill_9_of_one_replica_during_streams(
    pulled: Path, pg: Postgres, redis: Redis, tmp_path: Path
) -> None:
    pair = [replica(pg, redis), replica(pg, redis)]
    lb = Balancer(pair, tmp_path / "haproxy.log")
    url = lb.url
    try:
        for n in range(8):  # sessions stored before the crash, whichever replica wrote them
            assert chat(url, f"kept-{n}", f"Kept {n}?").ok
        results: dict[int, str] = {}
        first_tokens = threading.Barrier(9, timeout=120)

        def stream(n: int) -> None:
            body = {"model": M, "session_id": f"s-{n}", "options": {"max_tokens": 400}}
            body["messages"] = [{"role": "user", "content": f"Story {n}, long please."}]
            try:
                with requests.post(url + "/api/chat", json=body, stream=True, timeout=120) as r:
                    lines = r.iter_lines()
                    next(lines)
                    first_tokens.wait()
                    text = b"".join(lines)
                    results[n] = "done" if b'"done": true' in text or b'"done":true' in text else "cut"
            except (requests.RequestException, threading.BrokenBarrierError):
                results[n] = "error"

        threads = [threading.Thread(target=stream, args=(n,), daemon=True) for n in range(8)]
        for t in threads:
            t.start()
        first_tokens.wait()
        victim = pair[0]
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        killed_at = time.monotonic()
        for t in threads:
            t.join(timeout=180)
        # the killed replica's clients see their streams end without a final event; the others finish
        assert len(results) == 8 and {"cut", "error"} & set(results.values()), results
        assert "done" in results.values(), results
        # new requests reach the survivor within the health check's interval × fall (2 s × 2) and a margin
        while True:
            try:
                if chat(url, "after-crash", "Still there?").ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() - killed_at < 15, "the balancer kept sending requests to the dead replica"
            time.sleep(0.5)
        for n in range(8):
            assert questions(url, f"kept-{n}") == [f"Kept {n}?"]
            asked = questions(url, f"s-{n}")
            assert asked == [f"Story {n}, long please."]  # every stream's question is stored, answered or not
    finally:
        lb.close()
        for live in pair:
            live.stop()


def test_sessions_copy_moves_every_session_to_postgres(tmp_path: Path, pg: Postgres) -> None:
    source = SessionStore(tmp_path / "old.db")
    for owner in ("", "key:alice"):
        store = source.scoped(owner)
        store.create(session_id="c1", title="First", system_prompt="Be brief.", origin="ui")
        store.append(
            "c1", [{"role": "user", "content": f"hi {owner}"}, {"role": "assistant", "content": "hello"}]
        )
        store.create(session_id="c2")
    target = pg.createdb("copy")
    proc = ortllm("sessions", "copy", target, "--from", f"sqlite:///{tmp_path / 'old.db'}")
    assert proc.returncode == 0, proc.stderr
    assert "copied 4 sessions (4 messages) and 0 stored responses" in proc.stdout
    copied = SessionStore(url=target)
    for owner in ("", "key:alice"):
        old, new = source.scoped(owner), copied.scoped(owner)
        assert [s.as_dict() for s in new.list()] == [s.as_dict() for s in old.list()]
        assert new.history("c1") == old.history("c1")
    again = ortllm("sessions", "copy", target, "--from", f"sqlite:///{tmp_path / 'old.db'}")
    assert (
        again.returncode == 1
        and "already holds sessions" in again.stderr
        and len(again.stderr.splitlines()) == 1
    )


def test_replicas_starting_together_migrate_once(pg: Postgres) -> None:
    url = pg.createdb("together")
    code = f"from ortllm.db import Database; Database({url!r}).migrate(); print('ok')"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    store = SessionStore(url=url)
    with store.db.read() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalars().all() == ["0002"]


def test_the_store_behaves_the_same_on_postgres(pg: Postgres) -> None:
    from ortllm.errors import SessionNotFound
    from ortllm.responses_store import ResponseStore, StoredResponse

    store = SessionStore(url=pg.createdb("same"))
    alice, bob = store.scoped("key:alice"), store.scoped("key:bob")
    alice.create(session_id="s", system_prompt="Be brief.", origin="ui")
    alice.append("s", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    pending, created = alice.start_turn(
        "s", [{"role": "user", "content": "c"}], replace=False, model=M, system_prompt=None
    )
    assert not created and len(pending) == 1
    assert alice.messages("s")[-1] == {"role": "user", "content": "c", "unanswered": True}
    alice.finish_turn("s", pending, "d")
    assert [m["content"] for m in alice.history("s")] == ["Be brief.", "a", "b", "c", "d"]
    assert alice.rollback("s", 2) == 2 and alice.get("s").message_count == 2
    pending, created = bob.start_turn(
        "t", [{"role": "user", "content": "x"}], replace=False, model=M, system_prompt=None
    )
    bob.withdraw_turn("t", pending, created=created)  # a withdrawn first turn leaves no session
    assert bob.find("t") is None and bob.find("s") is None  # and alice's session is not bob's
    assert [s.id for s in alice.list()] == ["s"] and alice.get("s").origin == "ui"
    alice.delete("s")
    with pytest.raises(SessionNotFound):
        alice.get("s")
    responses = ResponseStore(store.db, "key:alice")
    stored = StoredResponse("resp_1", M, 1.0, "completed", {"input": "hi"}, [{"a": 1}], [{"b": 2}], {"t": 3})
    responses.save(stored)
    responses.save(stored)  # saved again: replaced, not duplicated
    assert responses.get("resp_1") == stored
    assert responses.scoped("key:bob").find("resp_1") is None
    responses.delete("resp_1")
    assert responses.find("resp_1") is None
