"""A GGUF's own blocks survive conversion (converters/grid.py): codes and scales bit for bit, offsets as block sums."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from ortllm.converters.grid import SOURCE_TYPES, Blocks, _rank, _row_order, decode, on_grid
from tests.conftest import DEFAULT_MODEL, ortllm

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def raw_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """GGUF blocks of `kind` ([rows, bytes]) as llama.cpp writes them: its reference quantiser where gguf-py has
    one, else random codes, scales and mins (valid K-quant blocks; gguf-py can only read those)."""
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        return gguf.quants.quantize(rng.normal(size=(rows, cols)).astype(np.float32) * 0.05, Q[kind])
    size = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}[kind]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)

    def fp16(values: np.ndarray) -> np.ndarray:
        return values.astype(np.float16).view(np.uint8).reshape(-1, 2)

    count = len(blocks)
    if kind == "Q6_K":
        blocks[:, 208:210] = fp16(rng.uniform(1e-4, 1e-3, count))
    else:
        blocks[:, 0:2] = fp16(rng.uniform(1e-4, 1e-3, count))
        blocks[:, 2:4] = fp16(rng.uniform(1e-4, 1e-3, count))
    return blocks.reshape(rows, -1)


def dequantised(raw: np.ndarray, kind: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, Q[kind]).astype(np.float32)


@pytest.mark.parametrize("kind", sorted(SOURCE_TYPES))
def test_every_source_type_decodes_to_gguf_pys_own_values(kind):
    """value = scale · code + offset per block reproduces gguf-py's dequantiser, and so does the MatMulNBits grid
    (integer zero point + residual offset) the matrix is rewritten to."""
    raw = raw_blocks(kind, 6, 512, np.random.default_rng(0))
    expected = dequantised(raw, kind)
    codes, scale, offset = decode(kind, raw)
    block = SOURCE_TYPES[kind][1]
    values = codes.reshape(6, -1, block) * scale[..., None] + offset[..., None]
    assert np.allclose(values.reshape(6, -1), expected, rtol=0, atol=1e-7)
    grid = on_grid([(kind, codes, scale, offset)])
    assert grid.bits == (4 if SOURCE_TYPES[kind][0] == 4 else 8) and grid.block == block
    assert np.allclose(grid.values(), expected, rtol=0, atol=1e-7)
    # symmetric types need neither zero points nor offsets: the fast path exactly as before
    assert grid.has_offset == (kind in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"))


def test_rows_permuted_by_transformers_are_matched_back():
    source = np.random.default_rng(2).normal(size=(16, 32)).astype(np.float32)
    order = np.random.default_rng(3).permutation(16)
    assert np.array_equal(_row_order(source, source[order]), order)
    assert _row_order(source, source + 1e-3) is None


# a tiny Llama (hidden 256, MLP 512, 2 layers) whose linear weights are every GGUF type this reads
LAYER_TYPES = [
    {"attn_q": "Q4_1", "attn_k": "Q4_1", "attn_v": "Q4_1", "attn_output": "Q4_0", "ffn_gate": "Q4_K",
     "ffn_up": "Q5_0", "ffn_down": "Q6_K"},
    {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": "Q8_0", "attn_output": "Q5_1", "ffn_gate": "Q8_0",
     "ffn_up": "Q5_K", "ffn_down": "Q4_K"},
]  # fmt: skip
HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj"}  # fmt: skip


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def gguf_model(request, pulled, tmp_path_factory) -> tuple[Path, Path, dict]:
    """The model as a GGUF (its tensors) and as the float folder transformers would dequantise it to; tied with a
    Q8_0 table, or untied with a Q6_K LM head beside a Q4_K table; converted by genai.build with room enough
    for every int8 matrix (`--max-size 4`)."""
    tied = request.param
    import torch
    import transformers

    from ortllm.converters import genai

    work = tmp_path_factory.mktemp("grid")
    src = work / "hf"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=49152, max_position_embeddings=512, tie_word_embeddings=tied,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    rng = np.random.default_rng(1)
    writer = gguf.GGUFWriter(str(work / "model.gguf"), "llama")
    params = dict(model.named_parameters())

    def put(gguf_name: str, hf_name: str, kind: str) -> None:
        rows, cols = params[hf_name].shape
        raw = raw_blocks(kind, rows, cols, rng)
        writer.add_tensor(gguf_name, raw, raw_dtype=Q[kind])
        with torch.no_grad():
            params[hf_name].copy_(torch.from_numpy(dequantised(raw, kind)))

    for layer, types in enumerate(LAYER_TYPES):
        for name, kind in types.items():
            put(f"blk.{layer}.{name}.weight", f"model.layers.{layer}.{HF_NAMES[name]}.weight", kind)
    if tied:
        put("token_embd.weight", "model.embed_tokens.weight", "Q8_0")
    else:
        put("token_embd.weight", "model.embed_tokens.weight", "Q4_K")
        put("output.weight", "lm_head.weight", "Q6_K")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(pulled / "cpu-int4" / f, src / f)
    out = work / "onnx"
    info = genai.build(
        src, out, precision="int4", ep="cpu", cache_dir=work / "cache", log_path=work / "b.log",
        gguf=work / "model.gguf", max_size=4.0,
    )  # fmt: skip
    return src, out, info


def run_matmul(model, node, x: np.ndarray) -> np.ndarray:
    """One MatMulNBits of the converted model (with the block sums its input is extended by) on input x."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    made = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    nodes, needed = [], set(node.input)
    head = made.get(node.input[0])
    if head is not None and head.op_type == "Concat":  # Reshape → ReduceSum → Concat(x, sums)
        total = made[head.input[1]]
        split = made[total.input[0]]
        nodes = [split, total, head]
        needed |= set(split.input) | set(total.input)
        x_name = split.input[0]
    else:
        x_name = node.input[0]
    graph = helper.make_graph(
        [*nodes, node], "one",
        [helper.make_tensor_value_info(x_name, onnx.TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, None)],
        [inits[n] for n in needed if n in inits],
    )  # fmt: skip
    one = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    session = ort.InferenceSession(one.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {x_name: x})[0]


