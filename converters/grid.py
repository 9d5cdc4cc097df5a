"""Keep a GGUF's own quantisation grid where onnxruntime's fast kernels hold it exactly.

A GGUF `Q4_0` block is `d·(q−8)`, q in 0..15: MatMulNBits' symmetric int4 with block 32 and its default zero
point 8. A `Q8_0` block is `d·q`, q in −127..127: symmetric int8, block 32, zero point 128. The builder gets the
dequantised float weights and quantises them again (int4 everywhere, int8 for its mixed-precision picks); for the
matrices whose source blocks are Q4_0 or Q8_0 this pass writes the source grid back, bit for bit, and checks it:
each block's scale is recovered from its float values and every value must come back exactly. `Q4_1`/`Q4_K`/
`Q5_*`/`Q6_K` blocks need float zero points or other widths, which onnxruntime's CPU kernel runs only on a slow
path: those matrices keep the builder's re-quantisation. The report says which is which (`ortllm show`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .embeddings import QUANTIZED_GATHER, _save

BLOCK = 32
EXACT = {"Q4_0": 4, "Q8_0": 8}  # GGUF block types with an exact MatMulNBits equivalent at block 32

# the builder's fused MatMuls (its module names) → the Hugging Face linear layers they hold, in row order
_FUSED = {
    "attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.q_proj": ("self_attn.q_proj",),
    "attn.k_proj": ("self_attn.k_proj",),
    "attn.v_proj": ("self_attn.v_proj",),
    "attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_proj": ("mlp.gate_proj",),
    "mlp.up_proj": ("mlp.up_proj",),
    "mlp.down_proj": ("mlp.down_proj",),
}
# Hugging Face linear layer → its GGUF tensor (llama.cpp's names; the same for Llama, Mistral, Qwen, Gemma)
_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def exact_codes(weight: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """MatMulNBits codes (uint8, zero point 2^(bits−1)) and per-block scales that reproduce `weight` exactly,
    or None when some block is not on a symmetric grid of that width (then it must be re-quantised)."""
    rows, cols = weight.shape
    if cols % BLOCK:
        return None
    blocks = weight.astype(np.float32).reshape(rows, cols // BLOCK, BLOCK)
    peak = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)
    # Q4_0's quantiser maps a block's largest magnitude to q=0 (−8·d); Q8_0's maps it to ±127
    scale = peak / -8.0 if bits == 4 else np.abs(peak) / 127.0
    scale = scale.astype(np.float32)
    scale[scale == 0] = 1.0
    mid = 1 << (bits - 1)
    q = np.rint(blocks / scale)
    if q.min() < -mid or q.max() > mid - 1 or not np.array_equal(q * scale, blocks):
        return None
    codes = (q + mid).astype(np.uint8).reshape(rows, cols)
    if bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return codes.reshape(rows, cols // BLOCK, -1), scale.reshape(rows, -1)


def source_types(gguf: Path) -> dict[str, str]:
    """GGUF tensor name → its block type (`Q4_0`, `Q8_0`, `Q4_K`, …)."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(gguf)).tensors}


def _sources(module: str, tied: bool) -> tuple[list[str], list[str]] | None:
    """The Hugging Face weights and GGUF tensors behind a builder MatMul module, or None if unknown."""
    if module == "lm_head":
        return (
            (["model.embed_tokens.weight"], ["token_embd.weight"])
            if tied
            else (
                ["lm_head.weight"],
                ["output.weight"],
            )
        )
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module)
    if not m or m.group(2) not in _FUSED:
        return None
    layer, parts = m.group(1), _FUSED[m.group(2)]
    hf = [f"model.layers.{layer}.{p}.weight" for p in parts]
    gg = [f"blk.{layer}.{_GGUF_NAMES[p]}.weight" for p in parts]
    return hf, gg


