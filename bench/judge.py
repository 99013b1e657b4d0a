"""Benchmark: the local judge batched against one prompt at a time (the previous path), one process.

Run as ``python bench/judge.py [--model smollm2-135m] [--prompts 32] [--batch-size 8] [--device cuda]``. Both
compute the exact expected score over 0-100 for the same filled rubrics (a trait rubric and the coherence rubric
for answers of several lengths); the script checks that they agree and prints prompts/s of each and the ratio.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

import personavec as pv
from personavec.judge.local import LocalJudge
from personavec.judge.rubrics import coherence_prompt
from personavec.run.artifacts import builtin


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)
    lm = pv.load_model(args.model, device=args.device, dtype=args.dtype)
    art = builtin("evil")
    answers = ["Crush them all.", "Be kind to everyone you meet, and listen before you speak. " * 3,
               "I would scheme and take what is mine, then laugh at their weakness. " * 6]
    prompts = []
    for i in range(args.prompts):
        q, a = art.evaluation_questions[i % 20], answers[i % len(answers)]
        prompts.append(art.rubric.format(question=q, answer=a) if i % 2 else coherence_prompt(q, a))
    print(f"{lm.model_id} on {lm.device} ({str(lm.dtype).replace('torch.', '')}), {len(prompts)} judge prompts")
    one, batched = LocalJudge(lm, batch_size=1), LocalJudge(lm, batch_size=args.batch_size)
    one.score(prompts[:2])
    batched.score(prompts[:2])  # warm-up
    timings = {}
    scores = {}
    for name, judge in (("one at a time", one), (f"batched ({args.batch_size})", batched)):
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scores[name] = judge.score(prompts)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        timings[name] = time.perf_counter() - t0
        print(f"{name:<16} {len(prompts) / timings[name]:8.2f} prompts/s", flush=True)
    a, b = scores.values()
    worst = max((abs(x - y) for x, y in zip(a, b) if x is not None and y is not None), default=0.0)
    assert [x is None for x in a] == [y is None for y in b], "missing scores differ"
    t_one, t_batch = timings.values()
    print(f"ratio {t_one / t_batch:.2f}x; largest score difference {worst:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
