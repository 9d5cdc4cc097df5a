"""Perplexity of ortllm's conversion of a GGUF against llama.cpp's own perplexity on that GGUF, same text.

llama.cpp's protocol (`llama-perplexity -c 512`): the text is tokenised once and cut into chunks of 512 tokens;
each chunk is scored alone (BOS first when the model adds one) and only its second half counts. ortllm's side
runs the converted model.onnx with plain onnxruntime (2 threads, the builder's own graph) through the same
chunks. The text is the Python standard library's own documentation (`pydoc_data.topics`): English prose every
machine with Python has, no download.

    python benchmarks/perplexity.py --peer ~/.cache/ortllm/peer/llama.cpp-0.3.36/bin \\
        --gguf SmolLM2-135M-Instruct.Q4_1.gguf --make Q4_0,Q8_0,Q4_K_M --chunks 80 --json ppl.json

`--make` re-quantises the GGUF's dequantised weights with the peer's `llama-quantize` (through an f32 GGUF from
its `convert_hf_to_gguf.py`), so each GGUF type is measured on the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import onnx_inputs  # noqa: E402

CTX = 512
WORK = Path(os.environ.get("ORTLLM_BENCH_CACHE", Path.home() / ".cache" / "ortllm" / "bench")) / "perplexity"


def eval_text(path: Path) -> Path:
    """The standard library's documentation topics, in a stable order, written once."""
    from pydoc_data.topics import topics

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return path


def adds_bos(gguf: Path) -> tuple[bool, int | None]:
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf)).fields
    add = fields.get("tokenizer.ggml.add_bos_token")
    bos = fields.get("tokenizer.ggml.bos_token_id")
    return (bool(add.parts[-1][0]) if add else False), (int(bos.parts[-1][0]) if bos else None)


def ortllm_ppl(model_dir: Path, gguf: Path, text: Path, chunks: int, threads: int) -> tuple[float, int]:
    """llama-perplexity's chunked protocol on the converted model; returns (ppl, tokens scored)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(text.read_text(encoding="utf-8"), add_special_tokens=False).ids
    add_bos, bos = adds_bos(gguf)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    nll, count = 0.0, 0
    for c in range(min(chunks, len(ids) // CTX)):
        chunk = list(ids[c * CTX : (c + 1) * CTX])
        if add_bos and bos is not None:
            chunk[0] = bos
        batch = np.asarray([chunk], dtype=np.int64)
        (logits,) = session.run(["logits"], onnx_inputs(session, model_dir, batch))
        first = CTX // 2
        pred = logits[0, first : CTX - 1].astype(np.float64)
        target = batch[0, first + 1 :]
        peak = pred.max(axis=-1, keepdims=True)
        log_z = np.log(np.exp(pred - peak).sum(axis=-1)) + peak[:, 0]
        nll += float((log_z - pred[np.arange(len(target)), target]).sum())
        count += len(target)
    return float(np.exp(nll / count)), count


def llama_ppl(peer: Path, gguf: Path, text: Path, chunks: int, threads: int) -> tuple[float, str]:
    """llama.cpp's own `llama-perplexity` on the GGUF: (final estimate, its chunk line)."""
    out = subprocess.run(
        [str(peer / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", str(CTX), "--chunks", str(chunks),
         "-t", str(threads), "-b", str(CTX)],
        capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    log = out.stdout + out.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"llama-perplexity failed ({out.returncode}): {log.strip().splitlines()[-1:]}")
    chunk_line = next((ln.strip() for ln in log.splitlines() if "calculating perplexity over" in ln), "")
    return float(m.group(1)), chunk_line


def make_types(peer: Path, gguf: Path, kinds: list[str], work: Path) -> list[Path]:
    """The GGUF's weights re-quantised by llama.cpp to each type (via an f32 GGUF of the dequantised model)."""
    from ortllm.converters.gguf import dequantise

    env = {**os.environ, "PYTHONPATH": f"{peer / 'gguf-py'}:{peer / 'pydeps'}"}
    f32 = work / f"{gguf.stem}.f32.gguf"
    if not f32.exists():
        hf = dequantise(gguf, work / "cache")
        subprocess.run(
            [sys.executable, str(peer / "convert_hf_to_gguf.py"), str(hf), "--outtype", "f32", "--outfile", str(f32)],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
    made = []
    for kind in kinds:
        out = work / f"{gguf.stem}.{kind}.gguf"
        if not out.exists():
            subprocess.run(
                [str(peer / "llama-quantize"), str(f32), str(out), kind], check=True, capture_output=True
            )
        made.append(out)
    return made


def convert(gguf: Path, home: Path, extra: list[str] | None = None) -> Path:
    """`ortllm convert` into a store of its own (`extra`: more convert options, e.g. --block-size 128, which
    name a model of their own); the cpu-int4 folder."""
    extra = extra or []
    name = re.sub(r"[^a-z0-9-]+", "-", " ".join([gguf.stem, *extra]).lower()).strip("-")[:60]
    folder = home / "models" / name / "cpu-int4"
    if not (folder / "model.onnx").exists():
        subprocess.run(
            [sys.executable, "-m", "ortllm.cli.main", "convert", str(gguf), "--name", name, *extra],
            check=True, env={**os.environ, "ORTLLM_HOME": str(home)}, capture_output=True,
        )  # fmt: skip
    return folder


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peer", type=Path, required=True, help="folder with llama-perplexity, llama-quantize"
    )
    parser.add_argument(
        "--gguf", type=Path, action="append", required=True, help="a GGUF to measure (repeat)"
    )
    parser.add_argument(
        "--make", default="", help="also re-quantise the first GGUF to these types (Q4_0,Q8_0)"
    )
    parser.add_argument("--chunks", type=int, default=80, help="512-token chunks (half of each is scored)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--convert-args", default="", help="more `ortllm convert` options, e.g. '--block-size 128'"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    text = eval_text(WORK / "pydoc_topics.txt")
    ggufs = list(args.gguf)
    if args.make:
        ggufs += make_types(args.peer, args.gguf[0], args.make.split(","), WORK)
    rows = []
    for gguf in ggufs:
        started = time.monotonic()
        model = convert(gguf, WORK / "home", args.convert_args.split())
        manifest = json.loads((model.parent / "manifest.json").read_text())
        grid = next(iter(manifest["variants"].values())).get("grid")
        ours, scored = ortllm_ppl(model, gguf, text, args.chunks, args.threads)
        theirs, chunk_line = llama_ppl(args.peer, gguf, text, args.chunks, args.threads)
        row = {
            "gguf": gguf.name,
            "gguf_mb": round(gguf.stat().st_size / 1e6, 1),
            "ortllm_mb": round(folder_mb(model), 1),
            "ortllm_ppl": round(ours, 4),
            "llama_cpp_ppl": round(theirs, 4),
            "ratio": round(ours / theirs, 4),
            "tokens_scored": scored,
            "llama_cpp_chunks": chunk_line,
            "grid": grid,
            "seconds": round(time.monotonic() - started, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| GGUF | GGUF MB | ortllm MB | size × | ortllm ppl | llama.cpp ppl | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['gguf']} | {r['gguf_mb']} | {r['ortllm_mb']} | {r['ortllm_mb'] / r['gguf_mb']:.2f} "
            f"| {r['ortllm_ppl']:.3f} | {r['llama_cpp_ppl']:.3f} | {r['ratio']:.4f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
