"""`ortllm bench` runs and reports every metric (speed itself is measured by the benchmark, not asserted)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import DEFAULT_MODEL, ortllm


def test_engine_bench_reports_every_metric(pulled, tmp_path):
    out = tmp_path / "engine.json"
    ortllm(
        "bench",
        "engine",
        DEFAULT_MODEL,
        "--pp",
        "32",
        "--tg",
        "8",
        "--batch",
        "1,2",
        "--reps",
        "1",
        "--json",
        str(out),
        check=True,
    )
    data = json.loads(out.read_text())
    ours = data["ortllm"]
    assert ours["pp32_tok_s"]["mean"] > 0 and ours["tg8_tok_s"]["mean"] > 0 and ours["ttft_s"]["mean"] > 0
    assert set(ours["batch_aggregate_tok_s"]) == {"1", "2"} and ours["peak_rss_mb"] > 0
    assert (
        ours["draft_tokens"] == 0
    )  # plain decoding, as llama-bench measures (the filler prompt would draft)
    assert data["memory_bandwidth_gbs"] > 0 and data["decode_ceiling_tok_s"] > 0 and data["weight_mb"] > 50


def test_serve_bench_against_a_running_server(server, tmp_path):
    out = tmp_path / "serve.json"
    ortllm(
        "bench",
        "serve",
        DEFAULT_MODEL,
        "--url",
        server.url,
        "--concurrency",
        "1,2",
        "--requests",
        "1",
        "--prompts",
        "distinct",
        "--json",
        str(out),
        check=True,
    )
    assert json.loads(out.read_text())["prompts"] == "distinct"
    data = json.loads(out.read_text())["ortllm"]
    for level in ("1", "2"):
        r = data[level]
        assert r["errors"] == 0 and r["requests"] == int(level)
        assert r["output_tok_s"] > 0 and r["ttft_s"]["p50"] > 0 and r["itl_ms"]["p50"] > 0


def test_compare_without_llama_cpp_is_a_clear_error(pulled, monkeypatch):
    monkeypatch.delenv("ORTLLM_LLAMA_CPP", raising=False)
    proc = ortllm(
        "bench",
        "engine",
        DEFAULT_MODEL,
        "--pp",
        "16",
        "--tg",
        "4",
        "--batch",
        "1",
        "--reps",
        "1",
        "--compare",
        "llama-cpp",
        "--llama-cpp",
        "/nonexistent",
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 1 and "llama.cpp not found" in proc.stderr


def test_decode_ceiling_counts_the_bytes_the_kernels_read(pulled):
    import math

    import onnx

    from ortllm.benchmark import ceiling_note, decode_bytes, decode_ceiling

    model_dir = pulled / "cpu-int4"
    graph = onnx.load(str(model_dir / "model.onnx"), load_external_data=False).graph
    # expected from each MatMulNBits' attributes: packed B, fp32 scales, packed zero points when present
    expected = 0
    for node in graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
            blocks = math.ceil(a["K"] / a["block_size"])
            expected += a["N"] * blocks * a["block_size"] * a["bits"] // 8 + a["N"] * blocks * 4
            if len(node.input) > 3 and node.input[3]:
                expected += a["N"] * math.ceil(blocks * a["bits"] / 8)
        elif node.op_type.endswith("LayerNormalization"):
            expected += 576 * 4  # the norm's fp32 weight (SmolLM2-135M: hidden 576)
    sizes = decode_bytes(model_dir)
    # all of it, plus at most a few shape constants; the embedding table (one row per token) is left out
    assert expected <= sizes["weights"] <= expected + 1024
    assert (
        sizes["kv_per_context_token"] == 30 * 2 * 3 * 64 * 4
    )  # layers × (K, V) × KV heads × head dim × fp32
    ceiling = decode_ceiling(10.0, sizes, context=1000)
    assert ceiling == pytest.approx(10e9 / (sizes["weights"] + 1000 * 30 * 2 * 3 * 64 * 4))
    assert ceiling_note(ceiling / 2, ceiling) == "tg reached 50% of the ceiling"
    assert "under-measures" in ceiling_note(ceiling * 2, ceiling) and "%" in ceiling_note(
        ceiling * 2, ceiling
    )


def test_synthetic_model_has_the_shape_and_the_default_models_tokenizer(pulled, tmp_path, monkeypatch):
    from ortllm.benchmark import synthetic_model

    monkeypatch.setenv("ORTLLM_BENCH_CACHE", str(tmp_path))
    folder = synthetic_model("llama-tiny", pulled / "cpu-int4")
    config = json.loads((folder / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]) == (64, 2, 128)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]) == (4, 2, 16)
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 49152
    assert config["rope_parameters"]["rope_theta"] == 500000.0
    assert folder == tmp_path / "llama-tiny" / "hf" and (folder / "model.safetensors").exists()
    assert (folder / "tokenizer.json").read_bytes() == (pulled / "cpu-int4" / "tokenizer.json").read_bytes()
    made = (folder / "model.safetensors").stat().st_mtime_ns
    assert synthetic_model("llama-tiny", pulled / "cpu-int4") == folder  # cached: not made again
    assert (folder / "model.safetensors").stat().st_mtime_ns == made


@pytest.mark.slow
def test_bench_engine_synthetic_converts_and_generates_fixed_lengths(pulled, tmp_path):
    out = tmp_path / "engine.json"
    args = ["bench", "engine", "--synthetic", "llama-tiny", "--pp", "16", "--tg", "8", "--batch", "1"]
    ortllm(*args, "--reps", "1", "--json", str(out), env={"ORTLLM_BENCH_CACHE": str(tmp_path)}, check=True)
    data = json.loads(out.read_text())
    assert data["model"] == "bench-llama-tiny" and data["ortllm"]["tg8_tok_s"]["n"] == 1
    assert (tmp_path / "llama-tiny" / "hf" / "model.safetensors").exists()


def test_a_crashing_peer_is_one_line_and_the_bench_still_prints(pulled, tmp_path):
    peer = tmp_path / "peer"
    peer.mkdir()
    (peer / "llama-bench").write_text("#!/bin/sh\nkill -SEGV $$\n")
    (peer / "llama-bench").chmod(0o755)
    out = tmp_path / "engine.json"
    args = ["bench", "engine", DEFAULT_MODEL, "--pp", "16", "--tg", "4", "--batch", "1", "--reps", "1"]
    proc = ortllm(*args, "--compare", "llama-cpp", "--llama-cpp", str(peer), "--gguf", str(peer / "m.gguf"),
                  "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "llama-bench was killed by signal SIGSEGV" in proc.stdout and "tg4_tok_s" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
    assert json.loads(out.read_text())["llama_cpp"]["failures"] == [
        "llama.cpp: llama-bench was killed by signal SIGSEGV"
    ]
