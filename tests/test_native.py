"""The native batcher: sampling and KV bookkeeping as unit tests, batching and prefix reuse on the real model."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
import pytest

from ortllm.runtime.backends import native
from ortllm.runtime.backends.native import KVArena, inspect_decoder, sample
from ortllm.runtime.options import validate_options
from ortllm.runtime.types import ERROR, LENGTH, GenerationRequest
from tests.conftest import DEFAULT_MODEL, QUESTION, assert_answers_as_alone, full_logits

EOS = [2]


def batcher_of(scheduler) -> native.NativeBatcher:
    """The scheduler's native batcher (the first of its backends)."""
    first = scheduler.backends[0]
    assert isinstance(first, native.NativeBatcher)
    return first


def opts(**kw):
    return validate_options({"temperature": 0, "repeat_penalty": 1.0, **kw})


def rng(seed=0):
    return np.random.default_rng(seed)


# ---- sampling ------------------------------------------------------------------------------------


def test_greedy_takes_the_largest_logit():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert sample(logits.copy(), opts(), np.zeros(0, np.int64), 0, EOS, rng()) == 1


def test_repetition_penalty_demotes_seen_tokens_both_signs():
    logits = np.array([0.0, 3.0, 2.9, -1.0], dtype=np.float32)
    assert sample(logits.copy(), opts(repeat_penalty=1.1), np.array([1]), 0, EOS, rng()) == 2
    negative = np.array([-1.0, -1.05, -5.0], dtype=np.float32)  # a seen negative logit gets more negative
    assert sample(negative.copy(), opts(repeat_penalty=1.1), np.array([0]), 0, EOS, rng()) == 1


def test_min_tokens_masks_end_of_sequence_until_reached():
    logits = np.array([0.0, 1.0, 9.0], dtype=np.float32)  # token 2 is EOS and the best
    assert sample(logits.copy(), opts(min_tokens=3), np.zeros(0, np.int64), 2, EOS, rng()) == 1
    assert sample(logits.copy(), opts(min_tokens=3), np.zeros(0, np.int64), 3, EOS, rng()) == 2


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = np.random.default_rng(1).normal(size=1000).astype(np.float32)
    best = int(np.argmax(logits))
    for seed in range(20):
        assert (
            sample(logits.copy(), opts(temperature=1.5, top_k=1), np.zeros(0, np.int64), 0, EOS, rng(seed))
            == best
        )
        assert (
            sample(
                logits.copy(),
                opts(temperature=1.5, top_k=0, top_p=1e-6),
                np.zeros(0, np.int64),
                0,
                EOS,
                rng(seed),
            )
            == best
        )


def test_sampling_follows_the_softmax_and_respects_top_k():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    generator = rng(7)
    draws = [
        sample(
            logits.copy(), opts(temperature=1.0, top_k=0, top_p=1.0), np.zeros(0, np.int64), 0, [], generator
        )
        for _ in range(4000)
    ]
    freq = np.bincount(draws, minlength=4) / len(draws)
    assert freq == pytest.approx([0.5, 0.3, 0.15, 0.05], abs=0.03)
    top2 = {
        sample(
            logits.copy(), opts(temperature=1.0, top_k=2, top_p=1.0), np.zeros(0, np.int64), 0, [], generator
        )
        for _ in range(300)
    }
    assert top2 == {0, 1}
    nucleus = {
        sample(
            logits.copy(), opts(temperature=1.0, top_k=0, top_p=0.7), np.zeros(0, np.int64), 0, [], generator
        )
        for _ in range(300)
    }
    assert nucleus == {0, 1}  # 0.5 + 0.3 is the smallest set reaching 0.7


def test_the_same_seed_draws_the_same_tokens():
    logits = np.random.default_rng(3).normal(size=500).astype(np.float32)
    o = opts(temperature=1.0, top_k=50, top_p=0.9)
    a = [sample(logits.copy(), o, np.zeros(0, np.int64), 0, EOS, g) for g in [rng(5)] for _ in range(30)]
    b = [sample(logits.copy(), o, np.zeros(0, np.int64), 0, EOS, g) for g in [rng(5)] for _ in range(30)]
    assert a == b and len(set(a)) > 3


