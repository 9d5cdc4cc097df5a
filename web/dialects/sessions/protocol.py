"""The web UI's sessions wire format (`/api/sessions`)."""

from __future__ import annotations

from pydantic import Field

from ...wire import (
    Message,
    Role,
    Wire,
    sent_when_set,
)


class SessionCreate(Wire):
    title: str | None = None
    model: str | None = None
    system_prompt: str | None = None
    messages: list[Message] = Field(
        default_factory=list, description="seed the history (branch a conversation)"
    )


class SessionPatch(Wire):
    title: str | None = None
    system_prompt: str | None = None


class SessionObject(Wire):
    id: str
    model: str | None
    system_prompt: str | None
    title: str | None
    created: float
    updated: float
    message_count: int


class SessionList(Wire):
    sessions: list[SessionObject]


class SessionMessage(Wire):
    role: Role
    content: str
    unanswered: bool | None = sent_when_set("true on a question whose answer never came")


class SessionWithMessages(SessionObject):
    messages: list[SessionMessage]
