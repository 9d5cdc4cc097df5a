"""An int8 prefill graph for the native batcher (`ORTLLM_PREFILL=int8`, opt-in).

onnxruntime's int4 MatMulNBits is its fastest kernel for decoding (one token: bound by reading the weights) but
not for prompts: on the 1B shape a 2048 × 8192 matrix times 512 tokens takes 69 ms where the int8 GEMM behind
MatMulInteger (u8 × s8, AVX-512 VNNI) takes 25 ms, and MatMulNBits is 91 % of a prompt pass (benchmarks/NOTES.md
lever 24). This module derives a second decoder graph whose matrices (all but the LM head) are int8 with one scale
per output channel, made from the int4/int8 weights themselves (exact dequantisation, then per-channel rounding).
Activations are quantised per row (symmetric int8, stored as uint8 around 128 so the kernel's u8 × s8 path runs;
once per input: q/k/v and gate/up share theirs), after SmoothQuant-style channel smoothing (x / s, W · s with s = max|x|^0.5 / max|W|^0.5 per input channel, from a
calibration text): outlier channels would otherwise take a row's whole int8 range (SmolLM2's perplexity: 15.00 →
23.1 per-tensor, 15.53 per row, 15.14 per row with smoothing).

The prefill graph reads and writes the same KV arena as the decoder (the same bindings), so a prompt's keys and
values come from it and decoding continues on the int4 graph. It costs about two bytes per weight of memory
(the int8 copy, handed to onnxruntime in place, and the packed copy onnxruntime's GEMM makes of it).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("ortllm.native")

SMOOTH_ALPHA = 0.5  # migration strength: 0 = no smoothing, 1 = all of the activations' range into the weights
PROTO_LIMIT = 2**31 - 1  # a serialised graph above this cannot be handed to onnxruntime in memory


def tensor_array(init: Any, folder: Path) -> np.ndarray:
    """An initializer's values, read from its external data file when it has one."""
    from onnx import numpy_helper
    from onnx.helper import tensor_dtype_to_np_dtype

    if init.data_location != 1:  # TensorProto.EXTERNAL
        return np.asarray(numpy_helper.to_array(init))
    info = {e.key: e.value for e in init.external_data}
    dtype = tensor_dtype_to_np_dtype(init.data_type)
    count = int(np.prod(init.dims, dtype=np.int64))
    with open(folder / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        data = f.read(int(info.get("length", count * np.dtype(dtype).itemsize)))
    return np.frombuffer(data, dtype=dtype, count=count).reshape(tuple(init.dims))


def dequantize(
    packed: np.ndarray,
    scales: np.ndarray,
    zero_points: np.ndarray | None,
    k: int,
    n: int,
    bits: int,
    block: int,
) -> np.ndarray:
    """MatMulNBits' weights as float32, N × K (w = (q − zero point) · scale per block of K)."""
    blocks = packed.shape[1]
    if bits == 4:
        q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, block)
    elif bits == 8:
        q = packed.reshape(n, blocks, block)
    else:
        raise ValueError(f"{bits}-bit MatMulNBits weights")
    scale = scales.reshape(n, blocks, 1).astype(np.float32)
    if zero_points is None:
        zero: Any = np.float32(1 << (bits - 1))
    elif zero_points.dtype == np.uint8:
        z = np.stack([zero_points & 0x0F, zero_points >> 4], axis=-1) if bits == 4 else zero_points
        zero = z.reshape(n, -1)[:, :blocks].reshape(n, blocks, 1).astype(np.float32)
    else:  # float zero points
        zero = zero_points.reshape(n, blocks, 1).astype(np.float32)
    return ((q.astype(np.float32) - zero) * scale).reshape(n, blocks * block)[:, :k]


def replaced(node: Any) -> bool:
    """Whether the prefill graph replaces this node: every MatMulNBits but the LM head."""
    return bool(node.op_type == "MatMulNBits" and "logits" not in node.output)


def calibration_graph(model: Any) -> tuple[Any, list[str]]:
    """A copy of `model` that also outputs every replaced matrix's input; and those outputs' names."""
    from onnx import ModelProto, TensorProto, helper

    copy = ModelProto()
    copy.CopyFrom(model)
    names = sorted({n.input[0] for n in copy.graph.node if replaced(n)})
    copy.graph.output.extend(helper.make_tensor_value_info(x, TensorProto.FLOAT, None) for x in names)
    return copy, names


