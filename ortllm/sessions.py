"""Chat sessions stored durably: in SQLite under `$ORTLLM_HOME/sessions.db`, or in PostgreSQL shared by
replicas (`database.url`, see ortllm.db).

A session remembers its model, system prompt and messages; it survives restarts and crashes
(one short transaction per change) and is safe for concurrent writers, in one process or several. Every session
has an owner (an API key's name or a JWT subject, namespaced `key:NAME` / `jwt:NAME`; "" when auth is
off): a store handle sees only its owner's sessions, and the same id under two owners is two sessions,
so a foreign id looks exactly like one that does not exist.
"""

from __future__ import annotations

import builtins
import copy
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .db import Database, default_url, insert_ignore, upsert
from .db import messages as M
from .db import meta as META
from .db import sessions as S
from .errors import InvalidOptions, SessionNotFound

ROLES = ("system", "user", "assistant")
ORIGINS = ("ui", "api")  # the browser chat's sessions, and everything else's
TITLE_LENGTH = 48  # an API session's title: the first line of its first question, cut to this
MAX_ID_LENGTH = 128
# one pattern for session ids everywhere: they travel in URLs and in the X-Session-Id header
ID_PATTERN = re.compile(rf"[A-Za-z0-9._:@~+=-]{{1,{MAX_ID_LENGTH}}}")
_COUNT = sa.select(sa.func.count()).where(M.c.session_pk == S.c.pk).scalar_subquery()
COLUMNS = (S.c.id, S.c.model, S.c.system_prompt, S.c.title, S.c.created, S.c.updated, _COUNT, S.c.origin)
# who runs a turn, on its pending messages (replicas share the database): a server is its host and port, so
# a restarted server clears what its crashed predecessor left pending (configure_instance), else this process
INSTANCE = f"{socket.gethostname()}:pid{os.getpid()}"
# another process's pending question older than this belongs to a turn that is over (crashed or lost)
FOREIGN_PENDING_S = 3600.0


@dataclass(frozen=True)
class Session:
    id: str
    model: str | None
    system_prompt: str | None
    title: str | None
    created: float
    updated: float
    message_count: int = 0
    origin: str = "api"

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


