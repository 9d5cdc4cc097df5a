"""Chat sessions stored durably in SQLite under `$ORTLLM_HOME/sessions.db`.

A session remembers its model, system prompt and messages; it survives restarts and crashes
(WAL journal, one short transaction per change) and is safe for concurrent writers. Every session
has an owner (an API key's name or a JWT subject, namespaced `key:NAME` / `jwt:NAME`; "" when auth is
off): a store handle sees only its owner's sessions, and the same id under two owners is two sessions,
so a foreign id looks exactly like one that does not exist.
"""

from __future__ import annotations

import builtins
import copy
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidOptions, SessionNotFound, SessionStoreUnavailable
from .paths import ortllm_home

SCHEMA_VERSION = 2
SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    pk INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL DEFAULT '',
    id TEXT NOT NULL,
    model TEXT,
    system_prompt TEXT,
    title TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    UNIQUE (owner, id)
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_pk INTEGER NOT NULL REFERENCES sessions(pk) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL,
    answered INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_pk, id);
CREATE INDEX IF NOT EXISTS sessions_by_owner ON sessions(owner, updated);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""
# version 1 (no owners, `id` the primary key) → 2: every old session is kept, owned by nobody
MIGRATE_1_TO_2 = (
    """
ALTER TABLE sessions RENAME TO sessions_v1;
ALTER TABLE messages RENAME TO messages_v1;
DROP INDEX IF EXISTS messages_by_session;
"""
    + SCHEMA
    + """
INSERT INTO sessions(owner, id, model, system_prompt, title, created, updated)
    SELECT '', id, model, system_prompt, title, created, updated FROM sessions_v1;
INSERT INTO messages(session_pk, role, content, created)
    SELECT s.pk, m.role, m.content, m.created FROM messages_v1 m JOIN sessions s ON s.owner = '' AND s.id = m.session_id
    ORDER BY m.id;
DROP TABLE messages_v1;
DROP TABLE sessions_v1;
"""
)
ROLES = ("system", "user", "assistant")
MAX_ID_LENGTH = 128
# one pattern for session ids everywhere: they travel in URLs and in the X-Session-Id header
ID_PATTERN = re.compile(rf"[A-Za-z0-9._:@~+=-]{{1,{MAX_ID_LENGTH}}}")
COLUMNS = (
    "s.id, s.model, s.system_prompt, s.title, s.created, s.updated, "
    "(SELECT COUNT(*) FROM messages m WHERE m.session_pk = s.pk)"
)