def test_every_matrix_keeps_its_source_grid_and_computes_the_source_weights(gguf_model):
    import onnx
    from safetensors.numpy import load_file

    src, out, info = gguf_model
    grid = info["grid"]
    assert grid["exact"] == 11 and grid["requantised"] == {}, grid  # 2 × (qkv, o, gate, up, down) + head
    assert grid["size_budget"] == 4.0
    assert "matmul_mixed_precision" not in info["extra_options"]  # the GGUF's widths, not the builder's picks
    weights = load_file(str(next(src.glob("*.safetensors"))))
    model = onnx.load(str(out / "model.onnx"))
    rng = np.random.default_rng(4)
    checked = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        module = node.input[1].split(".MatMul.")[0]
        if module == "lm_head":
            expected = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
        else:
            layer, part = module.split(".")[2], module.split(".", 3)[3]
            names = {"attn.qkv_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]}.get(
                part, [part.replace("attn.", "self_attn.")]
            )
            expected = np.concatenate([weights[f"model.layers.{layer}.{n}.weight"] for n in names])
        x = rng.normal(size=(1, 3, expected.shape[1])).astype(np.float32)
        got = run_matmul(model, node, x)
        want = x @ expected.T
        # int8 activations (accuracy level 4) are the only rounding left; a grid re-quantised to int4 is ~10x off
        error = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert error < 0.01, (module, error)
        checked += 1
    assert checked == 11
    # and the whole model runs: one forward pass through onnxruntime (a mis-wired embedding fails to load)
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from fidelity import onnx_inputs

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[1, 2, 3, 4]], dtype=np.int64)
    (logits,) = session.run(["logits"], onnx_inputs(session, out, ids))
    assert logits.shape[-1] == 49152 and np.isfinite(logits).all()


def test_the_size_plan_keeps_4_bit_grids_first_then_the_head_then_values_and_down_projections():
    four = Blocks(np.zeros((2, 32), np.uint8), *(np.zeros((2, 1), t) for t in (np.float32, np.uint8, np.float32)),
                  bits=4, block=32, kinds=("Q4_1",))  # fmt: skip
    eight = Blocks(four.codes, four.scale, four.zero, four.offset, bits=8, block=32, kinds=("Q5_0",))
    ranked = sorted(
        [
            _rank("model.layers.3.mlp.up_proj", eight, 100),
            _rank("model.layers.0.mlp.up_proj", eight, 100),
            _rank("model.layers.5.mlp.down_proj", eight, 100),
            _rank("model.layers.5.attn.qkv_proj", eight, 100),
            _rank("lm_head", eight, 100),
            _rank("model.layers.9.mlp.gate_proj", four, 5),
        ]
    )
    assert [r[-1] for r in ranked] == [
        "model.layers.9.mlp.gate_proj", "lm_head", "model.layers.5.attn.qkv_proj", "model.layers.5.mlp.down_proj",
        "model.layers.0.mlp.up_proj", "model.layers.3.mlp.up_proj",
    ]  # fmt: skip


def test_the_converted_test_model_shows_which_matrices_kept_their_grid(pulled):
    """SmolLM2's GGUF: a Q4_1 body (codes and scales kept, offsets through block sums) and a Q8_0 tied embedding,
    kept exactly as int8, within 1.1x the GGUF's size."""
    manifest = json.loads((pulled / "manifest.json").read_text())
    variant = next(iter(manifest["variants"].values()))
    grid = variant["grid"]
    assert grid["exact_types"] == {"Q4_1": 150, "Q8_0": 1} and grid["requantised"] == {}, grid
    assert variant["embeddings"] == "int8 (the GGUF's Q8_0, exact), shared with the LM head"
    source = Path(variant["source_weights"])
    assert variant["size_bytes"] <= 1.1 * source.stat().st_size
    shown = ortllm("show", DEFAULT_MODEL, check=True).stdout
    assert "source grid: 151 matrices kept (Q4_1: 150, Q8_0: 1), 0 re-quantised" in " ".join(shown.split())