class SessionStore:
    """CRUD over one owner's sessions and their messages. Each call opens its own short-lived connection;
    `scoped(owner)` is a handle on the same database for another owner."""

    def __init__(self, path: Path | None = None, owner: str = "", *, url: str | None = None) -> None:
        self.db = Database.open(url or (f"sqlite:///{path}" if path else default_url()))
        self.path = self.db.path  # the SQLite file; None for a database server
        self.owner = owner
        self._live: set[int] = set()  # pending message ids of turns still running in this process
        self._live_lock = threading.Lock()
        self.db.migrate()

    def scoped(self, owner: str) -> SessionStore:
        """The same database, seen by `owner` (shares the running turns' bookkeeping)."""
        view = copy.copy(self)
        view.owner = owner
        return view

    def check(self) -> None:
        """Raise SessionStoreUnavailable unless the database can be read and written (for /health)."""
        with self.db.read() as conn:
            conn.execute(sa.select(S.c.pk).limit(1)).all()
        with self.db.rolled_back() as conn:  # a read-only or full database fails this write
            upsert(conn, META, ["key"], key="health", value=str(time.time()))

    @staticmethod
    def check_id(session_id: str) -> str:
        if not isinstance(session_id, str) or not ID_PATTERN.fullmatch(session_id):
            raise InvalidOptions(
                f"session id must be 1 to {MAX_ID_LENGTH} characters of A-Z a-z 0-9 . _ : @ ~ + = -"
            )
        return session_id

    def _pk(self, conn: Connection, session_id: str, *, lock: bool = False) -> int:
        """The owner's session's row key; `lock`: hold its row until the transaction ends (PostgreSQL)."""
        query = sa.select(S.c.pk).where(S.c.owner == self.owner, S.c.id == session_id)
        pk = conn.execute(query.with_for_update() if lock else query).scalar()
        if pk is None:
            raise SessionNotFound(f"Session '{session_id}' not found")
        return int(pk)

    def create(
        self,
        model: str | None = None,
        system_prompt: str | None = None,
        session_id: str | None = None,
        title: str | None = None,
        origin: str = "api",
    ) -> Session:
        """A new session (or the existing one when `session_id` is already taken by this owner)."""
        sid = self.check_id(session_id) if session_id else str(uuid.uuid4())
        if origin not in ORIGINS:
            raise InvalidOptions(f"origin must be one of {', '.join(ORIGINS)}")
        now = time.time()
        with self.db.write() as conn:
            self._insert_session(conn, sid, model, system_prompt, title, now, origin)
        return self.get(sid)

    def _insert_session(
        self,
        conn: Connection,
        session_id: str,
        model: str | None,
        system_prompt: str | None,
        title: str | None,
        now: float,
        origin: str = "api",
    ) -> bool:
        """Create the owner's session `session_id` unless it exists; whether it was created."""
        return insert_ignore(
            conn,
            S,
            ["owner", "id"],
            owner=self.owner,
            id=session_id,
            model=model,
            system_prompt=system_prompt,
            title=title,
            created=now,
            updated=now,
            origin=origin,
        )

    @staticmethod
    def _insert_messages(
        conn: Connection, pk: int, messages: builtins.list[dict[str, str]], now: float
    ) -> None:
        rows = [
            {"session_pk": pk, "role": m["role"], "content": m["content"], "created": now}
            | {"stopped": int(bool(m.get("stopped")))}
            for m in messages
        ]
        if rows:
            conn.execute(M.insert(), rows)

    @staticmethod
    def _touch(conn: Connection, pk: int, now: float | None = None) -> None:
        conn.execute(S.update().where(S.c.pk == pk).values(updated=now or time.time()))

    def find(self, session_id: str) -> Session | None:
        self.check_id(session_id)
        with self.db.read() as conn:
            row = conn.execute(
                sa.select(*COLUMNS).where(S.c.owner == self.owner, S.c.id == session_id)
            ).first()
        return Session(*row) if row else None

    def get(self, session_id: str) -> Session:
        session = self.find(session_id)
        if session is None:
            raise SessionNotFound(f"Session '{session_id}' not found")
        return session

    def list(self) -> builtins.list[Session]:
        """The owner's sessions, most recently updated first."""
        with self.db.read() as conn:
            rows = conn.execute(
                sa.select(*COLUMNS).where(S.c.owner == self.owner).order_by(S.c.updated.desc(), S.c.pk.desc())
            ).all()
        return [Session(*r) for r in rows]

    def messages(self, session_id: str, *, answered_only: bool = False) -> builtins.list[dict[str, Any]]:
        """The stored conversation (user and assistant turns), oldest first. A question whose answer never
        came (the server stopped, the turn failed) is marked `"unanswered": true`, an answer the user
        stopped `"stopped": true`; `answered_only` (the model's history): answered turns, no marks."""
        self.check_id(session_id)
        with self.db.read() as conn:
            pk = self._pk(conn, session_id)
            rows = conn.execute(
                sa.select(M.c.role, M.c.content, M.c.answered, M.c.stopped)
                .where(M.c.session_pk == pk)
                .order_by(M.c.id)
            ).all()
        out: builtins.list[dict[str, Any]] = []
        for role, content, answered, stopped in rows:
            if answered:
                out.append(
                    {
                        "role": role,
                        "content": content,
                        **({"stopped": True} if stopped and not answered_only else {}),
                    }
                )
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
        with self.db.write() as conn:
            pk = self._pk(conn, session_id, lock=True)
            if clear:
                conn.execute(M.delete().where(M.c.session_pk == pk))
            self._insert_messages(conn, pk, messages, now)
            self._touch(conn, pk, now)

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
        with self.db.write() as conn:
            created = self._insert_session(conn, session_id, model, system_prompt, _title_of(messages), now)
            pk = self._pk(conn, session_id, lock=True)
            if system_prompt is not None:
                conn.execute(S.update().where(S.c.pk == pk).values(system_prompt=system_prompt))
            with self._live_lock:
                live = set(self._live)
            query = sa.select(M.c.id, M.c.instance, M.c.created).where(M.c.session_pk == pk)
            if not replace:
                query = query.where(M.c.answered == 0)
            stale = [
                i
                for i, instance, created_at in conn.execute(query)
                # this process knows its running turns; on a shared database another replica's pending
                # question waits until it is old (an SQLite file has one server: the rest is a crash's)
                if (
                    i not in live
                    if instance == INSTANCE or self.db.sqlite
                    else replace or created_at < now - FOREIGN_PENDING_S
                )
            ]
            if stale:
                conn.execute(M.delete().where(M.c.id.in_(stale)))
            pending: builtins.list[int] = []
            for i, m in enumerate(messages):
                answered = i <= last_answer
                row = {"session_pk": pk, "role": m["role"], "content": m["content"], "created": now}
                inserted = conn.execute(
                    M.insert()
                    .values(**row, answered=int(answered), instance=None if answered else INSTANCE)
                    .returning(M.c.id)
                ).scalar_one()
                if not answered:
                    pending.append(int(inserted))
            self._touch(conn, pk, now)
            # live before the commit: a turn that takes the session's lock next must not clear these
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
            with self.db.write() as conn:
                pk = self._pk(conn, session_id, lock=True)
                if pending:
                    conn.execute(
                        M.update()
                        .where(M.c.id.in_(pending), M.c.session_pk == pk)
                        .values(answered=1, instance=None)
                    )
                self._insert_messages(conn, pk, [{"role": "assistant", "content": reply}], now)
                self._touch(conn, pk, now)
        finally:
            with self._live_lock:
                self._live.difference_update(pending)

    def withdraw_turn(self, session_id: str, pending: builtins.list[int], *, created: bool) -> None:
        """Undo a turn the client withdrew (cancelled): its pending messages go, and so does the session when
        the turn created it and nothing else was stored in it meanwhile."""
        try:
            with self.db.write() as conn:
                pk = self._pk(conn, session_id, lock=True)
                if pending:
                    conn.execute(
                        M.delete().where(M.c.id.in_(pending), M.c.session_pk == pk, M.c.answered == 0)
                    )
                empty = conn.execute(sa.select(M.c.id).where(M.c.session_pk == pk).limit(1)).first() is None
                if created and empty:
                    conn.execute(S.delete().where(S.c.pk == pk))
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
        changes = {k: v for k, v in (("title", title), ("system_prompt", system_prompt), ("model", model))}
        changes = {k: v for k, v in changes.items() if v is not None}
        with self.db.write() as conn:
            pk = self._pk(conn, session_id, lock=True)
            if changes:
                conn.execute(S.update().where(S.c.pk == pk).values(**changes, updated=time.time()))
        return self.get(session_id)

    def rollback(self, session_id: str, amount: int) -> int:
        """Remove the last `amount` messages; returns how many were removed."""
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise InvalidOptions("amount must be a non-negative integer")
        self.check_id(session_id)
        with self.db.write() as conn:
            pk = self._pk(conn, session_id, lock=True)
            query = sa.select(M.c.id).where(M.c.session_pk == pk).order_by(M.c.id.desc()).limit(amount)
            ids = list(conn.execute(query).scalars())
            if ids:
                conn.execute(M.delete().where(M.c.id.in_(ids)))
            self._touch(conn, pk)
        return len(ids)

    def delete(self, session_id: str) -> None:
        self.check_id(session_id)
        with self.db.write() as conn:
            conn.execute(S.delete().where(S.c.pk == self._pk(conn, session_id, lock=True)))


def _title_of(messages: builtins.list[dict[str, str]]) -> str | None:
    """A title for a session an API client's turn creates: the first line of its first question."""
    first = next((m["content"] for m in messages if m["role"] == "user" and m["content"].strip()), "")
    line = first.strip().split("\n")[0].strip()
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1] + "…"


def configure_instance(name: str) -> None:
    """Name this process's turns (`HOST:PORT` for a server), so its successor recognises them after a crash."""
    global INSTANCE
    INSTANCE = name
