"""Wire formats of every dialect as pydantic models: they validate requests and generate /openapi.json."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from typing_extensions import Required, TypedDict

from ortllm.runtime.options import MAX_STOP_STRINGS
from ortllm.sessions import ID_PATTERN

Role = Literal["system", "user", "assistant"]


def _integral(value: Any) -> Any:
    """JSON Schema counts 3.0 as an integer: accept it (requests are validated strictly otherwise)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Integral = BeforeValidator(_integral)  # after the Field() in Annotated, so the bounds reach the JSON schema
Int = Annotated[int, Integral]
# The ranges of ortllm/runtime/options.py, the one options validator (its messages name the field): stated
# in /openapi.json only, so every dialect keeps one check and one message per rule.
Temperature = Annotated[
    float, Field(description="0.0 to 2.0 (0 = greedy)", json_schema_extra={"minimum": 0.0, "maximum": 2.0})
]
TopP = Annotated[float, Field(description="0.0 to 1.0", json_schema_extra={"minimum": 0.0, "maximum": 1.0})]
TopK = Annotated[int, Field(description="integer >= 0 (0 = off)", json_schema_extra={"minimum": 0}), Integral]
RepeatPenalty = Annotated[float, Field(description=">= 0.0 (1 = off)", json_schema_extra={"minimum": 0.0})]
Seed = Annotated[int, Field(json_schema_extra={"minimum": 0, "maximum": 2**63 - 1}), Integral]
StopString = Annotated[str, Field(json_schema_extra={"minLength": 1})]
StopList = Annotated[
    list[StopString], Field(description="stop sequences", json_schema_extra={"maxItems": MAX_STOP_STRINGS})
]
# bounds that are server settings: openapi_spec writes [keyword, setting] as `keyword: <the setting's value>`
LIMIT_MARK = "x-ortllm-limit"
MaxTokens = Annotated[
    int, Field(json_schema_extra={"minimum": 1, LIMIT_MARK: ["maximum", "max_tokens_limit"]}), Integral
]
PositiveMaxTokens = Annotated[
    int, Field(ge=1, json_schema_extra={LIMIT_MARK: ["maximum", "max_tokens_limit"]}), Integral
]
SESSION_ID_PATTERN = f"^{ID_PATTERN.pattern}$"
SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN)]


class Wire(BaseModel):
    """Requests ignore unknown fields (clients send extras), but types are checked strictly (no "1" for 1)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Message(Wire):
    role: Role
    content: str


class InferenceOptions(Wire):
    """The seeds' InferenceOptions; ranges are checked by ortllm's one options validator."""

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    max_tokens: MaxTokens | None = None
    stop: StopList | None = None
    repeat_penalty: RepeatPenalty | None = None
    seed: Seed | None = None


# ---- error bodies, one per dialect (web/errors.py:error_response) --------------------------------


class OpenAIErrorObject(Wire):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(Wire):
    error: OpenAIErrorObject


class SpecErrorObject(Wire):
    code: str
    message: str
    details: str


class SpecError(Wire):
    error: SpecErrorObject


class RustError(Wire):
    error: str


class DetailError(Wire):
    detail: str


# ---- native (myllm seeds) ----------------------------------------------------------------------


# the runtime needs something to answer: a user or assistant message, or a non-empty system prompt
ANSWERABLE = "messages need a user or assistant message, or a system message with content"
# a character str.isspace() is false for (the runtime strips texts): the same set in Python's and ECMA regex
NOT_ONLY_SPACE = r"[^\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
EmbeddingText = Annotated[
    str, Field(description="not empty or only whitespace", json_schema_extra={"pattern": NOT_ONLY_SPACE})
]
EmbeddingInput = (
    EmbeddingText
    | Annotated[
        list[EmbeddingText],
        Field(min_length=1, json_schema_extra={LIMIT_MARK: ["maxItems", "max_embedding_inputs"]}),
    ]
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


class Usage(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatResponse(Wire):
    message: Message
    session_id: str
    usage: Usage


class GenerateResponse(Wire):
    text: str
    usage: Usage


class EmbeddingResponse(Wire):
    embedding: list[float] | None = None
    embeddings: list[list[float]] | None = None
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
    ep: str | None = None
    ep_reason: str | None = None


class ModelList(Wire):
    models: list[ModelObject]


class StatusMessage(Wire):
    status: str
    message: str


class Health(Wire):
    status: str
    model_loaded: bool
    memory_usage: str
    active_connections: int
    uptime: float
    timestamp: str


# ---- OpenAI ------------------------------------------------------------------------------------


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


# ---- Rust service ------------------------------------------------------------------------------


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


# ---- TGI orchestrator --------------------------------------------------------------------------


class TGIModel(Wire):
    id: str
    name: str
    hf_name: str
    running: bool
    context_length: int
    quantization: str


class TGIModelList(Wire):
    models: list[TGIModel]


class TGIStarted(Wire):
    message: str
    port: int
    container_name: str


class TGIGenerateRequest(Wire):
    model_id: str
    prompt: str = Field(min_length=1)
    max_new_tokens: MaxTokens = Field(200, ge=1)
    temperature: Temperature = 0.7
    top_p: TopP = 0.95


class TGIGenerateResponse(Wire):
    generated_text: str
    model_id: str


# ---- API design spec (/api/v1) -----------------------------------------------------------------


class SpecGenerateRequest(Wire):
    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="absent or 'default': the first loaded model")
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    stop: StopList | None = None
    stream: bool = False


class SpecGenerateResponse(Wire):
    text: str
    usage: Usage
    latency: float


class SpecBatchRequest(Wire):
    requests: list[SpecGenerateRequest] = Field(min_length=1, max_length=64)


class SpecBatchResponse(Wire):
    results: list[SpecGenerateResponse]


class SpecModel(Wire):
    name: str
    format: str
    size: str
    loaded: bool
    memory_usage: str
    quantization: str


class SpecModelList(Wire):
    models: list[SpecModel]


class SpecLoadRequest(Wire):
    quantization: str | None = Field(None, description="e.g. q4_0, int4, int8, fp16, fp32")
    prefer_gpu: bool = False


# ---- sessions for the web UI (/api/sessions) ---------------------------------------------------


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
    title: str | None
    model: str | None
    system_prompt: str | None
    created: float
    updated: float
    message_count: int


class SessionList(Wire):
    sessions: list[SessionObject]
