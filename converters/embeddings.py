"""Quantise a built model's float token-embedding table (the 0.18 builder only does so for tied models)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

GATHER = "/model/embed_tokens/Gather"
QUANTIZED_GATHER = "/model/embed_tokens/GatherBlockQuantized"
ROWS_PER_CHUNK = 8192  # bounds the float temporaries of a 150k-row vocabulary to ~100 MB


def quantise_table(table: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block quantisation in GatherBlockQuantized's layout: packed uint8 data, per-block scales.

    Each block's largest-magnitude value maps exactly onto the grid's end (-8 or -128, as MLAS does), and
    the stored codes are offset by 8 / 128, the operator's default zero point.
    """
    rows, cols = table.shape
    padded = -(-cols // block_size) * block_size
    qmax = 1 << (bits - 1)
    data = np.empty((rows, padded * bits // 8), dtype=np.uint8)
    scales = np.empty((rows, padded // block_size), dtype=table.dtype)
    for start in range(0, rows, ROWS_PER_CHUNK):
        chunk = table[start : start + ROWS_PER_CHUNK].astype(np.float32)
        chunk = np.pad(chunk, ((0, 0), (0, padded - cols))).reshape(len(chunk), -1, block_size)
        peak = np.take_along_axis(chunk, np.abs(chunk).argmax(-1)[..., None], -1)
        scale = peak / -qmax
        scale[scale == 0] = 1.0
        codes = (np.clip(np.rint(chunk / scale), -qmax, qmax - 1) + qmax).astype(np.uint8)
        codes = codes.reshape(len(chunk), padded)
        if bits == 4:
            codes = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
        data[start : start + len(chunk)] = codes
        scales[start : start + len(chunk)] = scale[..., 0]
    return data, scales


def dequantise_table(
    data: np.ndarray, scales: np.ndarray, bits: int, block_size: int, cols: int
) -> np.ndarray:
    """The float table GatherBlockQuantized reads back from `quantise_table`'s output (for checks): the same
    block layout as MatMulNBits' weights, so the runtime's reader of that layout reads it."""
    from ortllm.runtime.backends.prefill8 import dequantize

    rows, blocks = scales.shape
    return dequantize(data.reshape(rows, blocks, -1), scales, None, cols, rows, bits, block_size)


def quantise_embeddings(out_dir: Path, bits: int, block_size: int) -> str:
    """Replace the float Gather over the embedding table in out_dir/model.onnx; say what the table is now."""
    import onnx_ir as ir

    path = out_dir / "model.onnx"
    model = ir.load(str(path))
    graph = model.graph
    nodes = {node.name: node for node in graph}
    if QUANTIZED_GATHER in nodes:
        bits_attr = nodes[QUANTIZED_GATHER].attributes.get("bits")
        return f"int{bits_attr.as_int() if bits_attr else 4}, shared with the LM head"
    gather = nodes.get(GATHER)
    table = gather.inputs[0] if gather is not None else None
    if gather is None or table is None or table.const_value is None:
        return "float, shared with the LM head" if gather is not None else "not found"
    weights = table.const_value.numpy()
    rows, cols = weights.shape
    data, scales = quantise_table(weights, bits, block_size)
    del weights
    name = table.name or "model.embed_tokens.weight"
    q_data = ir.Value(name=f"{name}_Q{bits}", const_value=ir.tensor(data, name=f"{name}_Q{bits}"))
    q_scales = ir.Value(name=f"{name}_scales", const_value=ir.tensor(scales, name=f"{name}_scales"))
    for value in (q_data, q_scales):
        graph.register_initializer(value)
    padded = scales.shape[1] * block_size
    attrs: dict[str, Any] = {"bits": bits, "block_size": block_size, "gather_axis": 0, "quantize_axis": 1}
    new = ir.node(
        "GatherBlockQuantized",
        [q_data, gather.inputs[1], q_scales],
        attrs,
        domain="com.microsoft",
        name=QUANTIZED_GATHER,
    )
    added = [new]
    result = new.outputs[0]
    dtype = gather.outputs[0].dtype
    assert dtype is not None  # the builder's graphs type every value
    result.dtype = dtype
    if padded != cols:  # the padded columns of the last block are sliced off again
        consts = [
            ir.Value(name=f"{QUANTIZED_GATHER}/{label}", const_value=ir.tensor(np.array([v], dtype=np.int64)))
            for label, v in (("starts", 0), ("ends", cols), ("axes", -1))
        ]
        for value in consts:
            graph.register_initializer(value)
        added.append(ir.node("Slice", [result, *consts], name="/model/embed_tokens/Slice"))
        result = added[-1].outputs[0]
        result.dtype = dtype
    result.shape = gather.outputs[0].shape
    graph.insert_after(gather, added)
    old_name = gather.outputs[0].name
    ir.convenience.replace_all_uses_with(gather.outputs[0], result, replace_graph_outputs=True)
    graph.remove(gather, safe=True)
    result.name = old_name
    graph.initializers.pop(name)
    _save(model, out_dir)
    return f"int{bits} (block {block_size}), separate from the LM head"


def _save(model: Any, out_dir: Path) -> None:
    """Write model.onnx + model.onnx.data next to the old pair, then swap them in (the old data is mmapped)."""
    import onnx_ir as ir

    staging = out_dir / ".embeddings"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    ir.save(model, str(staging / "model.onnx"), external_data="model.onnx.data")
    del model
    for name in ("model.onnx.data", "model.onnx"):
        os.replace(staging / name, out_dir / name)
    shutil.rmtree(staging, ignore_errors=True)
