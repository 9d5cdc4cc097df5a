"""The chat service dialect's wire format: kebab-case bodies of `/completions`, `/chat/*`, `WS /chat/ws`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, RootModel

from ...wire import (
    Integral,
    MaxTokens,
    RepeatPenalty,
    Role,
    SessionId,
    StopList,
    Temperature,
    TopK,
    TopP,
    Wire,
    sent_when_set,
)


class RustCompletionRequest(Wire):
    model: str
    prompt: str = Field(min_length=1)
    max_tokens: MaxTokens = Field(128, ge=1)
    temperature: Temperature = 0.7
    top_p: TopP = 0.95
    stop: StopList = Field(default_factory=list)
    stream: bool = False


class RustCompletionResponse(Wire):
    text: str
    model: str
    tokens: int


class RustChatRequest(Wire):
    """The kebab-case chat body of `/chat/completions` and `/chat/ws`."""

    model_name: str = Field(alias="model-name")
    prompt: str = Field(min_length=1)
    session_id: SessionId | None = Field(
        None, alias="session-id", description="absent: a new session (X-Session-Id)"
    )
    max_token: MaxTokens = Field(512, ge=1, alias="max-token")
    temperature: Temperature = 0.7
    top_p: TopP = Field(0.95, alias="top-p")
    top_k: TopK = Field(40, alias="top-k")
    repeat_penalty: RepeatPenalty = Field(1.1, alias="repeat-penalty")
    system_prompt: str | None = Field(None, alias="system-prompt")
    stop: StopList = Field(default_factory=list)
    device: str = Field(
        "cpu", description="cpu, cuda, dml (or directml) or webgpu; 400 when this machine or model has none"
    )
    multi_turn: bool = Field(False, alias="multi-turn", description="WebSocket only: keep the socket open")


class Rollback(Wire):
    amount: Annotated[int, Field(ge=0, le=1_000_000), Integral]


class Readiness(Wire):
    status: str
    models_available: int
    timestamp: str


class StoredMessage(Wire):
    role: Role
    content: str
    unanswered: bool | None = sent_when_set("true on a question whose answer never came")


History = RootModel[list[StoredMessage]]  # a session's messages, system prompt first
SessionIds = RootModel[list[str]]  # most recent first


class RollbackDone(Wire):
    status: Literal["ok"] = "ok"
