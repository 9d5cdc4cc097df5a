"""Measurements behind `ortllm bench`: the engine alone (like llama-bench), a server under concurrent
streaming load (like vLLM's bench serve), the machine's memory-bandwidth ceiling, and llama.cpp as
the peer measured in the same run."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

FILLER = (
    "The quick brown fox jumps over the lazy dog while the compiler turns source code into machine "
    "instructions, and the database index keeps sorted keys in balanced trees. "
)


@dataclass
class Stat:
    """Repeated measurements of one quantity."""

    values: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else 0.0

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def pct(self, q: float) -> float:
        if not self.values:
            return 0.0
        ordered = sorted(self.values)
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    def summary(self) -> dict[str, float]:
        return {"mean": round(self.mean, 3), "sd": round(self.sd, 3), "n": len(self.values)}


def peak_rss_mb() -> float:
    """This process's peak resident memory (MB), on POSIX and Windows alike."""
    import psutil

    info = psutil.Process().memory_info()
    peak = getattr(info, "peak_wset", None)  # Windows
    if peak is None:
        import resource  # POSIX only: imported here so the CLI loads on Windows

        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB elsewhere
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
    return peak / 1e6


def memory_bandwidth_gbs(size_mb: int = 1024, repeats: int = 4, threads: int = 1) -> dict[str, float]:
    """Read and copy bandwidth (GB/s) over `size_mb` MiB, far larger than the caches: the best of `repeats`."""
    from concurrent.futures import ThreadPoolExecutor

    data = np.ones(size_mb * (1 << 20) // 8, dtype=np.float64)
    target = np.empty_like(data)
    parts = np.array_split(data, max(1, threads))
    dests = np.array_split(target, max(1, threads))

    def best(fn: Any) -> float:
        fastest = float("inf")
        with ThreadPoolExecutor(len(parts)) as pool:
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(fn, range(len(parts))))
                fastest = min(fastest, time.perf_counter() - start)
        return fastest

    read = data.nbytes / best(lambda i: parts[i].sum()) / 1e9  # numpy releases the GIL: threads overlap
    copy = 2 * data.nbytes / best(lambda i: np.copyto(dests[i], parts[i])) / 1e9  # bytes read + written
    return {"read_gbs": round(read, 1), "copy_gbs": round(copy, 1), "threads": len(parts)}


# Inputs that read one row per token, not the whole tensor: embeddings' Gather, GQA's cos/sin caches.
_ROW_READERS = {"Gather", "GatherBlockQuantized", "GroupQueryAttention"}


def decode_bytes(model_dir: Path) -> dict[str, int]:
    """Bytes one decode step reads: weights from the graph's real initializer sizes, and KV per context token."""
    import onnx

    weights = kv_per_token = 0
    config = model_dir / "genai_config.json"
    decoder = json.loads(config.read_text())["model"]["decoder"] if config.exists() else {}
    for path in sorted(model_dir.glob("*.onnx")):
        graph = onnx.load(str(path), load_external_data=False).graph
        consumers: dict[str, set[str]] = {}
        for node in graph.node:
            for name in node.input:
                consumers.setdefault(name, set()).add(node.op_type)
        for t in graph.initializer:
            if consumers.get(t.name, set()) - _ROW_READERS:  # read in full by a MatMul or a norm each step
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
                weights += int(np.prod(t.dims, dtype=np.int64)) * itemsize
        for value in graph.input:
            if value.name.startswith("past_key_values."):  # [batch, kv_heads, seq, head_dim]
                tensor = value.type.tensor_type
                dims = tensor.shape.dim  # the head dim is often symbolic: genai_config.json knows it
                kv_heads = dims[1].dim_value or decoder["num_key_value_heads"]
                head_dim = dims[3].dim_value or decoder["head_size"]
                itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).itemsize
                kv_per_token += kv_heads * head_dim * itemsize
    return {"weights": weights, "kv_per_context_token": kv_per_token}


