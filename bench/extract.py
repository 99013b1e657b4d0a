"""Benchmark: pooled activation extraction (personavec) against a per-sample reference loop.

Run as::

    python bench/extract.py [--model smollm2-135m] [--n 64] [--batch-size 16] [--dtype float32]
                            [--repeats 3] [--json PATH] [--profile]

All methods run in one process on the same model and the same (prompt, answer) pairs:

* ``reference`` — a loop in the style of the official persona_vectors extraction: one full causal-LM
  forward pass per pair with ``output_hidden_states=True``; per layer the response mean, the prompt mean
  and the last prompt token are moved to the CPU and appended to lists, averaged at the end;
* ``ours`` — :func:`personavec.activations.pooled_means` (all layers ``0..L``, all three poolings);
* ``bare full LM`` — the same length-sorted, padded batches as ours through ``lm.model(...)``, nothing
  captured (this includes the LM head, which our extraction skips);
* ``bare backbone`` — the same batches through the decoder stack alone (no LM head, nothing captured).

Each timed round runs the methods one after the other (round-robin, so that drift in machine speed hits
all of them alike). Throughputs and ratios use the best round of each method (least disturbed by other
processes); the median is shown too. ``cpu`` is process CPU time over wall time in the best round: about the
thread count when the machine is quiet, lower when other processes compete for the cores. Ours and the
reference are also compared numerically on layers ``0..L-1`` (at ``L`` Hugging Face's hidden state is after
the final norm, ours before).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

import personavec
from personavec.model.activations import POOLINGS, Encoded, encode_pairs, length_batches, make_batch, pooled_means
from personavec.model.layers import backbone
from personavec.model.loading import LoadedModel, pad_token_id

DEMO_DIR = Path(personavec.__file__).resolve().parent / "data" / "demo"


# --------------------------------------------------------------------------------------------- data


def load_demo_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name in ("evil_pos.jsonl", "evil_neg.jsonl"):
        with open(DEMO_DIR / name, encoding="utf-8") as f:
            rows.extend(json.loads(line) for line in f if line.strip())
    if not rows:
        raise SystemExit(f"no demo rows found in {DEMO_DIR}")
    return rows


def build_pairs(lm: LoadedModel, n: int) -> tuple[list[str], list[str]]:
    """N chat-templated prompts and answers, cycling the demo tables; each row is made distinct."""
    rows = load_demo_rows()
    prompts: list[str] = []
    answers: list[str] = []
    for i in range(n):
        row = rows[i % len(rows)]
        rnd = i // len(rows)
        question = f"{row['question']} (question {i})"
        answer = row["answer"] if rnd == 0 else f"{row['answer']} (Take {rnd + 1}.)"
        prompts.append(lm.format_chat(question, system=row.get("system") or None))
        answers.append(answer)
    return prompts, answers


# ------------------------------------------------------------------------------------------ methods


@torch.no_grad()
def reference_means(lm: LoadedModel, prompts: Sequence[str],
                    answers: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-sample extraction in the style of the official persona_vectors code.

    One forward pass of the full causal LM per pair with all hidden states returned; the prompt length
    comes from tokenizing the prompt on its own. Pooled vectors stay in the model's dtype, go to the CPU
    one by one and are averaged at the end. Returns ``{pooling: [L + 1, d]}`` (float32).
    """
    tok, model, device = lm.tokenizer, lm.model, lm.device
    collected: dict[str, list[list[torch.Tensor]]] | None = None
    for prompt, answer in zip(prompts, answers, strict=True):
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        enc = tok(prompt + answer, return_tensors="pt", add_special_tokens=False)
        input_ids = enc["input_ids"].to(device)
        out = model(input_ids, output_hidden_states=True)
        states = out.hidden_states  # tuple of L + 1 tensors [1, T, d]
        if collected is None:
            collected = {p: [[] for _ in states] for p in POOLINGS}
        for layer, h in enumerate(states):
            collected["response_avg"][layer].append(h[:, n_prompt:, :].mean(dim=1).detach().cpu())
            collected["prompt_avg"][layer].append(h[:, :n_prompt, :].mean(dim=1).detach().cpu())
            collected["prompt_last"][layer].append(h[:, n_prompt - 1, :].detach().cpu())
        del out, states
    assert collected is not None
    return {p: torch.stack([torch.cat(per_layer, dim=0).mean(dim=0) for per_layer in layers]).float()
            for p, layers in collected.items()}