def _external(name: str, array: np.ndarray) -> Any:
    """An initializer declared as external data: onnxruntime takes its values from add_external_initializers
    (our array, used in place: no copy in the graph, in its serialisation or in the session)."""
    from onnx import TensorProto, helper

    tensor = TensorProto()
    tensor.name = name
    tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
    tensor.dims.extend(array.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "ortllm-prefill8"), ("offset", "0"), ("length", str(array.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def prefill_graph(
    model: Any, folder: Path, peaks: dict[str, np.ndarray]
) -> tuple[bytes, dict[str, np.ndarray]]:
    """`model` (the decoder as the native batcher runs it, weights external in `folder`) with its matrices as
    smoothed int8 GEMMs; `peaks`: each matrix input's largest magnitude per channel (from calibration_graph).
    Returns the serialised graph and its int8 weights (for SessionOptions.add_external_initializers)."""
    from onnx import ModelProto, TensorProto, helper, numpy_helper

    out = ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {i.name: i for i in graph.initializer}
    nodes: list[Any] = []
    dropped: set[str] = set()
    weights: dict[str, np.ndarray] = {}
    added: list[Any] = [
        numpy_helper.from_array(np.array(127, np.float32), "ortllm_p8_127"),
        numpy_helper.from_array(np.array(128, np.float32), "ortllm_p8_128"),
        numpy_helper.from_array(np.array(128, np.uint8), "ortllm_p8_zero"),
        numpy_helper.from_array(np.array(1e-12, np.float32), "ortllm_p8_tiny"),
        numpy_helper.from_array(np.array([-1], np.int64), "ortllm_p8_last"),
        numpy_helper.from_array(np.array(1.0, np.float32), "ortllm_p8_one"),
    ]

    def matrix(node: Any) -> np.ndarray:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) > 4 and any(node.input[4:]):  # g_idx or bias: not made by the builder
            raise ValueError(f"{node.name}: MatMulNBits with g_idx or bias")
        zero = tensor_array(inits[node.input[3]], folder) if len(node.input) > 3 and node.input[3] else None
        return dequantize(
            tensor_array(inits[node.input[1]], folder),
            tensor_array(inits[node.input[2]], folder),
            zero,
            int(attrs["K"]),
            int(attrs["N"]),
            int(attrs.get("bits", 4)),
            int(attrs["block_size"]),
        )

    # matrices reading the same input (q/k/v, gate/up) share one smoothing and one quantised copy of it
    groups: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        if replaced(node):
            groups.setdefault(node.input[0], []).append(i)
    quantised: dict[str, str] = {}  # input → the name of its (quantised rows, row scales) pair's prefix
    for i, node in enumerate(graph.node):
        if not replaced(node):
            nodes.append(node)
            continue
        dropped.update(x for x in node.input[1:] if x)
        source = node.input[0]
        group = groups[source]
        if source not in quantised:
            matrices = {j: matrix(graph.node[j]) for j in group}
            x_peak = np.maximum(peaks[source].astype(np.float32), 1e-5)
            w_peak = np.maximum(np.max([np.abs(w).max(axis=0) for w in matrices.values()], axis=0), 1e-5)
            smooth = (x_peak**SMOOTH_ALPHA / w_peak ** (1 - SMOOTH_ALPHA)).astype(np.float32)
            q = f"ortllm_p8_in{i}"
            quantised[source] = q
            added.append(numpy_helper.from_array((1.0 / smooth).astype(np.float32), q + "_inv"))
            nodes += [
                helper.make_node("Mul", [source, q + "_inv"], [q + "_x"]),
                helper.make_node("Abs", [q + "_x"], [q + "_abs"]),
                helper.make_node("ReduceMax", [q + "_abs", "ortllm_p8_last"], [q + "_peak"], keepdims=1),
                helper.make_node("Div", [q + "_peak", "ortllm_p8_127"], [q + "_s0"]),
                helper.make_node("Max", [q + "_s0", "ortllm_p8_tiny"], [q + "_s"]),
                helper.make_node("Div", [q + "_x", q + "_s"], [q + "_q0"]),
                helper.make_node("Round", [q + "_q0"], [q + "_q1"]),
                helper.make_node("Add", [q + "_q1", "ortllm_p8_128"], [q + "_q2"]),
                helper.make_node("Cast", [q + "_q2"], [q + "_q"], to=TensorProto.UINT8),
            ]
            for j, w in matrices.items():
                w *= smooth[None, :]
                column = np.abs(w).max(axis=1)
                column[column == 0] = 1.0
                scale = (column / 127.0).astype(np.float32)
                p = f"ortllm_p8_{j}"
                weights[p + "_w"] = np.clip(np.rint(w / scale[:, None]), -127, 127).astype(np.int8).T.copy()
                added += [_external(p + "_w", weights[p + "_w"]), numpy_helper.from_array(scale, p + "_ws")]
            del matrices
        q, p = quantised[source], f"ortllm_p8_{i}"
        nodes += [  # int32 sums × the weights' column scales in one kernel, then × each row's scale
            helper.make_node(
                "MatMulIntegerToFloat",
                [q + "_q", p + "_w", "ortllm_p8_one", p + "_ws", "ortllm_p8_zero"],
                [p + "_f"],
                domain="com.microsoft",
                name=node.name + "_i8",
            ),
            helper.make_node("Mul", [p + "_f", q + "_s"], list(node.output)),
        ]
    still = {x for n in nodes for x in n.input}
    keep = [t for t in graph.initializer if t.name not in dropped or t.name in still]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    data = out.SerializeToString()
    if len(data) > PROTO_LIMIT:
        raise ValueError("the int8 prefill graph exceeds 2 GB")
    return data, weights
