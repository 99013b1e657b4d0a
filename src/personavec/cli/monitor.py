"""`personavec project` (projections of conversations) and `personavec monitor` (the experiment)."""

from __future__ import annotations

import argparse

from .common import (
    check_experiment_layer,
    load_lm,
    model_args,
    named_vectors,
    out_file,
    parse_layers,
    positive_int,
    run_args,
    run_from_args,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    pj = sub.add_parser("project", help="project conversations on persona vectors (resumable, one model pass)",
                        description="Adds columns <trait>@L<layer>:<pooling> (scalar projection on the unit "
                                    "vector) and ...:cos for each vector, layer and pooling. Input rows: a chat "
                                    "'messages' list, or 'prompt' (chat-formatted) + optional 'answer'.")
    pj.add_argument("data", help="CSV, JSONL or Parquet")
    pj.add_argument("--vector", action="append", required=True, help="a vector file (repeat for several)")
    pj.add_argument("--layers", default=None, help="layers (default: each vector's chosen layer)")
    pj.add_argument("--poolings", default=None, help="comma-separated: prompt_last,response_avg,prompt_avg")
    pj.add_argument("--out", required=True, help="output .jsonl (input columns + projections; resumable)")
    pj.add_argument("--chunk-rows", type=positive_int, default=256)
    pj.add_argument("--batch-size", type=positive_int, default=16)
    pj.add_argument("--max-length", type=positive_int, default=None,
                    help="cut conversations to this many tokens (default: the model's context length)")
    model_args(pj)
    pj.set_defaults(func=cmd_project)

    mo = sub.add_parser("monitor", help="monitoring experiment: does the last prompt token predict the trait?",
                        description="Runs (or resumes) the trait's run, then the paper's monitoring experiment: an "
                                    "8-step system-prompt ladder and 0-20-shot prompts on the evaluation questions; "
                                    "Pearson r between the last-prompt projection and the answers' judged trait.")
    run_args(mo)
    mo.add_argument("--layer", type=int, default=None, help="default: the vector's chosen layer")
    mo.add_argument("--monitor-samples", type=positive_int, default=1, help="answers per prompt (default 1)")
    mo.set_defaults(func=cmd_monitor)


def cmd_project(args: argparse.Namespace) -> None:
    from ..model.loading import model_id_for
    from ..monitor.projections import MONITOR_POOLINGS, check_projection, project_file
    from ..vectors.probe import make_probes

    # bad vector files fail before the model loads
    out_file(args.out, "--out", (".jsonl",))
    probes = make_probes(named_vectors(args, args.vector), parse_layers(args.layers))
    poolings = args.poolings.split(",") if args.poolings else list(MONITOR_POOLINGS)
    check_projection(args.data, probes, args.out, poolings, model_id_for(args.model), args.max_length)
    lm = load_lm(args)
    out = project_file(lm, args.data, probes, args.out, poolings=poolings, chunk_rows=args.chunk_rows,
                       batch_size=args.batch_size, progress=True, max_length=args.max_length)
    print(f"projections -> {out}")


def cmd_monitor(args: argparse.Namespace) -> None:
    check_experiment_layer(args)
    run = run_from_args(args)
    run.run()
    from ..monitor.experiment import monitor_run

    corr = monitor_run(run, layer=args.layer, n_samples=args.monitor_samples)
    print(f"\nmonitoring at layer {corr['layer']} ({corr['n_prompts']} prompts; judge {corr['judge']}, "
          f"{corr['trait_scored']} with a trait score)")
    for key, label in (("r_trait", "last-prompt projection vs judged trait"),
                       ("r_answer_projection", "last-prompt projection vs the answers' projection")):
        def r(part: str, key: str = key) -> str:
            lo, hi = (corr.get(f"{key}_{part}_interval") or [float("nan")] * 2)[:2]
            interval = f" [{lo:.2f}, {hi:.2f}]" if lo == lo and hi == hi else ""
            return f"{corr[f'{key}_{part}']:.3f}{interval}"

        print(f"  Pearson r [95% interval over questions], {label}: overall {r('overall')}, ladder {r('ladder')}, "
              f"many-shot {r('many_shot')}")
        if key + "_overall_setting_means" in corr:
            print(f"    over the setting means: overall {corr[key + '_overall_setting_means']:.3f}, ladder "
                  f"{corr[key + '_ladder_setting_means']:.3f}, many-shot {corr[key + '_many_shot_setting_means']:.3f}")
    if corr.get("judge_note"):
        print(f"  note: {corr['judge_note']}")
    print(f"table -> {run.path('monitor.parquet')}, plot -> {run.path('monitor.png')}")
