"""The one request type every interface builds, and the events a generation streams back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ortllm.errors import InvalidOptions, RequestTooLarge

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
    # chat messages as the model's template reads them (tool calls and tool results included)
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    session_id: str | None = None
    guidance: tuple[str, str] | None = (
        None  # ("json_schema" | "regex" | "lark_grammar", text): constrained output
    )
    tools: list[dict[str, Any]] | None = None  # function tools the chat template describes (OpenAI's shape)
    logprobs: int | None = None  # None: none; k: each token's log-probability and its k best alternatives
    # whose cached keys and values this request may reuse: requests of different scopes (API keys) never
    # share a prefix cache, so one caller cannot learn from timing what another has sent; None: all share
    cache_scope: str | None = None
    # True once the caller's client has gone (probed by the web layer): a request still queued is then dropped
    client_gone: Callable[[], bool] | None = field(default=None, repr=False, compare=False)


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
    """Seconds: queue wait, time to first token, and total; tokens/s of the decode phase; speculative
    decoding's drafted tokens and those kept (llama-server's draft_n and draft_n_accepted)."""

    queued_s: float = 0.0
    ttft_s: float = 0.0
    total_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.__dict__.items()}


@dataclass
class TokenLogprob:
    """A generated token's log-probability (after penalties and constraints, before temperature) and the
    most likely alternatives at its position, best first: (text, bytes, logprob)."""

    text: str
    raw: bytes
    logprob: float
    top: list[tuple[str, bytes, float]] = field(default_factory=list)


@dataclass
class TokenEvent:
    """One step of a stream: a text delta, or the final event (finish_reason set, usage, timings)."""

    text: str = ""
    token_id: int | None = None
    # the tokens behind `text` (a token whose text is held back, e.g. by a stop string, comes with a later one)
    logprobs: list[TokenLogprob] | None = None
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
    logprobs: list[TokenLogprob] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "finish_reason": self.finish_reason,
            "usage": self.usage.as_dict(),
            "timings": self.timings.as_dict(),
        }


# ---- limits on the work one request may cause -------------------------------------------------


@dataclass(frozen=True)
class RequestLimits:
    """The most work one request may ask for (server.max_embedding_* in config.toml); larger ones get 413."""

    max_embedding_inputs: int = 2048  # texts in one embeddings request (OpenAI's limit too)
    max_embedding_tokens: int = 32768  # their tokens together

    @classmethod
    def of(cls, server: Any) -> RequestLimits:
        """The limits set in a ServerSettings."""
        return cls(server.max_embedding_inputs, server.max_embedding_tokens)


@dataclass
class Embeddings:
    """The vectors of one embeddings request, in input order, and how many tokens they took."""

    vectors: list[list[float]]
    tokens: int


def embedding_tokens(
    texts: Any, encode: Callable[[str], list[int]], limits: RequestLimits
) -> list[list[int]]:
    """Each text's token ids, after checking the input against `limits` (the count before any tokenizing)."""
    if not isinstance(texts, list) or not texts:
        raise InvalidOptions("input must be a non-empty string or a list of non-empty strings")
    if len(texts) > limits.max_embedding_inputs:
        raise RequestTooLarge(
            f"input has {len(texts)} items; the limit is {limits.max_embedding_inputs} (server.max_embedding_inputs)"
        )
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise InvalidOptions("input must be a non-empty string or a list of non-empty strings")
    lists = [encode(text) for text in texts]
    empty = next((i for i, ids in enumerate(lists) if not ids), None)
    if empty is not None:  # e.g. only characters the tokenizer drops
        raise InvalidOptions(f"input[{empty}] has no tokens the model can read", param="input")
    total = sum(len(ids) for ids in lists)
    if total > limits.max_embedding_tokens:
        raise RequestTooLarge(
            f"input has {total} tokens; the limit is {limits.max_embedding_tokens} (server.max_embedding_tokens)"
        )
    return lists
