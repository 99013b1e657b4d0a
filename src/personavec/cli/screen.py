"""`personavec screen` (ΔP) and `personavec screen-experiment`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PersonavecError
from ..run.format import with_interval
from .common import (
    check_experiment_layer,
    experiment_args,
    finite_float,
    fmt,
    load_lm,
    model_args,
    named_vectors,
    non_negative_int,
    parse_layers,
    positive_int,
    run_args,
    run_from_args,
    train_config,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sc = sub.add_parser("screen", help="score training data by projection difference (dP) on persona vectors",
                        description="dP = projection of the dataset response minus that of the base model's own "
                                    "response to the same prompt (response-average, on v-hat). Streams the input in "
                                    "chunks; rerun the same command to resume. --ray runs the same on Ray Data.")
    sc.add_argument("data", help="JSONL or Parquet rows with 'messages' (ending with the assistant turn) or "
                                 "'prompt' + 'answer'")
    sc.add_argument("--vector", required=True, action="append", help="vector file (repeat for several traits)")
    sc.add_argument("--layers", default=None, help="layers (default: each vector's chosen layer); the first ranks")
    sc.add_argument("--pooling", default=None, help="which of the vector's poolings to project on (default: its own)")
    sc.add_argument("--out", required=True, help="output directory")
    sc.add_argument("--mode", choices=["delta", "response", "prompt_last"], default="delta",
                    help="delta: dP (generates base answers, cached); response: the response's projection only; "
                         "prompt_last: the last prompt token only (cheapest)")
    sc.add_argument("--top-k", type=positive_int, default=20)
    sc.add_argument("--threshold", type=finite_float, default=None,
                    help="write filtered.jsonl without rows scoring above")
    sc.add_argument("--percentile", type=finite_float, default=None, help="... or above this percentile of the scores")
    sc.add_argument("--chunk-rows", type=positive_int, default=512, help="rows per checkpointed chunk")
    sc.add_argument("--batch-size", type=positive_int, default=16)
    sc.add_argument("--gen-batch-size", type=positive_int, default=16)
    sc.add_argument("--max-new-tokens", type=positive_int, default=256, help="base answers' length")
    sc.add_argument("--temperature", type=finite_float, default=0.0, help="base answers: 0 = greedy (default)")
    sc.add_argument("--max-length", type=positive_int, default=None,
                    help="cut pairs to this many tokens (default: the model's context length)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--base-cache", default=None,
                    help="SQLite cache of base answers (default: OUT/base_answers.sqlite)")
    sc.add_argument("--no-early-stop", action="store_true", help="run every layer (benchmarking)")
    sc.add_argument("--no-bucketing", action="store_true", help="batch in input order (benchmarking)")
    sc.add_argument("--sae", default=None, help="an SAE (any format `personavec sae info` reads) at one of the "
                                                "screened layers: every row gets the features that carry its score")
    sc.add_argument("--sae-layer", type=non_negative_int, default=None,
                    help="the SAE's layer, for a file that does not say")
    sc.add_argument("--ray", action="store_true", help="run on Ray Data (local Ray unless --ray-address)")
    sc.add_argument("--ray-workers", type=positive_int, default=2, help="model actors")
    sc.add_argument("--ray-address", default=None, help="existing cluster: auto or ray://host:port")
    sc.add_argument("--cpus-per-worker", type=finite_float, default=1.0)
    sc.add_argument("--gpus-per-worker", type=finite_float, default=0.0)
    model_args(sc)
    sc.set_defaults(func=cmd_screen)

    sx = sub.add_parser("screen-experiment", help="validate dP screening: fine-tune on the top / random / bottom "
                                                  "samples of a mixed dataset",
                        description="Runs (or resumes) the trait's run, screens its trait/normal mixture with dP, "
                                    "fine-tunes on the top-n, random-n and bottom-n samples (and top-n by the "
                                    "response projection alone, and by the judge when it scores), and compares the "
                                    "fine-tuned models as finetune-experiment does. Resumable.")
    run_args(sx)
    sx.add_argument("--n", type=positive_int, default=100, help="samples per selection")
    sx.add_argument("--mix-percent", type=finite_float, default=50, help="trait share of the screened mixture")
    experiment_args(sx)
    sx.set_defaults(func=cmd_screen_experiment)


def _screen_probes(args: argparse.Namespace) -> tuple[list[dict], list]:
    """Probe specs (for Ray workers, which load the files themselves) and the probes built from them."""
    from ..vectors.probe import make_probes

    probes = make_probes(named_vectors(args, args.vector), parse_layers(args.layers), args.pooling)
    specs = [{"name": p.name, "path": str(path), "layers": list(p.layers), "pooling": p.pooling}
             for p, path in zip(probes, args.vector)]
    return specs, probes


def cmd_screen(args: argparse.Namespace) -> None:
    from ..screening.ray import screen_file_ray
    from ..screening.report import report
    from ..screening.scoring import ScreenConfig, screen_file

    if args.threshold is not None and args.percentile is not None:
        raise PersonavecError("give --threshold or --percentile, not both")
    if args.percentile is not None and not 0 < args.percentile < 100:
        raise PersonavecError(f"--percentile {args.percentile:g} is out of range: it must be above 0 and below 100 "
                              "(0 < p < 100; e.g. 95 keeps the rows above the 95th percentile)")
    cfg = ScreenConfig(mode=args.mode, chunk_rows=args.chunk_rows, batch_size=args.batch_size,
                       gen_batch_size=args.gen_batch_size, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed, max_length=args.max_length,
                       stop_early=not args.no_early_stop, bucket=not args.no_bucketing)
    if not Path(args.data).is_file():
        raise PersonavecError(f"{args.data} does not exist")
    specs, probes = _screen_probes(args)
    sae = None
    if args.sae is not None:
        from ..sae.formats import load_sae

        if not args.ray:  # on Ray the driver and every worker load it
            sae = load_sae(args.sae, layer=args.sae_layer)
    elif args.sae_layer is not None:
        raise PersonavecError("--sae-layer is the layer of an --sae file; give --sae too")
    if args.ray:
        if args.base_cache:
            raise PersonavecError("--base-cache is for the local path; on Ray each worker keeps its own cache on "
                                  "its node's local disk")
        speed = screen_file_ray(args.model, args.data, specs, args.out, cfg, workers=args.ray_workers,
                                device=args.device, dtype=args.dtype, address=args.ray_address,
                                cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker,
                                sae=None if args.sae is None else {"path": args.sae, "layer": args.sae_layer})
    else:
        speed = screen_file(load_lm(args), args.data, probes, args.out, cfg, cache_path=args.base_cache, sae=sae)
    summary = report(args.out, args.data, probes, cfg, top_k=args.top_k, threshold=args.threshold,
                     percentile=args.percentile, throughput=speed)
    print(f"{summary['rows']} samples screened ({cfg.mode}); this call: {speed['rows']} rows in {speed['seconds']} s"
          + (f" = {speed['samples_per_s']} samples/s, {speed['tokens_per_s']} tokens/s" if speed["rows"] else ""))
    for name, v in summary["vectors"].items():  # a mean or sd is None (null) where no row, or one row, has it
        print(f"  {name}: dataset mean {v['column'].split(':')[-1]} {_shown(v['mean'], '+.4f')} "
              f"(sd {_shown(v['std'], '.4f')})"
              + (f"; {v['above_cut']} rows above the cut {v['cut']:.4g}" if v["cut"] is not None else ""))
    if "filtered" in summary:
        f = summary["filtered"]
        print(f"  filtered: kept {f['kept']}, dropped {f['dropped']} -> {f['file']}")
    print(f"table -> {Path(args.out) / 'screen.parquet'}; top/bottom -> {Path(args.out)}/top.jsonl, bottom.jsonl")


def _shown(x: float | None, spec: str) -> str:
    """A summary number, or "–" where there is none (the sd of one row, the mean of rows that all lack it)."""
    return "–" if x is None else format(x, spec)


def cmd_screen_experiment(args: argparse.Namespace) -> None:
    from ..finetuning.experiment import FineTuneExperiment, FTExperimentConfig
    from ..screening.experiment import screen_validation

    check_experiment_layer(args)  # the experiment's settings are checked before its run starts
    if not 0 < args.mix_percent <= 100:
        raise PersonavecError(f"--mix-percent {args.mix_percent:g} is not a trait share to screen; give a percentage "
                              "above 0 and at most 100")
    cfg = FTExperimentConfig(layer=args.layer, train=train_config(args), eval_samples=args.ft_eval_samples,
                             max_new_tokens=args.ft_max_new_tokens, seed=args.seed)
    run = run_from_args(args)
    run.run()
    s = screen_validation(FineTuneExperiment(run, cfg), n=args.n, percent=args.mix_percent, seed=args.seed)
    dp = with_interval(s["auroc_delta_p_trait_rows"], s.get("auroc_delta_p_trait_rows_interval"))
    response = with_interval(s["auroc_response_trait_rows"], s.get("auroc_response_trait_rows_interval"))
    print(f"\n{s['mixture']}: dataset dP {s['dataset_delta_p']:+.3f}; AUROC of dP for the trait rows {dp} "
          f"(response projection alone {response}; 95% intervals over rows)")
    print(f"  {'selection':<16}{'trait share':>12}{'mean dP':>10}{'shift':>9}{'answer proj':>13}{'trait':>8}"
          f"{'NLL':>8}")
    b = s["base"]
    print(f"  {'base model':<16}{'':>12}{'':>10}{0:>9.3f}{b['answer_projection']:>13.3f}"
          f"{fmt(b['trait']):>8}{fmt(b['answer_nll']):>8}")
    for r in s["results"]:
        print(f"  {r['selection']:<16}{r['trait_share']:>12.2f}{r['mean_delta_p']:>10.3f}{r['shift']:>9.3f}"
              f"{r['answer_projection']:>13.3f}{fmt(r['trait']):>8}{fmt(r['answer_nll']):>8}")
    print(f"-> {run.dir / 'finetune' / 'screen_validation.json'}")
