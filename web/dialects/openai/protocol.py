"""The OpenAI dialect's wire format (`/v1/*`).

Every field of OpenAI's chat, completions and embeddings requests is declared here: honoured, accepted with
no effect on the output (identifiers, cache hints), or refused with a 400 that names it and says why. Any
other top-level field is answered as OpenAI answers it: `Unrecognized request argument supplied: NAME`.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator
from typing_extensions import Required, TypedDict

from ortllm.toolcalls import MAX_TOOLS

from ...wire import (
    ANSWERABLE,
    EmbeddingInput,
    Integral,
    LogitBias,
    MaxTokens,
    MinP,
    Penalty,
    PositiveMaxTokens,
    RefusingRequest,
    RepeatLastN,
    RepeatPenalty,
    Seed,
    StopList,
    StopString,
    Temperature,
    TopK,
    TopP,
    Wire,
    refusal,
    sent_when_set,
)


def not_supported(name: str, why: str) -> Any:
    """A field ortllm does not support: null only in /openapi.json; a value is a 400 (OpenAIRequest)."""
    return Field(None, description=f"not supported ({why}): any value but null is a 400")


class OpenAIRequest(RefusingRequest):
    """A request of the OpenAI dialect: as OpenAI does, an unknown top-level field is a 400."""


# ---- messages ------------------------------------------------------------------------------------

TEXT_PARTS = ("text", "input_text", "refusal")  # refusal: an assistant turn's own refusal, in history


class ContentPart(Wire):
    type: Literal["text", "input_text", "refusal"] = Field(
        description="text parts only: image_url, input_audio and file parts are a 400"
    )
    text: str | None = None
    refusal: str | None = None


class FunctionCall(Wire):
    name: str = Field(min_length=1)
    arguments: str = Field(description="the arguments as a JSON string")


class ToolCall(Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class OpenAIMessage(Wire):
    model_config = ConfigDict(
        json_schema_extra={  # what ChatCompletionRequest._by_role checks, stated for /openapi.json
            "allOf": [
                {
                    "if": {"properties": {"role": {"const": "tool"}}, "required": ["role"]},
                    "then": {
                        "required": ["tool_call_id"],
                        "properties": {"tool_call_id": {"type": "string", "minLength": 1}},
                    },
                },
                {
                    "if": {
                        "properties": {"tool_calls": {"type": "array", "minItems": 1}},
                        "required": ["tool_calls"],
                    },
                    "then": {"properties": {"role": {"const": "assistant"}}},
                },
            ]
        }
    )

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(None, description="the speaker's name (accepted: chat templates take no names)")
    tool_calls: list[ToolCall] | None = Field(None, description="assistant: the calls it made")
    tool_call_id: str | None = Field(None, description="tool: the id of the call this message answers")
    refusal: str | None = Field(None, description="assistant history: its refusal, read as its text")
    reasoning_content: str | None = Field(None, description="assistant history: its reasoning (accepted)")
    reasoning: str | None = Field(None, description="assistant history: the same, as newer clients name it")

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join((p.refusal if p.type == "refusal" else p.text) or "" for p in self.content)
        return self.content or self.refusal or ""


# ---- requests ------------------------------------------------------------------------------------


class StreamOptions(Wire):
    include_usage: bool = False
    include_obfuscation: bool | None = Field(
        None,
        description="accepted: chunks carry no obfuscation padding (it guards against network observers)",
    )


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


Choices = Annotated[int, Field(ge=1, le=8, description="choices to generate, 1 to 8"), Integral]
# OpenAI's tool shape as ortllm.toolcalls.parse_tools checks it (and names what is wrong with a tool)
TOOL_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["type", "function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": "^[a-zA-Z0-9_-]{1,64}$"},
                "description": {"type": ["string", "null"]},
                "parameters": {"type": ["object", "null"], "description": "a JSON Schema of the arguments"},
                "strict": {"type": ["boolean", "null"]},
            },
        },
    },
}
Tools = Annotated[
    list[dict[str, Any]], Field(json_schema_extra={"items": TOOL_SCHEMA, "maxItems": MAX_TOOLS})
]
TOOL_CHOICES = ("none", "auto", "required")


class NamedFunction(TypedDict):
    name: str


class NamedToolChoice(TypedDict):
    """`tool_choice` naming the one function to call."""

    type: Literal["function"]
    function: NamedFunction


class OpenAISampling(OpenAIRequest):
    """What the chat and completions requests share."""

    model: str
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: StopString | StopList | None = None
    seed: Seed | None = None
    n: Choices = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: LogitBias | None = None
    user: str | None = Field(None, description="an end-user identifier (accepted: it changes no output)")
    top_k: TopK | None = Field(None, description="extension: top-k sampling")
    min_p: MinP | None = Field(None, description="extension: min-p sampling")
    repeat_penalty: RepeatPenalty | None = Field(None, description="extension: repetition penalty")
    repeat_last_n: RepeatLastN | None = Field(None, description="extension: repeat_penalty's window")
    ignore_eos: bool = Field(False, description="extension (vLLM, llama.cpp): generate exactly max_tokens")

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_ids(cls, value: Any) -> Any:
        """Keys are token ids: checked here, before the route, so no other key is ever dropped unread."""
        for key in value if isinstance(value, dict) else ():
            if not (key.isascii() and key.isdigit() and len(key) <= 9):
                raise refusal("logit_bias", f"logit_bias keys must be token ids (got {key[:20]!r})")
        return value


class ChatCompletionRequest(OpenAISampling):
    model_config = ConfigDict(
        json_schema_extra={
            "allOf": [
                {  # top_logprobs needs logprobs: true
                    "if": {"properties": {"top_logprobs": {"type": "integer"}}, "required": ["top_logprobs"]},
                    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
                },
                {  # a call is required, or one named: of the tools given (the name: one of theirs)
                    "if": {
                        "properties": {"tool_choice": {"not": {"enum": ["none", "auto", None]}}},
                        "required": ["tool_choice"],
                    },
                    "then": {
                        "properties": {"tools": {"type": "array", "minItems": 1}},
                        "required": ["tools"],
                    },
                },
            ]
        }
    )
    REFUSED: ClassVar[dict[str, str]] = {
        "audio": "ortllm answers with text only",
        "prediction": "predicted outputs are not implemented",
        "web_search_options": "ortllm does not search the web",
        "moderation": "ortllm runs no moderation model",
        "functions": "deprecated by OpenAI: send `tools`",
        "function_call": "deprecated by OpenAI: send `tool_choice`",
    }
    ONLY: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "store": ((False,), "nothing is stored for OpenAI's dashboard; omit it or send false"),
        "service_tier": (("auto", "default"), "one local server has one tier"),
        "verbosity": (("medium",), "answer length follows the prompt and max_tokens"),
    }

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
    tools: Tools | None = Field(None, description="function tools (OpenAI's shape), names unique")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = Field(None, description="several calls in one answer (default true)")
    logprobs: bool | None = Field(None, description="the sampled tokens' log probabilities")
    top_logprobs: Annotated[int, Field(ge=0, le=20), Integral] | None = Field(
        None, description="0 to 20 most likely tokens per position (needs logprobs: true)"
    )
    safety_identifier: str | None = Field(None, description="an end-user identifier (accepted: no effect)")
    prompt_cache_key: str | None = Field(
        None, description="a cache hint (accepted: prefixes are reused anyway)"
    )
    prompt_cache_retention: Literal["in_memory", "24h"] | None = Field(
        None, description="a cache hint (accepted: the prefix cache is in memory)"
    )
    prompt_cache_options: dict[str, Any] | None = Field(
        None, description="cache hints (accepted: prefixes are reused automatically)"
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = Field(
        None, description="accepted: the model's own chat template decides how it reasons"
    )
    store: Literal[False] | None = Field(None, description="false only: nothing is stored for a dashboard")
    metadata: dict[str, str] | None = Field(
        None,
        description="stored with store: true only, so empty here",
        json_schema_extra={"maxProperties": 0},
    )
    service_tier: Literal["auto", "default"] | None = None
    modalities: list[Literal["text"]] | None = Field(None, description='["text"] only: no audio output')
    verbosity: Literal["medium"] | None = Field(None, description="medium only (OpenAI's default)")
    audio: None = not_supported("audio", "ortllm answers with text only")
    prediction: None = not_supported("prediction", "predicted outputs are not implemented")
    web_search_options: None = not_supported("web_search_options", "ortllm does not search the web")
    moderation: None = not_supported("moderation", "ortllm runs no moderation model")
    functions: None = not_supported("functions", "deprecated by OpenAI: send `tools`")
    function_call: None = not_supported("function_call", "deprecated by OpenAI: send `tool_choice`")

    @field_validator("messages", mode="before")
    @classmethod
    def _by_role(cls, messages: Any) -> Any:
        """Each message's fields for its role, and text parts only: a 400 naming where (as a path)."""
        for i, message in enumerate(messages if isinstance(messages, list) else []):
            if not isinstance(message, dict):
                continue
            role, call_id = message.get("role"), message.get("tool_call_id")
            if role == "tool" and not (isinstance(call_id, str) and call_id):
                where = f"messages[{i}].tool_call_id"
                raise refusal(
                    where,
                    f"messages[{i}] is a tool message without tool_call_id (the id of the call it answers)",
                )
            if message.get("tool_calls") and role != "assistant":
                where = f"messages[{i}].tool_calls"
                raise refusal(where, f"{where}: only assistant messages carry tool calls")
            parts = message.get("content")
            for j, part in enumerate(parts if isinstance(parts, list) else []):
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind not in TEXT_PARTS:
                    where = f"messages[{i}].content[{j}].type"
                    raise refusal(
                        where, f"{where}: content parts of type '{kind[:40]}' are not supported "
                        "(the models here read text: send text parts)"
                    )  # fmt: skip
        return messages

    @field_validator("messages")
    @classmethod
    def _answerable(cls, messages: list[OpenAIMessage]) -> list[OpenAIMessage]:
        said = (
            m.role in ("system", "developer") and isinstance(m.content, str) and m.content for m in messages
        )
        if not any(m.role in ("user", "assistant") for m in messages) and not any(said):
            raise ValueError(ANSWERABLE)
        return messages

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: Any) -> Any:
        named = (
            isinstance(value, dict)
            and value.get("type") == "function"
            and isinstance(value.get("function"), dict)
            and isinstance(value["function"].get("name"), str)
        )
        if value is not None and value not in TOOL_CHOICES and not named:
            raise refusal(
                "tool_choice",
                "tool_choice must be 'none', 'auto', 'required' or "
                '{"type": "function", "function": {"name": NAME}}',
            )
        return value

    @field_validator("modalities", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if isinstance(value, list) and any(m != "text" for m in value):
            raise refusal("modalities", 'Unsupported value of \'modalities\': only ["text"] is supported here '
                          "(ortllm answers with text only).")  # fmt: skip
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _no_metadata(cls, value: Any) -> Any:
        if isinstance(value, dict) and value:
            raise refusal("metadata", "Unsupported parameter: 'metadata' is stored with store: true, "
                          "which this server does not support (nothing is stored for a dashboard).")  # fmt: skip
        return value

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise refusal("top_logprobs", "top_logprobs needs logprobs: true")
        return self


class CompletionRequest(OpenAISampling):
    REFUSED: ClassVar[dict[str, str]] = {"suffix": "fill-in-the-middle is not implemented"}
    ONLY: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "best_of": ((1,), "each choice is one sample: send n for several choices")
    }

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[
            list[Annotated[str, Field(min_length=1)]],
            Field(min_length=1, max_length=1, description="one prompt"),
        ]
    )
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=5), Integral] | None = Field(
        None, description="0 to 5: the sampled tokens' log probabilities and this many most likely ones"
    )
    best_of: Annotated[Literal[1], Integral] | None = Field(
        None, description="1 only: send n for several choices"
    )
    suffix: None = not_supported("suffix", "fill-in-the-middle is not implemented")

    @field_validator("prompt", mode="before")
    @classmethod
    def _text_prompt(cls, value: Any) -> Any:
        if token_arrays(value):
            raise refusal("prompt", "prompt as token arrays is not supported: send the prompt as text")
        if isinstance(value, list) and len(value) > 1:
            raise refusal("prompt", "prompt must be one string (batches of prompts are not supported)")
        return value