@dataclass(frozen=True)
class Session:
    id: str
    model: str | None
    system_prompt: str | None
    title: str | None
    created: float
    updated: float
    message_count: int = 0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class SessionStore:
    """CRUD over one owner's sessions and their messages. Each call opens its own short-lived connection;
    `scoped(owner)` is a handle on the same database for another owner."""

    def __init__(self, path: Path | None = None, owner: str = "") -> None:
        self.path = path or ortllm_home() / "sessions.db"
        self.owner = owner
        self._live: set[int] = set()  # pending message ids of turns still running in this process
        self._live_lock = threading.Lock()
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            self._migrate(db)

    def scoped(self, owner: str) -> SessionStore:
        """The same database, seen by `owner` (shares the running turns' bookkeeping)."""
        view = copy.copy(self)
        view.owner = owner
        return view

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version >= SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            columns = {r[1] for r in db.execute("PRAGMA table_info(sessions)")}
            for statement in _statements(MIGRATE_1_TO_2 if columns and "owner" not in columns else SCHEMA):
                db.execute(statement)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        finally:
            db.close()

    def _unavailable(self, exc: sqlite3.Error) -> SessionStoreUnavailable:
        cause = str(exc) or type(exc).__name__
        if "not a database" in cause or "malformed" in cause:
            todo = "move it aside (an empty one is created at the next start) or restore a backup"
        elif "readonly" in cause or "read-only" in cause:
            todo = "make the file and its folder writable"
        else:
            todo = "check the file, its folder and the free disk space"
        return SessionStoreUnavailable(f"The sessions database {self.path} cannot be used: {cause} — {todo}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def check(self) -> None:
        """Raise SessionStoreUnavailable unless the database can be read and written (for /health)."""
        with self._connect() as db:
            db.execute("SELECT 1 FROM sessions LIMIT 1").fetchall()
            db.execute("BEGIN IMMEDIATE")
            try:  # a write that is rolled back: a read-only or full database fails here
                db.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES ('health', ?)", (str(time.time()),)
                )
            finally:
                db.execute("ROLLBACK")

    @staticmethod
    def check_id(session_id: str) -> str:
        if not isinstance(session_id, str) or not ID_PATTERN.fullmatch(session_id):
            raise InvalidOptions(
                f"session id must be 1 to {MAX_ID_LENGTH} characters of A-Z a-z 0-9 . _ : @ ~ + = -"
            )
        return session_id

    def _pk(self, db: sqlite3.Connection, session_id: str) -> int:
        row = db.execute(
            "SELECT pk FROM sessions WHERE owner = ? AND id = ?", (self.owner, session_id)
        ).fetchone()
        if row is None:
            raise SessionNotFound(f"Session '{session_id}' not found")
        return int(row[0])

    def create(
        self,
        model: str | None = None,
        system_prompt: str | None = None,
        session_id: str | None = None,
        title: str | None = None,
    ) -> Session:
        """A new session (or the existing one when `session_id` is already taken by this owner)."""
        sid = self.check_id(session_id) if session_id else str(uuid.uuid4())
        now = time.time()
        with self._transaction() as db:
            self._insert_session(db, sid, model, system_prompt, title, now)
        return self.get(sid)

    def _insert_session(
        self,
        db: sqlite3.Connection,
        session_id: str,
        model: str | None,
        system_prompt: str | None,
        title: str | None,
        now: float,
    ) -> bool:
        """Create the owner's session `session_id` unless it exists; whether it was created."""
        return bool(
            db.execute(
                "INSERT OR IGNORE INTO sessions(owner, id, model, system_prompt, title, created, updated) "
                "VALUES (?,?,?,?,?,?,?)",
                (self.owner, session_id, model, system_prompt, title, now, now),
            ).rowcount
        )

    @staticmethod
    def _insert_messages(
        db: sqlite3.Connection, pk: int, messages: builtins.list[dict[str, str]], now: float
    ) -> None:
        db.executemany(
            "INSERT INTO messages(session_pk, role, content, created) VALUES (?,?,?,?)",
            [(pk, m["role"], m["content"], now) for m in messages],
        )

    def find(self, session_id: str) -> Session | None:
        self.check_id(session_id)
        with self._connect() as db:
            row = db.execute(
                f"SELECT {COLUMNS} FROM sessions s WHERE s.owner = ? AND s.id = ?", (self.owner, session_id)
            ).fetchone()
        return Session(*row) if row else None

    def get(self, session_id: str) -> Session:
        session = self.find(session_id)
        if session is None:
            raise SessionNotFound(f"Session '{session_id}' not found")
        return session

    def list(self) -> builtins.list[Session]:
        """The owner's sessions, most recently updated first."""
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM sessions s WHERE s.owner = ? ORDER BY s.updated DESC", (self.owner,)
            ).fetchall()
        return [Session(*r) for r in rows]

    def messages(self, session_id: str, *, answered_only: bool = False) -> builtins.list[dict[str, Any]]:
        """The stored conversation (user and assistant turns), oldest first. A question whose answer never
        came (the server stopped, the turn failed) is marked `"unanswered": true`."""
        self.check_id(session_id)
        with self._connect() as db:
            pk = self._pk(db, session_id)
            rows = db.execute(
                "SELECT role, content, answered FROM messages WHERE session_pk = ? ORDER BY id", (pk,)
            ).fetchall()
        out: builtins.list[dict[str, Any]] = []
        for role, content, answered in rows:
            if answered:
                out.append({"role": role, "content": content})
            elif not answered_only:
                out.append({"role": role, "content": content, "unanswered": True})
        return out

    def history(self, session_id: str) -> builtins.list[dict[str, Any]]:
        """The conversation with the session's system prompt first, when it has one."""
        session = self.get(session_id)
        system = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
        return system + self.messages(session_id)

    @staticmethod
    def _check_messages(messages: builtins.list[dict[str, str]]) -> None:
        for m in messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidOptions(
                    "each message needs a role (system, user or assistant) and string content"
                )

    def append(self, session_id: str, messages: builtins.list[dict[str, str]]) -> None:
        """Add messages at the end of a session, in one transaction."""
        self._write(session_id, messages, clear=False)

    def replace(self, session_id: str, messages: builtins.list[dict[str, str]]) -> None:
        """Make the session's stored messages exactly `messages` (a client sent its full history)."""
        self._write(session_id, messages, clear=True)

    def _write(self, session_id: str, messages: builtins.list[dict[str, str]], *, clear: bool) -> None:
        self._check_messages(messages)
        now = time.time()
        with self._transaction() as db:
            pk = self._pk(db, session_id)
            if clear:
                db.execute("DELETE FROM messages WHERE session_pk = ?", (pk,))
            self._insert_messages(db, pk, messages, now)
            db.execute("UPDATE sessions SET updated = ? WHERE pk = ?", (now, pk))

    def start_turn(
        self,
        session_id: str,
        messages: builtins.list[dict[str, str]],
        *,
        replace: bool,
        model: str | None,
        system_prompt: str | None,
    ) -> tuple[builtins.list[int], bool]:
        """Store a turn's new messages before it is answered, in one transaction (the session is created
        when new): the user's question survives a crash. Messages up to the last assistant message count
        as answered; the rest are pending until `finish_turn`. Pending messages of turns that are no
        longer running (a crash, a cancelled or failed turn) are superseded by this turn and removed.
        Returns the ids of the pending messages and whether the session was created."""
        self.check_id(session_id)
        self._check_messages(messages)
        last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        now = time.time()
        with self._transaction() as db:
            created = self._insert_session(db, session_id, model, system_prompt, None, now)
            pk = self._pk(db, session_id)
            if system_prompt is not None:
                db.execute("UPDATE sessions SET system_prompt = ? WHERE pk = ?", (system_prompt, pk))
            with self._live_lock:
                live = set(self._live)
            if replace:
                stale = [r[0] for r in db.execute("SELECT id FROM messages WHERE session_pk = ?", (pk,))]
            else:
                stale = [
                    r[0]
                    for r in db.execute(
                        "SELECT id FROM messages WHERE session_pk = ? AND answered = 0", (pk,)
                    )
                ]
            db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in stale if i not in live])
            pending: builtins.list[int] = []
            for i, m in enumerate(messages):
                cursor = db.execute(
                    "INSERT INTO messages(session_pk, role, content, created, answered) VALUES (?,?,?,?,?)",
                    (pk, m["role"], m["content"], now, int(i <= last_answer)),
                )
                if i > last_answer:
                    pending.append(int(cursor.lastrowid or 0))
            db.execute("UPDATE sessions SET updated = ? WHERE pk = ?", (now, pk))
        with self._live_lock:
            self._live.update(pending)
        return pending, created

    def finish_turn(self, session_id: str, pending: builtins.list[int], reply: str | None) -> None:
        """End a turn started with `start_turn`: with a reply, its questions are answered and the reply
        stored; without one (failed or cancelled), they stay marked unanswered."""
        try:
            if reply is None:
                return
            now = time.time()
            with self._transaction() as db:
                pk = self._pk(db, session_id)
                db.executemany(
                    "UPDATE messages SET answered = 1 WHERE id = ? AND session_pk = ?",
                    [(i, pk) for i in pending],
                )
                self._insert_messages(db, pk, [{"role": "assistant", "content": reply}], now)
                db.execute("UPDATE sessions SET updated = ? WHERE pk = ?", (now, pk))
        finally:
            with self._live_lock:
                self._live.difference_update(pending)

    def withdraw_turn(self, session_id: str, pending: builtins.list[int], *, created: bool) -> None:
        """Undo a turn the client withdrew (cancelled): its pending messages go, and so does the session when
        the turn created it and nothing else was stored in it meanwhile."""
        try:
            with self._transaction() as db:
                pk = self._pk(db, session_id)
                db.executemany(
                    "DELETE FROM messages WHERE id = ? AND session_pk = ? AND answered = 0",
                    [(i, pk) for i in pending],
                )
                empty = (
                    db.execute("SELECT 1 FROM messages WHERE session_pk = ? LIMIT 1", (pk,)).fetchone()
                    is None
                )
                if created and empty:
                    db.execute("DELETE FROM sessions WHERE pk = ?", (pk,))
        except SessionNotFound:
            pass  # deleted meanwhile: nothing to undo
        finally:
            with self._live_lock:
                self._live.difference_update(pending)

    def update(
        self,
        session_id: str,
        *,
        title: str | None = None,
        system_prompt: str | None = None,
        model: str | None = None,
    ) -> Session:
        self.check_id(session_id)
        with self._transaction() as db:
            pk = self._pk(db, session_id)
            for column, value in (("title", title), ("system_prompt", system_prompt), ("model", model)):
                if value is not None:
                    db.execute(
                        f"UPDATE sessions SET {column} = ?, updated = ? WHERE pk = ?",
                        (value, time.time(), pk),
                    )
        return self.get(session_id)

    def rollback(self, session_id: str, amount: int) -> int:
        """Remove the last `amount` messages; returns how many were removed."""
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise InvalidOptions("amount must be a non-negative integer")
        self.check_id(session_id)
        with self._transaction() as db:
            pk = self._pk(db, session_id)
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM messages WHERE session_pk = ? ORDER BY id DESC LIMIT ?", (pk, amount)
                )
            ]
            db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])
            db.execute("UPDATE sessions SET updated = ? WHERE pk = ?", (time.time(), pk))
        return len(ids)

    def delete(self, session_id: str) -> None:
        self.check_id(session_id)
        with self._transaction() as db:
            db.execute("DELETE FROM sessions WHERE pk = ?", (self._pk(db, session_id),))


def _statements(script: str) -> builtins.list[str]:
    """A schema script as single statements (executescript would commit the migration's transaction)."""
    return [s.strip() for s in script.split(";") if s.strip()]
