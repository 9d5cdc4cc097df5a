"""Generation options (sampling, length, stops, seed): the one validator every dialect's options pass."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ortllm.errors import InvalidOptions

MAX_STOP_STRINGS = 16


@dataclass(frozen=True)
class GenerationOptions:
    """Validated sampling options. temperature 0 means greedy."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    max_tokens: int = 512
    stop: tuple[str, ...] = field(default_factory=tuple)
    repeat_penalty: float = 1.1
    seed: int | None = None
    min_tokens: int = 0  # end-of-sequence is masked until this many tokens (benchmarks, `ignore_eos`)
    repeat_last_n: int = 64  # repeat_penalty looks at this many last tokens (0: off, -1: the whole sequence)
    presence_penalty: float = 0.0  # OpenAI's additive penalties over the generated tokens (-2.0 to 2.0)
    frequency_penalty: float = 0.0
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one (0: off)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias -100..100) added to the logits
    num_ctx: int = 0  # this request's context (prompt + answer), at most the model's; 0: the model's own

    @property
    def native_only(self) -> list[str]:
        """The options set here that only ortllm's own sampler applies (og.Engine and og.Generator lack them)."""
        names = ("presence_penalty", "frequency_penalty", "min_p")
        return [n for n in names if getattr(self, n)] + (["logit_bias"] if self.logit_bias else [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def repetition_penalty(self) -> float:
        """The penalty to apply: 1.0 (none) when `repeat_penalty` is 0 or 1."""
        return self.repeat_penalty if self.repeat_penalty > 0 else 1.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["stop"] = list(self.stop)
        out["logit_bias"] = {str(k): v for k, v in self.logit_bias}
        return out


def _number(name: str, value: Any, lo: float, hi: float | None, *, integer: bool = False) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOptions(f"{name} must be a number")
    if integer and not float(value).is_integer():
        raise InvalidOptions(f"{name} must be an integer")
    if not math.isfinite(value):
        raise InvalidOptions(f"{name} must be a finite number")
    if hi is None and value < lo:
        raise InvalidOptions(f"{name} must be >= {lo}")
    if hi is not None and not lo <= value <= hi:
        raise InvalidOptions(f"{name} must be between {lo:.1f} and {hi:.1f}")
    return int(value) if integer else float(value)


def validate_options(
    raw: dict[str, Any] | None, defaults: dict[str, Any] | None = None, *, max_tokens_limit: int | None = None
) -> GenerationOptions:
    """Merge `raw` over `defaults` (None values are ignored) and check every range.

    Messages name the field, e.g. `temperature must be between 0.0 and 2.0`.
    """
    merged: dict[str, Any] = {}
    for source in (defaults or {}, raw or {}):
        merged.update({k: v for k, v in source.items() if v is not None})
    kwargs: dict[str, Any] = {}
    if "temperature" in merged:
        kwargs["temperature"] = _number("temperature", merged["temperature"], 0.0, 2.0)
    if "top_p" in merged:
        kwargs["top_p"] = _number("top_p", merged["top_p"], 0.0, 1.0)
    if "top_k" in merged:
        kwargs["top_k"] = _number("top_k", merged["top_k"], 0, None, integer=True)
    if "max_tokens" in merged:
        kwargs["max_tokens"] = _number("max_tokens", merged["max_tokens"], 1, None, integer=True)
        if max_tokens_limit is not None and kwargs["max_tokens"] > max_tokens_limit:
            raise InvalidOptions(f"max_tokens must be at most {max_tokens_limit}")
    if "repeat_penalty" in merged:
        kwargs["repeat_penalty"] = _number("repeat_penalty", merged["repeat_penalty"], 0.0, None)
    if "min_tokens" in merged:
        kwargs["min_tokens"] = _number("min_tokens", merged["min_tokens"], 0, None, integer=True)
    if "repeat_last_n" in merged:
        kwargs["repeat_last_n"] = _number("repeat_last_n", merged["repeat_last_n"], -1, None, integer=True)
    for name in ("presence_penalty", "frequency_penalty"):
        if name in merged:
            kwargs[name] = _number(name, merged[name], -2.0, 2.0)
    if "min_p" in merged:
        kwargs["min_p"] = _number("min_p", merged["min_p"], 0.0, 1.0)
    if "logit_bias" in merged:
        kwargs["logit_bias"] = _logit_bias(merged["logit_bias"])
    if "num_ctx" in merged:
        kwargs["num_ctx"] = _number("num_ctx", merged["num_ctx"], 1, None, integer=True)
    if "seed" in merged:
        kwargs["seed"] = _number("seed", merged["seed"], 0, 2**63 - 1, integer=True)
    if "stop" in merged:
        stop = merged["stop"]
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise InvalidOptions("stop must be a list of strings")
        if any(s == "" for s in stop):
            raise InvalidOptions("stop strings must not be empty")
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidOptions(f"stop must hold at most {MAX_STOP_STRINGS} strings")
        kwargs["stop"] = tuple(stop)
    return GenerationOptions(**kwargs)


MAX_LOGIT_BIAS = 300  # entries in one logit_bias (OpenAI's own limit)


def _logit_bias(raw: Any) -> tuple[tuple[int, float], ...]:
    """OpenAI's `logit_bias`: {"token id": bias -100..100}."""
    if not isinstance(raw, dict):
        raise InvalidOptions("logit_bias must be an object mapping token ids to numbers", param="logit_bias")
    if len(raw) > MAX_LOGIT_BIAS:
        raise InvalidOptions(f"logit_bias holds at most {MAX_LOGIT_BIAS} entries", param="logit_bias")
    out = []
    for key, value in raw.items():
        token = str(key)
        if not token.isdigit() or len(token) > 9:
            raise InvalidOptions(
                f"logit_bias keys must be token ids (got {token[:20]!r})", param="logit_bias"
            )
        out.append((int(token), float(_number(f"logit_bias[{token}]", value, -100.0, 100.0))))
    return tuple(out)
