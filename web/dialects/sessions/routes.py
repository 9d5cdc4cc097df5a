"""Chat sessions for the web UI under /api/sessions: list, create (optionally seeded with messages, which is
how a conversation is branched), read with messages, rename / change the system prompt, delete.
Errors are `{"detail": ...}`."""

from __future__ import annotations

from flask import Blueprint, Response, jsonify
from werkzeug.exceptions import MethodNotAllowed

from ...routes import api_route
from ...services import services
from . import protocol as p

bp = Blueprint("sessions_api", __name__, url_prefix="/api/sessions")
TAG = "sessions (web UI)"


@api_route(bp, "", tag=TAG, summary="All sessions, most recently updated first", response=p.SessionList)
def list_sessions() -> Response:
    sessions = p.SessionList(sessions=[p.SessionObject(**s.as_dict()) for s in services().sessions().list()])
    return jsonify(sessions.model_dump(mode="json"))


@api_route(
    bp,
    "",
    ("POST",),
    tag=TAG,
    summary="Create a session (201); `messages` seed its history",
    body=p.SessionCreate,
    response=p.SessionObject,
    optional_body=True,
)
def create_session(body: p.SessionCreate) -> tuple[Response, int]:
    store = services().sessions()
    messages = [m.model_dump() for m in body.messages]
    systems = [m["content"] for m in messages if m["role"] == "system"]
    system = body.system_prompt if body.system_prompt is not None else (systems[-1] if systems else None)
    session = store.create(model=body.model, system_prompt=system, title=body.title, origin=body.origin)
    conversation = [m for m in messages if m["role"] != "system"]
    if conversation:
        store.append(session.id, conversation)
    return jsonify(p.SessionObject(**store.get(session.id).as_dict()).model_dump(mode="json")), 201


@api_route(
    bp, "/<path:session_id>", tag=TAG, summary="A session with its messages", response=p.SessionWithMessages
)
def get_session(session_id: str) -> Response:
    _not_messages(session_id)
    store = services().sessions()
    session = p.SessionWithMessages(**store.get(session_id).as_dict(), messages=store.messages(session_id))
    return jsonify(session.model_dump(mode="json"))


@api_route(
    bp,
    "/<path:session_id>/messages",
    ("POST",),
    tag=TAG,
    summary="Add messages at the end (a stopped turn: the question and the partial answer)",
    body=p.SessionAppend,
    response=p.SessionObject,
)
def append_messages(body: p.SessionAppend, session_id: str) -> Response:
    store = services().sessions()
    store.append(session_id, [m.model_dump() for m in body.messages])
    return jsonify(p.SessionObject(**store.get(session_id).as_dict()).model_dump(mode="json"))


@api_route(
    bp,
    "/<path:session_id>",
    ("PATCH",),
    tag=TAG,
    summary="Change the title or the system prompt",
    body=p.SessionPatch,
    response=p.SessionObject,
)
def update_session(body: p.SessionPatch, session_id: str) -> Response:
    _not_messages(session_id)
    session = services().sessions().update(session_id, title=body.title, system_prompt=body.system_prompt)
    return jsonify(p.SessionObject(**session.as_dict()).model_dump(mode="json"))


@api_route(bp, "/<path:session_id>", ("DELETE",), tag=TAG, summary="Delete a session (204)")
def delete_session(session_id: str) -> Response:
    _not_messages(session_id)
    services().sessions().delete(session_id)
    return Response(status=204)


def _not_messages(session_id: str) -> None:
    """`/<id>/messages` with another method than POST: 405, not the path rule's "bad session id" 400."""
    if session_id.endswith("/messages"):
        raise MethodNotAllowed(valid_methods=["POST"])
