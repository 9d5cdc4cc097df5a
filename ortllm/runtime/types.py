"""The one request type every interface builds, and the events a generation streams back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .options import GenerationOptions

# finish reasons, named as OpenAI names them
STOP = "stop"  # end-of-sequence token or a stop string
LENGTH = "length"  # max_tokens (or the context window) reached
CANCELLED = "cancelled"
ERROR = "error"


@dataclass
class GenerationRequest:
    """What to generate: chat `messages` or a raw `prompt` (or ready `prompt_tokens`), with options."""

    options: GenerationOptions = field(default_factory=GenerationOptions)
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    session_id: str | None = None
    guidance: tuple[str, str] | None = (
        None  # ("json_schema" | "regex" | "lark_grammar", text): constrained output
    )
    # whose cached keys and values this request may reuse: requests of different scopes (API keys) never
    # share a prefix cache, so one caller cannot learn from timing what another has sent; None: all share
    cache_scope: str | None = None


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cached_prompt_tokens": self.cached_prompt_tokens,
        }


@dataclass
class Timings:
    """Seconds: queue wait, time to first token, and total; tokens/s of the decode phase."""

    queued_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    decode_tokens_per_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class TokenEvent:
    """One step of a stream: a text delta, or the final event (finish_reason set, usage, timings)."""

    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    error: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Result:
    """A whole generation, collected from its events."""

    text: str
    finish_reason: str
    usage: Usage
    timings: Timings
    token_ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage.as_dict(),
            "timings": self.timings.as_dict(),
        }