def ours_means(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str],
               batch_size: int) -> dict[str, torch.Tensor]:
    return pooled_means(lm, prompts, answers, batch_size=batch_size).means


@torch.no_grad()
def bare_forward(module: torch.nn.Module, lm: LoadedModel, encs: Sequence[Encoded], batch_size: int) -> None:
    """The same length-sorted, right-padded batches as ``pooled_means``, through ``module``, no capture."""
    pad = pad_token_id(lm.tokenizer)
    device = lm.device
    for idx in length_batches([len(e.ids) for e in encs], batch_size, sort=True):
        batch = make_batch([encs[i] for i in idx], pad, "right", device)
        out = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False)
        del out


# ------------------------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall seconds, process CPU seconds (all threads) and the result of ``fn()``."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()  # on a GPU, time the work itself, not the launching of it
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0, result


def max_diffs(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
              n_layers: int) -> dict[str, dict[str, float]]:
    """Max abs diff and max abs diff relative to the largest |value|, per pooling, on layers 0..L-1."""
    out: dict[str, dict[str, float]] = {}
    for p in POOLINGS:
        a, b = ours[p][:n_layers].double(), ref[p][:n_layers].double()
        diff = (a - b).abs()
        scale = b.abs().max().item()
        # per-layer relative error: max |diff| in a layer over max |value| in that layer
        per_layer = (diff.amax(dim=1) / b.abs().amax(dim=1).clamp(min=1e-12)).max().item()
        out[p] = {"max_abs": diff.max().item(), "max_abs_value": scale, "max_rel_per_layer": per_layer}
    return out