def token_arrays(value: Any) -> bool:
    """Whether `value` is a token array or a list of them (OpenAI's other form of text input)."""
    ints = (isinstance(v, int) and not isinstance(v, bool) for v in value) if isinstance(value, list) else ()
    return isinstance(value, list) and bool(value) and (
        all(ints) or all(isinstance(v, list) and (not v or token_arrays(v)) for v in value)
    )  # fmt: skip


class OpenAIEmbeddingsRequest(OpenAIRequest):
    model: str
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1), Integral] | None = None
    user: str | None = Field(None, description="an end-user identifier (accepted: it changes no output)")

    @field_validator("input", mode="before")
    @classmethod
    def _text_input(cls, value: Any) -> Any:
        if token_arrays(value):
            raise refusal(
                "input", "input as token arrays is not supported; send text (with LangChain: "
                "OpenAIEmbeddings(..., check_embedding_ctx_length=False))"
            )  # fmt: skip
        return value


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
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = sent_when_set(
        "the calls the model made (with finish_reason tool_calls)"
    )
    reasoning_content: str | None = sent_when_set(
        "the model's reasoning (<think>…</think>), kept out of content"
    )
    reasoning: str | None = sent_when_set("the same reasoning, as newer clients name it")


class TopLogprob(Wire):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(Wire):
    content: list[TokenLogprob] | None
    refusal: None = None


class ChatChoice(Wire):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "tool_calls"]


class ChatCompletion(Wire):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage
    system_fingerprint: None = None


class CompletionLogprobs(Wire):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(Wire):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
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
