"""The Anthropic Messages dialect's wire format (`/v1/messages`, `/v1/messages/count_tokens`).

Every top-level field Anthropic documents is declared: honoured, accepted with no effect on the output
(`metadata`, `cache_control` hints), or refused with a 400 naming it; any other field is answered as Anthropic
answers it: `NAME: Extra inputs are not permitted`. Content blocks are text, tool_use, tool_result and (in an
assistant's history) thinking; image and document blocks are a 400 naming the block type.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ortllm.toolcalls import MAX_TOOLS

from ...wire import Integral, PositiveMaxTokens, StopList, TopK, TopP, Wire, refusal

# blocks the models here cannot read (no vision, no files) and server-side blocks ortllm never produces
UNREADABLE = ("image", "document", "search_result", "container_upload")
SERVER_BLOCKS = ("server_tool_use", "web_search_tool_result", "web_fetch_tool_result", "mcp_tool_use",
                 "mcp_tool_result", "code_execution_tool_result", "bash_code_execution_tool_result",
                 "text_editor_code_execution_tool_result")  # fmt: skip
BLOCKS = {
    "user": ("text", "tool_result"),
    "assistant": ("text", "tool_use", "thinking", "redacted_thinking"),
}


class CacheHint(Wire):
    """`cache_control` (accepted: prompt prefixes are reused automatically)."""

    type: Literal["ephemeral"] = "ephemeral"
    ttl: str | None = None


class TextBlock(Wire):
    type: Literal["text"]
    text: str
    cache_control: CacheHint | None = None
    citations: list[dict[str, Any]] | None = Field(None, description="accepted in history: no effect")


class ToolUseBlock(Wire):
    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: CacheHint | None = None


class ToolResultBlock(Wire):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: CacheHint | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(b.text for b in self.content)
        return self.content or ""


class ThinkingBlock(Wire):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class RedactedThinkingBlock(Wire):
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[
    TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock,
    Field(discriminator="type"),
]


class InputMessage(Wire):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(Wire):
    type: Literal["custom"] | None = Field(None, description="client tools only (custom)")
    name: str = Field(pattern="^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any] = Field(description="a JSON Schema of the tool's input")
    cache_control: CacheHint | None = None


class ToolChoice(Wire):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = Field(None, description="type tool: the tool to call")
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoice:
        if self.type == "tool" and not self.name:
            raise refusal("tool_choice.name", "tool_choice.name: Field required (with type tool)")
        return self


class Metadata(Wire):
    user_id: str | None = Field(None, description="an end-user identifier (accepted: no effect)")


class Thinking(Wire):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Annotated[int, Field(ge=1), Integral] | None = Field(
        None, description="accepted: max_tokens bounds the whole answer, reasoning included"
    )


class MessagesBase(Wire):
    """What a message request and a token count share; unknown top-level fields are a 400."""

    model_config = ConfigDict(
        json_schema_extra={"additionalProperties": False}
    )  # (_known_fields refuses them)

    # field -> why it is refused: any value but null is a 400 naming it
    REFUSED: ClassVar[dict[str, str]] = {
        "service_tier": "one local server has one tier",
        "container": "ortllm runs no code-execution containers",
        "mcp_servers": "ortllm connects to no MCP servers: give the tools to the client",
        "context_management": "ortllm does not edit the context: the client keeps the conversation",
    }

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = Field(None, description="enabled: the model's reasoning as thinking blocks")

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, why in cls.REFUSED.items():
            if data.get(name) is not None:
                raise refusal(name, f"{name}: not supported by this server ({why})")
        for name in data:
            if name not in cls.model_fields and name not in cls.REFUSED:
                raise refusal(str(name), f"{name}: Extra inputs are not permitted")
        return data

    @field_validator("messages", mode="before")
    @classmethod
    def _blocks(cls, messages: Any) -> Any:
        """Each block's type for its role: a 400 naming where (messages.I.content.J)."""
        for i, message in enumerate(messages if isinstance(messages, list) else []):
            if not isinstance(message, dict) or not isinstance(message.get("content"), list):
                continue
            allowed = BLOCKS.get(str(message.get("role")), ())
            for j, block in enumerate(message["content"]):
                kind = block.get("type") if isinstance(block, dict) else None
                if not isinstance(kind, str):
                    continue
                where = f"messages.{i}.content.{j}"
                if kind in UNREADABLE:
                    raise refusal(
                        where, f"{where}: {kind} blocks are not supported (the models here read text)"
                    )
                if kind in SERVER_BLOCKS:
                    raise refusal(
                        where, f"{where}: {kind} blocks are not supported (ortllm runs no server tools)"
                    )
                if kind not in allowed and allowed:
                    known = ", ".join(allowed)
                    raise refusal(where, f"{where}: a {message['role']} message cannot hold a '{kind[:40]}' "
                                  f"block (expected {known})")  # fmt: skip
                content = block.get("content")
                for k, part in enumerate(
                    content if kind == "tool_result" and isinstance(content, list) else []
                ):
                    inner = part.get("type") if isinstance(part, dict) else None
                    if isinstance(inner, str) and inner != "text":
                        spot = f"{where}.content.{k}"
                        raise refusal(spot, f"{spot}: tool results of type '{inner[:40]}' are not supported "
                                      "(send text)")  # fmt: skip
        return messages

    @field_validator("tools", mode="before")
    @classmethod
    def _client_tools(cls, tools: Any) -> Any:
        for i, tool in enumerate(tools if isinstance(tools, list) else []):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if isinstance(kind, str) and kind != "custom":
                raise refusal(f"tools.{i}.type", f"tools.{i}.type: '{kind[:60]}' tools are not supported "
                              "(server tools run at Anthropic: ortllm serves client tools only)")  # fmt: skip
        return tools


class MessagesRequest(MessagesBase):
    max_tokens: PositiveMaxTokens
    stop_sequences: StopList | None = None
    stream: bool = False
    temperature: Annotated[float, Field(ge=0.0, le=1.0, description="0.0 to 1.0 (0 = greedy)")] | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    metadata: Metadata | None = None
    cache_control: CacheHint | None = Field(None, description="accepted: prompt prefixes are reused anyway")
    service_tier: None = Field(None, description="not supported: any value but null is a 400")
    container: None = Field(None, description="not supported: any value but null is a 400")
    mcp_servers: None = Field(None, description="not supported: any value but null is a 400")
    context_management: None = Field(None, description="not supported: any value but null is a 400")

    @model_validator(mode="before")
    @classmethod
    def _max_tokens_given(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_tokens" not in data:
            raise refusal("max_tokens", "max_tokens: Field required")
        return data


class CountTokensRequest(MessagesBase):
    pass


# ---- responses ----------------------------------------------------------------------------------


class MessagesUsage(Wire):
    input_tokens: int = Field(description="prompt tokens not served from the prefix cache")
    output_tokens: int
    cache_read_input_tokens: int = Field(description="prompt tokens served from the prefix cache")
    cache_creation_input_tokens: int = 0


class MessageResponse(Wire):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[dict[str, Any]] = Field(description="text, tool_use and thinking blocks")
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]
    stop_sequence: str | None
    usage: MessagesUsage


class TokenCount(Wire):
    input_tokens: int
