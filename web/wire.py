"""What the dialects' wire formats share: the strict base model, field types with their documented bounds, the
message, usage and the error body of each dialect (each dialect's own models are in its protocol.py)."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

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
RepeatLastN = Annotated[
    int,
    Field(
        description="tokens repeat_penalty looks back over (0 = off, -1 = the whole context; default 64)",
        json_schema_extra={"minimum": -1},
    ),
    Integral,
]
Penalty = Annotated[
    float,
    Field(description="-2.0 to 2.0, additive (OpenAI)", json_schema_extra={"minimum": -2.0, "maximum": 2.0}),
]
MinP = Annotated[
    float,
    Field(description="0.0 to 1.0 (0 = off)", json_schema_extra={"minimum": 0.0, "maximum": 1.0}),
]
# the runtime's bounds (ortllm.runtime.options._logit_bias): token ids as decimal keys, at most 300 of them
LogitBias = Annotated[
    dict[str, float],
    Field(
        description="token id (decimal string) -> bias -100 to 100 added to its logit",
        json_schema_extra={
            "propertyNames": {"pattern": "^[0-9]{1,9}$"},
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
            "maxProperties": 300,
        },
    ),
]
Seed = Annotated[int, Field(json_schema_extra={"minimum": 0, "maximum": 2**63 - 1}), Integral]
StopString = Annotated[str, Field(json_schema_extra={"minLength": 1})]
# bounds that are server settings: openapi_spec writes [keyword, setting] as `keyword: <the setting's value>`
LIMIT_MARK = "x-ortllm-limit"
# the runtime's own bound (ortllm.runtime.options.MAX_STOP_STRINGS), written in by web/docs.py
StopList = Annotated[
    list[StopString],
    Field(description="stop sequences", json_schema_extra={LIMIT_MARK: ["maxItems", "max_stop_strings"]}),
]
MaxTokens = Annotated[
    int, Field(json_schema_extra={"minimum": 1, LIMIT_MARK: ["maximum", "max_tokens_limit"]}), Integral
]
PositiveMaxTokens = Annotated[
    int, Field(ge=1, json_schema_extra={LIMIT_MARK: ["maximum", "max_tokens_limit"]}), Integral
]
SESSION_ID_PATTERN = f"^{ID_PATTERN.pattern}$"
SessionId = Annotated[str, Field(pattern=SESSION_ID_PATTERN)]


def sent_when_set(description: str) -> Any:
    """A response field that is left out (not null) while it is None."""
    return Field(None, description=description, exclude_if=lambda value: value is None)


class Wire(BaseModel):
    """Requests ignore unknown fields (clients send extras), but types are checked strictly (no "1" for 1)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def refusal(param: str, message: str) -> PydanticCustomError:
    """A 400 whose message is sent as written, with `param` naming the field (web/errors.validation_message)."""
    return PydanticCustomError("unsupported_parameter", "{message}", {"param": param, "message": message})


def _same(value: Any, allowed: Any) -> bool:
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed  # True is not 1 here
    return value == allowed and isinstance(value, (int, float)) == isinstance(allowed, (int, float))


class RefusingRequest(Wire):
    """A request that refuses what it does not honour, as OpenAI's APIs do: an unknown top-level field, a
    field in REFUSED with any value but null, a field in ONLY with another value: each a 400 naming it."""

    model_config = ConfigDict(extra="forbid")
    # field -> why it is refused: any value but null is a 400 naming the field
    REFUSED: ClassVar[dict[str, str]] = {}
    # field -> (the supported values, why the others are refused)
    ONLY: ClassVar[dict[str, tuple[tuple[Any, ...], str]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _refused(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, why in cls.REFUSED.items():
            if data.get(name) is not None:
                raise refusal(
                    name, f"Unsupported parameter: '{name}' is not supported by this server ({why})."
                )
        for name, (allowed, why) in cls.ONLY.items():
            value = data.get(name)
            if value is not None and not any(_same(value, a) for a in allowed):
                shown = " or ".join(json.dumps(a) for a in allowed)
                raise refusal(name, f"Unsupported value of '{name}': only {shown} is supported here ({why}).")
        return data


class Message(Wire):
    role: Role
    content: str


# ---- error bodies, one per dialect (web/errors.py:error_response) --------------------------------


class OpenAIErrorObject(Wire):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(Wire):
    error: OpenAIErrorObject


class AnthropicErrorObject(Wire):
    type: str
    message: str


class AnthropicError(Wire):
    type: Literal["error"] = "error"
    error: AnthropicErrorObject


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


# ---- what the native and OpenAI dialects share --------------------------------------------------


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


class Usage(Wire):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
