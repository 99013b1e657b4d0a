"""Measurement: does a greedy answer depend on the batch it shares? Per dtype, on the embedded model.

Run as ``python bench/batch.py`` (``--dtypes float32,bfloat16 --questions 40 --tokens 64``). Every question is
answered greedily three ways by the engine: alone (batch of one), all questions in one batch, and in shuffled
order with at most 8 rows decoding together (continuous batching), next to other questions. Printed per dtype: how
many answers differ from the one-alone answer, and how many of their first tokens agree. In float32 the engine is
batch-invariant on CPU (tested in ``tests/engine/test_decoder.py``); in bfloat16 the matrix kernels round
differently for different batch shapes, so a near-tie between two tokens can go either way and the answer then
continues differently.
"""

from __future__ import annotations

import argparse
import random

from personavec.engine.decoder import Engine, Request
from personavec.model.loading import load_model
from personavec.run.artifacts import builtin, builtin_traits


def questions(n: int) -> list[str]:
    out: list[str] = []
    for trait in builtin_traits():
        art = builtin(trait)
        out += art.evaluation_questions + art.extraction_questions
    return list(dict.fromkeys(out))[:n]


def answers(engine: Engine, prompts: list[str], order: list[int], tokens: int) -> dict[int, list[int]]:
    reqs = [Request(prompts[i], tokens, 0.0, key=i) for i in order]
    return {r.key: r.token_ids for r in engine.generate(reqs)}


def first_difference(a: list[int], b: list[int]) -> int | None:
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return t
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"{'dtype':9} {'batching':22} {'answers differing':>18} {'tokens that agree first (median)':>34}")
    for dtype in args.dtypes.split(","):
        lm = load_model("smollm2-135m", device="cpu", dtype=dtype)
        prompts = [lm.format_chat(q) for q in questions(args.questions)]
        n = len(prompts)
        alone = {}
        for i in range(n):
            alone.update(answers(Engine(lm, 1), prompts, [i], args.tokens))
        order = list(range(n))
        random.Random(args.seed).shuffle(order)
        for name, engine, o in ((f"one batch of {n}", Engine(lm, n), list(range(n))),
                                ("shuffled, 8 rows at most", Engine(lm, 8), order)):
            got = answers(engine, prompts, o, args.tokens)
            diffs = [d for i in range(n) if (d := first_difference(alone[i], got[i])) is not None]
            median = sorted(diffs)[len(diffs) // 2] if diffs else "-"
            print(f"{dtype:9} {name:22} {len(diffs):>10d} of {n:<5d} {median!s:>34}")


if __name__ == "__main__":
    main()
