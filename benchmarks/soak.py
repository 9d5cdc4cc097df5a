"""Soak test: N concurrent streaming clients (mixed dialects, SSE and WebSocket) for a bounded time.

    python benchmarks/soak.py                       # starts `ortllm serve` itself on a free port
    python benchmarks/soak.py --url http://127.0.0.1:8000 --clients 64 --seconds 120 --json out.json

Reports requests, errors, TTFT p50/p99, aggregate tokens/s and the server's RSS before and after.
Traffic goes to loopback only; the loop is bounded in time and stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import psutil
import requests

from ortllm.benchmark import ServerProcess

PROMPTS = ["Tell me about the sea.", "What is the capital of France?", "Write a haiku about autumn.",
           "Explain what a compiler does.", "List three colours.", "Describe a cat in one sentence."]  # fmt: skip
DIALECTS = ("native-chat", "native-generate", "openai-chat", "rust-completions", "ws-chat")


@dataclass
class Sample:
    dialect: str
    ok: bool
    ttft: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    error: str = ""


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, sample: Sample) -> None:
        with self.lock:
            self.samples.append(sample)


def sse_lines(response: requests.Response):
    for line in response.iter_lines(decode_unicode=True):
        if line and line.startswith("data:"):
            yield line[5:].removeprefix(" ")


def run_one(url: str, model: str, dialect: str, prompt: str, max_tokens: int) -> Sample:
    started = time.monotonic()
    first: float | None = None
    tokens = 0
    try:
        if dialect == "ws-chat":
            from simple_websocket import Client, ConnectionClosed

            ws = Client.connect(url.replace("http", "ws", 1) + "/chat/ws")
            try:
                ws.send(json.dumps({"model-name": model, "prompt": prompt, "max-token": max_tokens}))
                while (frame := ws.receive(timeout=300)) is not None:
                    if str(frame).startswith("__ERROR__"):
                        return Sample(dialect, False, error=str(frame))
                    first = first or time.monotonic()
                    tokens += 1
            except ConnectionClosed:  # the server closes the socket when the answer is complete
                pass
            finally:
                with contextlib.suppress(ConnectionClosed):
                    ws.close()
        else:
            path, body = {
                "native-chat": ("/api/chat", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                              "options": {"max_tokens": max_tokens}}),
                "native-generate": ("/api/generate", {"model": model, "prompt": prompt,
                                                      "options": {"max_tokens": max_tokens}}),
                "openai-chat": ("/v1/chat/completions", {"model": model, "stream": True, "max_tokens": max_tokens,
                                                         "messages": [{"role": "user", "content": prompt}]}),
                "rust-completions": ("/completions", {"model": model, "prompt": prompt, "stream": True,
                                                      "max_tokens": max_tokens}),
            }[dialect]  # fmt: skip
            with requests.post(url + path, json=body, stream=True, timeout=300) as r:
                if r.status_code != 200:
                    return Sample(dialect, False, error=f"HTTP {r.status_code}: {r.text[:200]}")
                for data in sse_lines(r):
                    if data == "[DONE]" or '"done":true' in data or '"done": true' in data:
                        continue
                    first = first or time.monotonic()
                    tokens += 1
    except Exception as exc:
        return Sample(dialect, False, error=f"{type(exc).__name__}: {exc}"[:200])
    end = time.monotonic()
    # a complete stream with no tokens is an empty answer (e.g. an immediate end-of-sequence), not an error
    return Sample(dialect, True, (first or end) - started, tokens, end - started)


def soak(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> Results:
    results = Results()
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            dialect = DIALECTS[(i + n) % len(DIALECTS)]
            results.add(run_one(url, model, dialect, PROMPTS[(i + n) % len(PROMPTS)], max_tokens))
            n += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 360)
    return results


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def server_rss(server: ServerProcess | None) -> int:
    """RSS of the serving process tree (bytes), when this script started the server."""
    if server is None:
        return 0
    root = psutil.Process(server.proc.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("soak only targets this machine (loopback)")
    server = None if args.url else ServerProcess.ortllm(args.model)
    url = args.url or server.url  # type: ignore[union-attr]
    try:
        run_one(url, args.model, "native-generate", "Hi", 4)  # warm-up
        rss_before = server_rss(server)
        started = time.monotonic()
        results = soak(url, args.model, args.clients, args.seconds, args.max_tokens)
        wall = time.monotonic() - started
        rss_after = server_rss(server)
    finally:
        if server is not None:
            server.stop()
    ok = [s for s in results.samples if s.ok]
    errors = [s for s in results.samples if not s.ok]
    ttfts = [s.ttft for s in ok if s.tokens]
    report = {
        "clients": args.clients, "seconds": round(wall, 1), "requests": len(results.samples), "errors": len(errors),
        "error_examples": sorted({e.error for e in errors})[:5],
        "empty_answers": sum(1 for s in ok if not s.tokens),
        "ttft_p50_s": round(percentile(ttfts, 50), 3), "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "ttft_mean_s": round(statistics.fmean(ttfts), 3) if ttfts else 0,
        "aggregate_tokens_per_s": round(sum(s.tokens for s in ok) / wall, 1),
        "requests_per_s": round(len(ok) / wall, 2),
        "by_dialect": {d: sum(1 for s in ok if s.dialect == d) for d in DIALECTS},
        "rss_before_mb": round(rss_before / 1e6, 1), "rss_after_mb": round(rss_after / 1e6, 1),
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
