"""Stored OpenAI Responses (`/v1/responses` with `store`), in the sessions database (ortllm.db).

A stored response keeps its request, its input items and its output items, so `previous_response_id` can
rebuild the conversation after a restart. Ownership follows ortllm.sessions: every row has an owner (an API
key's name or a JWT subject; "" when auth is off), a handle sees only its owner's rows, and a foreign id looks
exactly like one that does not exist.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from .db import Database, upsert
from .db import responses as R
from .errors import OrtllmError

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
    """One owner's stored responses in the sessions database (the SessionStore's `db`)."""

    def __init__(self, db: Database, owner: str = "") -> None:
        self.db = db
        self.owner = owner
        db.migrate()

    def scoped(self, owner: str) -> ResponseStore:
        """The same database, seen by `owner`."""
        view = copy.copy(self)
        view.owner = owner
        return view

    def save(self, response: StoredResponse) -> None:
        """Insert or replace the owner's response `response.id`."""
        with self.db.write() as conn:
            upsert(
                conn,
                R,
                ["owner", "id"],
                owner=self.owner,
                id=response.id,
                model=response.model,
                created_at=response.created_at,
                status=response.status,
                request=json.dumps(response.request, ensure_ascii=False),
                input_items=json.dumps(response.input_items, ensure_ascii=False),
                output_items=json.dumps(response.output_items, ensure_ascii=False),
                usage=None if response.usage is None else json.dumps(response.usage),
                previous_response_id=response.previous_response_id,
            )

    def find(self, response_id: str) -> StoredResponse | None:
        columns = [R.c.id, R.c.model, R.c.created_at, R.c.status, R.c.request, R.c.input_items]
        columns += [R.c.output_items, R.c.usage, R.c.previous_response_id]
        with self.db.read() as conn:
            row = conn.execute(
                sa.select(*columns).where(R.c.owner == self.owner, R.c.id == response_id)
            ).first()
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
        with self.db.write() as conn:
            gone = conn.execute(R.delete().where(R.c.owner == self.owner, R.c.id == response_id)).rowcount
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