# ---- KV bookkeeping and eligibility --------------------------------------------------------------


def test_arena_swap_exchanges_only_the_valid_positions():
    arena = KVArena(layers=2, kv_heads=1, head_size=2, capacity=6, slots=3, dtype=np.float32)
    arena.data[:, 0, :, :4] = 1.0
    arena.data[:, 1, :, :2] = 2.0
    arena.swap(0, 1, 4, 2)
    assert (arena.data[:, 1, :, :4] == 1.0).all() and (arena.data[:, 0, :, :2] == 2.0).all()
    assert (arena.data[:, 2] == 0).all()


def test_warming_a_slot_keeps_its_content_and_marks_it_warm():
    arena = native.KVArena(layers=2, kv_heads=1, head_size=2, capacity=4, slots=3, dtype=np.float32)
    arena.data[:, 1] = np.arange(32, dtype=np.float32).reshape(4, 1, 4, 2)
    before = arena.data.copy()
    arena.mark_warm(0, 1)
    steps = 0
    while arena.warm_up(limit=2):
        steps += 1
    assert steps == 4 and arena.warm.tolist() == [
        True,
        True,
        False,
    ]  # slot 1, part by part; 2 is beyond the limit
    assert np.array_equal(arena.data, before)


def test_non_cpu_and_foreign_graphs_are_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    assert "CPU only" in inspect_decoder(tmp_path, {}, "cuda")[1]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])],
        "g",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, [1, 1])
            for n in ("input_ids", "attention_mask", "position_ids")
        ],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, [1, 1])],
    )
    onnx.save(helper.make_model(graph), str(tmp_path / "model.onnx"))
    cfg = {"model": {"decoder": {"filename": "model.onnx", "num_hidden_layers": 0}}}
    assert "position_ids" in inspect_decoder(tmp_path, cfg, "cpu")[1]
    assert "single decoder" in inspect_decoder(tmp_path, {"model": {"decoder": {}}}, "cpu")[1]


def test_the_default_model_is_eligible(loaded_model):
    from ortllm.runtime.loaded import LoadedModel

    model = LoadedModel(loaded_model)
    assert model.native is not None and model.info.batcher == "native"
    assert model._og_model is None  # og.Model is not loaded until a request needs og.Engine


# ---- on the real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sched(pulled):
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.store import ModelStore

    scheduler = Scheduler(LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="native"), batcher="native")
    yield scheduler
    scheduler.close()


def ask(scheduler, messages=QUESTION, **kw):
    return scheduler.generate(GenerationRequest(opts(**{"max_tokens": 40, **kw}), messages=messages))


def test_the_auto_backend_of_a_cpu_model_is_the_native_batcher(sched):
    """What `ortllm serve` gets by default (ORTLLM_BATCHER=auto): a regression once left the server on
    og.Engine while every test passed a backend explicitly."""
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.registry import ModelRegistry
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.store import ModelStore

    auto = Scheduler(LoadedModel(ModelStore().get(DEFAULT_MODEL)), batcher="auto")  # its own KV arena
    try:
        assert auto.batcher == "native" and isinstance(auto.backends[0], native.NativeBatcher)
        assert auto.generate(GenerationRequest(opts(max_tokens=3), prompt="Hi")).usage.completion_tokens
    finally:
        auto.close()
    registry = ModelRegistry(batcher="auto")
    try:
        assert isinstance(registry.load(DEFAULT_MODEL).backends[0], native.NativeBatcher)
    finally:
        registry.close()


def test_an_idle_batcher_warms_its_first_slots(sched):
    deadline = time.monotonic() + 30
    while not batcher_of(sched).decoder.arena.warm[: native.WARM_SLOTS].all() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert batcher_of(sched).decoder.arena.warm[: native.WARM_SLOTS].all()
    assert not batcher_of(sched).wants_warm_up  # then the worker sleeps until work arrives


