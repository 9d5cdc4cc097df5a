"""Where single-stream decode time goes: onnxruntime's MatMulNBits kernels alone, at batch 1.

Builds graphs of MatMulNBits nodes with the default model's shapes and quantisation (random weights,
so nothing is read from a model) and times them with the same thread count as the runtime:

- `decoder`: the 151 matrices of one decode step of smollm2-135m (30 layers of qkv 576→960,
  o 576→576, gate and up 576→1536, down 1536→576; qkv and down in int8 for 14 layers as in the mixed
  recipe; the 576→49152 LM head), in sequence: compare with a whole decode step (`ortllm bench engine`).
- `shapes`: each shape repeated (distinct weights, so caches do not help) → µs per node and GB/s.

    python benchmarks/matmul_nbits.py                  # both, 2 threads
    python benchmarks/matmul_nbits.py --threads 1 --block 64 --all-int4
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def _model(
    nodes_spec: list[tuple[str, str, int, int, int]], block: int, input_k: int
) -> tuple[bytes, list[str]]:
    """(name, input, K, N, bits) per node → a serialized model and its outputs."""
    from onnx import TensorProto, helper, numpy_helper

    gen = np.random.default_rng(0)
    nodes, inits, outputs = [], [], []
    for name, source, k, n, bits in nodes_spec:
        blocks, blob = -(-k // block), block * bits // 8
        inits.append(
            numpy_helper.from_array(gen.integers(0, 255, (n, blocks, blob), dtype=np.uint8), f"{name}.q")
        )
        inits.append(numpy_helper.from_array(gen.random(n * blocks, dtype=np.float32) / 100, f"{name}.s"))
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [source, f"{name}.q", f"{name}.s"],
                [name],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=bits,
                block_size=block,
                accuracy_level=4,
            )
        )
        outputs.append(name)
    graph = helper.make_graph(
        nodes,
        "matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, input_k])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        inits,
    )
    model = helper.make_model(
        graph,
        ir_version=10,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
    )
    return model.SerializeToString(), outputs


def _time(model: bytes, outputs: list[str], input_k: int, threads: int, reps: int) -> float:
    """Median seconds per run."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    io = session.io_binding()
    io.bind_cpu_input("x", np.random.default_rng(1).random((1, input_k), dtype=np.float32))
    for name in outputs:
        io.bind_output(name)
    for _ in range(10):
        session.run_with_iobinding(io)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        session.run_with_iobinding(io)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def decoder(threads: int, block: int, all_int4: bool, reps: int) -> None:
    spec, x = [], "x"
    for layer in range(30):
        wide = 4 if all_int4 or layer >= 14 else 8
        spec += [
            (f"qkv{layer}", x, 576, 960, wide),
            (f"o{layer}", x, 576, 576, 4),
            (f"gate{layer}", f"o{layer}", 576, 1536, 4),
            (f"up{layer}", f"o{layer}", 576, 1536, 4),
            (f"down{layer}", f"up{layer}", 1536, 576, wide),
        ]
        x = f"down{layer}"
    spec.append(("lm_head", x, 576, 49152, 4))
    model, outputs = _model(spec, block, 576)
    weights = sum(n * k * (bits / 8 + 4 / block) for _, _, k, n, bits in spec) / 1e6
    seconds = _time(model, outputs, 576, threads, reps)
    print(
        f"decoder step, {len(spec)} MatMulNBits ({weights:.0f} MB, block {block}, "
        f"{'all int4' if all_int4 else 'mixed int4/int8'}, {threads} threads): {seconds * 1e3:.2f} ms, "
        f"{weights / seconds / 1e3:.1f} GB/s"
    )


def shapes(threads: int, block: int, reps: int) -> None:
    for k, n, count, bits in (
        (576, 576, 400, 4),
        (576, 960, 200, 4),
        (576, 960, 200, 8),
        (576, 1536, 200, 4),
        (576, 3072, 100, 4),
        (1536, 576, 200, 4),
        (576, 49152, 4, 4),
    ):
        model, outputs = _model([(f"m{i}", "x", k, n, bits) for i in range(count)], block, k)
        seconds = _time(model, outputs, k, threads, reps)
        megabytes = count * n * k * (bits / 8 + 4 / block) / 1e6
        print(
            f"{k:>5}×{n:<6} int{bits}: {seconds / count * 1e6:7.1f} µs per node, "
            f"{megabytes / seconds / 1e3:5.1f} GB/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=32, help="quantisation block size (32, 64)")
    parser.add_argument("--all-int4", action="store_true", help="no int8 matrices (the mixed recipe has 28)")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--only", choices=["decoder", "shapes"])
    args = parser.parse_args()
    if args.only != "shapes":
        decoder(args.threads, args.block, args.all_int4, args.reps)
    if args.only != "decoder":
        shapes(args.threads, args.block, args.reps)


if __name__ == "__main__":
    main()
