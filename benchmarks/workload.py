"""A realistic workload over HTTP, ortllm against llama-server on the same GGUF, with and without each side's
speculative decoding (issue 19): code editing (the answer copies most of the prompt), summarising a given
document, and open chat; one client, then several at once.

Each request is an OpenAI chat completion (`/v1/chat/completions`, greedy, streamed); answers end where the
model ends them (up to the task's max_tokens), so the two sides' answers may differ in length: what is
compared is output tokens per second (completion tokens over the wall time, all clients together) and the
time to the first token. Each side is a fresh server process; every request is a fresh prompt for it.
On ortllm's side the texts with and without speculation are compared too (how often do they differ?).

    ORTLLM_HOME=... python benchmarks/workload.py --model qwen2.5-coder-0.5b \\
        --gguf qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --llama-cpp ~/.cache/ortllm/peer/.../bin \\
        [--clients 1,8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import requests

from ortllm.benchmark import ServerProcess, find_llama_cpp
from ortllm.runtime.loaded import default_threads

CODE = [
    """import json


def load(path):
    f = open(path)
    data = json.load(f)
    f.close()
    return data


def save(path, data):
    f = open(path, "w")
    json.dump(data, f)
    f.close()


def merge(a, b):
    out = {}
    for k in a:
        out[k] = a[k]
    for k in b:
        out[k] = b[k]
    return out
""",
    """class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if len(self.items) == 0:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

    def peek(self):
        if len(self.items) == 0:
            raise IndexError("peek at an empty stack")
        return self.items[-1]

    def size(self):
        return len(self.items)
""",
    """def area(shape, w, h):
    if shape == "rect":
        return w * h
    if shape == "tri":
        return w * h / 2
    raise ValueError(shape)


def perimeter(shape, w, h):
    if shape == "rect":
        return 2 * (w + h)
    raise ValueError(shape)


def describe(shape, w, h):
    return f"{shape}: area {area(shape, w, h)}, perimeter {perimeter(shape, w, h)}"
