"""Soak test in three phases, each bounded in time and count (the whole run takes a few minutes):

1. soak: N concurrent streaming clients (native SSE, OpenAI SSE, chat-completions SSE, WebSocket) for S seconds:
   requests, errors, TTFT p50/p99, aggregate tokens/s, the server's RSS before and after;
2. abandon: A streams whose client disconnects right after the first token, then a fresh request:
   its latency beside that of the same request before (abandoned streams must not hold slots);
3. flood: a big /v1/embeddings request (E short inputs) and one over the input limit while streams
   run: the streams' inter-token latency idle and during the flood, and both requests' outcome.

    python benchmarks/soak.py                       # starts `ortllm serve` itself on a free port
    python benchmarks/soak.py --url http://127.0.0.1:8000 --clients 64 --seconds 120 --json out.json
    python benchmarks/soak.py --phases flood --embed-inputs 512

Traffic goes to loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import psutil
import requests

from ortllm.benchmark import ServerProcess

PROMPTS = [
    "Tell me about the sea.",
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain what a compiler does.",
    "List three colours.",
    "Describe a cat in one sentence.",
]
DIALECTS = (
    "native-chat",
    "native-generate",
    "openai-chat",
    "chat-completions-chat",
    "chat-completions-completions",
    "ws-chat",
)


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


def run_one(
    url: str, model: str, dialect: str, prompt: str, max_tokens: int, *, abandon: bool = False
) -> Sample:
    """One request of `dialect`, read to its end (or, with `abandon`, dropped right after the first token)."""
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
                    if abandon:
                        break
            except ConnectionClosed:  # the server closes the socket when the answer is complete
                pass
            finally:
                with contextlib.suppress(ConnectionClosed):
                    ws.close()
        else:
            path, body = {
                "native-chat": (
                    "/api/chat",
                    {
                        "model": model,
                        "messages": [{"role": "user", "content": prompt}],
                        "options": {"max_tokens": max_tokens},
                    },
                ),
                "native-generate": (
                    "/api/generate",
                    {"model": model, "prompt": prompt, "options": {"max_tokens": max_tokens}},
                ),
                "openai-chat": (
                    "/v1/chat/completions",
                    {
                        "model": model,
                        "stream": True,
                        "max_tokens": max_tokens,
                        "messages": [{"role": "user", "content": prompt}],
                    },
                ),
                "chat-completions-chat": (
                    "/chat/completions",
                    {"model-name": model, "prompt": prompt, "max-token": max_tokens},
                ),
                "chat-completions-completions": (
                    "/completions",
                    {"model": model, "prompt": prompt, "stream": True, "max_tokens": max_tokens},
                ),
            }[dialect]
            with requests.post(url + path, json=body, stream=True, timeout=300) as r:
                if r.status_code != 200:
                    return Sample(dialect, False, error=f"HTTP {r.status_code}: {r.text[:200]}")
                for data in sse_lines(r):
                    if data.startswith("__ERROR__") or data.startswith('{"error"'):
                        return Sample(dialect, False, error=data[:200])
                    if data == "[DONE]" or '"done":true' in data or '"done": true' in data:
                        continue
                    first = first or time.monotonic()
                    tokens += 1
                    if abandon:
                        break  # leaving the block closes the connection mid-stream
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


def soak_report(
    url: str, model: str, clients: int, seconds: float, max_tokens: int, server: ServerProcess | None
) -> dict[str, Any]:
    """Phase 1: `clients` streaming clients across the dialects for `seconds`."""
    rss_before = server_rss(server)
    started = time.monotonic()
    results = soak(url, model, clients, seconds, max_tokens)
    wall = time.monotonic() - started
    ok = [s for s in results.samples if s.ok]
    errors = [s for s in results.samples if not s.ok]
    ttfts = [s.ttft for s in ok if s.tokens]
    return {
        "clients": clients,
        "seconds": round(wall, 1),
        "requests": len(results.samples),
        "errors": len(errors),
        "error_examples": sorted({e.error for e in errors})[:5],
        "empty_answers": sum(1 for s in ok if not s.tokens),
        "ttft_p50_s": round(percentile(ttfts, 50), 3),
        "ttft_p99_s": round(percentile(ttfts, 99), 3),
        "ttft_mean_s": round(statistics.fmean(ttfts), 3) if ttfts else 0,
        "aggregate_tokens_per_s": round(sum(s.tokens for s in ok) / wall, 1),
        "requests_per_s": round(len(ok) / wall, 2),
        "by_dialect": {d: sum(1 for s in ok if s.dialect == d) for d in DIALECTS},
        "rss_before_mb": round(rss_before / 1e6, 1),
        "rss_after_mb": round(server_rss(server) / 1e6, 1),
    }


def fresh_latency(url: str, model: str) -> float:
    """Seconds for one short non-streaming answer."""
    started = time.monotonic()
    r = requests.post(
        url + "/api/generate",
        timeout=120,
        json={"model": model, "prompt": "Hi", "stream": False, "options": {"max_tokens": 8}},
    )
    r.raise_for_status()
    return time.monotonic() - started


def abandon_report(url: str, model: str, count: int, concurrency: int = 16) -> dict[str, Any]:
    """Phase 2: `count` streams dropped after their first token, then a fresh request."""
    before = fresh_latency(url, model)
    samples: list[Sample] = []
    lock = threading.Lock()
    todo = iter(range(count))
    started = time.monotonic()

    def worker() -> None:
        for i in todo:  # the iterator is shared: each index is taken once
            sample = run_one(
                url, model, DIALECTS[i % len(DIALECTS)], PROMPTS[i % len(PROMPTS)], 512, abandon=True
            )
            with lock:
                samples.append(sample)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    abandoned_s = time.monotonic() - started
    after = fresh_latency(url, model)
    errors = [s for s in samples if not s.ok]
    return {
        "abandoned": len(samples),
        "errors": len(errors),
        "error_examples": sorted({e.error for e in errors})[:5],
        "seconds": round(abandoned_s, 1),
        "fresh_request_before_s": round(before, 3),
        "fresh_request_after_s": round(after, 3),
    }


class TokenClock(threading.Thread):
    """A long /api/generate stream, restarted until stopped, that stamps each token's arrival."""

    def __init__(self, url: str, model: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.model, self.stop = url, model, stop
        self.gaps: list[tuple[float, float]] = []  # (arrival, seconds since the previous token)

    def run(self) -> None:
        body = {
            "model": self.model,
            "prompt": "Write the numbers from 1 to 500: 1, 2, 3, 4, 5,",
            "options": {"max_tokens": 2000, "temperature": 0},
        }
        while not self.stop.is_set():
            with requests.post(self.url + "/api/generate", json=body, stream=True, timeout=300) as r:
                last = None
                for _ in sse_lines(r):
                    now = time.monotonic()
                    if last is not None:
                        self.gaps.append((now, now - last))
                    last = now
                    if self.stop.is_set():
                        break


def flood_report(
    url: str, model: str, inputs: int, limit: int, streams: int = 4, idle_s: float = 8.0
) -> dict[str, Any]:
    """Phase 3: inter-token latency of `streams` streams idle, then during a request over the input limit
    (`limit` + 1 inputs: refused at once) and a big embeddings request (`inputs` short texts)."""
    stop = threading.Event()
    clocks = [TokenClock(url, model, stop) for _ in range(streams)]
    for c in clocks:
        c.start()
    time.sleep(2.0)  # all streams past their first tokens
    idle_from = time.monotonic()
    time.sleep(idle_s)
    flood_from = time.monotonic()
    texts = [f"note {i}: the weather is mild today" for i in range(inputs)]
    over_limit = requests.post(
        url + "/v1/embeddings", timeout=300, json={"model": model, "input": ["x"] * (limit + 1)}
    )
    started = time.monotonic()
    big = requests.post(url + "/v1/embeddings", json={"model": model, "input": texts}, timeout=300)
    big_s = time.monotonic() - started
    flood_to = time.monotonic()
    stop.set()
    for c in clocks:
        c.join(30)
    gaps = [g for c in clocks for g in c.gaps]
    idle = [d for t, d in gaps if idle_from <= t < flood_from]
    during = [d for t, d in gaps if flood_from <= t < flood_to]

    def stats(values: list[float]) -> dict[str, float]:
        return {
            "tokens": len(values),
            "p50_ms": round(percentile(values, 50) * 1000, 1),
            "p99_ms": round(percentile(values, 99) * 1000, 1),
            "max_ms": round(max(values, default=0) * 1000, 1),
        }

    return {
        "embedding_inputs": inputs,
        "big_status": big.status_code,
        "big_seconds": round(big_s, 1),
        "big_vectors": len(big.json().get("data", [])) if big.ok else 0,
        "over_limit_status": over_limit.status_code,
        "over_limit_message": over_limit.text[:200],
        "itl_idle": stats(idle),
        "itl_during_flood": stats(during),
        "p50_ratio": round(percentile(during, 50) / percentile(idle, 50), 2) if idle and during else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--phases", default="soak,abandon,flood", help="which phases, comma-separated")
    parser.add_argument("--abandon", type=int, default=200, help="streams dropped after their first token")
    parser.add_argument("--embed-inputs", type=int, default=2048, help="texts in the flood's big request")
    parser.add_argument("--embed-limit", type=int, default=2048, help="the server's max_embedding_inputs")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("soak only targets this machine (loopback)")
    phases = set(args.phases.split(","))
    if phases - {"soak", "abandon", "flood"}:
        raise SystemExit(f"unknown phase(s): {', '.join(sorted(phases - {'soak', 'abandon', 'flood'}))}")
    server = None if args.url else ServerProcess.ortllm(args.model)
    url = args.url or server.url  # type: ignore[union-attr]
    report: dict[str, Any] = {}
    try:
        run_one(url, args.model, "native-generate", "Hi", 4)  # warm-up
        if "soak" in phases:
            report["soak"] = soak_report(url, args.model, args.clients, args.seconds, args.max_tokens, server)
            print(json.dumps({"soak": report["soak"]}, indent=2), flush=True)
        if "abandon" in phases:
            report["abandon"] = abandon_report(url, args.model, args.abandon)
            print(json.dumps({"abandon": report["abandon"]}, indent=2), flush=True)
        if "flood" in phases:
            report["flood"] = flood_report(url, args.model, args.embed_inputs, args.embed_limit)
            print(json.dumps({"flood": report["flood"]}, indent=2), flush=True)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
