"""Long answers that do not degrade: how many of N long answers fall into a loop or a word salad, per setting of
the repetition penalty (issue 18, item 7).

For each setting, N prompts asking for long prose (stories, explanations, letters) are answered with
`--tokens` tokens each at the default temperature (0.7, top-p 0.9, top-k 40), seeds 0..N-1, all requests of a
setting batched together on the native batcher. An answer is degenerate when, in its second half, either
- a loop: one 12-token sequence occurs 3 or more times, or 40 % or more of its 4-token sequences are repeats; or
- a collapse: fewer than 25 % of its last 200 tokens are distinct, or it ends in a run of one token; or
- a salad: 40 % or more of its last 60 words are not words (numbers, fragments).
Settings: the default (repeat_penalty 1.1 over the last 64 tokens, as llama.cpp and Ollama), the old rule
(1.1 over the whole sequence: `repeat_last_n` -1), and no penalty (1.0).

    python benchmarks/degeneration.py [--model smollm2-135m] [--answers 10] [--tokens 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import Counter
from typing import Any

from ortllm.runtime.loaded import LoadedModel
from ortllm.runtime.options import validate_options
from ortllm.runtime.scheduler import Scheduler
from ortllm.runtime.types import GenerationRequest
from ortllm.store import ModelStore

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a bicycle works, part by part.",
    "Write a long letter from a grandmother to her grandson who is leaving for university.",
    "Describe a day in the life of a medieval blacksmith, from dawn to night.",
    "Write a long essay on why people enjoy gardening.",
    "Tell the history of a small fishing village over three generations.",
    "Explain how bread is made, from the field to the table.",
    "Write a long adventure story about two friends crossing a desert.",
    "Describe, in detail, the four seasons in a mountain valley.",
    "Write a long speech for the opening of a new public library.",
]
SETTINGS = {
    "default (1.1, last 64)": {},
    "whole history (1.1, repeat_last_n -1)": {"repeat_last_n": -1},
    "no penalty (1.0)": {"repeat_penalty": 1.0},
}


def degenerate(tokens: list[int], finish: str, text: str) -> str | None:
    """Why an answer counts as degenerate (None when it does not)."""
    words = text.split()[-60:]
    if len(words) >= 30:
        odd = sum(not w.strip(".,;:!?\"'()[]-—…").isalpha() for w in words)
        if odd / len(words) >= 0.4:
            return f"salad ({odd} of the last {len(words)} words are not words)"
    half = tokens[len(tokens) // 2 :]
    if len(half) >= 12:
        grams = Counter(tuple(half[i : i + 12]) for i in range(len(half) - 11))
        if grams.most_common(1)[0][1] >= 3:
            return "loop (a 12-token run repeats 3+ times)"
    if len(half) >= 4:
        fours = [tuple(half[i : i + 4]) for i in range(len(half) - 3)]
        repeats = len(fours) - len(set(fours))
        if repeats / len(fours) >= 0.4:
            return f"loop ({repeats / len(fours):.0%} of 4-grams repeat)"
    tail = tokens[-200:]
    if len(tail) >= 100 and len(set(tail)) / len(tail) < 0.25:
        return f"collapse ({len(set(tail))} distinct of the last {len(tail)} tokens)"
    if finish == "length" and len(tokens) >= 20 and len(set(tokens[-20:])) == 1:
        return "collapse (one token repeated)"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--answers", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--json")
    args = parser.parse_args()
    model = LoadedModel(ModelStore().get(args.model))
    scheduler = Scheduler(model)
    report: dict[str, Any] = {
        "model": args.model,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "answers": args.answers,
        "tokens": args.tokens,
    }
    try:
        for name, extra in SETTINGS.items():
            started = time.perf_counter()
            streams = []
            for n in range(args.answers):
                options = validate_options({"max_tokens": args.tokens, "seed": n, **extra})
                prompt = [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}]
                streams.append(scheduler.submit(GenerationRequest(options, messages=prompt)))
            rows = []
            for stream in streams:
                with stream:
                    result = stream.result()
                tokens = model.encode(result.text)  # the answer as tokens (the detector counts token runs)
                rows.append({"tokens": len(tokens), "finish": result.finish_reason,
                             "degenerate": degenerate(tokens, result.finish_reason, result.text), "tail": result.text[-160:]})  # fmt: skip
            bad = [r for r in rows if r["degenerate"]]
            report[name] = {"degenerate": len(bad), "of": len(rows), "seconds": round(time.perf_counter() - started),
                            "answers": rows}  # fmt: skip
            print(f"{name:40} degenerate {len(bad)}/{len(rows)}  " + "; ".join(r["degenerate"] for r in bad))
    finally:
        scheduler.close()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
