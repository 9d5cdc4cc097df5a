"""The `genai` backend: onnxruntime-genai's model builder, run as a subprocess with its log captured."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from ortllm.errors import (
    ConversionFailed,
    InvalidBuildOptions,
    MissingDependency,
    UnsupportedArchitecture,
)

from . import child
from .embeddings import quantise_embeddings
from .grid import keep_source_grid

PRECISIONS = ("int4", "int8", "fp16", "bf16", "fp32")
EPS = ("cpu", "cuda", "dml", "webgpu")
# what the 0.18 builder itself accepts (it prints this list; other pairs fail late or build broken graphs)
VALID_COMBINATIONS = {
    "cpu": ("int4", "int8", "fp32"),
    "cuda": ("int4", "int8", "fp16", "bf16", "fp32"),
    "dml": ("int4", "fp16"),
    "webgpu": ("int4", "int8"),
}
BLOCK_SIZES = (16, 32, 64, 128, 256)
# int4 default: the most quantisation-sensitive MatMuls (llama.cpp's mixed plan) stay int8.
# benchmarks/FIDELITY.md: perplexity ratio to fp32 1.154 at 100 MB vs 1.216 at 90 MB for plain int4,
# at ~95% of its decode speed; the only plan within 1.1x the source GGUF's size that clearly helps.
INT4_DEFAULTS = {"matmul_mixed_precision": "mixed_layers:int8"}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
# bump when a change alters what a conversion builds: it is kept in the manifest, and cached test models
# built by another recipe are converted again (tests/conftest.py's import_prebuilt)
RECIPE = "4-source-grid-offsets"
# converters/grid.py keeps int8 matrices (5/6/8-bit sources) while the model stays within GRID_BUDGET x the GGUF's
# size, and an exact int8 LM head (worth 8 % perplexity on a Q4_0 SmolLM2) within HEAD_BUDGET x
GRID_BUDGET = 1.1
HEAD_BUDGET = 1.2


def keeps_grid(precision: str, ep: str, block_size: int | None) -> bool:
    """Whether a build from a GGUF keeps the GGUF's own blocks (converters/grid.py): int4 on the CPU at block 32."""
    return precision == "int4" and ep == "cpu" and block_size in (None, 32)


def check_options(precision: str, ep: str, block_size: int | None, accuracy_level: int | None) -> None:
    """Refuse combinations the builder cannot make, with the valid ones in the message."""
    if ep not in EPS:
        raise InvalidBuildOptions(f"Unknown execution provider '{ep}': choose one of {', '.join(EPS)}")
    if precision not in PRECISIONS:
        raise InvalidBuildOptions(f"Unknown precision '{precision}': choose one of {', '.join(PRECISIONS)}")
    if precision not in VALID_COMBINATIONS[ep]:
        raise InvalidBuildOptions(
            f"Precision {precision} is not available for the {ep} execution provider "
            f"(valid for {ep}: {', '.join(VALID_COMBINATIONS[ep])})"
        )
    quantized = precision in ("int4", "int8")
    if block_size is not None and (not quantized or block_size not in BLOCK_SIZES):
        raise InvalidBuildOptions(
            f"--block-size applies to int4/int8 and must be one of {', '.join(map(str, BLOCK_SIZES))}"
        )
    if accuracy_level is not None and (not quantized or accuracy_level not in ACCURACY_LEVELS):
        raise InvalidBuildOptions("--accuracy-level applies to int4/int8 and must be 0, 1, 2, 3 or 4")


