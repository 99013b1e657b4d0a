"""Benchmark: a TopK SAE trained with the defaults on the embedded model, measured side by side in one run.

Run as::

    python bench/sae.py [--out bench-sae] [--run RUN_DIR] [--layer 13] [--dtype auto] [--minutes 4] [--json PATH]

It runs ``personavec.sae.train_sae`` with the default settings (4096 latents, k = 32, batch 1024, 4 minutes of
training, the default corpus: the model's own answers to the built-in traits' questions, sampled once into
``OUT/corpus``) on ``smollm2-135m`` in the default dtype (``auto``: bfloat16 on CPUs with native bfloat16, else
float32; the SAE itself trains in float32) at the demo run's chosen layer (13 unless ``--run`` names a run that chose
another). Printed side by side, on the held-out documents' tokens: the SAE's FVU against rank-k PCA's on the same
tokens (k = 32), L0, the dead fraction (held-out and the last 65 536 training tokens), the next-token loss clean,
with the reconstruction spliced in and zero-ablated (ce_loss_score), training tokens/s, and the wall time of each
phase: corpus sampling (stated separately: done once per output directory), the activation pass, training,
evaluation. ``OUT`` is deleted first unless ``--keep`` (then a finished directory is only read back).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import torch

from personavec.files import read_json, write_json
from personavec.model.loading import load_model
from personavec.sae.corpus import sampled_corpus
from personavec.sae.training import SaeTrainConfig, train_sae


def chosen_layer(run_dir: str | None, default: int = 13) -> int:
    if run_dir and (Path(run_dir) / "selection.json").is_file():
        layer = read_json(Path(run_dir) / "selection.json").get("chosen_layer")
        if layer is not None:
            return int(layer)
    return default


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-sae")
    ap.add_argument("--run", default=None)
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--minutes", type=float, default=SaeTrainConfig().minutes)
    ap.add_argument("--json", default=None)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists() and not args.keep:
        shutil.rmtree(out)
    layer = args.layer if args.layer is not None else chosen_layer(args.run)
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m", device="cpu", dtype=args.dtype)
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    sampled_corpus(lm, out / "corpus")  # what train_sae would sample first: timed on its own
    t_corpus = time.perf_counter() - t0
    t0 = time.perf_counter()
    sae = train_sae(lm, layer, out=out, config=SaeTrainConfig(minutes=args.minutes), run=args.run)
    t_train_call = time.perf_counter() - t0
    m = sae.provenance["training"]
    r, s = m["recon"], m["spliced"]
    t_eval = t_train_call - m["train_seconds"] - (m["cache_seconds"] or 0)
    print(f"model smollm2-135m ({m['dtype']}), layer {layer}, {m['latents']} latents, k {m['k']}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    print(f"corpus: {m['n_docs']} documents ({m['n_heldout_docs']} held out), {m['n_train_tokens_corpus']} training "
          f"tokens ({m['n_dropped_sinks']} attention-sink tokens dropped), {r['n_tokens']} held-out tokens")
    print(f"{'':28} {'SAE':>10} {'rank-k PCA':>11}")
    print(f"{'FVU (held-out)':28} {r['fvu']:10.4f} {r['pca_fvu']:11.4f}")
    print(f"{'L0':28} {r['l0']:10.1f} {m['k']:11d}")
    print(f"{'dead, held-out':28} {r['dead_heldout']:10.1%}")
    print(f"{'dead, last 65536 train tok':28} {m['dead_training']:10.1%}")
    print(f"next-token loss ({s['n_tokens']} held-out tokens): clean {s['ce_clean']:.4f}, spliced "
          f"{s['ce_spliced']:.4f} (delta {s['ce_delta']:+.4f}), zero-ablated {s['ce_zero_ablated']:.4f}, "
          f"ce_loss_score {s['ce_loss_score']:.4f}")
    print(f"training: {m['train_tokens']} tokens, {m['steps']} steps in {m['train_seconds']:.0f} s = "
          f"{m['tokens_per_s']:.0f} tokens/s (stopped by {m['stopped_by']})")
    print(f"wall time: model load {t_load:.0f} s, corpus sampling {t_corpus:.0f} s (once, separate), activation "
          f"pass {m['cache_seconds']:.0f} s ({m['cache_tokens_per_s']:.0f} tokens/s), training "
          f"{m['train_seconds']:.0f} s, evaluation {t_eval:.0f} s; train_sae total {t_train_call:.0f} s")
    ok = r["fvu"] < r["pca_fvu"] and r["dead_heldout"] <= 0.10 and m["dead_training"] <= 0.10
    print(f"acceptance (FVU below PCA's, dead <= 10 %, train_sae within 10 min): "
          f"{'met' if ok and t_train_call <= 600 else 'NOT met'}")
    if args.json:
        write_json(args.json, {**m, "load_seconds": t_load, "corpus_seconds": t_corpus,
                               "train_sae_seconds": t_train_call, "eval_seconds": t_eval})


if __name__ == "__main__":
    main()
