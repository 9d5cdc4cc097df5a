"""Chat sessions stored durably in SQLite under `$ORTLLM_HOME/sessions.db`.

A session remembers its model, system prompt and messages; it survives restarts and crashes
(WAL journal, one short transaction per change) and is safe for concurrent writers.
"""

from __future__ import annotations

import builtins
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidOptions, SessionNotFound
from .paths import ortllm_home

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    model TEXT,
    system_prompt TEXT,
    title TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_session ON messages(session_id, id);
"""
ROLES = ("system", "user", "assistant")
MAX_ID_LENGTH = 128


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
    """CRUD over sessions and their messages. Each call opens its own short-lived connection."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or ortllm_home() / "sessions.db"
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        finally:
            db.close()

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

    @staticmethod
    def check_id(session_id: str) -> str:
        if not isinstance(session_id, str) or not session_id or len(session_id) > MAX_ID_LENGTH:
            raise InvalidOptions(f"session id must be a string of 1 to {MAX_ID_LENGTH} characters")
        return session_id

    def create(self, model: str | None = None, system_prompt: str | None = None,
               session_id: str | None = None, title: str | None = None) -> Session:  # fmt: skip
        """A new session (or the existing one when `session_id` is already taken)."""
        sid = self.check_id(session_id) if session_id else str(uuid.uuid4())
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO sessions(id, model, system_prompt, title, created, updated) VALUES (?,?,?,?,?,?)",
                (sid, model, system_prompt, title, now, now),
            )
        return self.get(sid)

    def find(self, session_id: str) -> Session | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT s.id, s.model, s.system_prompt, s.title, s.created, s.updated, "
                "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) FROM sessions s WHERE s.id = ?",
                (session_id,),
            ).fetchone()
        return Session(*row) if row else None

    def get(self, session_id: str) -> Session:
        session = self.find(session_id)
        if session is None:
            raise SessionNotFound(f"Session '{session_id}' not found")
        return session

    def list(self) -> builtins.list[Session]:
        """All sessions, most recently updated first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT s.id, s.model, s.system_prompt, s.title, s.created, s.updated, "
                "(SELECT COUNT(*) FROM messages m WHERE m.session_id = s.id) FROM sessions s ORDER BY s.updated DESC"
            ).fetchall()
        return [Session(*r) for r in rows]

    def messages(self, session_id: str) -> builtins.list[dict[str, str]]:
        """The stored conversation (user and assistant turns), oldest first."""
        self.get(session_id)
        with self._connect() as db:
            rows = db.execute(
                "SELECT role, content FROM messages WHERE session_id = ? ORDER BY id", (session_id,)
            ).fetchall()
        return [{"role": r, "content": c} for r, c in rows]

    def history(self, session_id: str) -> builtins.list[dict[str, str]]:
        """The conversation with the session's system prompt first, when it has one."""
        session = self.get(session_id)
        system = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
        return system + self.messages(session_id)

    def append(self, session_id: str, messages: builtins.list[dict[str, str]]) -> None:
        """Add messages at the end of a session, in one transaction."""
        for m in messages:
            if m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise InvalidOptions(
                    "each message needs a role (system, user or assistant) and string content"
                )
        now = time.time()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone() is None:
                raise SessionNotFound(f"Session '{session_id}' not found")
            db.executemany(
                "INSERT INTO messages(session_id, role, content, created) VALUES (?,?,?,?)",
                [(session_id, m["role"], m["content"], now) for m in messages],
            )
            db.execute("UPDATE sessions SET updated = ? WHERE id = ?", (now, session_id))

    def replace(self, session_id: str, messages: builtins.list[dict[str, str]]) -> None:
        """Make the session's stored messages exactly `messages` (a client sent its full history)."""
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE session_id = ?", (session_id,))
        self.append(session_id, messages)

    def update(self, session_id: str, *, title: str | None = None, system_prompt: str | None = None,
               model: str | None = None) -> Session:  # fmt: skip
        self.get(session_id)
        with self._transaction() as db:
            for column, value in (("title", title), ("system_prompt", system_prompt), ("model", model)):
                if value is not None:
                    db.execute(
                        f"UPDATE sessions SET {column} = ?, updated = ? WHERE id = ?",
                        (value, time.time(), session_id),
                    )
        return self.get(session_id)

    def rollback(self, session_id: str, amount: int) -> int:
        """Remove the last `amount` messages; returns how many were removed."""
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise InvalidOptions("amount must be a non-negative integer")
        self.get(session_id)
        with self._transaction() as db:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM messages WHERE session_id = ? ORDER BY id DESC LIMIT ?", (session_id, amount))]  # fmt: skip
            db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])
            db.execute("UPDATE sessions SET updated = ? WHERE id = ?", (time.time(), session_id))
        return len(ids)

    def delete(self, session_id: str) -> None:
        with self._transaction() as db:
            if db.execute("DELETE FROM sessions WHERE id = ?", (session_id,)).rowcount == 0:
                raise SessionNotFound(f"Session '{session_id}' not found")