def test_the_same_prompt_again_reuses_everything_and_answers_identically(sched):
    first = ask(sched, [{"role": "user", "content": "Write one sentence about the sea."}])
    again = ask(sched, [{"role": "user", "content": "Write one sentence about the sea."}])
    assert again.text == first.text
    assert again.usage.cached_prompt_tokens == again.usage.prompt_tokens


def test_callers_of_different_cache_scopes_never_share_a_prefix(sched):
    """A prompt computed for one API key is not reused for another (cache timing would tell the second
    what the first sent); the same key, or no key at all, reuses it."""
    batcher_of(sched).slots = [native._Slot() for _ in batcher_of(sched).slots]  # fresh slots: the worst case
    messages = [{"role": "user", "content": "Which planet has the most moons? One word."}]

    def run(scope):
        return sched.generate(GenerationRequest(opts(max_tokens=4), messages=messages, cache_scope=scope))

    first = run("key:alice")
    assert first.usage.cached_prompt_tokens == 0
    assert run("key:bob").usage.cached_prompt_tokens == 0
    assert run("key:alice").usage.cached_prompt_tokens == first.usage.prompt_tokens
    assert run(None).usage.cached_prompt_tokens == 0  # anonymous callers do not see keyed caches either
    assert run(None).usage.cached_prompt_tokens == first.usage.prompt_tokens


def test_a_later_turn_rereads_only_what_is_new(sched):
    turn1 = [{"role": "user", "content": "My name is Ada. Remember it."}]
    answer = ask(sched, turn1, max_tokens=20)
    assert answer.usage.cached_prompt_tokens < answer.usage.prompt_tokens
    turn2 = turn1 + [
        {"role": "assistant", "content": answer.text},
        {"role": "user", "content": "What is my name?"},
    ]
    second = ask(sched, turn2, max_tokens=20)
    assert second.usage.cached_prompt_tokens >= answer.usage.prompt_tokens  # turn 1's prompt is not re-read
    assert second.usage.completion_tokens > 0 and second.text.strip()


def test_a_prompt_fed_in_small_chunks_gives_the_same_answer(sched, monkeypatch):
    long = [
        {"role": "user", "content": "Summarise in one sentence: " + "The river floods every spring. " * 20}
    ]
    whole = ask(sched, long, max_tokens=12)
    batcher_of(sched).slots = [native._Slot() for _ in batcher_of(sched).slots]  # forget the cached prefix
    monkeypatch.setattr(native, "PREFILL_CHUNK_IDLE", 7)
    chunked = ask(sched, long, max_tokens=12)
    assert chunked.usage.cached_prompt_tokens == 0
    assert chunked.token_ids == whole.token_ids


def test_concurrent_requests_compute_a_shared_prompt_once(sched, monkeypatch):
    """Two requests with the same prompt at once: the second copies the first's keys and values (and
    its first token's logits) instead of computing them again; a third sharing only the beginning
    copies that beginning, even while the others are still generating."""
    batcher_of(sched).slots = [native._Slot() for _ in batcher_of(sched).slots]  # no cache from earlier tests
    monkeypatch.setattr(native, "PREFILL_CHUNK_IDLE", 16)  # the first prompt takes several steps
    monkeypatch.setattr(native, "PREFILL_CHUNK", 16)
    text = "Summarise in one sentence: " + "The river floods every spring and the town rebuilds. " * 8
    same = GenerationRequest(opts(max_tokens=30, min_tokens=30), messages=[{"role": "user", "content": text}])
    other = GenerationRequest(opts(max_tokens=10), messages=[{"role": "user", "content": text + " Why?"}])
    first, second, third = sched.submit(same), sched.submit(same), sched.submit(other)
    a, b, c = first.result(), second.result(), third.result()
    assert a.usage.cached_prompt_tokens == 0
    assert b.usage.cached_prompt_tokens == b.usage.prompt_tokens  # the whole prompt, copied
    assert b.token_ids == a.token_ids  # the same first-token logits, the same greedy answer
    assert c.usage.prompt_tokens > c.usage.cached_prompt_tokens > a.usage.prompt_tokens - 12


