"""Benchmark: steered vs unsteered generation throughput, same model, prompts and batch size, one process.

Run as ``python bench/steer.py [--model smollm2-135m] [--batch-size 16] [--new-tokens 32] [--dtype float32]``.

Both runs generate exactly ``--new-tokens`` tokens per prompt (greedy, ``min_new_tokens`` set), so they do the
same work; the steered run adds ``coef · v`` at one layer on every position (``--positions``) through
personavec's hooks. Rounds alternate between the two and the best round of each is compared; the target is an
overhead of at most 5 %.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

import personavec as pv
from personavec.model.edits import Edit, steer
from personavec.model.loading import pad_token_id
from personavec.run.artifacts import builtin


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--layer", type=int, default=None, help="default: 40%% of depth")
    ap.add_argument("--positions", default="all")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    lm = pv.load_model(args.model, dtype=args.dtype)
    layer = args.layer if args.layer is not None else round(0.4 * lm.n_layers)
    questions = builtin("evil").evaluation_questions
    prompts = [lm.format_chat(questions[i % len(questions)]) for i in range(args.batch_size)]
    tok = lm.tokenizer
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(lm.device)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(lm.hidden_size, generator=g)
    edit = Edit(layer=layer, direction=v / v.norm() * 4.0, coef=1.0, positions=args.positions)

    def generate() -> None:
        with torch.no_grad():
            lm.model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              do_sample=False, pad_token_id=pad_token_id(tok))

    def steered() -> None:
        with steer(lm, edit):
            generate()

    print(f"model {lm.model_id}, {lm.n_layers} layers, dtype {args.dtype}, batch {args.batch_size}, "
          f"{args.new_tokens} new tokens, prompt columns {enc['input_ids'].shape[1]}, edit at layer {layer} "
          f"({args.positions})")
    generate()
    steered()  # warm-up
    times: dict[str, list[float]] = {"unsteered": [], "steered": []}
    for _ in range(args.repeats):
        for name, fn in (("unsteered", generate), ("steered", steered)):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    tokens = args.batch_size * args.new_tokens
    print(f"{'run':<10} {'best s':>8} {'median s':>9} {'tokens/s':>9}")
    for name, ts in times.items():
        print(f"{name:<10} {min(ts):8.2f} {statistics.median(ts):9.2f} {tokens / min(ts):9.1f}")
    overhead = min(times["steered"]) / min(times["unsteered"]) - 1.0
    print(f"steering overhead {overhead * 100:+.1f}% (best rounds; target <= 5%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
