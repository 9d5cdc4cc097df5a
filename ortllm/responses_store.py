"""Stored OpenAI Responses (`/v1/responses` with `store`), in the sessions database (`sessions.db`).

A stored response keeps its request, its input items and its output items, so `previous_response_id` can
rebuild the conversation after a restart. Ownership follows ortllm.sessions: every row has an owner (an API
key's name or a JWT subject; "" when auth is off), a handle sees only its owner's rows, and a foreign id looks
exactly like one that does not exist.
"""

from __future__ import annotations

import copy
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OrtllmError, SessionStoreUnavailable

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    pk INTEGER PRIMARY KEY AUTOINCREMENT,
    owner TEXT NOT NULL DEFAULT '',
    id TEXT NOT NULL,
    model TEXT NOT NULL,
    created_at REAL NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    input_items TEXT NOT NULL,
    output_items TEXT NOT NULL,
    usage TEXT,
    previous_response_id TEXT,
    UNIQUE (owner, id)
)
"""
MAX_CHAIN = 10_000  # previous_response_id links followed at most (a guard against a cycle written by hand)


class ResponseNotFound(OrtllmError):
    """No stored response with that id for this caller."""

    status = 404
    code = "RESPONSE_NOT_FOUND"
    hint = "Only responses created with store: true (the default) by the same API key can be referenced"


@dataclass
class StoredResponse:
    """One response as stored: the response object's parts that cannot be recomputed."""

    id: str
    model: str
    created_at: float
    status: str
    request: dict[str, Any]
    input_items: list[dict[str, Any]]
    output_items: list[dict[str, Any]]
    usage: dict[str, Any] | None = None
    previous_response_id: str | None = None


class ResponseStore:
    """One owner's stored responses in the SQLite file at `path` (the SessionStore's)."""

    def __init__(self, path: Path, owner: str = "") -> None:
        self.path = path
        self.owner = owner
        with self._connect() as db:
            db.execute(SCHEMA)

    def scoped(self, owner: str) -> ResponseStore:
        """The same database, seen by `owner`."""
        view = copy.copy(self)
        view.owner = owner
        return view

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        try:
            db.execute("PRAGMA busy_timeout=30000")
            yield db
        except sqlite3.Error as exc:
            raise self._unavailable(exc) from exc
        finally:
            db.close()

    def _unavailable(self, exc: sqlite3.Error) -> SessionStoreUnavailable:
        return SessionStoreUnavailable(
            f"The sessions database {self.path} cannot store responses: {exc or type(exc).__name__}"
        )

    def save(self, response: StoredResponse) -> None:
        """Insert or replace the owner's response `response.id`."""
        row = (
            self.owner,
            response.id,
            response.model,
            response.created_at,
            response.status,
            json.dumps(response.request, ensure_ascii=False),
            json.dumps(response.input_items, ensure_ascii=False),
            json.dumps(response.output_items, ensure_ascii=False),
            None if response.usage is None else json.dumps(response.usage),
            response.previous_response_id,
        )
        with self._connect() as db:
            db.execute(
                "INSERT OR REPLACE INTO responses(owner, id, model, created_at, status, request, input_items, "
                "output_items, usage, previous_response_id) VALUES (?,?,?,?,?,?,?,?,?,?)",
                row,
            )

    def find(self, response_id: str) -> StoredResponse | None:
        with self._connect() as db:
            row = db.execute(
                "SELECT id, model, created_at, status, request, input_items, output_items, usage, "
                "previous_response_id FROM responses WHERE owner = ? AND id = ?",
                (self.owner, response_id),
            ).fetchone()
        if row is None:
            return None
        rid, model, created, status, request, inputs, outputs, usage, previous = row
        return StoredResponse(
            rid,
            model,
            created,
            status,
            json.loads(request),
            json.loads(inputs),
            json.loads(outputs),
            None if usage is None else json.loads(usage),
            previous,
        )

    def get(self, response_id: str) -> StoredResponse:
        found = self.find(response_id)
        if found is None:
            raise ResponseNotFound(f"Response with id '{response_id}' not found.", param="response_id")
        return found

    def delete(self, response_id: str) -> None:
        with self._connect() as db:
            gone = db.execute(
                "DELETE FROM responses WHERE owner = ? AND id = ?", (self.owner, response_id)
            ).rowcount
        if not gone:
            raise ResponseNotFound(f"Response with id '{response_id}' not found.", param="response_id")

    def conversation(self, response_id: str) -> list[dict[str, Any]]:
        """The items a response continues from: each earlier response's input then output, oldest first."""
        chain: list[StoredResponse] = []
        seen: set[str] = set()
        next_id: str | None = response_id
        while next_id is not None and next_id not in seen and len(chain) < MAX_CHAIN:
            seen.add(next_id)
            found = self.get(next_id) if not chain else self.find(next_id)
            if found is None:  # an earlier link was deleted: the conversation starts after it
                break
            chain.append(found)
            next_id = found.previous_response_id
        items: list[dict[str, Any]] = []
        for stored in reversed(chain):
            items += stored.input_items + stored.output_items
        return items
