"""The native dialect's wire format (`/api/*`, `/health`)."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import ConfigDict, Field, field_validator, model_validator

from ...wire import (
    ANSWERABLE,
    EmbeddingInput,
    Integral,
    MaxTokens,
    Message,
    MinP,
    Penalty,
    RepeatLastN,
    RepeatPenalty,
    Seed,
    SessionId,
    StopList,
    Temperature,
    TopK,
    TopP,
    Usage,
    Wire,
    sent_when_set,
)


class InferenceOptions(Wire):
    """Sampling options; ranges are checked by ortllm's one options validator. An option this dialect does not
    know is a 400 (it would otherwise be dropped unseen)."""

    model_config = ConfigDict(extra="forbid")

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: MinP | None = None
    max_tokens: MaxTokens | None = None
    min_tokens: Annotated[int, Field(ge=0), Integral] | None = Field(
        None, description="end-of-sequence is held back until this many tokens (benchmarks)"
    )
    stop: StopList | None = None
    repeat_penalty: RepeatPenalty | None = None
    repeat_last_n: RepeatLastN | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Seed | None = None
    num_ctx: Annotated[int, Field(ge=1), Integral] | None = Field(
        None,
        description="this request's context window (prompt + answer), at most the model's; a longer prompt is a "
        "400, never truncated",
    )


class ChatRequest(Wire):
    model: str
    messages: list[Message] = Field(
        min_length=1,
        json_schema_extra={
            "contains": {
                "anyOf": [
                    {"properties": {"role": {"enum": ["user", "assistant"]}}},
                    {"properties": {"content": {"minLength": 1}}},
                ]
            }
        },
    )
    session_id: SessionId | None = None
    stream: bool = True
    options: InferenceOptions | None = None

    @field_validator("messages")
    @classmethod
    def _answerable(cls, messages: list[Message]) -> list[Message]:
        if not any(m.role != "system" or m.content for m in messages):
            raise ValueError(ANSWERABLE)
        return messages


class GenerateRequest(Wire):
    model_config = ConfigDict(  # a raw prompt is the model's whole input: it cannot be empty
        json_schema_extra={
            "if": {"properties": {"raw": {"const": True}}, "required": ["raw"]},
            "then": {"properties": {"prompt": {"minLength": 1}}},
        }
    )

    model: str
    prompt: str
    stream: bool = True
    raw: bool = Field(False, description="send the prompt as is, without the chat template")
    system: str | None = None
    options: InferenceOptions | None = None

    @model_validator(mode="after")
    def _raw_not_empty(self) -> GenerateRequest:
        if self.raw and not self.prompt:
            raise ValueError("prompt must not be empty when raw is true")
        return self


class EmbeddingsRequest(Wire):
    model: str
    input: EmbeddingInput


class ChatResponse(Wire):
    message: Message
    session_id: str
    usage: Usage
    finish_reason: str


class GenerateResponse(Wire):
    text: str
    usage: Usage
    finish_reason: str


class EmbeddingResponse(Wire):
    embedding: list[float] | None = sent_when_set("the vector of a single `input` string")
    embeddings: list[list[float]] | None = sent_when_set("the vectors of an `input` list, in order")
    model: str


class ModelObject(Wire):
    name: str
    family: str
    size_mb: float
    quantization: str
    context_size: int
    template: str
    parameters: dict[str, Any]
    loaded: bool
    kind: str = "chat"
    variant: str | None = None
    variants: list[str] = Field(default_factory=list)
    ep: str | None = None
    ep_reason: str | None = None
    hf_name: str = ""


class ModelList(Wire):
    models: list[ModelObject]


class StatusMessage(Wire):
    status: str
    message: str


class Health(Wire):
    status: str
    detail: str | None = sent_when_set("why the server is unhealthy or degraded (only then)")
    model_loaded: bool
    models_loaded: list[str]
    memory_usage: str
    active_connections: int
    uptime: float
    timestamp: str
