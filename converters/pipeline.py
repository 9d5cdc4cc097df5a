"""One conversion: resolve the source, fetch, dequantise (GGUF), build, install atomically."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from ortllm import __version__
from ortllm.catalog import CatalogEntry, load_catalog
from ortllm.errors import ConversionFailed, InvalidBuildOptions, NotEnoughDiskSpace
from ortllm.paths import cache_dir
from ortllm.store import InstalledModel, ModelStore, validate_name, variant_id

from . import genai, sources
from .gguf import dequantise

# the subfolders of the cache a conversion fills (`ortllm cache clean` removes only these)
CACHE_PARTS = {
    "gguf-hf": "dequantised GGUF weights",
    "pypi": "downloaded wheels",
    "hf": "Hugging Face downloads",
    "builder": "builder scratch files",
    "logs": "logs of failed conversions",
}
BITS = {"int4": 4, "int8": 8, "fp16": 16, "bf16": 16, "fp32": 32}
DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


class Progress(Protocol):
    """What a conversion reports: the start and end of each step, and builder log lines."""

    def step(self, name: str) -> None: ...
    def done(self, name: str) -> None: ...
    def log(self, line: str) -> None: ...


class ByteProgress(Progress, Protocol):
    """A Progress that also hears the source download's bytes (optional: `convert` asks with getattr)."""

    def downloaded(self, done: int, total: int) -> None: ...


class SilentProgress:
    def step(self, name: str) -> None:
        pass

    def done(self, name: str) -> None:
        pass

    def log(self, line: str) -> None:
        pass

    def downloaded(self, done: int, total: int) -> None:
        pass


@dataclass
class ConvertRequest:
    """What to convert and how; `source` is a catalog name or a source string."""

    source: str
    name: str | None = None
    precision: str | None = (
        None  # None: int4, or fp32 for embedding models (4-bit tables cost cosine fidelity)
    )
    ep: str = "cpu"
    backend: str | None = None
    block_size: int | None = None
    accuracy_level: int | None = None
    force: bool = False
    extra: dict[str, str] = field(default_factory=dict)
    max_size: float | None = None  # a GGUF source's size budget (x its file): None = genai.GRID_BUDGET


def resolve(request: ConvertRequest) -> tuple[CatalogEntry | None, sources.Source, str]:
    """The catalog entry (if any), the parsed source and the store name."""
    entry = load_catalog().find(request.source)
    spec = entry.source if entry else request.source
    src = sources.parse_source(spec) if entry else _parse_user_source(request.source)
    name = request.name or (entry.name if entry else _default_name(src))
    return entry, src, validate_name(name)


def _parse_user_source(text: str) -> sources.Source:
    from ortllm.errors import ModelNotFound

    looks_like_name = not text.startswith(("hf:", "pypi:")) and "/" not in text and "\\" not in text
    if looks_like_name and not Path(text).exists():
        known = ", ".join(sorted(load_catalog().entries))
        raise ModelNotFound(
            f"Unknown model '{text}': not in the catalog and not a path. Known models: {known}"
        )
    return sources.parse_source(text)


def _default_name(src: sources.Source) -> str:
    base = src.member or src.repo
    stem = Path(base.split("==")[0]).name
    stem = re.sub(r"\.gguf$", "", stem, flags=re.I)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.").lower() or "model"


def convert(request: ConvertRequest, store: ModelStore, progress: Progress | None = None) -> InstalledModel:
    """Convert `request.source` into the store and return the installed model."""
    progress = progress or SilentProgress()
    entry, src, name = resolve(request)
    if request.precision is None:
        request = replace(request, precision="fp32" if entry and entry.kind == "embedding" else "int4")
    assert request.precision is not None
    backend = request.backend or (entry.backend if entry else "genai")
    if backend not in ("genai", "optimum"):
        raise InvalidBuildOptions(f"Unknown backend '{backend}': choose genai or optimum")
    genai.check_options(request.precision, request.ep, request.block_size, request.accuracy_level)
    if request.max_size is not None and not 1.0 <= request.max_size <= 4.0:
        raise InvalidBuildOptions(
            f"--max-size {request.max_size:g} is out of range: give 1.0 to 4.0 (x the GGUF)"
        )
    if request.max_size is not None and not genai.keeps_grid(
        request.precision, request.ep, request.block_size
    ):
        raise InvalidBuildOptions(
            "--max-size applies to int4 builds for the cpu execution provider at block size 32, "
            "the ones that keep a GGUF's own blocks"
        )
    vid = variant_id(request.ep, request.precision)
    existing = store.find(name)
    if existing and vid in existing.variants and not request.force:
        return existing
    if backend == "optimum":
        from .optimum import require_optimum

        require_optimum()
    else:
        genai.require_builder()

    cache = cache_dir()
    progress.step("fetch")
    weights = sources.fetch(src, cache, getattr(progress, "downloaded", None))
    progress.done("fetch")
    log_path = new_log(cache, name)
    try:
        model = _convert_fetched(request, store, progress, entry, src, name, vid, backend, weights, log_path)
    except BaseException:
        if log_path.stat().st_size == 0:  # refused before anything ran: nothing to read
            log_path.unlink()
        raise
    log_path.unlink(missing_ok=True)  # kept in the model's folder; only failed conversions' logs stay
    return model