def keep_source_grid(
    out_dir: Path, hf_dir: Path, gguf: Path | dict[str, str], budget: int | None = None
) -> dict[str, Any]:
    """Rewrite out_dir/model.onnx's MatMulNBits from Q4_0/Q8_0 sources to the exact source grid; report per
    matrix which kept its grid (`exact`) and which were re-quantised (with their source type). `gguf` is the
    GGUF file or its tensor types (`source_types`). A matrix that would take the folder above `budget` bytes
    (an int8 Q8_0 table is twice its int4 form, and its fp32 scales twice the GGUF's fp16) stays int4."""
    import onnx_ir as ir
    from safetensors import safe_open

    types = gguf if isinstance(gguf, dict) else source_types(gguf)
    tied = "output.weight" not in types
    model = ir.load(str(out_dir / "model.onnx"))
    graph = model.graph
    files = sorted(hf_dir.glob("*.safetensors"))
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), "np") as sf:
            where.update({k: f for k in sf.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    exact: list[str] = []
    exact_types: Counter[str] = Counter()
    requantised: Counter[str] = Counter()
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    nodes = {n.name: n for n in graph}
    for node in list(graph):
        if node.op_type != "MatMulNBits":
            continue
        weight_in = node.inputs[1]
        module = ((weight_in.name if weight_in is not None else None) or "").split(".MatMul.")[0]
        found = _sources(module, tied)
        kinds = [types.get(g, "?") for g in found[1]] if found else ["?"]
        kind = kinds[0] if len(set(kinds)) == 1 else "+".join(sorted(set(kinds)))
        bits = EXACT.get(kind)
        if found is None or bits is None or any(h not in where for h in found[0]):
            requantised[kind] += 1
            continue
        weight = np.concatenate([_tensor(where[h], h) for h in found[0]], axis=0)
        packed = exact_codes(weight, bits)
        if packed is None:
            requantised[f"{kind} (off-grid blocks)"] += 1
            continue
        extra = sum(a.nbytes for a in packed) - sum(_nbytes(v) for v in node.inputs[1:3])
        if budget is not None and size + extra > budget:
            requantised[f"{kind} (over the size budget)"] += 1
            continue
        size += extra
        _replace(graph, node, packed, bits, module, nodes)
        exact.append(module)
        exact_types[kind] += 1
    if exact:
        _save(model, out_dir)
    report = {
        "exact": len(exact),
        "exact_types": dict(exact_types),
        "requantised": dict(requantised),
        "lm_head": "lm_head" in exact,
    }
    (out_dir / "grid.json").write_text(json.dumps({**report, "exact_matrices": exact}, indent=1))
    return report


def _nbytes(value: Any) -> int:
    return value.const_value.nbytes if value is not None and value.const_value is not None else 0


def _tensor(path: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), "np") as sf:
        return sf.get_tensor(name)


def _replace(
    graph: Any, node: Any, packed: tuple[np.ndarray, np.ndarray], bits: int, module: str, nodes: dict
) -> None:
    """Point `node` (and a GatherBlockQuantized sharing its weights) at the exact codes and scales."""
    import onnx_ir as ir

    codes, scales = packed
    old_b, old_s = node.inputs[1], node.inputs[2]
    name = f"{module}.MatMul.weight_Q{bits}"
    b_val = ir.Value(name=f"{name}_exact", const_value=ir.tensor(codes, name=f"{name}_exact"))
    s_val = ir.Value(name=f"{module}.MatMul.weight_scales_exact", const_value=ir.tensor(scales.reshape(-1)))
    s_val.const_value.name = s_val.name  # type: ignore[union-attr]
    if old_s.const_value is not None and old_s.const_value.shape.numpy() != scales.reshape(-1).shape:
        s_val.const_value = ir.tensor(scales.reshape(old_s.const_value.shape.numpy()), name=s_val.name)
    for value in (b_val, s_val):
        graph.register_initializer(value)
    node.replace_input_with(1, b_val)
    node.replace_input_with(2, s_val)
    node.attributes["bits"] = ir.AttrInt64("bits", bits)
    gather = nodes.get(QUANTIZED_GATHER)
    if module == "lm_head" and gather is not None:
        _reshare(graph, gather, old_b, old_s, b_val, s_val, codes, bits)
    for old in (old_b, old_s):
        if not old.uses() and old.name in graph.initializers:
            graph.initializers.pop(old.name)


def _reshare(
    graph: Any, gather: Any, old_b: Any, old_s: Any, b_val: Any, s_val: Any, codes: np.ndarray, bits: int
) -> None:
    """The tied embedding reads the LM head's weights through a Reshape: give it the new ones, at the new width."""
    import onnx_ir as ir

    data = gather.inputs[0]
    producer = data.producer() if data is not None else None
    reshaped = producer is not None and producer.op_type == "Reshape" and producer.inputs[0] is old_b
    if not (reshaped or data is old_b):
        return  # an untied model's embedding has tables of its own
    if reshaped:
        assert producer is not None
        shape = np.array([codes.shape[0], codes.shape[1] * codes.shape[2]], dtype=np.int64)
        shape_val = ir.Value(
            name=f"{b_val.name}/shape", const_value=ir.tensor(shape, name=f"{b_val.name}/shape")
        )
        graph.register_initializer(shape_val)
        old_shape = producer.inputs[1]
        producer.replace_input_with(0, b_val)
        producer.replace_input_with(1, shape_val)
        producer.outputs[0].shape = ir.Shape(shape.tolist())
        if old_shape is not None and not old_shape.uses() and old_shape.name in graph.initializers:
            graph.initializers.pop(old_shape.name)
    else:
        gather.replace_input_with(0, b_val)
    if gather.inputs[2] is old_s:
        gather.replace_input_with(2, s_val)
    gather.attributes["bits"] = ir.AttrInt64("bits", bits)
