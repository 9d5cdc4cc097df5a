"""The web UI's sessions wire format (`/api/sessions`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...wire import (
    Message,
    Role,
    Wire,
    sent_when_set,
)


class StoredMessage(Message):
    stopped: bool = Field(False, description="an answer the user stopped part way (shown marked so)")


class SessionCreate(Wire):
    title: str | None = None
    model: str | None = None
    system_prompt: str | None = None
    origin: Literal["ui", "api"] = Field(
        "api", description="`ui`: made in the browser chat (listed in its sidebar); `api`: any other client"
    )
    messages: list[StoredMessage] = Field(
        default_factory=list, description="seed the history (branch a conversation)"
    )


class AppendedMessage(Wire):
    role: Literal["user", "assistant"] = Field(description="the system prompt is set with PATCH")
    content: str
    stopped: bool = Field(False, description="an answer the user stopped part way (shown marked so)")


class SessionAppend(Wire):
    messages: list[AppendedMessage] = Field(
        min_length=1, description="added at the end, e.g. a stopped turn: the question and the partial answer"
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
    origin: Literal["ui", "api"]


class SessionList(Wire):
    sessions: list[SessionObject]


class SessionMessage(Wire):
    role: Role
    content: str
    unanswered: bool | None = sent_when_set("true on a question whose answer never came")
    stopped: bool | None = sent_when_set("true on an answer the user stopped part way")


class SessionWithMessages(SessionObject):
    messages: list[SessionMessage]
