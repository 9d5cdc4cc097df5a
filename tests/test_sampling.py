"""ortllm's own sampler: penalties, biases, min-p and log-probabilities as unit tests; constrained output and
log-probabilities in the native batcher on the real model (batched with unconstrained requests), and the
400 for what og.Engine's sampler lacks."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from ortllm.errors import InvalidOptions
from ortllm.runtime.options import validate_options
from ortllm.runtime.sampling import adjust, pick, token_logprobs
from ortllm.runtime.types import GenerationRequest
from tests.conftest import DEFAULT_MODEL, QUESTION

EOS = [0]
NONE = np.zeros(0, dtype=np.int64)


def opts(**kw):
    return validate_options({"temperature": 0, "repeat_penalty": 1.0, **kw})


def test_presence_and_frequency_penalties_are_additive_over_the_output() -> None:
    logits = np.array([0.0, 5.0, 4.0, 3.0], dtype=np.float32)
    output = np.array([1, 1, 2])
    out = adjust(
        logits.copy(), opts(presence_penalty=1.0, frequency_penalty=0.5), NONE, 3, EOS, output=output
    )
    # token 1: 5 - 1 - 2*0.5 = 3; token 2: 4 - 1 - 0.5 = 2.5; token 3 untouched
    assert out.tolist() == [0.0, 3.0, 2.5, 3.0]
    assert adjust(logits.copy(), opts(presence_penalty=-2.0), NONE, 3, EOS, output=output)[2] == 6.0


def test_logit_bias_adds_to_the_named_tokens() -> None:
    logits = np.array([0.0, 5.0, 4.0], dtype=np.float32)
    options = opts(logit_bias={"2": 2, "1": -100})
    assert pick(adjust(logits.copy(), options, NONE, 1, EOS), options, np.random.default_rng(0)) == 2


def test_repeat_penalty_applies_to_the_window_only() -> None:
    logits = np.array([0.0, 4.0, 4.2], dtype=np.float32)
    options = opts(repeat_penalty=2.0)
    # token 2 is in the window: 4.2 / 2 = 2.1 < 4
    assert pick(adjust(logits.copy(), options, np.array([2]), 1, EOS), options, np.random.default_rng()) == 1
    assert pick(adjust(logits.copy(), options, NONE, 1, EOS), options, np.random.default_rng()) == 2


def test_min_p_drops_unlikely_tokens() -> None:
    logits = np.log(np.array([0.6, 0.3, 0.1], dtype=np.float32))
    seen = set()
    for seed in range(200):
        options = validate_options({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.6, "seed": seed})
        seen.add(pick(logits.copy(), options, np.random.default_rng(seed)))
    assert seen == {0}  # 0.3 < 0.6 * 0.6: dropped
    options = validate_options({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.3})
    seen = {pick(logits.copy(), options, np.random.default_rng(s)) for s in range(200)}
    assert seen == {0, 1}


def test_token_logprobs_are_a_log_softmax_with_the_best_alternatives() -> None:
    logits = np.array([1.0, 3.0, 2.0, -np.inf], dtype=np.float32)
    value, top = token_logprobs(logits, 2, 2)
    expected = 2.0 - np.log(np.exp(1.0) + np.exp(3.0) + np.exp(2.0))
    assert value == pytest.approx(expected, abs=1e-5)
    assert [t for t, _ in top] == [1, 2]
    assert top[1][1] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"presence_penalty": 3}, "presence_penalty must be between -2.0 and 2.0"),
        ({"min_p": 1.5}, "min_p must be between 0.0 and 1.0"),
        ({"logit_bias": {"abc": 1}}, "logit_bias keys must be token ids"),
        ({"logit_bias": {"5": 200}}, "logit_bias[5] must be between -100.0 and 100.0"),
        ({"repeat_last_n": -2}, "repeat_last_n must be >= -1"),
    ],
)
def test_bad_options_name_the_field(raw: dict, message: str) -> None:
    with pytest.raises(InvalidOptions, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_options(raw)


# ---- on the real model -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def native_scheduler(pulled):
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.store import ModelStore

    sched = Scheduler(LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="native"), batcher="native")
    yield sched
    sched.close()


SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}


def test_constrained_output_runs_in_the_native_batcher_beside_free_text(native_scheduler) -> None:
    """A JSON-schema request decodes in the native batcher (no og.Engine), batched with a free request."""
    batcher = native_scheduler.backends[0]
    seen_rows: list[int] = []
    original = batcher._decode

    def counting() -> None:
        seen_rows.append(batcher.decoding)
        original()

    batcher._decode = counting
    try:
        free = native_scheduler.submit(
            GenerationRequest(validate_options({"temperature": 0, "max_tokens": 40}), messages=QUESTION)
        )
        constrained = native_scheduler.submit(
            GenerationRequest(
                validate_options({"temperature": 0, "max_tokens": 60}),
                messages=[{"role": "user", "content": "Name a city and its population as JSON."}],
                guidance=("json_schema", json.dumps(SCHEMA)),
            )
        )
        results: dict[str, object] = {}
        t = threading.Thread(target=lambda: results.update(free=free.result()))
        t.start()
        answer = constrained.result()
        t.join(60)
    finally:
        batcher._decode = original
    value = json.loads(answer.text)
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)
    assert answer.finish_reason == "stop"
    assert max(seen_rows) == 2  # the two requests decoded in the same steps
    assert native_scheduler.backends[1].jobs() == []  # nothing went to og.Engine


def test_logprobs_follow_the_text(native_scheduler) -> None:
    result = native_scheduler.generate(
        GenerationRequest(
            validate_options({"temperature": 0, "max_tokens": 8}), messages=QUESTION, logprobs=3
        )
    )
    assert result.logprobs is not None and len(result.logprobs) == result.usage.completion_tokens
    assert "".join(e.text for e in result.logprobs) == result.text
    for entry in result.logprobs:
        assert len(entry.top) == 3 and entry.top[0][2] >= entry.top[1][2]
        assert entry.logprob == pytest.approx(entry.top[0][2])  # greedy: the chosen token is the best
        assert entry.raw.decode("utf-8", errors="replace") == entry.text


def test_a_grammar_that_cannot_compile_is_refused_before_it_runs(native_scheduler) -> None:
    with pytest.raises(InvalidOptions, match="cannot be used"):
        native_scheduler.submit(
            GenerationRequest(
                validate_options({}), messages=QUESTION, guidance=("lark_grammar", "start: nope")
            )
        )


def test_logit_bias_outside_the_vocabulary_is_refused(native_scheduler) -> None:
    with pytest.raises(InvalidOptions, match="logit_bias names token"):
        native_scheduler.submit(
            GenerationRequest(validate_options({"logit_bias": {"999999999": 1}}), messages=QUESTION)
        )


def test_engine_refuses_what_its_sampler_lacks(pulled) -> None:
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler, engine_supported
    from ortllm.store import ModelStore

    if not engine_supported():
        pytest.skip("no og.Engine in this onnxruntime-genai")
    sched = Scheduler(LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="engine"), batcher="engine")
    try:
        with pytest.raises(InvalidOptions, match="presence_penalty is not supported") as info:
            sched.submit(GenerationRequest(validate_options({"presence_penalty": 0.5}), messages=QUESTION))
        assert info.value.param == "presence_penalty"
        with pytest.raises(InvalidOptions, match="logprobs"):
            sched.submit(GenerationRequest(validate_options({}), messages=QUESTION, logprobs=0))
    finally:
        sched.close()


def test_a_tiny_repeat_penalty_keeps_logprobs_finite() -> None:
    """repeat_penalty may be any value >= 0: one near 0 must not turn logits (and log-probabilities, which JSON
    cannot carry as Infinity) infinite."""
    logits = np.array([5.0, 3.0, 1.0], dtype=np.float32)
    out = adjust(logits, opts(repeat_penalty=2.8e-72), np.array([0, 1]), 0, EOS)
    assert np.isfinite(out).all()
    value, top = token_logprobs(out, 0, 2)
    assert np.isfinite(value) and all(np.isfinite(lp) for _, lp in top)
