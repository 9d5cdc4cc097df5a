"""Chat turns over stored sessions: what to send the model and what to store afterwards.

Clients differ: some send their whole history every turn (OpenAI style), some send only the
new message plus a session id (the myllm seed's tip, the Rust seed's `prompt`). One rule serves
both: the stored conversation is prepended unless the client's messages already start with it,
or carry assistant turns of their own (then the client's list is the truth and replaces it).
The system prompt is kept on the session, not among the messages.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .sessions import SessionStore


@dataclass
class ChatTurn:
    session_id: str
    messages: list[dict[str, str]]  # what the model sees
    to_store: list[dict[str, str]] = field(default_factory=list)  # appended before the reply
    replace: bool = False  # the client's conversation replaces the stored one


def plan_turn(sessions: SessionStore, *, model: str, messages: list[dict[str, str]], session_id: str | None = None,
              system_prompt: str | None = None) -> ChatTurn:  # fmt: skip
    """Resolve history for a new turn; creates the session when the id is new or absent."""
    systems = [m["content"] for m in messages if m["role"] == "system"]
    system = system_prompt if system_prompt is not None else (systems[-1] if systems else None)
    session = sessions.find(session_id) if session_id else None
    if session is None:
        session = sessions.create(model=model, system_prompt=system, session_id=session_id)
    elif system is not None and system != session.system_prompt:
        session = sessions.update(session.id, system_prompt=system)
    convo = [m for m in messages if m["role"] != "system"]
    stored = sessions.messages(session.id)
    if stored and convo[: len(stored)] == stored:
        full, new, replace = convo, convo[len(stored) :], False
    elif any(m["role"] == "assistant" for m in convo):
        full, new, replace = convo, convo, True
    else:
        full, new, replace = stored + convo, convo, False
    prefix = [{"role": "system", "content": session.system_prompt}] if session.system_prompt else []
    return ChatTurn(session.id, prefix + full, new, replace)


def commit_turn(sessions: SessionStore, turn: ChatTurn, reply: str) -> None:
    """Store the turn's new messages and the assistant's reply."""
    new = turn.to_store + [{"role": "assistant", "content": reply}]
    if turn.replace:
        sessions.replace(turn.session_id, new)
    else:
        sessions.append(turn.session_id, new)
