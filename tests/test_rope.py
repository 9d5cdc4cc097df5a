"""Rotary tables computed at load instead of stored (converters/rope.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from converters.rope import compute_rope_caches


def builder_tables(rows: int, half: int, base: float, scale: float = 1.0, magnitude: float = 1.0):
    """As the genai builder makes them: float32 positions times float32 frequencies, cos and sin in float32."""
    import torch

    inv = 1.0 / (scale * base ** (torch.arange(0, 2 * half, 2, dtype=torch.int64).float() / (2 * half)))
    angles = torch.outer(torch.arange(rows, dtype=torch.float32), inv)
    return (angles.cos() * magnitude).numpy(), (angles.sin() * magnitude).numpy()


def write_model(folder: Path, tables: dict[str, np.ndarray]) -> None:
    """A graph whose outputs read each table (Gather of given positions), its tables in external data."""
    folder.mkdir(parents=True, exist_ok=True)
    nodes, outputs = [], []
    for name in tables:
        nodes.append(helper.make_node("Gather", [name, "positions"], [f"{name}_out"], axis=0))
        kind = TensorProto.FLOAT16 if tables[name].dtype == np.float16 else TensorProto.FLOAT
        outputs.append(helper.make_tensor_value_info(f"{name}_out", kind, None))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("positions", TensorProto.INT64, ["n"])],
        outputs,
        [numpy_helper.from_array(t, name) for name, t in tables.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")


def run(folder: Path, positions: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    return session.run(None, {"positions": positions})


def test_tables_become_nodes_that_give_the_same_numbers(tmp_path):
    local = builder_tables(4096, 32, 10_000.0)
    glob = builder_tables(4096, 32, 1_000_000.0, scale=8.0)  # linear scaling: smaller frequencies
    tables = {
        "cos_cache_local": local[0],
        "sin_cache_local": local[1],
        "cos_cache_global": glob[0],
        "sin_cache_global": glob[1],
    }
    write_model(tmp_path, tables)
    positions = np.asarray([0, 1, 2, 1000, 4095], dtype=np.int64)
    before = run(tmp_path, positions)
    size = (tmp_path / "model.onnx.data").stat().st_size
    report = compute_rope_caches(tmp_path)
    assert report == {"computed": 4, "kept": 0, "saved_bytes": 4 * 4096 * 32 * 4}
    assert (tmp_path / "model.onnx.data").stat().st_size < size // 100
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    assert not {i.name for i in graph.initializer} & set(tables)
    assert {n.op_type for n in graph.node} >= {"Range", "Cos", "Sin"}
    after = run(tmp_path, positions)
    for a, b in zip(before, after, strict=True):
        assert np.abs(a - b).max() <= 2.5e-7  # onnxruntime's Cos/Sin: within two units in the last place


def test_a_magnitude_is_kept(tmp_path):
    cos, sin = builder_tables(2048, 16, 10_000.0, magnitude=1.2)  # YaRN-style attention factor
    write_model(tmp_path, {"cos_cache": cos, "sin_cache": sin})
    positions = np.arange(0, 2048, 97, dtype=np.int64)
    before = run(tmp_path, positions)
    assert compute_rope_caches(tmp_path)["computed"] == 2
    after = run(tmp_path, positions)
    assert np.abs(before[0] - after[0]).max() <= 4e-7 and np.abs(before[1] - after[1]).max() <= 4e-7


@pytest.mark.parametrize("kind", ["random", "fp16", "alone"])
def test_tables_that_do_not_come_back_stay_stored(tmp_path, kind):
    cos, sin = builder_tables(512, 16, 10_000.0)
    if kind == "random":  # another rotary form: the recomputed table would differ
        sin = sin + np.random.default_rng(0).normal(0, 1e-3, sin.shape).astype(np.float32)
        tables = {"cos_cache": cos, "sin_cache": sin}
    elif kind == "fp16":  # GPU models' fp16 tables are left alone
        tables = {"cos_cache": cos.astype(np.float16), "sin_cache": sin.astype(np.float16)}
    else:
        tables = {"cos_cache": cos}
    write_model(tmp_path, tables)
    data = (tmp_path / "model.onnx.data").read_bytes()
    report = compute_rope_caches(tmp_path)
    assert report["computed"] == 0 and report["kept"] == len(tables)
    assert (tmp_path / "model.onnx.data").read_bytes() == data  # untouched


def test_the_default_model_computes_its_tables_at_load(pulled):
    """SmolLM2's two 8192 x 32 tables (2 MB); Gemma 3's four 32768 x 128 (67 MB) in test_real_models."""
    manifest = json.loads((pulled / "manifest.json").read_text())
    rope = manifest["variants"]["cpu-int4"]["rope_caches"]
    assert rope == {"computed": 2, "kept": 0, "saved_bytes": 2 * 8192 * 32 * 4}
