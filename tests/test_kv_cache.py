"""The int8 KV cache (ORTLLM_KV_CACHE=int8): the graph rewrite, calibration, fidelity against the float
cache, and requests served from it on the real model."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import onnx
import pytest

from ortllm.errors import ModelLoadError
from ortllm.runtime.backends import native
from ortllm.runtime.options import validate_options
from ortllm.runtime.types import GenerationRequest
from tests.conftest import DEFAULT_MODEL, QUESTION, assert_greedy_answer

TEXT = (
    "The river rises in the hills north of the town and runs south for forty miles before it reaches the "
    "sea. In spring the melting snow raises it by two metres, and the old stone bridge, built in 1820, has "
    "been closed three times since records began. The council plans a second bridge downstream; the work "
    "is expected to take two years and to cost about twelve million pounds, paid for by a national fund "
    "and by the town itself."
)


def test_the_choice_comes_from_the_environment(monkeypatch):
    from ortllm.runtime.loaded import kv_cache_choice

    monkeypatch.delenv("ORTLLM_KV_CACHE", raising=False)
    assert kv_cache_choice() == "float"
    monkeypatch.setenv("ORTLLM_KV_CACHE", " INT8 ")
    assert kv_cache_choice() == "int8"
    monkeypatch.setenv("ORTLLM_KV_CACHE", "fp8")
    with pytest.raises(ModelLoadError, match="ORTLLM_KV_CACHE must be float or int8, not 'fp8'"):
        kv_cache_choice()


def _decoder(pulled) -> tuple[Any, dict]:
    path = pulled / "cpu-int4"
    cfg = json.loads((path / "genai_config.json").read_text())
    return native.NativeDecoder(path, cfg, threads=2), cfg


@pytest.fixture(scope="module")
def decoders(pulled):
    """A float decoder and an int8 one calibrated on the chat template's rendering of KV_CALIBRATION."""
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.store import ModelStore

    model = LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="native")
    tokens = model.encode(model.render_chat(native.KV_CALIBRATION))
    plain, _ = _decoder(pulled)
    quantized, cfg = _decoder(pulled)
    float_slots = quantized.slots * quantized.max_capacity
    scales = quantized.quantize_kv(tokens)
    return plain, quantized, scales, model, cfg, float_slots


