"""The `optimum` backend: export with optimum in its own environment (transformers < 4.58)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ortllm.errors import MissingDependency

OPTIMUM_HINT = (
    "The optimum backend needs its own environment (optimum pins transformers<4.58, which the genai "
    "builder cannot use): run `make optimum-env`, then `.venv-optimum/bin/ortllm convert --backend optimum ...`"
)


def require_optimum() -> None:
    """Fail with the exact install command unless optimum's exporter can be imported here."""
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.exporters.onnx") is None:
        raise MissingDependency(OPTIMUM_HINT)


def build(hf_dir: Path, out_dir: Path, *, precision: str, log_path: Path) -> dict[str, object]:
    # the exporter itself lands with the portability work; until then say so instead of failing late
    raise MissingDependency("The optimum exporter is not available in this ortllm release; use --backend genai")
