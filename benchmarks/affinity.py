"""Cache-aware routing: two replicas behind HAProxy, the shipped affinity (deploy/haproxy.cfg: a consistent
hash of the session id) against plain round robin, on multi-turn chats.

C clients each hold a T-turn conversation through the balancer with /v1/chat/completions (the client sends
the whole history every turn, as OpenAI clients do, and names its conversation in X-Session-Id). A turn that
reaches the replica which answered the previous turns finds the conversation's keys and values in that
replica's KV cache (prefix reuse) and processes only the new message; one that lands on the other replica
processes the whole history. Reported per turn: cached prompt tokens (usage.prompt_tokens_details) and TTFT.

    python benchmarks/affinity.py [--model smollm2-135m] [--clients 4] [--turns 5] [--json out.json]

Needs haproxy (Debian) and a converted model in $ORTLLM_HOME; everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from ortllm.benchmark import ServerProcess, free_port

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Describe a lighthouse keeper's morning in three sentences.",
    "What does she eat for breakfast, and why?",
    "A storm comes in the afternoon. What does she do first?",
    "Who visits her in the evening?",
    "How does the day end?",
    "What does she write in her logbook?",
    "What will she do differently tomorrow?",
]


def balancer(cfg: Path, replicas: list[ServerProcess], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {
        **os.environ,
        "ORTLLM_LB_BIND": f"127.0.0.1:{port}",
        "ORTLLM_REPLICA_1": f"127.0.0.1:{replicas[0].port}",
        "ORTLLM_REPLICA_2": f"127.0.0.1:{replicas[1].port}",
    }
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    with log.open("w") as out:
        proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # both replicas up in HAProxy's eyes
        try:
            if all(requests.get(url + "/readiness", timeout=2).ok for _ in range(4)):
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"haproxy did not start: {log.read_text()}")


def conversation(url: str, model: str, client: int, turns: int, tag: str) -> list[dict[str, float]]:
    """One client's chat: per turn the cached prompt tokens, the prompt tokens and the TTFT."""
    history: list[dict[str, str]] = [{"role": "system", "content": f"You are storyteller number {client}."}]
    rows = []
    for turn in range(turns):
        history.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
        body = {
            "model": model,
            "messages": history,
            "max_tokens": 48,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        ttft = None
        text, usage = "", {}
        headers = {"X-Session-Id": f"{tag}-client-{client}"}
        with requests.post(
            url + "/v1/chat/completions", json=body, headers=headers, stream=True, timeout=300
        ) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        ttft = ttft or time.perf_counter() - start
                        text += piece
        history.append({"role": "assistant", "content": text})
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        rows.append(
            {"turn": turn + 1, "prompt": usage["prompt_tokens"], "cached": cached, "ttft_s": ttft or 0.0}
        )
    return rows


def run(url: str, model: str, clients: int, turns: int, tag: str) -> list[list[dict[str, float]]]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda c: conversation(url, model, c, turns, tag), range(clients)))


def summary(results: list[list[dict[str, float]]], turns: int) -> list[dict[str, float]]:
    out = []
    for turn in range(turns):
        rows = [r[turn] for r in results]
        out.append(
            {
                "turn": turn + 1,
                "prompt_tokens": statistics.mean(r["prompt"] for r in rows),
                "cached_tokens": statistics.mean(r["cached"] for r in rows),
                "cached_share": sum(r["cached"] for r in rows) / max(1, sum(r["prompt"] for r in rows)),
                "ttft_s": statistics.mean(r["ttft_s"] for r in rows),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ortllm-affinity-"))
    shipped = ROOT / "deploy" / "haproxy.cfg"
    roundrobin = work / "roundrobin.cfg"
    text = shipped.read_text()
    assert "    balance hash var(txn.affinity)\n" in text
    roundrobin.write_text(text.replace("    balance hash var(txn.affinity)\n", "    balance roundrobin\n"))
    cmd = [sys.executable, "-m", "ortllm.cli.main", "serve", "--model", args.model, "--quiet", "--port"]
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "clients": args.clients,
        "turns": args.turns,
    }
    for name, cfg in (("affinity", shipped), ("round robin", roundrobin)):
        # fresh replicas per routing: no cache left from the other run
        replicas = []
        for _ in range(2):
            port = free_port()
            replicas.append(ServerProcess([*cmd, str(port)], port, "/readiness"))
        lb, url = balancer(cfg, replicas, work / f"{name.replace(' ', '-')}.log")
        try:
            run(
                url, args.model, 1, 1, f"warm-{name}"
            )  # first request of each replica's kernels: not measured
            started = time.perf_counter()
            results = run(url, args.model, args.clients, args.turns, name.replace(" ", "-"))
            report[name] = {
                "wall_s": round(time.perf_counter() - started, 2),
                "turns": summary(results, args.turns),
            }
        finally:
            lb.terminate()
            lb.wait(timeout=10)
            for replica in replicas:
                replica.stop()
    print(f"{args.clients} clients × {args.turns} turns, 2 replicas, {report['machine']}")
    print(
        f"{'turn':>4} | {'prompt tok':>10} | {'cached: affinity':>16} | {'round robin':>11} | "
        f"{'TTFT affinity':>13} | {'round robin':>11}"
    )
    for a, r in zip(report["affinity"]["turns"], report["round robin"]["turns"], strict=True):
        print(
            f"{a['turn']:>4} | {a['prompt_tokens']:>10.0f} | {a['cached_share']:>15.0%} | {r['cached_share']:>10.0%} | "
            f"{a['ttft_s'] * 1000:>10.0f} ms | {r['ttft_s'] * 1000:>8.0f} ms"
        )
    print(f"wall: affinity {report['affinity']['wall_s']} s, round robin {report['round robin']['wall_s']} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