def test_more_requests_than_slots_all_finish(pulled):
    """Three slots, ten concurrent requests of different lengths: they queue, join and leave the batch."""
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.store import ModelStore

    model = LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="native")
    model.native = native.NativeDecoder(
        model.path,
        json.loads((model.path / "genai_config.json").read_text()),
        threads=model.threads,
        max_batch=3,
    )
    scheduler = Scheduler(model, batcher="native")
    # drafting depends on how many rows decode together (tests/test_speculation.py): off, so that a row's
    # numbers are those it computes alone
    batcher_of(scheduler).speculate = False
    try:
        questions = [
            f"What is {a} plus {b}? Answer with the number."
            for a, b in [(1, 1), (2, 3), (10, 5), (7, 7), (3, 4), (6, 2), (9, 1), (4, 4), (5, 5), (8, 1)]
        ]
        lengths = [4 + 3 * i for i in range(len(questions))]
        results: dict[int, Any] = {}

        def request(i: int) -> GenerationRequest:
            return GenerationRequest(
                opts(max_tokens=lengths[i], min_tokens=lengths[i]),
                messages=[{"role": "user", "content": questions[i]}],
            )

        alone = [scheduler.generate(request(i)).token_ids for i in range(len(questions))]
        batcher_of(scheduler).slots = [native._Slot() for _ in batcher_of(scheduler).slots]
        batcher_of(scheduler).reuse_prefixes = False  # every row computes its whole prompt, as alone

        def worker(i: int) -> None:
            results[i] = scheduler.generate(request(i))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert sorted(results) == list(range(len(questions)))
        for i, r in results.items():
            assert r.finish_reason == LENGTH and r.usage.completion_tokens == lengths[i]
        assert batcher_of(scheduler).busy is False and batcher_of(scheduler).decoding == 0
        # rows kept their own caches
        prompts = [scheduler.prompt_ids(request(i)) for i in range(len(questions))]
        got = [results[i].token_ids for i in range(len(questions))]
        assert_answers_as_alone(model.path, prompts, got, alone)
    finally:
        scheduler.close()


def test_a_failed_step_fails_its_rows_and_the_batcher_keeps_serving(sched, monkeypatch):
    real = batcher_of(sched).decoder.step
    calls = {"n": 0}

    def flaky(ids, lengths, first=0, counts=None, every=False):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure\nwith a C++ trace")
        return real(ids, lengths, first, counts, every)

    monkeypatch.setattr(batcher_of(sched).decoder, "step", flaky)
    stream = sched.submit(GenerationRequest(opts(max_tokens=20, min_tokens=20), messages=QUESTION))
    final = [ev for ev in stream if ev.done][0]
    assert final.finish_reason == ERROR and final.error == "generation failed: injected failure"
    assert "Paris" in ask(sched).text


def test_constrained_output_goes_to_the_engine(sched):
    from ortllm.runtime.scheduler import engine_supported

    if not engine_supported():
        pytest.skip("needs the 0.18 Engine")
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    request = GenerationRequest(
        opts(max_tokens=30), messages=QUESTION, guidance=("json_schema", json.dumps(schema))
    )
    result = sched.generate(request)
    assert "city" in json.loads(result.text)


def test_the_arena_grows_for_a_long_answer_and_shrinks_when_idle(sched, monkeypatch):
    import time

    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.store import ModelStore

    monkeypatch.setattr(native, "INITIAL_CAPACITY", 64)
    small = Scheduler(LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="native"), batcher="native")
    try:
        assert batcher_of(small).decoder.capacity == 64
        request = GenerationRequest(opts(max_tokens=100, min_tokens=100), messages=QUESTION)
        grown = small.generate(request)
        deadline = time.monotonic() + 10
        while batcher_of(small).decoder.capacity != 64 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batcher_of(small).decoder.capacity == 64  # back to the initial size once idle
        assert all(len(s.tokens) <= 64 for s in batcher_of(small).slots)
        assert grown.token_ids == sched.generate(request).token_ids  # growing kept every cached position
    finally:
        small.close()