""",
]
EDITS = [
    "Rewrite this code to use `with` blocks for the files. Return the whole file, nothing else.",
    "Add a docstring to every method of this class. Return the whole code, nothing else.",
    "Rename the parameter `shape` to `kind` everywhere in this code. Return the whole code, nothing else.",
]


def documents() -> list[str]:
    """Three passages of English prose this machine has without downloads (Python's own documentation)."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return [" ".join(topics[name].split()[:300]) for name in ("assert", "for", "with")]


def tasks() -> list[tuple[str, str, int]]:
    """(kind, user message, max_tokens), interleaved so that every client mixes the kinds."""
    code = [
        ("code edit", f"{edit}\n\n```python\n{source}```", 400)
        for edit, source in zip(EDITS, CODE, strict=True)
    ]
    summary = [("summary", f"Summarise this text in three sentences:\n\n{doc}", 150) for doc in documents()]
    chat = [
        ("open chat", question, 200)
        for question in (
            "What should I think about when choosing a first programming language?",
            "Give me three ideas for a weekend trip with children, with a sentence on each.",
            "Why do cats purr? Explain briefly.",
        )
    ]
    return [t for group in zip(code, summary, chat, strict=True) for t in group]


def chat_once(url: str, model: str, message: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": message}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    usage: dict[str, Any] = {}
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=900) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {r.text[:200]}"}
        for raw in r.iter_lines():
            line = raw.decode("utf-8", "replace")
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            data = json.loads(line[5:])
            if data.get("usage"):
                usage = data["usage"]
            for choice in data.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
    end = time.perf_counter()
    return {
        "text": "".join(parts),
        "tokens": int(usage.get("completion_tokens") or 0),
        "ttft": (first or end) - start,
        "latency": end - start,
    }


def run_clients(url: str, model: str, work: list[tuple[str, str, int]], clients: int) -> dict[str, Any]:
    """`clients` threads, client i taking requests i, i + clients, ...; all of `work` once."""
    results: list[tuple[int, dict[str, Any]]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for k in range(i, len(work), clients):
            kind, message, max_tokens = work[k]
            out = chat_once(url, model, message, max_tokens)
            out["kind"] = kind
            with lock:
                results.append((k, out))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    results.sort(key=lambda r: r[0])
    answers = [r for _, r in results]
    errors = [a["error"] for a in answers if "error" in a]
    ok = [a for a in answers if "error" not in a]
    per_kind: dict[str, Any] = {}
    for kind in dict.fromkeys(a["kind"] for a in ok):
        mine = [a for a in ok if a["kind"] == kind]
        per_kind[kind] = {
            "tokens": sum(a["tokens"] for a in mine),
            "seconds": round(sum(a["latency"] for a in mine), 2),
            # tokens over each request's whole time (prompt included), and decode alone (after the first token):
            # the two sides' answers differ in length, which weighs the prompt's share differently
            "tok_s": round(sum(a["tokens"] for a in mine) / sum(a["latency"] for a in mine), 1),
            "decode_tok_s": round(
                sum(a["tokens"] - 1 for a in mine) / sum(a["latency"] - a["ttft"] for a in mine), 1
            ),
        }
    return {
        "clients": clients,
        "errors": errors,
        "wall_s": round(wall, 2),
        "tokens": sum(a["tokens"] for a in ok),
        "output_tok_s": round(sum(a["tokens"] for a in ok) / wall, 1),
        "ttft_mean_s": round(statistics.fmean(a["ttft"] for a in ok), 3) if ok else 0.0,
        "ttft_max_s": round(max((a["ttft"] for a in ok), default=0.0), 3),
        "per_kind": per_kind,
        "texts": [a.get("text", "") for a in answers],
        "requests": [{k: a.get(k) for k in ("kind", "tokens", "ttft", "latency", "error")} for a in answers],
    }


LLAMA_SPEC = {
    "none": [],
    "ngram-simple n3 m8": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                           "--spec-ngram-simple-size-m", "8"],
    "ngram-simple (defaults n12 m48)": ["--spec-type", "ngram-simple"],
    "ngram-mod (defaults)": ["--spec-type", "ngram-mod"],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--gguf", type=Path, help="the GGUF the model was converted from (for llama-server)")
    parser.add_argument("--llama-cpp", help="folder with llama-server (default: $ORTLLM_LLAMA_CPP)")
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--llama-spec", default=",".join(LLAMA_SPEC), help="llama-server settings to try")
    parser.add_argument("--limit", type=int, help="only the first N requests (a quick check)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = tasks()[: args.limit]
    levels = [int(c) for c in args.clients.split(",")]
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads,
        "model": args.model,
        "requests": len(work),
        "runs": [],
    }
    sides: list[tuple[str, Any]] = [
        (
            f"ortllm speculation {mode}",
            lambda parallel, log, mode=mode: ServerProcess.ortllm(
                args.model,
                extra=["--quiet"],
                env={**os.environ, "ORTLLM_SPECULATION": mode},
                log=log,
                timeout_s=300,
            ),
        )  # fmt: skip
        for mode in ("off", "ngram")
    ]
    if args.gguf:
        binaries = find_llama_cpp(args.llama_cpp)
        for name in args.llama_spec.split(","):
            spec = LLAMA_SPEC[name]
            sides.append(
                (
                    f"llama-server {name}",
                    lambda parallel, log, spec=spec: ServerProcess.llama(
                        binaries,
                        args.gguf,
                        parallel=parallel,
                        threads=args.threads,
                        ctx_per_slot=4096,
                        extra=spec,
                        log=log,
                        timeout_s=300,
                    ),  # fmt: skip
                )
            )
    for label, start in sides:
        for clients in levels:
            with tempfile.TemporaryFile("w+") as log:
                server = start(clients, log)
                try:
                    chat_once(server.url, args.model, "Hello", 4)  # warm-up
                    run = run_clients(server.url, args.model, work, clients)
                finally:
                    server.stop()
            run["side"] = label
            report["runs"].append(run)
            print(
                f"{label:40s} {clients} client(s): {run['output_tok_s']:6.1f} tok/s, "
                f"TTFT mean {run['ttft_mean_s']:.2f} s max {run['ttft_max_s']:.2f} s, "
                + ", ".join(
                    f"{k} {v['tok_s']} (decode {v['decode_tok_s']})" for k, v in run["per_kind"].items()
                )
                + (f", {len(run['errors'])} errors: {run['errors'][:1]}" if run["errors"] else ""),
                flush=True,
            )
    for clients in levels:
        runs = {r["side"]: r for r in report["runs"] if r["clients"] == clients}
        off, on = runs.get("ortllm speculation off"), runs.get("ortllm speculation ngram")
        if off and on:
            differ = [i for i, (a, b) in enumerate(zip(off["texts"], on["texts"], strict=True)) if a != b]
            report.setdefault("texts_differ", {})[str(clients)] = differ
            print(f"{clients} client(s): ortllm's texts with and without speculation differ in "
                  f"{len(differ)} of {len(work)} answers {differ}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
