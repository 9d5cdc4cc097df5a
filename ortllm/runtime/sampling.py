"""ortllm's own sampler (the native batcher's): logits adjusted by penalties, biases and a grammar's mask,
then a token picked; log-probabilities read from the same adjusted logits (before temperature, as OpenAI
documents)."""

from __future__ import annotations

import numpy as np

from .options import GenerationOptions

_BIG = float(np.finfo(np.float32).max) / 4  # far above any real logit, finite after a subtraction


def adjust(
    logits: np.ndarray,
    options: GenerationOptions,
    window: np.ndarray,
    generated: int,
    eos_ids: list[int],
    *,
    output: np.ndarray | None = None,
    allowed: np.ndarray | None = None,
) -> np.ndarray:
    """One row of logits (changed in place) as sampling and log-probabilities see them: the repetition
    penalty over the token ids in `window` (the last repeat_last_n tokens), OpenAI's presence and frequency
    penalties over the `output` generated so far, logit_bias, end-of-sequence held back until min_tokens,
    and `allowed` (a boolean mask of the vocabulary: the grammar of constrained output)."""
    penalty = options.repetition_penalty
    if penalty != 1.0 and window.size:
        seen = logits[window]
        # a penalty near 0 divides by almost nothing: keep the logits finite (log-probabilities must be)
        with np.errstate(divide="ignore", over="ignore"):
            logits[window] = np.clip(np.where(seen > 0, seen / penalty, seen * penalty), -_BIG, _BIG)
    if (options.presence_penalty or options.frequency_penalty) and output is not None and output.size:
        ids, counts = np.unique(output, return_counts=True)
        logits[ids] -= options.presence_penalty + options.frequency_penalty * counts
    for token, bias in options.logit_bias:
        if token < logits.size:
            logits[token] += bias
    if generated < options.min_tokens and eos_ids:
        logits[eos_ids] = -np.inf
    if allowed is not None:
        logits[~allowed[: logits.size]] = -np.inf
    return logits


def pick(logits: np.ndarray, options: GenerationOptions, rng: np.random.Generator) -> int:
    """The next token from adjusted logits (not changed): greedy, or temperature, top-k, top-p and min-p."""
    if options.greedy:
        return int(np.argmax(logits))
    scaled = logits / options.temperature
    k = options.top_k
    if 0 < k < scaled.size:
        candidates = np.argpartition(scaled, -k)[-k:]
    else:
        candidates = np.arange(scaled.size)
    values = scaled[candidates]
    order = np.argsort(-values, kind="stable")
    candidates, values = candidates[order], values[order]
    probs = np.exp(values - values[0])
    if options.min_p > 0.0:  # probs[0] is the most likely token's, 1 before normalising
        keep = max(1, int(np.count_nonzero(probs >= options.min_p)))
        candidates, probs = candidates[:keep], probs[:keep]
    probs /= probs.sum()
    if options.top_p < 1.0:
        cumulative = np.cumsum(probs)
        keep = int(np.searchsorted(cumulative, options.top_p)) + 1  # the smallest set reaching top_p
        candidates, probs = candidates[:keep], probs[:keep] / cumulative[min(keep, cumulative.size) - 1]
    return int(candidates[min(int(np.searchsorted(np.cumsum(probs), rng.random())), candidates.size - 1)])


def sample(
    logits: np.ndarray,
    options: GenerationOptions,
    history: np.ndarray,
    generated: int,
    eos_ids: list[int],
    rng: np.random.Generator,
) -> int:
    """The next token from one row of logits (modified in place); `history`: the penalty's window."""
    return pick(adjust(logits, options, history, generated, eos_ids), options, rng)


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under adjusted logits, and the `top` most likely tokens with theirs."""
    finite = np.isfinite(logits)
    peak = float(logits[finite].max()) if finite.any() else 0.0
    total = peak + float(np.log(np.exp(logits[finite] - peak).sum())) if finite.any() else 0.0
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(-logits, min(top, logits.size - 1))[:top]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        best = [(int(i), max(float(logits[i]) - total, -9999.0)) for i in ids]
    return max(float(logits[token]) - total, -9999.0), best
