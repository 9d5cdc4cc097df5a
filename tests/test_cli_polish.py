"""First-run polish of the command line (issue 20's CLI items), each run through the real `ortllm`."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.conftest import ortllm


def catalog_names() -> list[str]:
    rows = json.loads(ortllm("list", "--available", "--json", check=True).stdout)
    return [r["name"] for r in rows]


def test_list_available_keeps_names_whole_at_80_columns() -> None:
    names = catalog_names()
    out = ortllm("list", "--available", env={"COLUMNS": "80"}, check=True).stdout
    assert max(len(line) for line in out.splitlines()) <= 80, out
    for name in names:
        assert name in out, f"{name} is cut in:\n{out}"
    assert "…" not in out.split("┩", 1)[1].splitlines()[0], out  # no cell of the first row is cut


def test_run_unknown_model_says_where_to_look() -> None:
    proc = ortllm("run", "nope-no-such-model", "hi")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "nope-no-such-model" in lines[0]
    assert "ortllm list --available" in lines[0]
    assert "ortllm pull" not in lines[0]  # pulling an unknown name would fail too
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "command,variable,value,message",
    [
        (
            ("serve", "--port", "0"),
            "ORTLLM_PREFILL",
            "bogus",
            "ORTLLM_PREFILL must be model or int8, not 'bogus'",
        ),
        (
            ("serve", "--port", "0"),
            "ORTLLM_KV_CACHE",
            "fp8",
            "ORTLLM_KV_CACHE must be float or int8, not 'fp8'",
        ),
        (
            ("run", "smollm2-135m", "hi"),
            "ORTLLM_SPECULATION",
            "medusa",
            "ORTLLM_SPECULATION must be ngram or off",
        ),
        (("bench", "engine"), "ORTLLM_BATCHER", "fast", "ORTLLM_BATCHER must be one of auto, native"),
    ],
)
def test_a_bad_runtime_choice_is_one_line_before_anything_starts(command, variable, value, message) -> None:
    """Checked before a model loads (a server's worker would otherwise die with a traceback)."""
    proc = ortllm(*command, env={variable: value}, timeout=60)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), proc.stderr
    assert "serving on" not in proc.stderr


def test_catalog_model_not_installed_suggests_pull() -> None:
    # `run` pulls a catalog model itself; `show` and `rm` answer with the command that installs it
    for command in ("show", "rm"):
        proc = ortllm(command, "llama3")
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "ortllm pull llama-3-8b" in lines[0], lines[0]


def isolated(tmp_path: Path) -> dict[str, str]:
    """A store and a conversion cache of the test's own (the shared test cache is never cleaned)."""
    return {"ORTLLM_HOME": str(tmp_path / "home"), "ORTLLM_CACHE": str(tmp_path / "cache")}


@pytest.mark.slow
def test_conversion_shows_only_its_steps_reports_the_cache_and_cache_clean_frees_it(pulled, tmp_path) -> None:
    from tests.test_convert import cached_gguf

    env = isolated(tmp_path)
    cache = tmp_path / "cache"
    proc = ortllm("convert", str(cached_gguf()), "--name", "smol-quiet", env=env, check=True)
    # transformers' GGUF tqdm bars go to the build log, not below the step list
    assert "de-quantizing" not in proc.stderr and "it/s" not in proc.stderr, proc.stderr
    assert [ln.split()[0] for ln in proc.stderr.strip().splitlines()] == ["✓"] * 3, proc.stderr
    build_log = tmp_path / "home" / "models" / "smol-quiet" / "cpu-int4" / "build.log"
    assert "de-quantizing" in build_log.read_text()
    assert not list((cache / "logs").glob("*.log"))  # a successful conversion's log lives with the model
    report = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(
        r"cache: (\d+) MB left in (.+) \(dequantised GGUF weights (\d+) MB.*`ortllm cache clean`", report
    )
    assert match, report
    assert Path(match.group(2)) == cache and int(match.group(1)) > 400  # the float32 copy of a 135M model

    dry = ortllm("cache", "clean", "--dry-run", env=env, check=True).stdout
    assert dry.startswith(f"would free {match.group(1)} MB in {cache}"), dry
    assert (cache / "gguf-hf").is_dir()
    freed = ortllm("cache", "clean", env=env, check=True).stdout
    assert freed.startswith(f"freed {match.group(1)} MB in {cache}"), freed
    assert not (cache / "gguf-hf").exists() and not (cache / "pypi").exists()
    assert build_log.is_file()  # installed models are not the cache
    assert ortllm("cache", "clean", env=env, check=True).stdout.startswith(
        f"freed 0 MB in {cache} (it was empty)"
    )


def test_hub_failure_marks_the_step_failed_and_says_what_to_do(tmp_path) -> None:
    # nothing listens on port 9: the hub is unreachable whether or not this machine has a network
    env = {**isolated(tmp_path), "HF_ENDPOINT": "http://127.0.0.1:9"}
    proc = ortllm("pull", "llama-3-8b", env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[:-1] == [lines[0]] and "✗ Fetching weights" in lines[0], proc.stderr  # marked, not a spinner
    assert not set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏") & set(proc.stderr), proc.stderr
    error = lines[-1]
    assert error.startswith("error: Could not download 'meta-llama/Meta-Llama-3-8B-Instruct'"), error
    assert "Got:" not in error and "unreachable" in error
    assert "check the network" in error and "HF_TOKEN" in error and "`ortllm convert PATH`" in error


def test_failed_conversion_points_at_a_log_that_exists(tmp_path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1, "vocab_size": 100}))
    (folder / "model.safetensors").write_bytes(b"\0" * 16)  # no tokenizer, no real weights: the builder fails
    env = isolated(tmp_path)
    proc = ortllm("convert", str(folder), "--name", "broken", env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert "✗ Building ONNX model" in lines[-2], proc.stderr
    match = re.fullmatch(r"error: The genai builder failed: .+ \(full log: (.+)\)", lines[-1])
    assert match, lines[-1]
    log = Path(match.group(1))
    assert log.parent == tmp_path / "cache" / "logs" and log.name.startswith("broken-"), log
    assert "onnxruntime_genai.models.builder" in log.read_text()  # the builder's command line and output
    assert not list((tmp_path / "home" / "models").iterdir())  # no staging folder, nothing listed


def test_cache_clean_waits_for_a_running_conversion(tmp_path) -> None:
    env = isolated(tmp_path)
    (tmp_path / "cache" / "gguf-hf" / "m").mkdir(parents=True)
    (tmp_path / "cache" / "gguf-hf" / "m" / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    # a staging folder whose owner (this test process) is alive: a conversion is running
    (tmp_path / "home" / "models" / f".staging-m-cpu-int4-{os.getpid()}-abcd1234" / "cpu-int4").mkdir(
        parents=True
    )
    proc = ortllm("cache", "clean", env=env)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert "A conversion is running" in proc.stderr and (tmp_path / "cache" / "gguf-hf" / "m").is_dir()
    dry = ortllm("cache", "clean", "--dry-run", env=env, check=True).stdout
    assert dry.strip() == f"would free 3 MB in {tmp_path / 'cache'} (dequantised GGUF weights 3 MB)", dry