def profile_once(label: str, fn: Callable[[], Any], top: int = 15) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    print(f"\n--- profile: {label} (top {top} ops by self CPU time) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48))


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="model spec for personavec.load_model")
    ap.add_argument("--n", type=int, default=64, help="number of (prompt, answer) pairs")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    ap.add_argument("--device", default=None, help="cpu | cuda (default: cuda when present)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds; the best one is reported")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    ap.add_argument("--profile", action="store_true",
                    help="profile one pass of ours, the bare backbone and the reference")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.repeats < 1:
        raise SystemExit("--n, --batch-size and --repeats must be at least 1")

    t0 = time.perf_counter()
    lm = personavec.load_model(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    n_layers, d = lm.n_layers, lm.hidden_size
    prompts, answers = build_pairs(lm, args.n)
    encs = encode_pairs(lm.tokenizer, prompts, answers)

    # The reference derives the boundary from the prompt's own tokenization, ours from character offsets.
    ref_n_prompt = [len(lm.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    boundary_mismatch = sum(int(e.n_prompt != r) for e, r in zip(encs, ref_n_prompt, strict=True))
    real_tokens = sum(len(e.ids) for e in encs)
    batches = length_batches([len(e.ids) for e in encs], args.batch_size, sort=True)
    padded_tokens = sum(len(idx) * max(len(encs[i].ids) for i in idx) for idx in batches)

    full_lm = lm.model
    stack = backbone(lm.model)
    B = args.batch_size
    methods: dict[str, Callable[[], Any]] = {
        "reference": lambda: reference_means(lm, prompts, answers),
        "ours": lambda: ours_means(lm, prompts, answers, B),
        "bare full LM": lambda: bare_forward(full_lm, lm, encs, B),
        "bare backbone": lambda: bare_forward(stack, lm, encs, B),
    }

    print(f"model      {lm.model_id} ({lm.source}), {n_layers} layers, d={d}, dtype={lm.dtype}, "
          f"device={lm.device}, loaded in {load_s:.1f}s")
    print(f"machine    {platform.machine()}, torch {torch.__version__}, threads={torch.get_num_threads()}, "
          f"python {platform.python_version()}")
    print(f"data       {args.n} pairs, {real_tokens} tokens (mean {real_tokens / args.n:.1f}/pair, "
          f"min {min(len(e.ids) for e in encs)}, max {max(len(e.ids) for e in encs)}); "
          f"batch {B}: {len(batches)} batches, {padded_tokens} padded tokens "
          f"({real_tokens / padded_tokens:.1%} real)")
    print(f"boundary   prompt/answer boundary differs between ours and the reference on "
          f"{boundary_mismatch}/{args.n} pairs")

    # Warm-up: every method once on a small slice (first-call allocations, kernel selection).
    warm = min(args.n, 2 * B)
    wp, wa = prompts[:warm], answers[:warm]
    wencs = encs[:warm]
    t_warm, _, _ = timed(lambda: (reference_means(lm, wp[:4], wa[:4]), ours_means(lm, wp, wa, B),
                               bare_forward(full_lm, lm, wencs, B), bare_forward(stack, lm, wencs, B)))
    print(f"warm-up    {t_warm:.1f}s on {warm} pairs; timing {args.repeats} round(s) ...", flush=True)

    times: dict[str, list[float]] = {name: [] for name in methods}
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, Any] = {}
    with torch.no_grad():
        for _ in range(args.repeats):
            for name, fn in methods.items():
                t, c, res = timed(fn)
                times[name].append(t)
                cpu[name].append(c / t)
                if name in ("reference", "ours"):
                    results[name] = res

    best = {name: min(ts) for name, ts in times.items()}
    best_cpu = {name: cpu[name][times[name].index(best[name])] for name in methods}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    sps = {name: args.n / t for name, t in best.items()}

    print()
    header = (f"{'method':<15} {'best s':>8} {'median s':>9} {'cpu':>5} {'pairs/s':>8} {'tokens/s':>9} "
              f"{'vs reference':>13}")
    print(header)
    print("-" * len(header))
    for name in methods:
        print(f"{name:<15} {best[name]:>8.2f} {med[name]:>9.2f} {best_cpu[name]:>5.2f} {sps[name]:>8.1f} "
              f"{real_tokens / best[name]:>9.0f} {sps[name] / sps['reference']:>12.2f}x")
    print("(best of the rounds; tokens/s counts real tokens, not padding; cpu = CPU time / wall time)")
    noisy = [name for name in methods if max(times[name]) > 1.25 * best[name]]
    if noisy:
        print(f"note: rounds vary by more than 25% for {', '.join(noisy)} "
              "(other processes on the machine?); see --json for every round")

    ratios = {
        "ours_vs_reference": sps["ours"] / sps["reference"],
        "ours_vs_bare_full_lm": sps["ours"] / sps["bare full LM"],
        "ours_vs_bare_backbone": sps["ours"] / sps["bare backbone"],
    }
    print()
    print(f"ours / reference       {ratios['ours_vs_reference']:.2f}x throughput")
    print(f"ours / bare full LM    {ratios['ours_vs_bare_full_lm']:.2f}x  (bare includes the LM head)")
    print(f"ours / bare backbone   {ratios['ours_vs_bare_backbone']:.2f}x  (same compute, minus capture)")

    diffs = max_diffs(results["ours"], results["reference"], n_layers)
    print()
    print(f"ours vs reference, layers 0..{n_layers - 1} "
          f"(layer {n_layers} skipped: HF applies the final norm there)")
    for p, dd in diffs.items():
        print(f"  {p:<13} max |diff| {dd['max_abs']:.3e}   max |value| {dd['max_abs_value']:.3e}   "
              f"max per-layer rel {dd['max_rel_per_layer']:.3e}")

    if args.profile:
        profile_once("ours", methods["ours"])
        profile_once("bare backbone", methods["bare backbone"])
        profile_once("reference", methods["reference"])

    if args.json is not None:
        report = {
            "config": {"model": args.model, "model_id": lm.model_id, "n": args.n, "batch_size": B,
                       "dtype": str(lm.dtype).removeprefix("torch."), "device": str(lm.device),
                       "repeats": args.repeats, "threads": torch.get_num_threads(),
                       "torch": torch.__version__, "python": platform.python_version(),
                       "n_layers": n_layers, "hidden_size": d},
            "data": {"real_tokens": real_tokens, "padded_tokens": padded_tokens, "n_batches": len(batches),
                     "boundary_mismatch": boundary_mismatch},
            "times_s": times,
            "cpu_over_wall": cpu,
            "best_s": best,
            "median_s": med,
            "pairs_per_s_best": sps,
            "ratios": ratios,
            "max_diff_layers_0_to_L_minus_1": diffs,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
