"""The OpenAI dialect's wire format (`/v1/*`)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from typing_extensions import Required, TypedDict

from ...wire import (
    ANSWERABLE,
    EmbeddingInput,
    Int,
    Integral,
    MaxTokens,
    PositiveMaxTokens,
    RepeatPenalty,
    Seed,
    StopList,
    StopString,
    Temperature,
    TopK,
    TopP,
    Wire,
)


class ContentPart(Wire):
    type: str
    text: str | None = None


class OpenAIMessage(Wire):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type in ("text", "input_text"))
        return self.content or ""


class StreamOptions(Wire):
    include_usage: bool = False


class JSONSchemaFormat(TypedDict, total=False):
    """OpenAI's `response_format.json_schema`: its `schema` constrains the output."""

    name: str
    description: str
    schema: Required[dict[str, Any]]
    strict: bool | None


class ResponseFormat(Wire):
    model_config = ConfigDict(  # `json_schema` is required with type json_schema
        json_schema_extra={
            "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
            "then": {"required": ["json_schema"], "properties": {"json_schema": {"type": "object"}}},
        }
    )

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is json_schema")
        return self


class OpenAISampling(Wire):
    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopString | StopList | None = None
    seed: Seed | None = None
    n: Int = Field(1, json_schema_extra={"minimum": 1, "maximum": 1})
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, description="accepted, not applied (see README)")
    frequency_penalty: float | None = Field(None, description="accepted, not applied (see README)")
    top_k: TopK | None = Field(None, description="extension: top-k sampling")
    repeat_penalty: RepeatPenalty | None = Field(None, description="extension: repetition penalty")
    ignore_eos: bool = Field(False, description="extension (vLLM, llama.cpp): generate exactly max_tokens")
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value


class ChatCompletionRequest(OpenAISampling):
    messages: list[OpenAIMessage] = Field(
        min_length=1,
        json_schema_extra={
            "contains": {
                "anyOf": [
                    {"properties": {"role": {"enum": ["user", "assistant"]}}},
                    {
                        "properties": {
                            "role": {"enum": ["system", "developer"]},
                            "content": {"type": "string", "minLength": 1},
                        },
                        "required": ["content"],
                    },
                ]
            }
        },
    )
    max_completion_tokens: PositiveMaxTokens | None = None  # 0 would silently fall back to max_tokens
    response_format: ResponseFormat | None = None

    @field_validator("messages")
    @classmethod
    def _answerable(cls, messages: list[OpenAIMessage]) -> list[OpenAIMessage]:
        said = (
            m.role in ("system", "developer") and isinstance(m.content, str) and m.content for m in messages
        )
        if not any(m.role in ("user", "assistant") for m in messages) and not any(said):
            raise ValueError(ANSWERABLE + " (tool messages are not read)")
        return messages


class CompletionRequest(OpenAISampling):
    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[
            list[Annotated[str, Field(min_length=1)]],
            Field(min_length=1, max_length=1, description="one prompt"),
        ]
    )
    echo: bool = False


class OpenAIEmbeddingsRequest(Wire):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1), Integral] | None = None


# ---- responses ----------------------------------------------------------------------------------


class PromptTokensDetails(Wire):
    cached_tokens: int = Field(description="prompt tokens served from the prefix cache")


class OpenAIUsage(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(Wire):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Wire):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage
    system_fingerprint: None = None


class CompletionChoice(Wire):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class Completion(Wire):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage


class EmbeddingObject(Wire):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str = Field(description="floats, or base64 of little-endian float32")


class EmbeddingUsage(Wire):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(Wire):
    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: EmbeddingUsage


class ModelCard(Wire):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelCardList(Wire):
    object: Literal["list"] = "list"
    data: list[ModelCard]
