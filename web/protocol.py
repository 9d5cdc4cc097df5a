"""Wire formats of every dialect as pydantic models: they validate requests and generate /openapi.json."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Role = Literal["system", "user", "assistant"]


class Wire(BaseModel):
    """Requests ignore unknown fields (clients send extras), but types are checked."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Message(Wire):
    role: Role
    content: str


class InferenceOptions(Wire):
    """The seeds' InferenceOptions; ranges are checked by ortllm's one options validator."""

    temperature: float | None = Field(None, description="0.0 to 2.0 (0 = greedy)")
    top_p: float | None = Field(None, description="0.0 to 1.0")
    top_k: int | None = Field(None, description="integer >= 0 (0 = off)")
    max_tokens: int | None = Field(None, description="integer >= 1")
    stop: list[str] | None = Field(None, description="stop sequences")
    repeat_penalty: float | None = Field(None, description=">= 0.0 (1 = off)")
    seed: int | None = None


# ---- native (myllm seeds) ----------------------------------------------------------------------


class ChatRequest(Wire):
    model: str
    messages: list[Message] = Field(min_length=1)
    session_id: str | None = None
    stream: bool = True
    options: InferenceOptions | None = None


class GenerateRequest(Wire):
    model: str
    prompt: str
    stream: bool = True
    raw: bool = Field(False, description="send the prompt as is, without the chat template")
    system: str | None = None
    options: InferenceOptions | None = None


class EmbeddingsRequest(Wire):
    model: str
    input: str | list[str]


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


class ResponseFormat(Wire):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class OpenAISampling(Wire):
    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, description="accepted, not applied (see README)")
    frequency_penalty: float | None = Field(None, description="accepted, not applied (see README)")
    top_k: int | None = Field(None, description="extension: top-k sampling")
    repeat_penalty: float | None = Field(None, description="extension: repetition penalty")
    ignore_eos: bool = Field(False, description="extension (vLLM, llama.cpp): generate exactly max_tokens")
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value


class ChatCompletionRequest(OpenAISampling):
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(OpenAISampling):
    prompt: str | list[str]
    echo: bool = False


class OpenAIEmbeddingsRequest(Wire):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None


# ---- Rust service ------------------------------------------------------------------------------


class RustCompletionRequest(Wire):
    model: str
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(128, ge=1)
    temperature: float = 0.7
    top_p: float = 0.95
    stop: list[str] = Field(default_factory=list)
    stream: bool = False


class RustCompletionResponse(Wire):
    text: str
    model: str
    tokens: int


class RustChatRequest(Wire):
    """The kebab-case chat body of `/chat/completions` and `/chat/ws`."""

    model_name: str = Field(alias="model-name")
    prompt: str = Field(min_length=1)
    session_id: str | None = Field(None, alias="session-id", description="auto: a new session (X-Session-Id)")
    max_token: int = Field(512, ge=1, alias="max-token")
    temperature: float = 0.7
    top_p: float = Field(0.95, alias="top-p")
    top_k: int = Field(40, alias="top-k")
    repeat_penalty: float = Field(1.1, alias="repeat-penalty")
    system_prompt: str | None = Field(None, alias="system-prompt")
    stop: list[str] = Field(default_factory=list)
    device: str = Field("cpu", description="cpu, cuda, dml or webgpu (400 when not available here)")
    multi_turn: bool = Field(False, alias="multi-turn", description="WebSocket only: keep the socket open")


class Rollback(Wire):
    amount: int = Field(ge=0, le=1_000_000)


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
    max_new_tokens: int = Field(200, ge=1)
    temperature: float = 0.7
    top_p: float = 0.95


class TGIGenerateResponse(Wire):
    generated_text: str
    model_id: str


# ---- API design spec (/api/v1) -----------------------------------------------------------------


class SpecGenerateRequest(Wire):
    prompt: str = Field(min_length=1)
    model: str | None = Field(None, description="absent or 'default': the first loaded model")
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] | None = None
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
