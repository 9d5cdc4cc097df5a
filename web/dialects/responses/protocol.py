"""The OpenAI Responses API's wire format (`/v1/responses`).

Every request field is honoured, accepted with no effect on the output (identifiers, cache hints), or refused
with a 400 naming it; any other top-level field is a 400 as OpenAI answers it (`Unrecognized request argument
supplied: NAME`). Input items are checked in routes.py, which names the item at fault.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import ConfigDict, Field, model_validator

from ...wire import MaxTokens, RefusingRequest, Seed, Temperature, TopK, TopP, Wire, refusal


class TextFormat(Wire):
    """`text.format`: plain text, any JSON object, or JSON that a schema constrains (llguidance)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={  # `schema` is required with type json_schema
            "if": {"properties": {"type": {"const": "json_schema"}}, "required": ["type"]},
            "then": {"required": ["schema"], "properties": {"schema": {"type": "object"}}},
        },
    )
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise refusal("text.format.schema", "text.format.schema is required when type is json_schema")
        return self


class TextConfig(Wire):
    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = Field(None, description="medium only (OpenAI's default)")


class ReasoningConfig(Wire):
    """Accepted: the model's own chat template decides whether and how it reasons."""

    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponseRequest(RefusingRequest):
    """`POST /v1/responses`."""

    # field -> why it is refused: any value but null is a 400 naming the field
    REFUSED: ClassVar[dict[str, str]] = {
        "conversation": "conversations are not implemented: continue with previous_response_id",
        "prompt": "stored prompt templates are not implemented",
        "top_logprobs": "log probabilities are served by /v1/chat/completions",
        "max_tool_calls": "calls are limited by tool_choice and parallel_tool_calls",
        "context_management": "compaction is not implemented",
    }
    # field -> (the supported values, why the others are refused)
    ONLY: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {
        "background": ((False,), "background responses are not implemented: use stream: true"),
        "truncation": (("disabled",), "a conversation longer than the context is a 400, never cut"),
        "service_tier": (("auto", "default"), "one local server has one tier"),
    }

    model: str
    input: Annotated[str, Field(min_length=1)] | Annotated[list[Any], Field(min_length=1)] = Field(
        description="a string (one user message) or a list of input items"
    )
    instructions: str | None = Field(None, description="a system message before the input (not carried on)")
    tools: list[dict[str, Any]] | None = Field(None, description="function tools (flat Responses shape)")
    tool_choice: Any = Field(None, description='"none", "auto", "required" or {"type": "function", "name"}')
    parallel_tool_calls: bool | None = Field(None, description="several calls in one answer (default true)")
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = Field(None, description="extension: top-k sampling")
    seed: Seed | None = Field(None, description="extension: the sampler's seed")
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = Field(None, description="accepted: reasoning follows the template")
    store: bool = Field(True, description="keep the response for previous_response_id and GET (default true)")
    previous_response_id: str | None = Field(None, description="continue from this stored response")
    metadata: dict[str, str] | None = Field(None, description="up to 16 pairs, returned with the response")
    stream: bool = False
    stream_options: dict[str, Any] | None = Field(None, description="accepted (no obfuscation padding)")
    include: Annotated[list[str], Field(max_length=0)] | None = Field(
        None, description="empty only: nothing extra can be included"
    )
    user: str | None = Field(None, description="an end-user identifier (accepted: no effect)")
    safety_identifier: str | None = Field(None, description="an end-user identifier (accepted: no effect)")
    prompt_cache_key: str | None = Field(None, description="a cache hint (accepted: prefixes are reused)")
    prompt_cache_retention: str | None = Field(None, description="a cache hint (accepted: in memory)")
    prompt_cache_options: dict[str, Any] | None = Field(None, description="cache hints (accepted)")
    background: Literal[False] | None = Field(None, description="false only")
    truncation: Literal["disabled"] | None = Field(None, description="disabled only")
    service_tier: Literal["auto", "default"] | None = None
    conversation: None = Field(None, description="not supported: use previous_response_id")
    prompt: None = Field(None, description="not supported")
    top_logprobs: None = Field(None, description="not supported")
    max_tool_calls: None = Field(None, description="not supported")
    context_management: None = Field(None, description="not supported")

    @model_validator(mode="before")
    @classmethod
    def _include_and_metadata(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        include = data.get("include")
        if isinstance(include, list) and include:
            raise refusal(
                "include",
                f"Unsupported value of 'include': {str(include[0])[:60]!r} cannot be included by this server "
                "(send an empty list or omit it).",
            )
        metadata = data.get("metadata")
        if isinstance(metadata, dict) and len(metadata) > 16:
            raise refusal("metadata", "metadata holds at most 16 key-value pairs")
        return data


class DeletedResponse(Wire):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool = True


class InputItemsQuery(Wire):
    """`GET /v1/responses/{id}/input_items`'s query: a page of the items, as the openai SDK asks for it."""

    limit: int = Field(20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"
    after: str | None = None
    include: list[str] | None = None


class ResponseObject(Wire):
    """The response object (documented loosely: its items follow OpenAI's shapes)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "failed", "cancelled", "in_progress"]
    model: str
    output: list[dict[str, Any]]
    output_text: str
    usage: dict[str, Any] | None
    error: dict[str, Any] | None = None
    incomplete_details: dict[str, Any] | None = None
    previous_response_id: str | None = None