def decode_ceiling(read_gbs: float, sizes: dict[str, int], context: float) -> float:
    """Tokens/s if every decode step only streamed its weights and KV cache at `read_gbs`."""
    return read_gbs * 1e9 / (sizes["weights"] + sizes["kv_per_context_token"] * context)


def ceiling_note(tg_tok_s: float, ceiling: float) -> str:
    """The share of the ceiling reached, or why the figure would be meaningless."""
    if ceiling <= 0 or tg_tok_s <= 0:
        return "no decode ceiling: nothing measured"
    share = tg_tok_s / ceiling
    if share > 1:
        return (
            f"tg ran at {share:.0%} of the computed ceiling: impossible, so the bandwidth probe "
            "under-measures on this machine (no ceiling reported)"
        )
    return f"tg reached {share:.0%} of the ceiling"


def prompt_of(model: Any, n_tokens: int) -> list[int]:
    """A fixed English prompt of exactly `n_tokens` tokens."""
    ids = model.encode(FILLER * (n_tokens // 20 + 2))
    return ids[:n_tokens]


def engine_bench(
    scheduler: Any,
    *,
    pp: int = 512,
    tg: int = 128,
    batches: tuple[int, ...] = (1, 2, 4, 8),
    reps: int = 3,
    warmup: int = 1,
) -> dict[str, Any]:
    """pp (prompt tok/s), tg (generation tok/s), TTFT and batched throughput through the runtime's scheduler."""
    from ortllm.runtime.options import validate_options
    from ortllm.runtime.types import GenerationRequest

    model = scheduler.model
    long_prompt = prompt_of(model, pp)
    short_prompt = prompt_of(model, 16)
    # plain decoding, as llama-bench measures it: greedy text of a fixed length loops on small models and
    # prompt lookup would then draft most of it (SmolLM2 tg128 186 instead of ~130 tok/s); the workload
    # benchmark (benchmarks/workload.py) measures speculation on real requests
    for backend in scheduler.backends:
        if getattr(backend, "speculate", False):
            backend.speculate = False

    runs = itertools.count()
    drafted = [0]

    def run(tokens: list[int], max_tokens: int) -> Any:
        # ignore EOS: greedy decoding of exactly max_tokens tokens, as llama-bench does
        options = validate_options(
            {"temperature": 0, "max_tokens": max_tokens, "min_tokens": max_tokens, "repeat_penalty": 1.0}
        )
        # a different first token each run: no prefix reuse, every prompt is processed in full
        first = 100 + next(runs) % 20_000
        request = GenerationRequest(options, prompt_tokens=[first, *tokens[1:]])
        with scheduler.submit(request) as stream:
            result = stream.result()
        drafted[0] += result.timings.draft_tokens
        return result

    for _ in range(warmup):
        run(short_prompt, 8)
        run(long_prompt, 1)  # the first long prefill pays one-off costs (a GPU's kernel tuning, KV pages)
    pp_stat, ttft_stat, tg_stat = Stat(), Stat(), Stat()
    for _ in range(reps):
        r = run(long_prompt, 1)
        pp_stat.values.append(pp / r.timings.ttft_s)
        r = run(short_prompt, tg)
        ttft_stat.values.append(r.timings.ttft_s)
        if r.usage.completion_tokens > 1:
            tg_stat.values.append(r.timings.decode_tokens_per_s)
    batch_results = {}
    for size in batches:
        agg = Stat()
        for _ in range(reps):
            results: list[Any] = []
            start = time.perf_counter()
            threads = [
                threading.Thread(target=lambda out=results: out.append(run(short_prompt, tg)))
                for _ in range(size)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            agg.values.append(sum(r.usage.completion_tokens for r in results) / (time.perf_counter() - start))
        batch_results[str(size)] = agg.summary()
    return {
        f"pp{pp}_tok_s": pp_stat.summary(),
        f"tg{tg}_tok_s": tg_stat.summary(),
        "ttft_s": ttft_stat.summary(),
        "batch_aggregate_tok_s": batch_results,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": model.threads,
        "batcher": scheduler.batcher,
        "draft_tokens": drafted[0],  # 0: plain decoding (speculation off, see above)
    }


# ---- serving: N concurrent streaming clients against an OpenAI-compatible /v1/completions ------------


def _stream_once(
    url: str, model: str, prompt: str, max_tokens: int, headers: dict[str, str]
) -> dict[str, Any]:
    import requests

    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    start = time.perf_counter()
    stamps: list[float] = []
    try:
        with requests.post(
            url + "/v1/completions", json=body, stream=True, timeout=600, headers=headers
        ) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}"}
            for raw in r.iter_lines():
                line = raw.decode("utf-8", "replace")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                text = json.loads(data)["choices"][0].get("text") if data.startswith("{") else ""
                if text:
                    stamps.append(time.perf_counter())
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    if not stamps:
        return {"error": "no tokens"}
    end = time.perf_counter()
    itl = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "ttft": stamps[0] - start,
        "tokens": len(stamps),
        "latency": end - start,
        "tpot": (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0,
        "itl": itl,
    }


def first_token_after(url: str, model: str, since: float) -> float:
    """Seconds from `since` (a server's launch) to the first streamed token of a first request."""
    result = _stream_once(url, model, "Hello", 1, {})
    if "error" in result:
        raise RuntimeError(f"first request failed: {result['error']}")
    return time.perf_counter() - since - result["latency"] + result["ttft"]


def serve_bench(
    url: str,
    model: str,
    *,
    concurrency: tuple[int, ...] = (1, 4, 8, 16),
    requests_per_client: int = 2,
    prompt_tokens: tuple[int, ...] = (32, 128, 384),
    max_tokens: tuple[int, ...] = (64, 128),
    stagger_s: float = 0.05,
    api_key: str | None = None,
    distinct: bool = False,
) -> dict[str, Any]:
    """Mixed-length streaming requests at each concurrency; clients start staggered (late arrivals).

    The prompts are prefixes of one text (a shared system prompt or document: prefix caches help);
    `distinct` starts each with its own tag, so no request can reuse another's keys and values."""
    nonce = os.urandom(3).hex()
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    _stream_once(url, model, "Hello", 4, headers)  # warm-up
    out: dict[str, Any] = {}
    for n in concurrency:
        samples: list[dict[str, Any]] = []

        def client(i: int, out: list[dict[str, Any]] = samples, level: int = n) -> None:
            time.sleep(i * stagger_s)
            for k in range(requests_per_client):
                words = prompt_tokens[(i + k) % len(prompt_tokens)]
                prompt = " ".join((FILLER.split() * (words // 10 + 1))[:words])
                if distinct:
                    prompt = f"Request {nonce}-{level}-{i}-{k}. {prompt}"
                out.append(_stream_once(url, model, prompt, max_tokens[(i + k) % len(max_tokens)], headers))

        start = time.perf_counter()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
        ok = [s for s in samples if "error" not in s]
        ttft, tpot = Stat([s["ttft"] for s in ok]), Stat([s["tpot"] for s in ok if s["tpot"]])
        itl = Stat([x for s in ok for x in s["itl"]])
        out[str(n)] = {
            "requests": len(samples),
            "errors": len(samples) - len(ok),
            "ttft_s": {
                "p50": round(ttft.pct(50), 3),
                "p90": round(ttft.pct(90), 3),
                "p99": round(ttft.pct(99), 3),
                "max": round(max(ttft.values, default=0), 3),
            },
            "tpot_ms": round(tpot.mean * 1000, 2),
            "itl_ms": {
                "p50": round(itl.pct(50) * 1000, 2),
                "p90": round(itl.pct(90) * 1000, 2),
                "p99": round(itl.pct(99) * 1000, 2),
            },
            "output_tok_s": round(sum(s["tokens"] for s in ok) / wall, 1),
            "single_stream_tok_s": round(1 / tpot.mean, 1) if tpot.mean else 0.0,
            "requests_per_s": round(len(ok) / wall, 3),
        }
    return out


# ---- the llama.cpp peer -----------------------------------------------------------------------------


def find_llama_cpp(path: str | None) -> Path:
    """The folder holding llama-bench and llama-server (`--llama-cpp`, `$ORTLLM_LLAMA_CPP`, or PATH)."""
    candidates = [path, os.environ.get("ORTLLM_LLAMA_CPP")]
    for c in candidates:
        if c and (Path(c) / "llama-bench").exists():
            return Path(c)
    found = shutil.which("llama-bench")
    if found:
        return Path(found).parent
    from ortllm.errors import MissingDependency

    raise MissingDependency(
        "llama.cpp not found: build llama-bench and llama-server (see benchmarks/NOTES.md) "
        "and pass --llama-cpp DIR or set ORTLLM_LLAMA_CPP"
    )


class PeerFailed(Exception):
    """A llama.cpp tool that crashed or failed: reported as one line, the rest of the bench goes on."""


def run_peer(cmd: list[str], env: dict[str, str] | None = None) -> str:
    """Run one peer tool; its stdout, or PeerFailed naming the tool and its exit status or signal."""
    import signal

    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode == 0:
        return proc.stdout
    tool = Path(cmd[1] if cmd[0] == sys.executable else cmd[0]).name
    if proc.returncode < 0:
        how = f"was killed by signal {signal.Signals(-proc.returncode).name}"
    else:
        last = (proc.stderr.strip().splitlines() or [""])[-1][:200]
        how = f"exited with status {proc.returncode}" + (f": {last}" if last else "")
    raise PeerFailed(f"{tool} {how}")


def llama_bench(binaries: Path, gguf: Path, *, pp: int, tg: int, threads: int, reps: int) -> dict[str, Any]:
    """llama-bench's pp/tg tokens/s on `gguf` (it generates exactly `tg` tokens, ignoring EOS)."""
    cmd = [str(binaries / "llama-bench"), "-m", str(gguf), "-p", str(pp), "-n", str(tg), "-t", str(threads),
           "-r", str(reps), "-o", "json"]  # fmt: skip
    rows = json.loads(run_peer(cmd))
    out = {}
    for row in rows:
        key = f"pp{row['n_prompt']}_tok_s" if row["n_prompt"] else f"tg{row['n_gen']}_tok_s"
        out[key] = {"mean": round(row["avg_ts"], 3), "sd": round(row["stddev_ts"], 3), "n": reps}
    return out


# ---- a random-weight model of a real model's shape (the speed of a size, without a download) ----------

SHAPES: dict[str, dict[str, Any]] = {
    # Llama-3.2-1B's shape: 1.07 B parameters with SmolLM2's 49k vocabulary
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64},
    # small enough for the test suite
    "llama-tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16},
}  # fmt: skip
PEER_QUANTS = ("Q4_0", "Q4_K_M")


def bench_cache() -> Path:
    """Where synthetic models and their GGUFs are kept (`$ORTLLM_BENCH_CACHE`, else ~/.cache/ortllm/bench)."""
    import platformdirs

    env = os.environ.get("ORTLLM_BENCH_CACHE")
    path = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("ortllm")) / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def synthetic_config(shape: str, tokenizer_dir: Path) -> Any:
    """A LlamaConfig of `shape` with the vocabulary and special tokens of the model in `tokenizer_dir`."""
    import transformers

    model = json.loads((tokenizer_dir / "genai_config.json").read_text())["model"]
    eos = model["eos_token_id"]
    return transformers.LlamaConfig(
        **SHAPES[shape],
        vocab_size=model["vocab_size"],
        bos_token_id=model["bos_token_id"],
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )


def synthetic_model(shape: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A Hugging Face folder (seeded random fp16 weights, safetensors, tokenizer files), made once and cached."""
    target = bench_cache() / shape / "hf"
    if (target / "model.safetensors").exists():
        return target
    import torch  # only when making it: importing torch costs seconds and memory
    import transformers

    staging = target.with_name(f"hf.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        synthetic_config(shape, tokenizer_dir), dtype=torch.float16
    )
    model.save_pretrained(staging, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, staging / name)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)  # complete or absent: an interrupted run leaves no half-written model behind
    return target


def peer_ggufs(hf_dir: Path, binaries: Path) -> dict[str, Path]:
    """`hf_dir` as GGUF through the peer's own convert_hf_to_gguf.py (f16), then Q4_0 and Q4_K_M; cached."""
    f16 = hf_dir.parent / "model-f16.gguf"
    if not f16.exists():
        script = binaries / "convert_hf_to_gguf.py"
        if not script.exists():
            raise PeerFailed(f"{script} not found: run benchmarks/build_peer.sh")
        partial = f16.with_suffix(".tmp")
        cmd = [sys.executable, str(script), str(hf_dir), "--outtype", "f16", "--outfile", str(partial)]
        # gguf-py and pydeps (sentencepiece) sit beside the script: benchmarks/build_peer.sh puts them there
        run_peer(cmd, env={"PYTHONPATH": os.pathsep.join(str(binaries / d) for d in ("gguf-py", "pydeps"))})
        partial.rename(f16)
    out = {}
    for quant in PEER_QUANTS:
        path = hf_dir.parent / f"model-{quant}.gguf"
        if not path.exists():
            partial = path.with_suffix(".tmp")
            run_peer([str(binaries / "llama-quantize"), str(f16), str(partial), quant])
            partial.rename(path)
        out[quant] = path
    return out


class ServerProcess:
    """A server started on a loopback port (in its own process group) and stopped afterwards.

    With `log` (an open file) its output is kept there and quoted when it fails to start."""

    def __init__(
        self,
        cmd: list[str],
        port: int,
        health: str = "/health",
        timeout_s: float = 120,
        *,
        log: IO[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        import requests

        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.launched = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd,
            stdout=log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        name = Path(cmd[0]).name if cmd[0] != sys.executable else " ".join(cmd[2:4])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited while starting: {self.output()}")
            try:
                if requests.get(self.url + health, timeout=5).ok:
                    return
            except requests.RequestException:  # not listening yet, or still loading models
                time.sleep(0.2)
        output = self.output()
        self.stop()
        raise RuntimeError(f"{name} did not start: {output}")

    def output(self) -> str:
        """What the server printed so far (empty without a log)."""
        if self.log is None or self.log.closed:
            return ""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    @classmethod
    def ortllm(
        cls,
        model: str,
        *,
        extra: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log: IO[str] | None = None,
        timeout_s: float = 120,
    ) -> ServerProcess:
        """`ortllm serve` of `model` (`extra`: more serve options; `env`: its environment)."""
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "ortllm.cli.main",
            "serve",
            "--port",
            str(port),
            "--model",
            model,
            *extra,
        ]
        return cls(cmd, port, timeout_s=timeout_s, log=log, env=env)

    @classmethod
    def llama(
        cls,
        binaries: Path,
        gguf: Path,
        *,
        parallel: int,
        threads: int,
        ctx_per_slot: int = 1024,
        extra: Sequence[str] = (),
        log: IO[str] | None = None,
        timeout_s: float = 120,
    ) -> ServerProcess:
        """llama.cpp's own server (continuous batching, what Ollama runs underneath); `extra`: more of its
        options (e.g. `--spec-type ngram-mod`)."""
        port = free_port()
        return cls([str(binaries / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
                    "-np", str(parallel), "-c", str(ctx_per_slot * parallel), "-t", str(threads), "--no-webui",
                    *extra], port, timeout_s=timeout_s, log=log)  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not None:
            self.log.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