def _convert_fetched(
    request: ConvertRequest,
    store: ModelStore,
    progress: Progress,
    entry: CatalogEntry | None,
    src: sources.Source,
    name: str,
    vid: str,
    backend: str,
    weights: sources.LocalWeights,
    log_path: Path,
) -> InstalledModel:
    """Dequantise (GGUF), build and install fetched weights; the steps' output goes to `log_path`."""
    assert request.precision is not None
    cache = cache_dir()
    hf_dir = weights.path
    if request.max_size is not None and (weights.gguf is None or backend != "genai"):
        raise InvalidBuildOptions(
            "--max-size sizes what a GGUF source keeps of its own blocks: this source is no GGUF"
        )
    if weights.gguf is not None:
        _check_space(store.root, weights.gguf.stat().st_size * 8, "dequantise the GGUF")
        progress.step("dequantise")
        try:
            with _output_to(log_path):  # transformers' own tqdm bars: into the log, not below the steps
                hf_dir = dequantise(weights.gguf, cache)
        except ConversionFailed as exc:
            raise ConversionFailed(f"{exc} (full log: {log_path})") from exc
        progress.done("dequantise")
    if backend == "genai":
        genai.check_architecture(hf_dir)
    _check_space(store.root, _estimate_output_bytes(hf_dir, request.precision), "build the model")

    manifest = _model_manifest(entry, request, src, backend)
    with store.install(name, vid, manifest) as out_dir:
        progress.step("build")
        if backend == "genai":
            build_info = genai.build(
                hf_dir,
                out_dir,
                precision=request.precision,
                ep=request.ep,
                cache_dir=cache / "builder",
                block_size=request.block_size,
                accuracy_level=request.accuracy_level,
                trust_remote_code=bool(entry and entry.trust_remote_code),
                extra=request.extra,
                log_path=log_path,
                on_line=progress.log,
                gguf=weights.gguf,
                max_size=request.max_size,
            )
        else:
            from .optimum import build as optimum_build

            build_info = optimum_build(hf_dir, out_dir, precision=request.precision, log_path=log_path)
        shutil.copy(log_path, out_dir / "build.log")
        manifest["variants"] = {
            vid: {
                "precision": request.precision,
                "ep": request.ep,
                "backend": backend,
                "source_weights": str(weights.gguf or weights.path),
                "versions": _versions(),
                **build_info,
            }
        }
        manifest["kind"] = build_info.get("kind", manifest.get("kind", "chat"))  # an exported encoder
        if not manifest.get("context_size"):
            manifest["context_size"] = _context_length(out_dir)
        progress.done("build")
    return store.get(name)


def new_log(cache: Path, name: str) -> Path:
    """A fresh build log under the cache (it outlives the staging folder, so an error can point at it)."""
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        path = logs / (f"{stem}.log" if n == 1 else f"{stem}-{n}.log")
        with contextlib.suppress(FileExistsError):
            path.open("x").close()
            return path
    raise ConversionFailed(f"Could not create a build log in {logs}")


@contextlib.contextmanager
def _output_to(log_path: Path) -> Iterator[None]:
    """Send this process's Python-level stdout and stderr (progress bars, prints) to the log meanwhile."""
    with (
        open(log_path, "a", encoding="utf-8") as log,
        contextlib.redirect_stdout(log),
        contextlib.redirect_stderr(log),
    ):
        yield


def _model_manifest(
    entry: CatalogEntry | None, request: ConvertRequest, src: sources.Source, backend: str
) -> dict[str, Any]:
    if entry:
        return {
            "source": entry.source,
            "catalog_name": entry.name,
            "hf_name": entry.hf_name,
            "description": entry.description,
            "family": entry.family,
            "template": entry.template,
            "context_size": entry.context_size,
            "kind": entry.kind,
            "backend": backend,
            "parameters": dict(entry.parameters),
        }
    return {
        "source": src.spec,
        "kind": "chat",
        "backend": backend,
        "parameters": {},
        "template": "auto",
        "family": "",
    }


def _context_length(out_dir: Path) -> int:
    try:
        return int(json.loads((out_dir / "genai_config.json").read_text())["model"]["context_length"])
    except (OSError, ValueError, KeyError):
        return 0


def _versions() -> dict[str, str]:
    out = {"ortllm": __version__}
    for dist in ("onnxruntime-genai", "onnxruntime", "transformers", "torch", "onnx", "gguf"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _weights_bytes(hf_dir: Path) -> tuple[int, int]:
    """Total weight bytes in the folder and the bit width they are stored in."""
    total = sum(f.stat().st_size for pat in ("*.safetensors", "*.bin") for f in hf_dir.glob(pat))
    try:
        cfg = json.loads((hf_dir / "config.json").read_text())
        bits = DTYPE_BITS.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float16"), 16)
    except (OSError, ValueError):
        bits = 16
    return total, bits


def _estimate_output_bytes(hf_dir: Path, precision: str) -> int:
    total, bits = _weights_bytes(hf_dir)
    return int(total * BITS[precision] / bits * 1.25) + (64 << 20)


def _check_space(folder: Path, need: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if free < need:
        raise NotEnoughDiskSpace(
            f"Not enough disk space to {what}: about {need >> 20} MB needed in {folder}, {free >> 20} MB free"
        )
