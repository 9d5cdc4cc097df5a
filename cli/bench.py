"""`ortllm bench`: engine and serving benchmarks, with llama.cpp measured in the same run."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import click
import psutil
from rich.console import Console
from rich.table import Table

from ortllm import benchmark as b
from ortllm.catalog import load_catalog
from ortllm.runtime.loaded import BATCHERS, check_runtime_env

from .options import option_group


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from exc


def _machine() -> dict[str, Any]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": psutil.cpu_count(logical=False),
        "threads": psutil.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / 1e9, 1),
    }


def _gguf_of(model: Any, explicit: str | None) -> Path:
    if explicit:
        return Path(explicit)
    for variant in model.variants.values():
        source = variant.info.get("source_weights", "")
        if source.endswith(".gguf") and Path(source).is_file():
            return Path(source)
    raise click.UsageError("the model was not converted from a GGUF file here: pass --gguf PATH for the peer")


def _write(data: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).write_text(json.dumps(data, indent=2))


def _ratio(ours: float, peer: float) -> str:
    return f"{ours / peer:.2f}×" if peer else "–"


def _synthetic(shape: str, console: Console) -> Path:
    """The cached random-weight model of `shape`, converted into the store as `bench-<shape>` once."""
    import subprocess
    import sys

    from ortllm.store import ModelStore

    store = ModelStore()
    default = store.find(load_catalog().default)
    if default is None:
        raise click.ClickException(
            f"--synthetic takes its tokenizer from `{load_catalog().default}`: pull it first"
        )
    tokenizer_dir = next(iter(default.variants.values())).path
    with console.status(f"making the random-weight {shape} model"):
        hf_dir = b.synthetic_model(shape, tokenizer_dir)
    if store.find(f"bench-{shape}") is None:
        with console.status(f"ortllm convert {hf_dir}"):
            cmd = [
                sys.executable,
                "-m",
                "ortllm.cli.main",
                "convert",
                str(hf_dir),
                "--name",
                f"bench-{shape}",
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise click.ClickException(f"converting the {shape} model failed: {last}")
    return hf_dir


with_compare = option_group(
    click.option(
        "--compare", type=click.Choice(["llama-cpp"]), help="Measure llama.cpp on the same GGUF too."
    ),
    click.option(
        "--llama-cpp", "llama_dir", help="Folder with llama-bench and llama-server (or $ORTLLM_LLAMA_CPP)."
    ),
    click.option("--gguf", help="GGUF for the peer (default: the one the model was converted from)."),
    click.option("--json", "out", help="Also write the results as JSON to this file."),
)


@click.group()
def bench() -> None:
    """Benchmarks: `engine` (like llama-bench) and `serve` (like vLLM's bench serve)."""


@bench.command()
@click.argument("model", required=False)
@click.option("--pp", default=512, show_default=True, help="Prompt length for prompt processing.")
@click.option("--tg", default=128, show_default=True, help="Tokens to generate.")
@click.option(
    "--batch", "batches", default="1,2,4,8", show_default=True, help="Concurrent requests to measure."
)
@click.option("--reps", default=3, show_default=True, help="Repetitions (after one warm-up).")
@click.option("--threads", type=int, help="Intra-op threads (default: physical cores).")
@click.option(
    "--batcher", type=click.Choice(BATCHERS), default="auto", show_default=True, help="Who batches requests."
)
@click.option(
    "--api", "api_alias", type=click.Choice(BATCHERS), hidden=True, help="The old name of --batcher."
)
@click.option(
    "--synthetic",
    type=click.Choice(sorted(b.SHAPES)),
    help="Bench a seeded random-weight model of this shape (made, converted and cached on first use).",
)
@with_compare
def engine(
    model: str | None,
    pp: int,
    tg: int,
    batches: str,
    reps: int,
    threads: int | None,
    batcher: str,
    api_alias: str | None,
    synthetic: str | None,
    compare: str | None,
    llama_dir: str | None,
    gguf: str | None,
    out: str | None,
) -> None:
    """Prompt processing (ppN) and generation (tgN) tokens/s, TTFT, peak RSS, batched throughput."""
    from ortllm.runtime.backends.native import KVArena
    from ortllm.runtime.embedder import not_generative
    from ortllm.runtime.registry import ModelRegistry
    from ortllm.runtime.scheduler import Scheduler

    console = Console()
    batcher = api_alias or batcher  # --api: the old name of --batcher, kept for one release
    if synthetic and (model or gguf):
        raise click.UsageError("--synthetic makes its own model and GGUFs: drop MODEL and --gguf")
    check_runtime_env()
    binaries = b.find_llama_cpp(llama_dir) if compare else None  # a missing peer fails before any work
    hf_dir = _synthetic(synthetic, console) if synthetic else None
    registry = ModelRegistry(batcher=None if batcher == "auto" else batcher, threads=threads)
    name = f"bench-{synthetic}" if synthetic else model or load_catalog().default
    scheduler = registry.get(name)
    if not isinstance(scheduler, Scheduler):  # an embedding model: no tokens to time
        registry.close()
        raise not_generative(scheduler.model.name)
    installed = scheduler.model.installed
    sizes = b.decode_bytes(scheduler.model.path)
    decoder = scheduler.model.native
    if decoder is not None:  # the arena's own type (ORTLLM_KV_CACHE=int8 keeps one byte a value)
        sizes["kv_per_context_token"] = KVArena.bytes_per_token(
            decoder.layers, decoder.kv_heads, decoder.head_size, decoder.dtype
        )
    with console.status(f"benchmarking {scheduler.model.name} (pp{pp}, tg{tg}, batches {batches})"):
        ours = b.engine_bench(scheduler, pp=pp, tg=tg, batches=_ints(batches), reps=reps)
    on_cpu = (
        scheduler.model.ep == "cpu"
    )  # a GPU decodes from its own memory: the host's bandwidth says nothing
    bandwidth = {"read_gbs": 0.0, "copy_gbs": 0.0, "threads": 0}
    if on_cpu:
        with console.status("measuring memory bandwidth"):  # after the bench: its 2 GiB stay out of peak RSS
            bandwidth = b.memory_bandwidth_gbs(threads=scheduler.model.threads or 1)
    ep = scheduler.model.ep
    registry.close()
    # decode streams weights and KV read-only, so read bandwidth bounds it (copy is shown as a cross-check)
    context = 16 + tg / 2  # the tg run's 16-token prompt plus, on average, half its generated tokens
    ceiling = b.decode_ceiling(bandwidth["read_gbs"], sizes, context) if on_cpu else 0.0
    tg_mean = ours[f"tg{tg}_tok_s"]["mean"]
    result: dict[str, Any] = {
        "model": installed.name,
        "variant": scheduler.model.variant.id,
        "machine": _machine(),
        "ortllm": ours,
        "memory_bandwidth_gbs": bandwidth["read_gbs"],
        "memory_copy_gbs": bandwidth["copy_gbs"],
        "weight_mb": round(sizes["weights"] / 1e6, 1),
        "kv_kb_per_context_token": round(sizes["kv_per_context_token"] / 1e3, 1),
        "decode_ceiling_tok_s": round(ceiling, 1) if on_cpu and tg_mean <= ceiling else None,
    }
    peers: dict[str, dict[str, Any]] = {}
    failures: list[str] = []
    if binaries:
        peer_threads = ours["threads"] or psutil.cpu_count(logical=False) or 1
        try:
            with console.status("converting to GGUF with llama.cpp's own tools"):
                ggufs = b.peer_ggufs(hf_dir, binaries) if hf_dir else {"llama.cpp": _gguf_of(installed, gguf)}
        except b.PeerFailed as exc:
            ggufs, failures = {}, [str(exc)]
        for label, path in ggufs.items():
            try:
                with console.status(f"running llama-bench on {path.name}"):
                    peers[label] = b.llama_bench(
                        binaries, path, pp=pp, tg=tg, threads=peer_threads, reps=reps
                    )
            except b.PeerFailed as exc:
                failures.append(f"{label}: {exc}")
        result["llama_cpp"] = {**peers, **({"failures": failures} if failures else {})}
    blank = [""] * (2 * len(peers))
    table = Table(
        "metric",
        "ortllm",
        *[c for label in peers for c in (label, "ratio")],
        title=f"{installed.name} ({scheduler.model.variant.id}, {ours['batcher']}, {ours['threads']} threads)",
    )
    for key in (f"pp{pp}_tok_s", f"tg{tg}_tok_s"):
        row = [key, f"{ours[key]['mean']:.1f} ± {ours[key]['sd']:.1f}"]
        for peer in peers.values():
            row += [
                f"{peer[key]['mean']:.1f} ± {peer[key]['sd']:.1f}",
                _ratio(ours[key]["mean"], peer[key]["mean"]),
            ]
        table.add_row(*row)
    table.add_row("TTFT (16-token prompt)", f"{ours['ttft_s']['mean'] * 1000:.0f} ms", *blank)
    for size, agg in ours["batch_aggregate_tok_s"].items():
        table.add_row(f"{size} concurrent, aggregate tok/s", f"{agg['mean']:.1f} ± {agg['sd']:.1f}", *blank)
    table.add_row("peak RSS", f"{ours['peak_rss_mb']:.0f} MB", *blank)
    console.print(table)
    for line in failures:
        console.print(f"[red]peer failed[/red] {line}")
    if not on_cpu:
        console.print(f"no decode ceiling: the model runs on {ep}, not from this host's memory")
        _write(result, out)
        return
    console.print(
        f"memory bandwidth: read {bandwidth['read_gbs']:.1f} GB/s, copy {bandwidth['copy_gbs']:.1f} GB/s "
        f"({bandwidth['threads']} threads, the ceiling uses read); per token {sizes['weights'] / 1e6:.0f} MB "
        f"of weights + {sizes['kv_per_context_token'] * context / 1e6:.1f} MB of KV → decode ceiling "
        f"{ceiling:.0f} tok/s; {b.ceiling_note(tg_mean, ceiling)}"
    )
    _write(result, out)


@bench.command()
@click.argument("model", required=False)
@click.option("--url", help="A running ortllm server (default: start one on a free port).")
@click.option("--concurrency", default="1,4,8,16", show_default=True, help="Concurrent streaming clients.")
@click.option("--requests", "per_client", default=2, show_default=True, help="Requests per client.")
@click.option("--api-key", help="Bearer key for a server that requires one.")
@click.option(
    "--prompts",
    type=click.Choice(["shared", "distinct"]),
    default="shared",
    show_default=True,
    help="shared: prompts are prefixes of one text (prefix caches help); distinct: each its own.",
)
@with_compare
def serve(
    model: str | None,
    url: str | None,
    concurrency: str,
    per_client: int,
    api_key: str | None,
    prompts: str,
    compare: str | None,
    llama_dir: str | None,
    gguf: str | None,
    out: str | None,
) -> None:
    """TTFT, TPOT, ITL p50/p90/p99, output tok/s and request throughput under concurrent streams."""
    console = Console()
    name = model or load_catalog().default
    levels = _ints(concurrency)
    distinct = prompts == "distinct"
    server = None if url else b.ServerProcess.ortllm(name)
    target = url or server.url  # type: ignore[union-attr]
    cold = b.first_token_after(target, name, server.launched) if server else None
    try:
        with console.status(f"ortllm: {levels} concurrent streams against {target}"):
            ours = b.serve_bench(
                target,
                name,
                concurrency=levels,
                requests_per_client=per_client,
                api_key=api_key,
                distinct=distinct,
            )
    finally:
        if server:
            server.stop()
    result: dict[str, Any] = {
        "model": name,
        "machine": _machine(),
        "ortllm": ours,
        "cold_start_first_token_s": cold,
        "prompts": prompts,
    }
    peer: dict[str, Any] = {}
    if compare:
        from ortllm.runtime.loaded import default_threads
        from ortllm.store import ModelStore

        binaries = b.find_llama_cpp(llama_dir)
        source = _gguf_of(ModelStore().get(load_catalog().canonical(name)), gguf)
        llama = b.ServerProcess.llama(binaries, source, parallel=max(levels), threads=default_threads())
        try:
            with console.status(f"llama-server -np {max(levels)}: the same load"):
                peer = b.serve_bench(
                    llama.url, name, concurrency=levels, requests_per_client=per_client, distinct=distinct
                )
        finally:
            llama.stop()
        result["llama_server"] = peer
    table = Table(
        "clients",
        "output tok/s",
        "per-stream tok/s",
        "TTFT p50 / p99 / max",
        "ITL p50 / p99",
        "req/s",
        "errors",
        *(["vs llama-server (tok/s, max TTFT)"] if peer else []),
        title=f"serving {name} ({prompts} prompts)",
    )
    for level, r in ours.items():
        row = [
            level,
            f"{r['output_tok_s']:.1f}",
            f"{r['single_stream_tok_s']:.1f}",
            f"{r['ttft_s']['p50']:.2f} / {r['ttft_s']['p99']:.2f} / {r['ttft_s']['max']:.2f} s",
            f"{r['itl_ms']['p50']:.1f} / {r['itl_ms']['p99']:.1f} ms",
            f"{r['requests_per_s']:.2f}",
            str(r["errors"]),
        ]
        if peer:
            p = peer[level]
            row.append(
                f"{_ratio(r['output_tok_s'], p['output_tok_s'])} ({p['output_tok_s']:.1f}), "
                f"{p['ttft_s']['max']:.2f} s"
            )
        table.add_row(*row)
    console.print(table)
    if cold is not None:
        console.print(
            f"cold start: `ortllm serve --model {name}` launched → first streamed token in {cold:.2f} s"
        )
    _write(result, out)


COMMANDS = [bench]
