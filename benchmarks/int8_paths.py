"""Fidelity and speed of the native batcher's two int8 options against the model's own numbers.

    python benchmarks/int8_paths.py MODEL_DIR [--chunks 6] [--decode 128] [--modes model,kv8,prefill8]

MODEL_DIR is a converted variant folder (e.g. ~/.local/share/ortllm/models/smollm2-135m/cpu-int4). Each mode
gets a fresh NativeDecoder: `model` (float KV cache, the model's weights everywhere), `kv8` (ORTLLM_KV_CACHE=int8),
`prefill8` (ORTLLM_PREFILL=int8), `both`. For each 512-token chunk of the perplexity text (benchmarks/perplexity.py
downloads it) the first 256 tokens are fed as one prompt chunk and the next `--decode` are scored one decode step
at a time, so the scores read the cache the prompt wrote, as answers do. Prints perplexity, the prompt pass's time
(median) and the load-time setup (calibration, graph building). Calibration uses the model's chat template on
native.KV_CALIBRATION, as `ortllm serve` does. Used for benchmarks/NOTES.md levers 23 and 24.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ortllm.runtime.backends import native  # noqa: E402

TEXT = Path.home() / ".cache" / "ortllm" / "bench" / "perplexity" / "pydoc_topics.txt"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--chunks", type=int, default=6)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="model,kv8,prefill8")
    parser.add_argument("--text", type=Path, default=TEXT)
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer

    from ortllm.runtime import templates

    folder: Path = args.model_dir
    cfg = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = templates.model_template(folder)
    rendered = (
        templates.render_jinja(template, native.KV_CALIBRATION, {})
        if template
        else "\n\n".join(m["content"] for m in native.KV_CALIBRATION)
    )
    calibration = tokenizer.encode(rendered, add_special_tokens=False).ids
    ids = tokenizer.encode(args.text.read_text(encoding="utf-8"), add_special_tokens=False).ids
    chunks = min(args.chunks, len(ids) // 512)
    print(
        f"{folder}: {chunks} chunks, {args.decode} decode steps each, calibration {len(calibration)} tokens"
    )
    for mode in args.modes.split(","):
        decoder = native.NativeDecoder(folder, cfg, threads=args.threads)
        start = time.perf_counter()
        if mode in ("kv8", "both"):
            decoder.quantize_kv(calibration)
        if mode in ("prefill8", "both"):
            decoder.enable_int8_prefill(calibration)
        setup = time.perf_counter() - start
        nll, count, prompt_s = 0.0, 0, []
        for c in range(chunks):
            seq = ids[c * 512 : (c + 1) * 512]
            decoder.reserve(520, [0] * decoder.slots)
            t = time.perf_counter()
            logits = decoder.step(np.asarray([seq[:256]]), np.zeros(1, dtype=np.int64))
            prompt_s.append(time.perf_counter() - t)
            for pos in range(256, 256 + args.decode):
                row = logits[0].astype(np.float64)
                top = row.max()
                nll += float(np.log(np.exp(row - top).sum()) + top - row[seq[pos]])
                count += 1
                logits = decoder.step(np.asarray([[seq[pos]]]), np.asarray([pos]))
        print(
            f"{mode:9s} perplexity {np.exp(nll / count):.4f} ({count} tokens); 256-token prompt pass "
            f"{np.median(prompt_s) * 1000:.0f} ms (median of {len(prompt_s)}); setup {setup:.1f} s",
            flush=True,
        )
        del decoder
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
