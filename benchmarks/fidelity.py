"""Fidelity benchmark: perplexity of ONNX builds against the float32 Hugging Face reference.

Each named config is built with onnxruntime-genai's model builder into a temporary folder, scored on
`benchmarks/data/fidelity.txt` with plain onnxruntime in one forward pass, and compared with the
transformers model the build came from (ratio = ppl(onnx) / ppl(fp32)). Optionally times greedy decoding
with onnxruntime-genai.

    python benchmarks/fidelity.py --hf /tmp/setup/hf --speed --json fidelity.json
    python benchmarks/fidelity.py --gguf model.Q4_1.gguf --configs int4-default,int4-k_quant
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
import torch
import transformers
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

from ortllm.converters import genai
from ortllm.converters import gguf as gguf_converter
from ortllm.paths import cache_dir

TEXT = Path(__file__).parent / "data" / "fidelity.txt"
MAX_TOKENS = 512
MB = 1_000_000
# the goal the results are judged against: this close to the reference, at most this much above the GGUF
GOAL_RATIO = 1.05
GOAL_SIZE_FACTOR = 1.1


@dataclass(frozen=True)
class Config:
    """A named set of builder options."""

    precision: str
    extra: dict[str, str] = field(default_factory=dict)


CONFIGS: dict[str, Config] = {
    "fp32": Config("fp32"),
    "int8": Config("int8"),
    "int4-default": Config("int4"),
    "int4-block16": Config("int4", {"block_size": "16"}),
    "int4-block64": Config("int4", {"block_size": "64"}),
    "int4-asym": Config("int4", {"is_symmetric": "false"}),
    "int4-k_quant": Config("int4", {"algo_config": "k_quant"}),
    "int4-acc1": Config("int4", {"accuracy_level": "1"}),
    "int4-last-int8": Config("int4", {"matmul_mixed_precision": "last_matmul:int8"}),
    "int4-mixed-int8": Config("int4", {"matmul_mixed_precision": "last_matmul:int8,mixed_layers:int8"}),
    "int4-k_quant-last-int8": Config(
        "int4", {"algo_config": "k_quant", "matmul_mixed_precision": "last_matmul:int8"}
    ),
    "int4-rtn": Config("int4", {"algo_config": "rtn"}),
    "int4-mixed-layers-int8": Config("int4", {"matmul_mixed_precision": "mixed_layers:int8"}),
    "int4-unshared-last-int8": Config(
        "int4",
        {
            "shared_embeddings": "false",
            "op_types_to_quantize": "MatMul/Gather",
            "matmul_mixed_precision": "last_matmul:int8",
        },
    ),
    "int4-shared-emb": Config("int4", {"shared_embeddings": "true"}),
    "int4-unshared-emb": Config("int4", {"shared_embeddings": "false"}),
}

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass
class Result:
    """One config's measurements, or the reason it has none."""

    name: str
    precision: str
    extra: dict[str, str]
    ppl: float | None = None
    ratio: float | None = None
    size_mb: float | None = None
    build_s: float | None = None
    decode_tok_s: float | None = None
    error: str | None = None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (ORT's are long C++ traces)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def tokenise(hf_dir: Path) -> np.ndarray:
    """The benchmark text as token ids [1, n], truncated to MAX_TOKENS, with the reference's tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tokenizer(TEXT.read_text(encoding="utf-8"))["input_ids"][:MAX_TOKENS]
    return np.asarray([ids], dtype=np.int64)


def perplexity(logits: np.ndarray, ids: np.ndarray) -> float:
    """exp of the mean next-token cross-entropy of logits [1, n, vocab] on ids [1, n]."""
    pred = logits[0, :-1].astype(np.float64)
    target = ids[0, 1:]
    peak = pred.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(pred - peak).sum(axis=-1)) + peak[:, 0]
    nll = log_z - pred[np.arange(len(target)), target]
    return float(np.exp(nll.mean()))


def reference_ppl(hf_dir: Path, ids: np.ndarray) -> float:
    """Perplexity of the float32 transformers model in one forward pass."""
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(ids)).logits
    return perplexity(logits.float().numpy(), ids)


def onnx_inputs(session: ort.InferenceSession, model_dir: Path, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a single prefill pass: the tokens, a full mask and an empty KV cache."""
    decoder = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
    # sliding-window attention (Gemma 2/3): GroupQueryAttention refuses a KV buffer below the window, so the
    # empty cache is a zero-filled buffer of that capacity (the mask's length says how much of it is used)
    window = (decoder.get("sliding_window") or {}).get("window_size") or 0
    capacity = max(window, ids.shape[1]) if window else 0
    kv_shape = (1, decoder["num_key_value_heads"], capacity, decoder["head_size"])
    feeds: dict[str, np.ndarray] = {}
    for inp in session.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = ids
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones_like(ids)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(ids.shape[1], dtype=np.int64)[None, :]
        elif inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros(kv_shape, dtype=ORT_DTYPES[inp.type])
        else:
            raise ValueError(f"unexpected graph input '{inp.name}'")
    return feeds


def onnx_ppl(model_dir: Path, ids: np.ndarray, threads: int) -> float:
    """Perplexity of a built model.onnx run with plain onnxruntime in one forward pass."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], onnx_inputs(session, model_dir, ids))
    return perplexity(logits, ids)


def decode_speed(model_dir: Path, prompt: np.ndarray, threads: int, tokens: int = 128) -> float:
    """Greedy decode tokens/s with onnxruntime-genai, timed after a warm-up run."""
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    generate(model, prompt, 16)
    return generate(model, prompt, tokens)


def generate(model: og.Model, prompt: np.ndarray, tokens: int) -> float:
    """Generate exactly `tokens` greedy tokens after `prompt`; return the decode rate in tokens/s."""
    params = og.GeneratorParams(model)
    length = prompt.shape[1] + tokens
    params.set_search_options(max_length=length, min_length=length, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt.astype(np.int32))
    generator.generate_next_token()  # the first token comes from the prefill logits
    started = time.perf_counter()
    steps = 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    return steps / (time.perf_counter() - started)


def folder_mb(folder: Path) -> float:
    """Total size of the files in a build folder (model, weights, tokenizer, config), in MB."""
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / MB


def run_config(name: str, hf_dir: Path, work: Path, ids: np.ndarray, ref: float, threads: int) -> Result:
    """Build and score one config into `work/name`; failures become a one-line error."""
    config = CONFIGS[name]
    result = Result(name, config.precision, config.extra)
    out = work / name
    try:
        built = genai.build(
            hf_dir,
            out,
            precision=config.precision,
            ep="cpu",
            cache_dir=work / "cache",
            extra=config.extra,
            log_path=work / f"{name}.log",
        )
        result.build_s = float(built["build_seconds"])
        result.size_mb = round(folder_mb(out), 1)
        result.ppl = onnx_ppl(out, ids, threads)
        result.ratio = result.ppl / ref
    except Exception as exc:  # a config that cannot be built or loaded is reported, not fatal
        result.error = first_line(exc)
    return result


def time_all(results: list[Result], work: Path, prompt: np.ndarray, threads: int, rounds: int) -> None:
    """Best decode speed of each scored config over `rounds` round-robin passes (spreads load spikes)."""
    for round_no in range(1, rounds + 1):
        print(f"timing decode, round {round_no}/{rounds} ...", file=sys.stderr)
        for result in results:
            if result.error is not None:
                continue
            try:
                speed = decode_speed(work / result.name, prompt, threads)
            except Exception as exc:  # scored by onnxruntime but not runnable by onnxruntime-genai
                result.error = f"decode: {first_line(exc)}"
                continue
            result.decode_tok_s = round(max(speed, result.decode_tok_s or 0.0), 1)


def check_sanity(results: list[Result]) -> None:
    """Warn when the fp32 build does not reproduce the reference: the harness would be measuring itself."""
    for r in results:
        if r.name == "fp32" and r.ratio is not None and abs(r.ratio - 1) > 0.005:
            print(f"warning: fp32 ratio {r.ratio:.4f} is not ~1.00; check the harness", file=sys.stderr)


def render(results: list[Result], ref: float, gguf_mb: float | None) -> None:
    """Print the results as a rich table, with the goal column when the GGUF's size is known."""
    budget = gguf_mb * GOAL_SIZE_FACTOR if gguf_mb else None
    title = f"Perplexity vs fp32 reference (ppl {ref:.3f})"
    if gguf_mb:
        title += f"; GGUF {gguf_mb:.1f} MB, goal ratio <= {GOAL_RATIO} at <= {budget:.1f} MB"
    table = Table(title=title)
    table.add_column("config", no_wrap=True)
    for column in ("ppl", "ratio", "size MB", "build s", "tok/s", "goal"):
        table.add_column(column, justify="right")
    for r in results:
        goal = "" if budget is None or r.error else ("yes" if meets_goal(r, budget) else "no")
        table.add_row(
            r.name,
            _fmt(r.ppl, 3),
            _fmt(r.ratio, 4),
            _fmt(r.size_mb, 1),
            _fmt(r.build_s, 1),
            _fmt(r.decode_tok_s, 1),
            goal,
        )
    console = Console()
    console.print(table)
    for r in results:
        if r.error:
            console.print(f"[red]{r.name} failed:[/red] {r.error}", highlight=False)


def meets_goal(r: Result, budget: float) -> bool:
    """Whether a result is close enough to the reference and small enough."""
    return r.ratio is not None and r.size_mb is not None and r.ratio <= GOAL_RATIO and r.size_mb <= budget


def _fmt(value: float | None, digits: int) -> str:
    """A number with fixed decimals, or a dash when missing."""
    return "-" if value is None else f"{value:.{digits}f}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", type=Path, help="float32 Hugging Face folder (the reference)")
    source.add_argument("--gguf", type=Path, help="GGUF file, dequantised to float32 as the reference")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS)}"
    )
    parser.add_argument("--speed", action="store_true", help="also time 128-token greedy decoding")
    parser.add_argument("--rounds", type=int, default=3, help="timed decoding rounds (the best counts)")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for scoring and decoding")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {', '.join(unknown)}; choose from {', '.join(CONFIGS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Build and score every requested config; print the table and optionally write JSON."""
    args = parse_args(argv)
    transformers.utils.logging.disable_progress_bar()
    hf_dir = gguf_converter.dequantise(args.gguf, cache_dir()) if args.gguf else args.hf
    gguf_mb = args.gguf.stat().st_size / MB if args.gguf else None
    ids = tokenise(hf_dir)
    ref = reference_ppl(hf_dir, ids)
    print(f"reference: {hf_dir} ({ids.shape[1]} tokens) ppl {ref:.3f}", file=sys.stderr)
    results = []
    with tempfile.TemporaryDirectory(prefix="ortllm-fidelity-") as tmp:
        for name in args.configs.split(","):
            print(f"building {name} ...", file=sys.stderr)
            results.append(run_config(name, hf_dir, Path(tmp), ids, ref, args.threads))
        if args.speed:  # after all builds, so that no build's disk writes overlap a measurement
            time_all(results, Path(tmp), ids[:, :64], args.threads, args.rounds)
    check_sanity(results)
    render(results, ref, gguf_mb)
    if args.json:
        report = {
            "reference": {"model": str(hf_dir), "tokens": int(ids.shape[1]), "ppl": ref},
            "gguf_mb": gguf_mb,
            "threads": args.threads,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
