"""The int8 prefill graph (ORTLLM_PREFILL=int8): exact dequantisation against onnxruntime's own kernel, the
graph's fidelity on the real model, routing of prompt chunks, and requests served with it."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from ortllm.errors import ModelLoadError
from ortllm.runtime.backends import native, prefill8
from ortllm.runtime.options import validate_options
from ortllm.runtime.types import GenerationRequest
from tests.conftest import DEFAULT_MODEL, QUESTION
from tests.test_kv_cache import TEXT, _teacher_forced


def _matmul_nbits(k: int, n: int, bits: int, block: int, zero: np.ndarray | None, rng) -> tuple:
    blocks = (k + block - 1) // block
    packed = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) + 0.5) * 0.01
    inputs = ["x", "w", "s"] + (["z"] if zero is not None else [])
    inits = [numpy_helper.from_array(packed, "w"), numpy_helper.from_array(scales, "s")]
    if zero is not None:
        inits.append(numpy_helper.from_array(zero, "z"))
    node = helper.make_node(
        "MatMulNBits",
        inputs,
        ["y"],
        domain="com.microsoft",
        K=k,
        N=n,
        bits=bits,
        block_size=block,
        accuracy_level=0,
    )
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, packed, scales


@pytest.mark.parametrize(
    "bits,block,k,zero",
    [(4, 32, 96, None), (4, 32, 80, "packed"), (8, 32, 64, None), (8, 16, 48, "bytes"), (4, 16, 64, "float")],
)
def test_dequantize_matches_onnxruntime_s_kernel(bits, block, k, zero):
    """x @ dequantize(...)ᵀ equals MatMulNBits (float compute) for each zero-point layout the builder writes."""
    rng = np.random.default_rng(bits * 100 + block + k)
    n = 24
    blocks = (k + block - 1) // block
    if zero == "packed":  # 4-bit: two per byte, low nibble first, rows padded to whole bytes
        z = rng.integers(0, 256, n * ((blocks + 1) // 2), dtype=np.uint8)
    elif zero == "bytes":
        z = rng.integers(0, 256, n * blocks, dtype=np.uint8)
    elif zero == "float":
        z = rng.random(n * blocks, dtype=np.float32) * 15
    else:
        z = None
    session, packed, scales = _matmul_nbits(k, n, bits, block, z, rng)
    x = rng.standard_normal((3, k), dtype=np.float32)
    (expected,) = session.run(None, {"x": x})
    w = prefill8.dequantize(packed, scales, z, k, n, bits, block)
    assert w.shape == (n, k)
    np.testing.assert_allclose(x @ w.T, expected, rtol=1e-4, atol=1e-4)


def test_the_choice_comes_from_the_environment(monkeypatch):
    from ortllm.runtime.loaded import prefill_choice

    monkeypatch.delenv("ORTLLM_PREFILL", raising=False)
    assert prefill_choice() == "model"
    monkeypatch.setenv("ORTLLM_PREFILL", "INT8")
    assert prefill_choice() == "int8"
    monkeypatch.setenv("ORTLLM_PREFILL", "int4")
    with pytest.raises(ModelLoadError, match="ORTLLM_PREFILL must be model or int8, not 'int4'"):
        prefill_choice()


@pytest.fixture(scope="module")
def decoders(pulled):
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.store import ModelStore

    model = LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="native")
    path = pulled / "cpu-int4"
    cfg = json.loads((path / "genai_config.json").read_text())
    plain = native.NativeDecoder(path, cfg, threads=2)
    fast = native.NativeDecoder(path, cfg, threads=2)
    fast.enable_int8_prefill(model.encode(model.render_chat(native.KV_CALIBRATION)))
    return plain, fast, model


def test_prompt_chunks_run_on_the_int8_graph_and_decode_steps_do_not(decoders):
    _, fast, model = decoders
    calls: list[str] = []
    for name, session in (("prefill", fast._prefill), ("decode", fast.session)):
        run = session.run_with_iobinding
        session.run_with_iobinding = lambda io, *a, _run=run, _name=name: (calls.append(_name), _run(io, *a))[
            1
        ]
    try:
        ids = model.encode(TEXT)
        fast.reserve(len(ids) + 1, [0] * fast.slots)
        fast.step(np.asarray([ids[:40]]), np.zeros(1, dtype=np.int64))  # 40 tokens: prefill
        fast.step(np.asarray([ids[40:50]]), np.asarray([40]))  # 10 (< PREFILL_INT8_MIN): the model's weights
        fast.step(np.asarray([[ids[50]]]), np.asarray([50]))  # a decode step
        fast.step(np.asarray([ids[51:71]]), np.asarray([51]), every=True)  # every position: verification
    finally:
        for session in (fast._prefill, fast.session):
            del session.run_with_iobinding
    assert calls == ["prefill", "decode", "decode", "decode"]


def test_int8_prefill_keeps_the_model_s_predictions(decoders):
    """The prompt's keys and values come from the int8 graph, the next tokens from the model's weights:
    measured on Python's docs (NOTES.md lever 24) perplexity +0.2 %."""
    plain, fast, model = decoders
    ids = model.encode(TEXT)
    nll_plain, best_plain = _teacher_forced(plain, ids, 48)
    nll_fast, best_fast = _teacher_forced(fast, ids, 48)
    assert abs(nll_fast.mean() - nll_plain.mean()) < 0.05, (nll_plain.mean(), nll_fast.mean())
    assert (best_fast == best_plain).mean() >= 0.9


def test_the_prefill_graph_replaces_every_matrix_but_the_head(pulled, decoders):
    _, fast, _ = decoders
    peaks = {}
    matrices = sum(1 for node in fast._proto.graph.node if prefill8.replaced(node))
    for node in fast._proto.graph.node:
        if prefill8.replaced(node):
            k = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "K")
            peaks[node.input[0]] = np.ones(k, dtype=np.float32)
    import onnx

    data, weights = prefill8.prefill_graph(fast._proto, fast._path, peaks)
    graph = onnx.load_from_string(data).graph
    ops = [n.op_type for n in graph.node]
    # the int8 matrices travel beside the graph (declared external, handed to onnxruntime in place)
    assert len(weights) == matrices and all(w.dtype == np.int8 for w in weights.values())
    assert len(data) < 50_000_000
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMulIntegerToFloat") == matrices > 100
    names = {i.name for i in graph.initializer}
    assert not any(name.endswith("_Q4") or "weight_Q4" in name for name in names)  # int4 matrices gone


def test_a_model_loaded_with_int8_prefill_and_kv_cache_serves(pulled):
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler
    from ortllm.store import ModelStore

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ORTLLM_PREFILL", "int8")
        mp.setenv("ORTLLM_KV_CACHE", "int8")
        model = LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher="native")
    assert model.info.prefill == "int8" and "int8 prefill" in model.info.runtime
    assert model.info.kv_cache == "int8"
    scheduler = Scheduler(model, batcher="native")
    try:
        long_question = [{"role": "user", "content": TEXT + "\n\nWhat is the capital of France?"}]
        for messages in (QUESTION, long_question):
            result = scheduler.generate(
                GenerationRequest(validate_options({"temperature": 0, "max_tokens": 24}), messages=messages)
            )
            assert result.usage.completion_tokens > 0 and result.text.strip()
        assert (
            "Paris"
            in scheduler.generate(
                GenerationRequest(validate_options({"temperature": 0, "max_tokens": 24}), messages=QUESTION)
            ).text
        )
    finally:
        scheduler.close()