def test_the_decoder_computes_logits_for_the_last_position_only(sched):
    """Prompt chunks skip the LM head for all but their last position; the numbers stay the same."""
    decoder = batcher_of(sched).decoder
    assert decoder.last_only
    ids = np.asarray([[1, 504, 3575, 282, 4649, 314]], dtype=np.int64)
    expected = full_logits(sched.model.path, ids[0].tolist())[-1]  # the builder's graph, every position
    batcher_of(sched).slots = [native._Slot() for _ in batcher_of(sched).slots]
    got = sched.call(lambda: decoder.step(ids, np.asarray([0]), 0)[0].copy())
    assert np.abs(got - expected).max() < 1e-3


# ---- several prompts in one pass (onnxruntime 1.32's query_seqlens) -------------------------------

PROMPTS = [
    "Name three colours.",
    "Summarise in one sentence: " + "The river floods every spring and the town rebuilds. " * 6,
    "Explain in two sentences why the sky is blue, for a child who asked at breakfast.",
    "List the planets of the solar system in order from the sun, separated by commas.",
]


@pytest.fixture(scope="module")
def old_sched(pulled):
    """A batcher on the one-row-per-chunk path (as with onnxruntime < 1.32): the reference."""
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.store import ModelStore

    patch = pytest.MonkeyPatch()
    patch.setattr(native, "ragged_supported", lambda: False)
    try:
        scheduler = Scheduler(
            LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="native"), batcher="native"
        )
    finally:
        patch.undo()
    yield scheduler
    scheduler.close()


def together(scheduler, requests: list[GenerationRequest]) -> list[list[int]]:
    """Submit `requests` between two steps (the batcher admits them at once); their greedy tokens."""
    streams = scheduler.call(lambda: [scheduler.submit(r) for r in requests])
    return [s.result().token_ids for s in streams]


