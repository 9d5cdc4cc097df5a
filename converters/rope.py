"""Rotary caches computed when the model loads instead of stored in it.

The genai builder stores GroupQueryAttention's `cos_cache`/`sin_cache` as float32 tables of context length ×
head_size/2: Gemma 3 270M carries four of 32768 × 128 (local and global rotary bases), 67 MB of a 277 MB
model; Llama 3.2 1B's 131072-token context would carry 34 MB. Each table is cos(p·f_i)·m (or sin) for
position p, frequency f_i and magnitude m, computed in float32. This module recovers f and m from the
table, recomputes the table with float32 numpy the way an onnxruntime Mul + Cos/Sin would, and when that
gives the stored numbers back (to 1e-6: one or two units in the last place) replaces the table by those
nodes over a 128-byte-per-column frequency row. onnxruntime folds constant nodes when it creates a session
(onnxruntime-genai's sessions too), so the tables exist again in memory at load, a few milliseconds of
work, and the file no longer carries them. A table that does not come back (another rotary form) stays.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .embeddings import _save

_CACHE = re.compile(r"^(cos|sin)_cache(.*)$")
TOLERANCE = 1e-6
FIT_ROWS = 4096  # positions the frequencies are fitted on (their phases unwrapped)


def frequencies(cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Each column's frequency f (float32): the slope of its unwrapped phase over the first positions."""
    rows = min(len(cos), FIT_ROWS)
    phase = np.unwrap(np.arctan2(sin[:rows].astype(np.float64), cos[:rows].astype(np.float64)), axis=0)
    p = np.arange(rows, dtype=np.float64)
    return ((phase * p[:, None]).sum(axis=0) / (p * p).sum()).astype(np.float32)


def recompute(rows: int, freq: np.ndarray, magnitude: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The tables as the replacing nodes compute them (float32 throughout)."""
    angles = np.arange(rows, dtype=np.float32)[:, None] * freq[None, :]
    cos, sin = np.cos(angles), np.sin(angles)
    if magnitude != 1.0:
        cos, sin = cos * magnitude, sin * magnitude
    return cos, sin


def compute_rope_caches(out_dir: Path) -> dict[str, Any]:
    """Replace out_dir/model.onnx's stored rotary tables by nodes computing them; report what it saved."""
    import onnx_ir as ir

    model = ir.load(str(out_dir / "model.onnx"))
    graph = model.graph
    pairs: dict[str, dict[str, Any]] = {}
    for name, value in graph.initializers.items():
        match = _CACHE.match(name)
        if match and value.const_value is not None:
            pairs.setdefault(match.group(2), {})[match.group(1)] = value
    added: list[Any] = []
    positions: dict[int, Any] = {}  # rows → the Range of positions, shared by the tables of that length
    saved, kept, computed = 0, 0, 0
    for suffix, pair in sorted(pairs.items()):
        if set(pair) != {"cos", "sin"}:
            kept += len(pair)
            continue
        cos, sin = pair["cos"].const_value.numpy(), pair["sin"].const_value.numpy()
        magnitude = np.float32(cos[0, 0]) if cos.ndim == 2 and cos.size else np.float32(0)
        if (
            cos.dtype != np.float32
            or cos.shape != sin.shape
            or cos.ndim != 2
            or len(cos) < 2
            or magnitude <= 0
            or not np.all(cos[0] == magnitude)
        ):
            kept += 2
            continue
        freq = frequencies(cos, sin)
        again_cos, again_sin = recompute(len(cos), freq, magnitude)
        if max(np.abs(again_cos - cos).max(), np.abs(again_sin - sin).max()) > TOLERANCE:
            kept += 2
            continue
        rows = len(cos)
        if rows not in positions:
            consts = [
                ir.Value(
                    name=f"ortllm_rope_{label}_{rows}", const_value=ir.tensor(np.array(v, dtype=np.float32))
                )
                for label, v in (("start", 0.0), ("limit", float(rows)), ("delta", 1.0))
            ]
            axes = ir.Value(
                name=f"ortllm_rope_axes_{rows}", const_value=ir.tensor(np.array([1], dtype=np.int64))
            )
            for value in (*consts, axes):
                graph.register_initializer(value)
            steps = ir.node("Range", consts, name=f"/ortllm/rope/positions_{rows}/Range")
            column = ir.node(
                "Unsqueeze", [steps.outputs[0], axes], name=f"/ortllm/rope/positions_{rows}/Unsqueeze"
            )
            added += [steps, column]
            positions[rows] = column.outputs[0]
        freq_value = ir.Value(name=f"ortllm_rope_freq{suffix}", const_value=ir.tensor(freq[None, :]))
        graph.register_initializer(freq_value)
        angles = ir.node("Mul", [positions[rows], freq_value], name=f"/ortllm/rope{suffix}/Mul")
        added.append(angles)
        for kind, op in (("cos", "Cos"), ("sin", "Sin")):
            node = ir.node(op, [angles.outputs[0]], name=f"/ortllm/rope{suffix}/{op}")
            added.append(node)
            result = node.outputs[0]
            if magnitude != 1.0:
                scale = ir.Value(
                    name=f"ortllm_rope_magnitude{suffix}_{kind}",
                    const_value=ir.tensor(np.array(magnitude, dtype=np.float32)),
                )
                graph.register_initializer(scale)
                scaled = ir.node("Mul", [result, scale], name=f"/ortllm/rope{suffix}/{op}/Mul")
                added.append(scaled)
                result = scaled.outputs[0]
            stored = pair[kind]
            name = stored.name
            result.dtype = ir.DataType.FLOAT
            result.shape = ir.Shape(list(cos.shape))
            ir.convenience.replace_all_uses_with(stored, result)
            graph.initializers.pop(name)
            result.name = name
            saved += cos.nbytes
            computed += 1
    if not added:
        return {"computed": 0, "kept": kept, "saved_bytes": 0}
    graph.insert_before(graph.node(0), added)
    _save(model, out_dir)
    return {"computed": computed, "kept": kept, "saved_bytes": saved}
