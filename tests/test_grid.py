"""A GGUF's Q4_0/Q8_0 blocks survive conversion bit for bit (converters/grid.py); other types are re-quantised."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ortllm.converters.grid import BLOCK, exact_codes
from tests.conftest import DEFAULT_MODEL, ortllm

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def round_trip(weight: np.ndarray, kind) -> np.ndarray:
    """llama.cpp's reference quantiser (gguf-py), then back to float: what a dequantised GGUF holds."""
    return gguf.quants.dequantize(gguf.quants.quantize(weight.astype(np.float32), kind), kind).reshape(
        weight.shape
    )


def unpack(codes: np.ndarray, scales: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """MatMulNBits' float weights ([N, K]) from its packed codes and scales (default zero point)."""
    rows = codes.shape[0]
    flat = codes.reshape(rows, -1)
    if bits == 4:
        flat = np.stack([flat & 0x0F, flat >> 4], axis=-1).reshape(rows, -1)
    values = flat.astype(np.float32) - (1 << (bits - 1))
    return (values.reshape(rows, -1, BLOCK) * scales.reshape(rows, -1, 1)).reshape(rows, -1)[:, :cols]


@pytest.mark.parametrize(("kind", "bits"), [(Q.Q4_0, 4), (Q.Q8_0, 8)])
def test_exact_codes_give_back_a_reference_quantised_matrix_bit_for_bit(kind, bits):
    weight = round_trip(np.random.default_rng(0).normal(size=(48, 256)).astype(np.float32), kind)
    codes, scales = exact_codes(weight, bits)
    assert np.array_equal(unpack(codes, scales, bits, 256), weight)


def test_blocks_off_a_symmetric_grid_are_left_to_re_quantisation():
    weight = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    assert exact_codes(weight, 4) is None and exact_codes(weight, 8) is None
    assert exact_codes(round_trip(weight, Q.Q4_1), 4) is None  # Q4_1 carries a float offset per block


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def q4_0_model(request, pulled, tmp_path_factory) -> tuple[Path, Path, dict]:
    """A tiny Llama whose linear weights are Q4_0 blocks and whose LM head is Q8_0, as a GGUF holds them: tied
    to the embedding, or untied beside a Q4_K embedding (re-quantised into a table of its own)."""
    tied = request.param
    import torch
    import transformers

    src = tmp_path_factory.mktemp("q40") / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=49152, max_position_embeddings=512, tie_word_embeddings=tied,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("proj.weight"):
                param.copy_(torch.from_numpy(round_trip(param.numpy(), Q.Q4_0)))
            elif name == ("model.embed_tokens.weight" if tied else "lm_head.weight"):
                param.copy_(torch.from_numpy(round_trip(param.numpy(), Q.Q8_0)))
    model.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pulled / "cpu-int4" / f, src / f)
    types = {"token_embd.weight": "Q8_0"} if tied else {"token_embd.weight": "Q4_K", "output.weight": "Q8_0"}
    for i in range(2):
        for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
            types[f"blk.{i}.{t}.weight"] = "Q4_0"
    from ortllm.converters import genai

    out = src.parent / "onnx"
    info = genai.build(
        src, out, precision="int4", ep="cpu", cache_dir=src.parent / "cache", log_path=src.parent / "b.log",
        gguf=types,
    )  # fmt: skip
    return src, out, info


def test_a_q4_0_model_keeps_every_matrix_on_its_source_grid(q4_0_model):
    import onnx
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    src, out, info = q4_0_model
    assert (
        info["grid"]["exact"] == 11 and info["grid"]["requantised"] == {}
    )  # 2 × (qkv, o, gate, up, down) + head
    assert "matmul_mixed_precision" not in info["extra_options"]  # the GGUF's widths, not the builder's picks
    weights = load_file(str(next(src.glob("*.safetensors"))))
    model = onnx.load(str(out / "model.onnx"))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    checked = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in node.attribute}
        module = node.input[1].split(".MatMul.")[0]
        if module == "lm_head":
            expected = weights[
                "model.embed_tokens.weight" if "lm_head.weight" not in weights else "lm_head.weight"
            ]
            assert attrs["bits"] == 8
        else:
            layer, part = module.split(".")[2], module.split(".", 3)[3]
            names = {"attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}.get(
                part, [part.replace("attn.", "self_attn.")]
            )
            expected = np.concatenate([weights[f"model.layers.{layer}.{n}.weight"] for n in names])
            assert attrs["bits"] == 4
        got = unpack(inits[node.input[1]], inits[node.input[2]], attrs["bits"], attrs["K"])
        assert np.array_equal(got, expected), module
        checked += 1
    assert checked == 11
    # and it runs: one forward pass through onnxruntime (a mis-wired embedding fails to load)
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fidelity import onnx_inputs

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    (logits,) = session.run(["logits"], onnx_inputs(session, out, ids))
    assert logits.shape[-1] == 49152 and np.isfinite(logits).all()


def test_the_converted_test_model_shows_which_matrices_kept_their_grid(pulled):
    """SmolLM2's GGUF: a Q4_1 body (re-quantised) and a Q8_0 tied embedding, kept exactly as int8."""
    manifest = json.loads((pulled / "manifest.json").read_text())
    grid = next(iter(manifest["variants"].values()))["grid"]
    assert grid["exact"] == 1 and grid["exact_types"] == {"Q8_0": 1} and grid["requantised"] == {"Q4_1": 150}
    assert next(iter(manifest["variants"].values()))["embeddings"] == (
        "int8 (the GGUF's Q8_0, exact), shared with the LM head"
    )
    shown = ortllm("show", DEFAULT_MODEL, check=True).stdout
    assert "source grid: 1 matrix kept exactly (Q8_0), 150 re-quantised (Q4_1: 150)" in " ".join(
        shown.split()
    )
