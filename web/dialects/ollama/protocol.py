"""The Ollama dialect's request bodies (field names and types as Ollama's api/types.go has them)."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ...wire import Int, Wire

# what `keep_alive` may be: a Go duration string ("5m", "1h30m", "0") or a number of seconds
KeepAlive = str | int | float
# `format`: "json" or a JSON schema object
Format = str | dict[str, Any]
# `think`: true/false, or an effort level ("high", "medium", "low") for the models that take one
Think = bool | str


class ToolCallFunction(Wire):
    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: Int | None = None


class ToolCall(Wire):
    id: str | None = None
    function: ToolCallFunction


class Message(Wire):
    role: str
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    tool_call_id: str | None = None


class Inference(Wire):
    """The fields /api/chat and /api/generate share."""

    model: str
    stream: bool = True
    format: Format | None = None
    keep_alive: KeepAlive | None = None
    options: dict[str, Any] | None = None
    think: Think | None = None
    truncate: bool | None = None
    shift: bool | None = None
    logprobs: bool = False
    top_logprobs: Int = Field(0, ge=0, le=20)


class ChatRequest(Inference):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(Inference):
    prompt: str = ""
    suffix: str = ""
    system: str = ""
    template: str = ""
    context: list[Int] | None = None
    raw: bool = False
    images: list[str] | None = None


class ShowRequest(Wire):
    model: str | None = None
    name: str | None = None  # the older field
    verbose: bool = False


class EmbedRequest(Wire):
    model: str
    input: str | list[str]
    truncate: bool = True
    dimensions: Int | None = Field(None, ge=1)
    keep_alive: KeepAlive | None = None
    options: dict[str, Any] | None = None


class EmbeddingsRequest(Wire):
    model: str
    prompt: str
    keep_alive: KeepAlive | None = None
    options: dict[str, Any] | None = None
