"""Benchmark: data screening throughput, with and without early stopping and length bucketing, in one run.

Run as::

    python bench/screen.py [--model smollm2-135m] [--n 256] [--layer 13] [--batch-size 16] [--dtype float32]
                           [--repeats 3] [--delta-n 32] [--json PATH]

The data: ``n`` (question, answer) chats built from the shipped demo rows and the built-in traits'
questions, answers cut to seeded random lengths (8..all words) so that lengths vary as in real data.
A random unit vector at ``--layer`` stands in for a persona vector (speed does not depend on its values).

Timed, round-robin in one process (best round reported, median shown):

* ``response`` mode (projection passes only: response average + last prompt token) with
  early stop on/off × length bucketing on/off — the forward pass stops after block ``layer − 1`` when on;
* ``delta`` mode (ΔP: adds one greedy base answer per distinct prompt and a second projection pass) on the
  first ``--delta-n`` rows, once, with both speed knobs on, to show what generation costs.

Each configuration writes into its own fresh directory (nothing is reused between configurations).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import personavec
from personavec.model.loading import load_model
from personavec.run.artifacts import builtin, builtin_traits
from personavec.screening.scoring import ScreenConfig, screen_file
from personavec.vectors.probe import Probe
from personavec.vectors.vector import PersonaVector

DEMO_DIR = Path(personavec.__file__).resolve().parent / "data" / "demo"


def make_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    answers = []
    for name in ("evil_pos.jsonl", "evil_neg.jsonl"):
        with open(DEMO_DIR / name, encoding="utf-8") as f:
            answers += [json.loads(line)["answer"] for line in f if line.strip()]
    questions = [q for t in builtin_traits() for q in builtin(t).evaluation_questions]
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(answers) for _ in range(rng.randint(1, 4))).split()
        cut = rng.randint(min(8, len(words)), len(words))
        rows.append({"messages": [{"role": "user", "content": rng.choice(questions)},
                                  {"role": "assistant", "content": " ".join(words[:cut])}]})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--layer", type=int, default=13)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--delta-n", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    lm = load_model(args.model, dtype=args.dtype)
    g = torch.Generator().manual_seed(0)
    t = torch.randn(lm.n_layers + 1, lm.hidden_size, generator=g)
    vec = PersonaVector(tensors={"response_avg": t}, model_id=lm.model_id, trait="bench", chosen_layer=args.layer)
    probes = [Probe("v", vec, (args.layer,))]
    tmp = Path(tempfile.mkdtemp(prefix="pv-bench-screen-"))
    data = tmp / "data.jsonl"
    rows = make_rows(args.n)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = lm.tokenizer
    lengths = [len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
               for r in rows]

    configs = {"early stop + bucketing": (True, True), "early stop, no bucketing": (True, False),
               "no early stop, bucketing": (False, True), "neither": (False, False)}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    # warm-up (allocator, kernels) outside the timed rounds
    screen_file(lm, data, probes, tmp / "warm", ScreenConfig(mode="response", chunk_rows=args.chunk_rows,
                                                              batch_size=args.batch_size), progress=False)
    for r in range(args.repeats):
        for name, (stop, bucket) in configs.items():
            out = tmp / f"{r}-{name.replace(' ', '_').replace(',', '')}"
            cfg = ScreenConfig(mode="response", chunk_rows=args.chunk_rows, batch_size=args.batch_size,
                               stop_early=stop, bucket=bucket)
            c0 = time.process_time()
            res = screen_file(lm, data, probes, out, cfg, progress=False)
            res["cpu"] = (time.process_time() - c0) / res["seconds"]
            runs[name].append(res)
            shutil.rmtree(out)
    delta_rows = tmp / "delta.jsonl"
    delta_rows.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.delta_n]))
    delta = screen_file(lm, delta_rows, probes, tmp / "delta",
                        ScreenConfig(mode="delta", chunk_rows=args.chunk_rows, batch_size=args.batch_size,
                                     gen_batch_size=args.batch_size, max_new_tokens=args.max_new_tokens),
                        progress=False)

    cpu = platform.processor() or platform.machine()
    print(f"personavec {personavec.__version__}, torch {torch.__version__}, {cpu}, threads {torch.get_num_threads()}, "
          f"model {lm.model_id} ({args.dtype}, {lm.n_layers} layers)")
    print(f"{args.n} samples, {sum(lengths)} tokens (min {min(lengths)}, median {statistics.median(lengths):.0f}, "
          f"max {max(lengths)}), layer {args.layer}, batch {args.batch_size}, best of {args.repeats} rounds\n")
    best = {k: max(v, key=lambda x: x["samples_per_s"]) for k, v in runs.items()}
    base = best["neither"]["samples_per_s"]
    print(f"{'response mode':<28}{'samples/s':>11}{'tokens/s':>11}{'median s/s':>12}{'cpu':>6}{'vs neither':>12}")
    for k, b in best.items():
        med = statistics.median(x["samples_per_s"] for x in runs[k])
        print(f"{k:<28}{b['samples_per_s']:>11.1f}{b['tokens_per_s']:>11.0f}{med:>12.1f}{b['cpu']:>6.1f}"
              f"{b['samples_per_s'] / base:>11.2f}x")
    es = best["early stop + bucketing"]["samples_per_s"]
    print(f"\nearly stop (with bucketing): {es / best['no early stop, bucketing']['samples_per_s']:.2f}x; "
          f"bucketing (with early stop): {es / best['early stop, no bucketing']['samples_per_s']:.2f}x")
    print(f"delta mode (dP, {args.delta_n} samples, greedy base answers of <= {args.max_new_tokens} tokens): "
          f"{delta['samples_per_s']:.2f} samples/s, {delta['tokens_per_s']:.0f} projected tokens/s, "
          f"{delta['generated_tokens']} tokens generated in {delta['seconds']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "delta": delta, "args": vars(args)}, indent=2))
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
