"""`ortllm doctor`: what is installed, which execution providers work, which variant each model uses."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ortllm import __version__
from ortllm.errors import OrtllmError
from ortllm.paths import ortllm_home
from ortllm.store import ModelStore

GENAI_DISTS = (
    "onnxruntime-genai",
    "onnxruntime-genai-cuda",
    "onnxruntime-genai-directml",
    "onnxruntime-genai-winml",
)
ORT_DISTS = (
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxruntime-directml",
    "onnxruntime-openvino",
    "onnxruntime-qnn",
)
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "fma", "f16c")


def _installed(names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def cpu_features() -> dict[str, bool] | None:
    """x86 SIMD features that ORT's int4 kernels use; None where they cannot be read."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    flags: set[str] = set()
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {f: f in flags for f in CPU_FLAGS}


def report() -> dict[str, Any]:
    from ortllm.runtime.loaded import (
        batcher_choice,
        batcher_for,
        batcher_for_display,
        choose_variant,
        default_threads,
        ep_support,
        variant_ep,
    )
    from ortllm.runtime.scheduler import engine_supported

    genai = _installed(GENAI_DISTS)
    eps = ep_support()
    ort = _installed(ORT_DISTS)
    problems = []
    if len(genai) > 1:
        problems.append(f"several onnxruntime-genai flavours are installed ({', '.join(genai)}): keep one")
    if len(ort) > 1:
        problems.append(f"several onnxruntime flavours are installed ({', '.join(ort)}): keep one")
    models = []
    requested = batcher_choice()
    for model in ModelStore().list():
        try:
            variant, reason = choose_variant(model)
            choice: dict[str, Any] = {"variant": variant.id, "reason": reason}
            if model.kind != "embedding":  # the same decision `ortllm chat` and `serve` make at load
                batcher, why, _ = batcher_for(variant.path, variant_ep(variant), requested)
                choice.update(batcher=batcher, runtime=batcher_for_display(batcher, why))
        except (OrtllmError, OSError, ValueError) as exc:
            choice = {"variant": None, "reason": str(exc)}
        models.append({"name": model.name, "variants": sorted(model.variants), **choice})
    convert_missing = [
        m for m in ("torch", "transformers", "onnx", "onnx_ir", "gguf") if importlib.util.find_spec(m) is None
    ]
    return {
        "ortllm": __version__,
        "python": sys.version.split()[0],
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "home": str(ortllm_home()),
        "onnxruntime_genai": genai,
        "onnxruntime": ort,
        "engine_api": engine_supported(),
        "execution_providers": [ep for ep, why in eps.items() if why is None] + ["cpu"],
        "unavailable_providers": {ep: why for ep, why in eps.items() if why is not None},
        "cpu_threads": default_threads(),
        "cpu_features": cpu_features(),
        "convert_extra": {"usable": not convert_missing, "missing": convert_missing},
        "optimum": {"usable": importlib.util.find_spec("optimum") is not None},
        "models": models,
        "problems": problems,
    }


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def doctor(as_json: bool) -> None:
    """Check the installation: runtime flavours, execution providers, CPU features, models."""
    data = report()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console = Console()
    table = Table(show_header=False, box=None)
    table.add_row("ortllm", data["ortllm"])
    table.add_row("python", data["python"])
    table.add_row("os", data["os"])
    table.add_row("home", data["home"])
    table.add_row(
        "onnxruntime-genai", ", ".join(f"{k} {v}" for k, v in data["onnxruntime_genai"].items()) or "missing"
    )
    table.add_row("onnxruntime", ", ".join(f"{k} {v}" for k, v in data["onnxruntime"].items()) or "missing")
    table.add_row(
        "genai API", "og.Engine (0.18+)" if data["engine_api"] else "og.Generator only (before 0.18)"
    )
    table.add_row("execution providers", ", ".join(data["execution_providers"]))
    for ep, why in data["unavailable_providers"].items():
        table.add_row(f"  not {ep}", escape(why))
    table.add_row("CPU threads", str(data["cpu_threads"]))
    features = data["cpu_features"]
    table.add_row("CPU features", ", ".join(k for k, v in features.items() if v) if features else "unknown")
    conv = data["convert_extra"]
    table.add_row("convert extra", "usable" if conv["usable"] else f"missing {', '.join(conv['missing'])}")
    table.add_row(
        "optimum backend",
        "usable" if data["optimum"]["usable"] else "not in this environment (make optimum-env)",
    )
    console.print(table)
    if data["models"]:
        models = Table("model", "variants", "would run", "why", "batched by")
        for m in data["models"]:
            models.add_row(
                m["name"],
                ", ".join(m["variants"]),
                m["variant"] or "[red]none[/]",
                escape(m["reason"]),
                escape(m.get("runtime", "")),
            )
        console.print(models)
    for problem in data["problems"]:
        console.print(f"[red]problem:[/] {problem}")


COMMANDS = [doctor]
