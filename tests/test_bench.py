"""`ortllm bench` runs and reports every metric (speed itself is measured by the benchmark, not asserted)."""

from __future__ import annotations

import json

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