def request(text: str, max_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(
        opts(max_tokens=max_tokens, min_tokens=max_tokens), messages=[{"role": "user", "content": text}]
    )


@pytest.fixture
def passes(sched, monkeypatch) -> list[tuple[int, int, int, list[int], list[int], int]]:
    """Every forward pass of `sched`'s decoder: (rows, new tokens, first slot, past lengths, valid counts,
    decoding rows); small chunks so prompts take several passes; no cache from earlier tests."""
    batcher = batcher_of(sched)
    decoder = batcher.decoder
    real = decoder.step
    seen: list[tuple[int, int, int, list[int], list[int], int]] = []

    def spy(ids, lengths, first=0, counts=None, every=False):
        valid = [ids.shape[1]] * ids.shape[0] if counts is None else [int(c) for c in counts]
        seen.append((ids.shape[0], ids.shape[1], first, [int(n) for n in lengths], valid, batcher.decoding))
        return real(ids, lengths, first, counts, every)

    monkeypatch.setattr(decoder, "step", spy)
    # answers are compared with the one-row batcher's, which cannot speculate (tests/test_speculation.py)
    monkeypatch.setattr(batcher, "speculate", False)
    monkeypatch.setattr(native, "PREFILL_CHUNK_IDLE", 48)
    monkeypatch.setattr(native, "PREFILL_CHUNK", 48)
    sched.call(lambda: setattr(batcher_of(sched), "slots", [native._Slot() for _ in batcher_of(sched).slots]))
    return seen


def test_prompt_chunks_share_a_pass_exactly_when_onnxruntime_can(sched, old_sched):
    """On whenever GroupQueryAttention takes query_seqlens (onnxruntime 1.32), off when told it cannot."""
    import onnxruntime as ort

    recent = tuple(int(p) for p in ort.__version__.split(".")[:2]) >= (1, 32)
    assert batcher_of(sched).decoder.ragged == native.ragged_supported() == recent
    assert not batcher_of(old_sched).decoder.ragged


def test_prompts_of_different_lengths_share_a_pass_and_answer_as_alone(sched, old_sched, passes):
    if not batcher_of(sched).decoder.ragged:
        pytest.skip("needs onnxruntime >= 1.32 (GroupQueryAttention query_seqlens)")
    expected = [old_sched.generate(request(p)).token_ids for p in PROMPTS]
    prompts = [sched.prompt_ids(request(p)) for p in PROMPTS]
    assert_answers_as_alone(
        sched.model.path, prompts, together(sched, [request(p) for p in PROMPTS]), expected
    )
    # several rows in one pass, with past context and of different valid lengths
    ragged = [p for p in passes if p[0] > 1 and p[1] > 1 and max(p[3]) > 0 and len(set(p[4])) > 1]
    assert ragged, passes


def test_a_reused_prefix_and_a_fresh_prompt_share_a_pass(sched, old_sched, passes):
    if not batcher_of(sched).decoder.ragged:
        pytest.skip("needs onnxruntime >= 1.32 (GroupQueryAttention query_seqlens)")
    head = "Summarise in one sentence: " + "The river floods every spring and the town rebuilds. " * 6
    follow = [head, head + " Then say why.", PROMPTS[3]]
    expected = [old_sched.generate(request(p)).token_ids for p in follow[1:]]
    sched.generate(request(head))  # cached in a free slot
    del passes[:]
    streams = sched.call(lambda: [sched.submit(request(p)) for p in follow[1:]])
    results = [s.result() for s in streams]
    assert [r.token_ids for r in results] == expected
    assert results[0].usage.cached_prompt_tokens > 60  # the head was not read again
    first = next(p for p in passes if p[0] > 1)
    # both rows in the first pass: the reused head's tail after 60+ cached tokens, the other prompt's chunk
    assert first[0] == 2 and max(first[3]) > 60, passes


def test_decoding_rows_ride_along_in_a_prefill_pass(sched, old_sched, passes, monkeypatch):
    """Prompt chunks of one token per row join the decoding rows' pass (exactly the numbers of separate
    passes); both batchers feed prompts one token at a time here, so their answers must agree (to a
    near-tie where the CPU's kernels for one row and for several differ: conftest.NEAR_TIE)."""
    if not batcher_of(sched).decoder.ragged:
        pytest.skip("needs onnxruntime >= 1.32 (GroupQueryAttention query_seqlens)")
    monkeypatch.setattr(native, "PREFILL_CHUNK", 2)  # two rows of one token each
    monkeypatch.setattr(native, "PREFILL_CHUNK_IDLE", 2)
    long = request(PROMPTS[0], max_tokens=80)
    late = [request("Name a colour."), request("What is two plus two?")]
    expected = [old_sched.generate(r).token_ids for r in (long, *late)]
    running = sched.submit(long)
    deadline = time.monotonic() + 30
    while not batcher_of(sched).decoding and time.monotonic() < deadline:
        time.sleep(0.01)
    answers = together(sched, late)  # while the first one decodes
    prompts = [sched.prompt_ids(r) for r in (long, *late)]
    assert_answers_as_alone(sched.model.path, prompts, [running.result().token_ids, *answers], expected)
    mixed = [p for p in passes if p[2] == 0 and 0 < p[5] < p[0]]
    assert mixed, passes  # decoding rows and prompt tokens in one pass


def test_the_answers_check_fails_a_row_given_another_row_s_answer(old_sched):
    """The tolerance for kernels that differ per row count (conftest.NEAR_TIE) still tells crossed rows."""
    alone = [old_sched.generate(request(p)).token_ids for p in PROMPTS[:2]]
    prompts = [old_sched.prompt_ids(request(p)) for p in PROMPTS[:2]]
    assert_answers_as_alone(old_sched.model.path, prompts, alone, alone)
    with pytest.raises(AssertionError, match="not a greedy answer of its prompt"):
        assert_answers_as_alone(old_sched.model.path, prompts, alone[::-1], alone)


def test_the_one_row_path_serves_concurrent_prompts_without_query_seqlens(old_sched):
    """onnxruntime < 1.32 (the capability flag off): one prompt chunk per pass, the same answers."""
    alone = [old_sched.generate(request(p)).token_ids for p in PROMPTS[:3]]
    batcher_of(old_sched).slots = [native._Slot() for _ in batcher_of(old_sched).slots]
    prompts = [old_sched.prompt_ids(request(p)) for p in PROMPTS[:3]]
    got = together(old_sched, [request(p) for p in PROMPTS[:3]])
    assert_answers_as_alone(old_sched.model.path, prompts, got, alone)
