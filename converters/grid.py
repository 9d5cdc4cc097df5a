"""Keep a GGUF's own quantisation grid, read from its raw blocks, on onnxruntime's fast MatMulNBits kernels.

Every GGUF block type this reads is `s·q + o` per block: integer codes q, a scale s and an offset o
(`Q4_0`: `d·(q−8)`; `Q8_0`: `d·q`; `Q5_0`: `d·(q−16)`; `Q6_K`: `d·sc·(q−32)` in blocks of 16; `Q4_1`/`Q5_1`:
`d·q + m`; `Q4_K`/`Q5_K`: `d·sc·q − dmin·m`). MatMulNBits computes `s·(k − z)` with an integer zero point z, so a
block becomes `s·(k − z) + r` with `z = round(−o/s)` and a residual offset r (zero for the symmetric types). The
residuals are the only part a MatMulNBits cannot hold in its blocks: they multiply each input block's sum, so the
input is extended by its block sums (Reshape → ReduceSum → Concat, once per input) and the matrix by one more
column per block holding r, quantised at the matrix's width (for Q4_1 that is ~1/28 of a grid step, against the
half step a re-quantisation moves each weight). Float zero points, which would hold `o` directly, run only on
onnxruntime's slow unpacked path (9 tok/s instead of ~150 on SmolLM2).

4-bit sources (Q4_0, Q4_1, Q4_K) stay 4-bit at about their GGUF size; 5/6/8-bit sources become int8 (Q6_K at
block 16), which costs bytes (int8 with fp32 scales is 1.125 bytes a weight, Q5_0 0.69): those are kept in a size
plan — attention values and MLP down projections first (llama.cpp's own order of sensitivity), then the rest,
while the model stays within its budget. Every kept matrix is checked against the dequantised weights the builder
saw (the rows matched to the GGUF's, whose Q/K rows transformers permuted) before it is written. The report says
which matrices kept their grid and why the others were re-quantised (`ortllm show`).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .embeddings import QUANTIZED_GATHER, _save

BLOCK = 32
# GGUF block type → (code width in bits, block length): the types this module reads
SOURCE_TYPES = {
    "Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K": (4, 32), "Q5_0": (5, 32), "Q5_1": (5, 32), "Q5_K": (5, 32),
    "Q6_K": (6, 16), "Q8_0": (8, 32),
}  # fmt: skip
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
# what a budget leaves for the files written after the plan (build.log, grid.json, the graph's added nodes)
RESERVE = 1_000_000
# which int8 matrices a size plan keeps first (llama.cpp's Q4_K_M gives attn_v and ffn_down more bits)
_PRIORITY = ("qkv_proj", "v_proj", "down_proj", "o_proj", "q_proj", "k_proj", "gate_proj", "up_proj")


@dataclass
class Blocks:
    """One matrix on its source grid: value = scale · (codes − zero) + offset, per block of `block` columns."""

    codes: np.ndarray  # uint8 [N, K], at `bits` width
    scale: np.ndarray  # float32 [N, K/block]
    zero: np.ndarray  # uint8 [N, K/block]
    offset: np.ndarray  # float32 [N, K/block]: the residual the tail columns carry (0 for symmetric types)
    bits: int
    block: int
    kinds: tuple[str, ...]

    def values(self) -> np.ndarray:
        rows, cols = self.codes.shape
        grid = self.codes.astype(np.float64).reshape(rows, -1, self.block) - self.zero[..., None]
        return (grid * self.scale[..., None] + self.offset[..., None]).reshape(rows, cols)

    @property
    def has_zero(self) -> bool:
        return bool((self.zero != 1 << (self.bits - 1)).any())

    @property
    def has_offset(self) -> bool:
        return bool(self.offset.any())


def decode(kind: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A GGUF tensor's raw blocks ([rows, bytes]) → (unsigned codes [rows, K], scale, offset [rows, K/block]) with
    value = scale · code + offset; the arithmetic follows gguf-py's dequantisers."""
    rows = raw.shape[0]
    b = np.ascontiguousarray(raw, dtype=np.uint8)
    codes: np.ndarray
    if kind in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        size = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}[kind]
        b = b.reshape(-1, size)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        if kind == "Q8_0":
            codes = (b[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
            off = -128 * d
        else:
            m = b[:, 2:4].copy().view(np.float16).astype(np.float32) if kind in ("Q4_1", "Q5_1") else None
            start = {"Q4_0": 2, "Q4_1": 4, "Q5_0": 6, "Q5_1": 8}[kind]
            qs = b[:, start:]
            codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
            if kind in ("Q5_0", "Q5_1"):
                qh = b[:, start - 4 : start].copy().view(np.uint32)
                high = (qh >> np.arange(32, dtype=np.uint32)) & 1
                codes = codes | (high.astype(np.uint8) << 4)
            off = m if m is not None else -{"Q4_0": 8, "Q5_0": 16}[kind] * d
        return codes.reshape(rows, -1), d.reshape(rows, -1), off.astype(np.float32).reshape(rows, -1)
    if kind in ("Q4_K", "Q5_K"):
        size = 144 if kind == "Q4_K" else 176
        b = b.reshape(-1, size)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, mn = _scale_min(b[:, 4:16])
        qs = b[:, -128:]
        low = (qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        codes = low.reshape(-1, 8, 32)
        if kind == "Q5_K":
            qh = b[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
            codes = codes | ((qh & 1) << 4)
        scale = d * sc.astype(np.float32)
        off = -(dmin * mn.astype(np.float32))
        return codes.reshape(rows, -1), scale.reshape(rows, -1), off.reshape(rows, -1)
    if kind == "Q6_K":
        b = b.reshape(-1, 210)
        ql, qh, scales, d = b[:, :128], b[:, 128:192], b[:, 192:208], b[:, 208:210]
        d = d.copy().view(np.float16).astype(np.float32)
        low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 0x03
        codes = low.reshape(-1, 8, 32) | (high.reshape(-1, 8, 32) << 4)
        scale = (d * scales.view(np.int8).astype(np.float32)).reshape(-1, 16)
        return codes.reshape(rows, -1), scale.reshape(rows, -1), (-32 * scale).reshape(rows, -1)
    raise ValueError(f"no decoder for {kind}")


def _scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 6-bit sub-block scales and mins (gguf-py's Q4_K.get_scale_min)."""
    s = packed.reshape(-1, 3, 4)
    d, m, m_d = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def on_grid(parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> Blocks:
    """Stack a fused matrix's parts (kind, codes, scale, offset; rows already in the model's order) into one
    MatMulNBits grid: 4-bit if every part is 4-bit, else int8; block 16 if a part has 16-column blocks."""
    widths = [SOURCE_TYPES[k][0] for k, *_ in parts]
    bits = 4 if max(widths) == 4 else 8
    block = min(SOURCE_TYPES[k][1] for k, *_ in parts)
    mid = 1 << (bits - 1)
    codes, scales, zeros, offsets = [], [], [], []
    for (kind, q, s, o), width in zip(parts, widths, strict=True):
        step = SOURCE_TYPES[kind][1] // block
        s, o = np.repeat(s, step, axis=1), np.repeat(o, step, axis=1)
        shift = mid - (1 << (width - 1))  # the type's centre code lands on the zero point
        safe = np.where(s == 0, 1.0, s).astype(np.float64)
        z = np.where(s == 0, mid, np.clip(np.rint(shift - o / safe), 0, (1 << bits) - 1))
        r = o.astype(np.float64) + s.astype(np.float64) * (z - shift)
        codes.append((q.astype(np.int16) + shift).astype(np.uint8))
        scales.append(s.astype(np.float32))
        zeros.append(z.astype(np.uint8))
        offsets.append(r.astype(np.float32))
    return Blocks(
        np.concatenate(codes), np.concatenate(scales), np.concatenate(zeros), np.concatenate(offsets),
        bits, block, tuple(k for k, *_ in parts),
    )  # fmt: skip


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


def _row_order(source: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """Indices i with source[i] == target (row for row, bit for bit), or None: transformers permutes Llama's
    Q/K rows back from llama.cpp's rotary layout, so the GGUF's rows can come in another order."""
    if source.shape != target.shape:
        return None
    if np.array_equal(source, target):
        return np.arange(source.shape[0])
    index = {row.tobytes(): i for i, row in enumerate(source)}
    order = [index.get(row.tobytes()) for row in np.ascontiguousarray(target, dtype=np.float32)]
    return None if any(i is None for i in order) else np.asarray(order)


def _grid_bytes(blocks: Blocks) -> int:
    rows, cols = blocks.codes.shape
    nblk = -(-(cols + (cols // blocks.block if blocks.has_offset else 0)) // blocks.block)
    size = rows * nblk * (blocks.block * blocks.bits // 8 + 4)
    return size + (rows * -(-nblk * blocks.bits // 8) if blocks.has_zero or blocks.has_offset else 0)


def keep_source_grid(
    out_dir: Path,
    hf_dir: Path,
    gguf: Path,
    budget: int | None = None,
    head_budget: int | None = None,
) -> dict[str, Any]:
    """Rewrite out_dir/model.onnx's MatMulNBits onto the GGUF's own grid where it fits; report per matrix which
    kept its grid (`exact`) and which were re-quantised (with their source type and why). Matrices that grow
    (int8 for 5/6/8-bit sources) are kept while the folder stays within `budget` bytes (the LM head, worth the
    most, within `head_budget`)."""
    import onnx_ir as ir
    from gguf import GGUFReader, dequantize
    from safetensors import safe_open

    tensors = {t.name: t for t in GGUFReader(str(gguf)).tensors}
    tied = "output.weight" not in tensors
    model = ir.load(str(out_dir / "model.onnx"))
    graph = model.graph
    where: dict[str, Path] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), "np") as sf:
            where.update({k: f for k in sf.keys()})  # noqa: SIM118 (safe_open has no __iter__)
    requantised: Counter[str] = Counter()
    candidates: list[tuple[tuple, Any, str, Blocks, int]] = []
    nodes = {n.name: n for n in graph}
    for node in list(graph):
        if node.op_type != "MatMulNBits":
            continue
        weight_in = node.inputs[1]
        module = ((weight_in.name if weight_in is not None else None) or "").split(".MatMul.")[0]
        found = _sources(module, tied)
        kinds = [tensors[g].tensor_type.name if g in tensors else "?" for g in found[1]] if found else ["?"]
        kind = kinds[0] if len(set(kinds)) == 1 else "+".join(sorted(set(kinds)))
        if (
            found is None
            or any(k not in SOURCE_TYPES for k in kinds)
            or any(h not in where for h in found[0])
        ):
            requantised[kind] += 1
            continue
        parts, weights = [], []
        for h, g, k in zip(found[0], found[1], kinds, strict=True):
            raw = np.asarray(tensors[g].data)
            weights.append(_tensor(where[h], h))
            order = _row_order(dequantize(raw, tensors[g].tensor_type), weights[-1])
            if order is None:
                break
            q, s, o = decode(k, raw)
            parts.append((k, q[order], s[order], o[order]))
        blocks = on_grid(parts) if len(parts) == len(kinds) else None
        if blocks is None or not _matches(blocks, np.concatenate(weights)):
            requantised[f"{kind} (off-grid blocks)"] += 1
            continue
        if (
            module == "lm_head"
            and QUANTIZED_GATHER in nodes
            and (blocks.has_zero or blocks.has_offset or blocks.block != BLOCK)
        ):
            if _shares_head(nodes[QUANTIZED_GATHER], node):
                requantised[f"{kind} (tied embedding table)"] += 1  # a table lookup has no block sums
                continue
        extra = _grid_bytes(blocks) - sum(_nbytes(v) for v in node.inputs[1:4])
        candidates.append((_rank(module, blocks, extra), node, module, blocks, extra))
    size = sum(f.stat().st_size for f in out_dir.iterdir() if f.is_file())
    exact: list[str] = []
    exact_types: Counter[str] = Counter()
    sums: dict[tuple[str, int], Any] = {}  # (input, block) → the input extended by its block sums
    consts: dict[str, Any] = {}  # their Reshape/ReduceSum constants, one per width
    for _, node, module, blocks, extra in sorted(candidates, key=lambda c: c[0]):
        limit = head_budget if module == "lm_head" and head_budget is not None else budget
        kind = "+".join(sorted(set(blocks.kinds)))
        if extra > 0 and limit is not None and size + extra > limit - RESERVE:
            requantised[f"{kind} (over the size budget)"] += 1
            continue
        size += extra
        _replace(graph, node, blocks, module, nodes, sums, consts)
        exact.append(module)
        exact_types[kind] += 1
    if exact:
        _save(model, out_dir)
    report = {
        "exact": len(exact),
        "exact_types": dict(exact_types),
        "requantised": dict(requantised),
        "lm_head": "lm_head" in exact,
        "block_sums": len(sums),
    }
    (out_dir / "grid.json").write_text(json.dumps({**report, "exact_matrices": sorted(exact)}, indent=1))
    return report


def _rank(module: str, blocks: Blocks, extra: int) -> tuple:
    """Matrices that cost nothing first, then the LM head, then int8 matrices by sensitivity, early layers first."""
    if extra <= 0 or blocks.bits == 4:
        return (0, extra, module)
    if module == "lm_head":
        return (1, 0, module)
    part = module.rsplit(".", 1)[-1]
    layer = re.search(r"layers\.(\d+)\.", module)
    order = _PRIORITY.index(part) if part in _PRIORITY else len(_PRIORITY)
    return (2, order, int(layer.group(1)) if layer else 0, module)


def _matches(blocks: Blocks, expected: np.ndarray) -> bool:
    """The grid gives back the builder's float weights (to float rounding of the offset arithmetic)."""
    values = blocks.values()
    if values.shape != expected.shape:
        return False
    tolerance = 1e-6 * (np.abs(blocks.scale) * (1 << blocks.bits) + np.abs(blocks.offset)).max(initial=0.0)
    return bool(np.abs(values - expected).max(initial=0.0) <= tolerance)


def _shares_head(gather: Any, node: Any) -> bool:
    data = gather.inputs[0]
    producer = data.producer() if data is not None else None
    return data is node.inputs[1] or (producer is not None and producer.inputs[0] is node.inputs[1])


def _nbytes(value: Any) -> int:
    return value.const_value.nbytes if value is not None and value.const_value is not None else 0


def _tensor(path: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(path), "np") as sf:
        return sf.get_tensor(name).astype(np.float32)


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    return codes[..., 0::2] | (codes[..., 1::2] << 4) if bits == 4 else codes


def _replace(
    graph: Any, node: Any, blocks: Blocks, module: str, nodes: dict, sums: dict, consts: dict
) -> None:
    """Point `node` (and a GatherBlockQuantized sharing its weights) at the source grid; a grid with offsets
    reads its input extended by the input's block sums."""
    import onnx_ir as ir

    def const(name: str, array: np.ndarray) -> Any:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        graph.register_initializer(value)
        return value

    rows, cols = blocks.codes.shape
    bits, block, mid = blocks.bits, blocks.block, 1 << (blocks.bits - 1)
    codes, scales, zeros = blocks.codes, blocks.scale, blocks.zero
    width = cols
    if blocks.has_offset:
        nb = cols // block
        width = cols + nb
        tail_blocks = -(-nb // block)
        tail = np.zeros((rows, tail_blocks * block), np.float32)
        tail[:, :nb] = blocks.offset
        tail = tail.reshape(rows, tail_blocks, block)
        step = np.abs(tail).max(-1) / (mid - 1)
        step[step == 0] = 1.0
        tail_codes = (np.rint(tail / step[..., None]) + mid).astype(np.uint8).reshape(rows, -1)
        codes = np.concatenate([codes, tail_codes], axis=1)
        scales = np.concatenate([scales, step.astype(np.float32)], axis=1)
        zeros = np.concatenate([zeros, np.full((rows, tail_blocks), mid, np.uint8)], axis=1)
    nblk = codes.shape[1] // block
    old = list(node.inputs[1:4])
    name = f"{module}.MatMul.weight_Q{bits}G{block}"
    b_val = const(f"{name}_grid", _pack(codes, bits).reshape(rows, nblk, -1))
    s_shape = (
        old[1].const_value.shape.numpy() if old[1] is not None and old[1].const_value is not None else None
    )
    # MatMulNBits takes flat scales or [N, blocks] (the builder's, which a tied GatherBlockQuantized shares)
    s_flat = scales.reshape(-1)
    s_val = const(
        f"{module}.MatMul.weight_scales_grid",
        scales.reshape(rows, -1) if s_shape is not None and len(s_shape) == 2 else s_flat,
    )
    node.replace_input_with(1, b_val)
    node.replace_input_with(2, s_val)
    if blocks.has_zero or blocks.has_offset:
        if nblk % 2 and bits == 4:
            zeros = np.concatenate([zeros, np.full((rows, 1), mid, np.uint8)], axis=1)
        z_val = const(f"{module}.MatMul.weight_zp_grid", _pack(zeros, bits).reshape(-1))
        if len(node.inputs) < 4:
            node.resize_inputs(4)
        node.replace_input_with(3, z_val)
    if blocks.has_offset:
        x = node.inputs[0]
        key = (x.name, block)
        if key not in sums:
            prefix = f"{x.name}/block_sums{block}"
            # one shape and one axes constant for every input of this width
            if f"shape_{cols}_{block}" not in consts:
                consts[f"shape_{cols}_{block}"] = const(
                    f"block_sums/shape_{cols}_{block}", np.array([0, 0, cols // block, block], np.int64)
                )
            if "axes" not in consts:
                consts["axes"] = const("block_sums/axes", np.array([3], np.int64))
            shape, axes = consts[f"shape_{cols}_{block}"], consts["axes"]
            split = ir.node("Reshape", [x, shape], name=f"{prefix}/Reshape")
            total = ir.node(
                "ReduceSum", [split.outputs[0], axes], attributes={"keepdims": 0}, name=f"{prefix}/Sum"
            )
            joined = ir.node(
                "Concat", [x, total.outputs[0]], attributes={"axis": -1}, name=f"{prefix}/Concat"
            )
            producer = x.producer()  # right after the input is made: every matrix reading it comes later
            if producer is not None:
                graph.insert_after(producer, [split, total, joined])
            else:
                graph.insert_before(next(iter(graph)), [split, total, joined])
            sums[key] = joined.outputs[0]
        node.replace_input_with(0, sums[key])
    node.attributes["bits"] = ir.AttrInt64("bits", bits)
    node.attributes["block_size"] = ir.AttrInt64("block_size", block)
    node.attributes["K"] = ir.AttrInt64("K", width)
    gather = nodes.get(QUANTIZED_GATHER)
    if module == "lm_head" and gather is not None:
        _reshare(graph, gather, old[0], old[1], b_val, s_val, codes, bits)
    for value in old:
        if value is not None and not value.uses() and value.name in graph.initializers:
            graph.initializers.pop(value.name)


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
    packed = _pack(codes, bits)
    if reshaped:
        assert producer is not None
        shape = np.array(packed.shape, dtype=np.int64)
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