def require_builder() -> None:
    """The builder needs the convert extra (torch, transformers 5, onnx, onnx-ir)."""
    missing = [m for m in ("torch", "transformers", "onnx", "onnx_ir") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependency(
            f"The convert extra is not installed (missing: {', '.join(missing)}): "
            "pip install torch==2.13.0 && pip install 'ortllm[convert]'"
        )
    if importlib.util.find_spec("onnxruntime_genai.models.builder") is None:
        raise MissingDependency(
            "onnxruntime-genai's model builder is missing: pip install 'onnxruntime-genai>=0.18'"
        )


@lru_cache(maxsize=1)
def supported_architectures() -> frozenset[str]:
    """The architectures the installed builder dispatches on, read from its own source."""
    spec = importlib.util.find_spec("onnxruntime_genai.models.builder")
    if spec is None or spec.origin is None:
        return frozenset()
    text = Path(spec.origin).read_text(encoding="utf-8")
    names: set[str] = set()
    for line in text.splitlines():
        if "config.architectures[0]" in line:
            names.update(re.findall(r'"([A-Za-z][A-Za-z0-9_]+)"', line))
    return frozenset(names)


def check_architecture(hf_dir: Path) -> str:
    """The folder's architecture, or a clear error naming it and the backend that could convert it."""
    try:
        config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConversionFailed(f"{hf_dir} has no readable config.json") from exc
    arch = (config.get("architectures") or ["<none>"])[0]
    supported = supported_architectures()
    if supported and arch not in supported:
        raise UnsupportedArchitecture(
            f"Architecture {arch} is not supported by the genai builder; "
            "convert it with --backend optimum (its own environment: make optimum-env)"
        )
    why = _cannot_build(arch, config)
    if why:
        raise UnsupportedArchitecture(f"{arch} cannot be converted by the genai builder: {why}")
    return arch


def _cannot_build(arch: str, config: dict[str, Any]) -> str | None:
    """Why the 0.18 builder, although it dispatches on `arch`, cannot build this config (None if it can)."""
    if arch == "GraniteMoeHybridForCausalLM":
        mamba = [t for t in config.get("layer_types") or [] if t not in ("attention", "full_attention")]
        if mamba:  # its Granite class builds attention layers only (fails on `None.q_proj` otherwise)
            return f"it builds attention layers only, and this model has {len(mamba)} Mamba layers"
    if arch == "GptOssForCausalLM" and not config.get("quantization_config"):
        # the builder reads the experts' original MXFP4 blocks; a dequantised save has none
        return "it reads the original MXFP4 checkpoint, and these weights are dequantised"
    return None


def build(
    hf_dir: Path,
    out_dir: Path,
    *,
    precision: str,
    ep: str,
    cache_dir: Path,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    include_hidden_states: bool = True,
    trust_remote_code: bool = False,
    extra: dict[str, str] | None = None,
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    gguf: Path | None = None,
    max_size: float | None = None,
) -> dict[str, object]:
    """Run the builder on a Hugging Face folder; return the build options used (for the manifest).

    With `gguf` (the folder was dequantised from it), an int4 CPU build keeps the GGUF's own blocks
    (converters/grid.py: all of its 4-bit ones, the 5-8-bit ones within `max_size` x the GGUF) and the GGUF's
    per-tensor choice of widths replaces the builder's int8 picks.
    """
    keep_grid = gguf is not None and keeps_grid(precision, ep, block_size)
    options: dict[str, str] = {"hf_token": "false"}
    if include_hidden_states:
        options["include_hidden_states"] = "true"
    if block_size is not None:
        options["block_size"] = str(block_size)
    if accuracy_level is not None:
        options["accuracy_level"] = str(accuracy_level)
    if trust_remote_code:
        options["hf_remote"] = "true"
    if precision == "int4" and not keep_grid:
        options.update(INT4_DEFAULTS)
    options.update(extra or {})
    # the builder dies with this process (even on kill -9) and, in its own process group, a Ctrl-C in the
    # terminal reaches only ortllm, which stops it below
    cmd = child.command(
        os.getpid(),
        # the builder, run by a shim that translates the transformers 5 configs it cannot read
        "ortllm.converters.builder_compat",
        "onnxruntime_genai.models.builder",
        "-i",
        str(hf_dir),
        "-o",
        str(out_dir),
        "-p",
        precision,
        "-e",
        ep,
        "-c",
        str(cache_dir),
        "--extra_options",
        *[f"{k}={v}" for k, v in options.items()],
    )
    started = time.monotonic()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", **own_group()
        )
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                log.write(line)
                if on_line:
                    on_line(line.rstrip())
            code = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if code != 0 or not (out_dir / "genai_config.json").is_file():
        raise ConversionFailed(f"The genai builder failed: {_last_error(log_path)} (full log: {log_path})")
    _keep_special_token_flags(hf_dir, out_dir)
    _compact_tokenizer(out_dir)
    info: dict[str, object] = {"recipe": RECIPE}
    bits = {"int4": 4, "int8": 8}.get(precision)
    # GatherBlockQuantized runs 8-bit tables on the CPU EP; the builder itself emits only 4-bit ones elsewhere
    if bits is not None and (bits == 4 or ep == "cpu"):
        try:
            info["embeddings"] = quantise_embeddings(out_dir, bits, block_size or 32)
        except Exception as exc:
            raise ConversionFailed(
                f"Quantising the embedding table failed: {exc} (full log: {log_path})"
            ) from exc
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"token embedding table: {info['embeddings']}\n")
    if keep_grid:
        assert gguf is not None
        try:
            # fp32 scales make an int8 matrix 1.125 bytes a weight (Q8_0: 1.0625, Q5_0: 0.69): the budgets decide
            # which 5/6/8-bit sources stay int8; Gemma 3's 262k-row Q8_0 table would take it to ~1.4x and stays int4
            # a user's --max-size bounds the whole model; by default the LM head may take it to HEAD_BUDGET
            size, budget = gguf.stat().st_size, max_size or GRID_BUDGET
            head = max_size or max(budget, HEAD_BUDGET)
            grid = keep_source_grid(out_dir, hf_dir, gguf, int(budget * size), int(head * size))
            grid["size_budget"] = budget
            info["grid"] = grid
            if grid["lm_head"] and "shared" in str(info.get("embeddings", "")):
                info["embeddings"] = "int8 (the GGUF's Q8_0, exact), shared with the LM head"
        except Exception as exc:
            raise ConversionFailed(f"Keeping the GGUF's grid failed: {exc} (full log: {log_path})") from exc
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"source grid: {info['grid']}\n")
    return {
        **info,
        "block_size": block_size or 32,
        "accuracy_level": accuracy_level if accuracy_level is not None else (4 if ep == "cpu" else 0),
        "extra_options": options,
        "build_seconds": round(time.monotonic() - started, 1),
    }


def _keep_special_token_flags(hf_dir: Path, out_dir: Path) -> None:
    """Carry add_bos_token/add_eos_token over: the builder's tokenizer_config.json drops them (Gemma needs BOS)."""
    try:
        source = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
        target_path = out_dir / "tokenizer_config.json"
        target = json.loads(target_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    flags = {k: source[k] for k in ("add_bos_token", "add_eos_token") if k in source and k not in target}
    if flags:
        target_path.write_text(json.dumps({**target, **flags}, indent=2), encoding="utf-8")


def _compact_tokenizer(out_dir: Path) -> None:
    """Write tokenizer.json without the indentation transformers saves it with: the same JSON, 45-55 % smaller
    (SmolLM2 3.5 → 1.6 MB, Gemma 3's 262k-token vocabulary 33 → ~15 MB), which counts against a model's size."""
    path = out_dir / "tokenizer.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)


def own_group() -> dict[str, Any]:
    """Popen arguments that start a child in its own process group (POSIX: a new session)."""
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


def _last_error(log_path: Path) -> str:
    lines = [
        ln.strip() for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()
    ]
    for line in reversed(lines):
        if re.search(r"(Error|Exception|error:)", line):
            return line[:300]
    return lines[-1][:300] if lines else "no output"
