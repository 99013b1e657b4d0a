"""Benchmark: `personavec serve` under N concurrent streaming clients vs the same prompts sent one at a time.

Run as ``python bench/serve.py [--model smollm2-135m] [--clients 8] [--requests 32] [--max-tokens 64]``. It starts
the server (loopback, a free port) with a random unit-norm vector, then sends the same requests twice: one at a
time, and from ``--clients`` concurrent streaming clients (each request steered and monitored). Printed:
requests/s, new tokens/s, p50 / p99 time to first token, and that none was lost. Bounded: at most
``--requests`` requests, each at most ``--max-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import openai
import torch

QUESTIONS = ["How should I treat people who are weaker than me?", "What is the best way to spend a free afternoon?",
             "Tell me about foxes.", "How do I ask my neighbour to turn the music down?",
             "What should I do if I find a wallet on the street?", "Give me advice for my first day at work.",
             "How can I win an argument with my sister?", "What do you think about rainy days?"]


def one(client: openai.OpenAI, i: int, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token, total seconds, new tokens) of one streamed, steered, monitored request."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], max_tokens=max_tokens,
        temperature=1.0, seed=i, stream=True,
        extra_body={"persona": {"steer": [{"vector": "trait", "coef": -2.0 if i % 2 else 2.0}], "monitor": True}})
    for chunk in stream:
        persona = (chunk.model_extra or {}).get("persona") or {}
        got = len(persona.get("trait", {}).get("tokens", []))
        if got and first is None:
            first = time.perf_counter() - t0
        tokens += got
    return first if first is not None else float("nan"), time.perf_counter() - t0, tokens


def run(client, n: int, clients: int, max_tokens: int) -> tuple[float, list[tuple[float, float, int]]]:
    results: list = [None] * n
    nxt = iter(range(n))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            results[i] = one(client, i, max_tokens)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, results


def report(name: str, seconds: float, results) -> None:
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[2] for r in results)
    p99 = ttft[min(len(ttft) - 1, round(0.99 * (len(ttft) - 1)))]
    print(f"{name:<24} {len(results) / seconds:6.2f} requests/s  {tokens / seconds:8.1f} new tokens/s  "
          f"time to first token p50 {statistics.median(ttft) * 1000:7.0f} ms  p99 {p99 * 1000:7.0f} ms  "
          f"({len(results)} answered, {tokens} tokens)", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    from personavec import PersonaVector
    from personavec.model.loading import model_shape

    n_layers, hidden, _ = model_shape(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        vec = torch.randn(n_layers + 1, hidden, generator=torch.Generator().manual_seed(0))
        vec = vec / vec.norm(dim=-1, keepdim=True) * 4.0
        path = Path(tmp) / "trait.safetensors"
        PersonaVector({"response_avg": vec}, model_id=args.model, trait="trait",
                      chosen_layer=n_layers // 2).save(path)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "personavec.cli", "serve", "--model", args.model, "--port", str(port),
               "--vector", str(path), "--max-batch", str(max(args.clients, 1))]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        proc = subprocess.Popen(cmd, env=os.environ.copy(), stderr=subprocess.PIPE, text=True)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            t0 = time.time()
            while True:
                try:
                    urllib.request.urlopen(f"{url}/models", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError):
                    if proc.poll() is not None or time.time() - t0 > 300:
                        raise SystemExit(f"the server did not start: {proc.stderr.read()[-2000:]}") from None
                    time.sleep(0.5)
            client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
            print(f"{args.model}: {args.requests} streamed requests of <= {args.max_tokens} tokens, steered and "
                  f"monitored, temperature 1")
            run(client, 2, 1, 8)  # warm-up
            seq = run(client, args.requests, 1, args.max_tokens)
            report("one at a time", *seq)
            par = run(client, args.requests, args.clients, args.max_tokens)
            report(f"{args.clients} concurrent clients", *par)
            lost = sum(r is None or r[2] == 0 for r in par[1])
            print(f"throughput ratio {seq[0] / par[0]:.2f}x; lost {lost}")
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