def test_quantize_kv_rewrites_every_attention_node(decoders):
    _, quantized, scales, _, cfg, float_tokens = decoders
    layers = int(cfg["model"]["decoder"]["num_hidden_layers"])
    assert scales.shape == (2 * layers, quantized.kv_heads, quantized.head_size)
    assert scales.dtype == np.float32 and bool((scales > 0).all())
    assert quantized.dtype is np.int8 and quantized.arena.data.dtype == np.int8
    # a quarter of the bytes per token: four times the tokens in the same budget (capped by the context)
    assert quantized.slots * quantized.max_capacity >= min(4 * float_tokens, quantized.slots * 8192)
    gqa = [n for n in quantized._proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == layers
    for node in gqa:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["k_quant_type"] == b"PER_CHANNEL" and attrs["v_quant_type"] == b"PER_CHANNEL"
        assert attrs["kv_cache_bit_width"] == 8
        layer = node.input[3].split(".")[1]
        assert (
            node.input[12] == f"ortllm_key_scale.{layer}" and node.input[13] == f"ortllm_value_scale.{layer}"
        )
    past = next(i for i in quantized.session.get_inputs() if i.name == "past_key_values.0.key")
    assert past.type == "tensor(int8)"


def test_quantize_kv_refuses_twice_and_an_empty_text(decoders, pulled):
    _, quantized, *_ = decoders
    with pytest.raises(ValueError, match="int8 already"):
        quantized.quantize_kv([1, 2, 3])
    fresh, _ = _decoder(pulled)
    with pytest.raises(ValueError, match="2 tokens or more"):
        fresh.quantize_kv([1])


def _teacher_forced(decoder, ids: list[int], prefix: int) -> tuple[np.ndarray, np.ndarray]:
    """Each next token's negative log-likelihood and the argmax, one decode step per token after a prompt of
    `prefix` tokens (the decode steps read the cache the way answers do)."""
    decoder.reserve(len(ids) + 1, [0] * decoder.slots)
    logits = decoder.step(np.asarray([ids[:prefix]]), np.zeros(1, dtype=np.int64))
    nll, best = [], []
    for pos in range(prefix, len(ids)):
        row = logits[0].astype(np.float64)
        top = row.max()
        nll.append(np.log(np.exp(row - top).sum()) + top - row[ids[pos]])
        best.append(int(row.argmax()))
        logits = decoder.step(np.asarray([[ids[pos]]]), np.asarray([pos]))
    return np.asarray(nll), np.asarray(best)


def test_int8_cache_keeps_the_model_s_predictions(decoders):
    """Measured on 2,040 tokens of Python's docs (benchmarks/NOTES.md lever 23): perplexity +0.4 %."""
    plain, quantized, _, model, *_ = decoders
    ids = model.encode(TEXT)
    assert len(ids) > 80
    nll_float, best_float = _teacher_forced(plain, ids, 24)
    nll_int8, best_int8 = _teacher_forced(quantized, ids, 24)
    assert abs(nll_int8.mean() - nll_float.mean()) < 0.05, (nll_float.mean(), nll_int8.mean())
    assert (best_int8 == best_float).mean() >= 0.9
    # and the cache really is int8: values the scales map back to the float cache's within a step
    n = len(ids)
    assert np.abs(quantized.arena.data[:, 0, :, :n]).max() <= 127


@pytest.fixture(scope="module")
def int8_scheduler(pulled):
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.store import ModelStore

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORTLLM_KV_CACHE", "int8")
        model = LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="native")
    sched = Scheduler(model, batcher="native")
    yield sched
    sched.close()


def test_a_model_loaded_with_int8_serves_requests(int8_scheduler):
    model = int8_scheduler.model
    assert model.info.kv_cache == "int8" and "int8 KV cache" in model.info.runtime
    options = validate_options({"temperature": 0, "max_tokens": 24})
    first = int8_scheduler.generate(GenerationRequest(options, messages=QUESTION))
    # "… Paris" on Intel's AVX-512; on AVX2 (kernels that differ per row count: conftest.NEAR_TIE) the
    # first token is a near-tie and the answer reads "L'Étoile … The capital of France": a greedy answer
    # of the model either way (how close int8 keeps its predictions: the test above)
    assert "Paris" in first.text or "France" in first.text, first.text
    assert_greedy_answer(
        model.path, int8_scheduler.prompt_ids(GenerationRequest(options, messages=QUESTION)), first.token_ids
    )
    again = int8_scheduler.generate(GenerationRequest(options, messages=QUESTION))
    assert again.text == first.text  # the prompt's cache reused from the int8 slot: the same answer
    assert again.usage.cached_prompt_tokens > 0


def test_int8_rows_draft_and_batch(int8_scheduler):
    """Drafted tokens verified in one pass, then concurrent rows (batched decode steps, prompts side by
    side), all on the int8 arena."""
    batcher = int8_scheduler.backends[0]
    assert isinstance(batcher, native.NativeBatcher) and batcher.speculate
    options = validate_options({"temperature": 0, "max_tokens": 40, "min_tokens": 40})
    echo = [{"role": "user", "content": "Repeat this line exactly: " + TEXT[:160]}]
    alone = int8_scheduler.generate(GenerationRequest(options, messages=echo))
    assert alone.usage.completion_tokens == 40 and alone.text.startswith("The river rises in the hills")
    assert alone.timings.accepted_draft_tokens > 0  # the echo drafted from its prompt and kept some
    results: dict[int, Any] = {}

    def worker(i: int) -> None:
        content = f"Count from {i} to {i + 9}."
        results[i] = int8_scheduler.generate(
            GenerationRequest(options, messages=[{"role": "user", "content": content}])
        )

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.usage.completion_tokens == 40 for r in results.values())
    assert not batcher.busy
