"""Constrained output with llguidance, inside ortllm's own sampler: a grammar's token mask at every step.

`TokenTable` is a model's vocabulary as llguidance sees it (built from tokenizer.json once, about a second,
on the first request that needs it); it also gives each token's bytes for log-probabilities. `Constraint`
follows one sequence through its grammar: `allowed()` before sampling, `advance(token)` after.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
from llguidance import LLMatcher, LLTokenizer

from ortllm.errors import InvalidOptions

GUIDANCE_KINDS = ("json_schema", "regex", "lark_grammar")


def grammar_of(kind: str, text: str) -> str:
    """llguidance's grammar for a request's guidance (kind, text); 400 when it cannot be used."""
    if kind == "json_schema":
        try:
            grammar = LLMatcher.grammar_from_json_schema(text)
        except ValueError as exc:
            raise InvalidOptions(f"the JSON schema cannot be used: {exc}") from exc
    elif kind == "regex":
        grammar = LLMatcher.grammar_from_regex(text)
    elif kind == "lark_grammar":
        grammar = LLMatcher.grammar_from_lark(text)
    else:
        raise InvalidOptions(f"unknown guidance kind {kind!r} (choose from {', '.join(GUIDANCE_KINDS)})")
    problem = LLMatcher.validate_grammar(grammar)
    if problem and not problem.startswith("WARNING"):
        raise InvalidOptions(f"the {kind.replace('_', ' ')} cannot be used: {problem.strip()}")
    return grammar


class TokenTable:
    """A model's vocabulary for llguidance and log-probabilities, built on first use."""

    def __init__(self, tokenizer_json: Path, vocab: int, eos_ids: list[int]) -> None:
        self.path = tokenizer_json
        self.vocab = vocab
        self.eos_ids = list(eos_ids)
        self._tokenizer: LLTokenizer | None = None
        self._lock = threading.Lock()

    @property
    def tokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                if not self.path.is_file():
                    raise InvalidOptions(
                        f"constrained output and log-probabilities need {self.path.name}, which this model lacks"
                    )
                self._tokenizer = LLTokenizer(
                    str(self.path), n_vocab=self.vocab, eos_token=self.eos_ids or None
                )
            return self._tokenizer

    def token_bytes(self, token: int) -> bytes:
        return bytes(self.tokenizer.decode_bytes([token]))

    def constraint(self, guidance: tuple[str, str]) -> Constraint:
        """A fresh Constraint for one sequence (400 when the grammar cannot be compiled)."""
        grammar = grammar_of(*guidance)
        matcher = LLMatcher(self.tokenizer, grammar)
        if matcher.is_error():
            raise InvalidOptions(f"the {guidance[0].replace('_', ' ')} cannot be used: {matcher.get_error()}")
        return Constraint(matcher, self.tokenizer.vocab_size)


class Constraint:
    """One sequence's place in its grammar. Used from the worker thread only."""

    def __init__(self, matcher: LLMatcher, vocab: int) -> None:
        self.matcher = matcher
        self._mask = np.full((vocab + 31) // 32, -1, dtype=np.int32)
        self.vocab = vocab

    def allowed(self, size: int) -> np.ndarray:
        """A boolean mask over `size` logits: the tokens the grammar allows next (ids beyond the
        tokenizer's vocabulary, padding of the model's output layer, never are)."""
        self.matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")[: min(size, self.vocab)]
        out = np.zeros(size, dtype=bool)
        out[: bits.size] = bits.astype(bool)
        return out

    def advance(self, token: int) -> None:
        """The sampled token (always one `allowed()` gave)."""
        self.matcher.consume_token(token)

    @property
    def finished(self) -> bool:
        """Nothing but the end of the sequence can follow."""
        return bool(self.matcher.is_stopped())

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() or None if self.matcher.is_error() else None
