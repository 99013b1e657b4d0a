"""`personavec run` (the main job) and `personavec report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import fmt, run_args, run_from_args


def add_parsers(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="the main job: trait -> artifacts -> answers -> judge -> filter -> vector",
                       description="Resumable: each stage writes into runs/<model>/<trait>/ and is skipped when "
                                   "done; rerun the same command after an interruption.")
    run_args(r)
    r.set_defaults(func=cmd_run)

    rp = sub.add_parser("report", help="(re)write a run directory's report.html and plots")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)


def cmd_run(args: argparse.Namespace) -> None:
    summary = run_from_args(args).run()
    print_summary(summary)
    print(f"report -> {summary['files']['report']}")


def print_summary(summary: dict) -> None:
    import pandas as pd

    c = summary["counts"]
    print(f"\ntrait {summary['trait']!r} on {summary['model']} — judge: {summary['judge']}")
    if "warning" in summary:
        print(f"WARNING: {summary['warning']}")
    if "judge_note" in summary:
        print(f"note: {summary['judge_note']}")
    f = summary.get("filter", {})
    print(f"answers {c['answers']} (extraction {c['extraction_answers']}, held-out {c['eval_answers']}, "
          f"empty {c['empty_answers']}); pairs used {c.get('kept')} of {c.get('rows')}")
    if "judge_auroc" in f:
        print(f"  judge trait-score AUROC pos vs neg {f['judge_auroc']:.3f} (nan: too few scores); "
              f"missing scores {f['judge_missing']}; "
              f"the paper's filter would keep {f['paper_filter_keeps']} pairs")
    for side, sc in summary["mean_scores"].items():
        print(f"  mean {side}: trait {sc['trait']}  coherence {sc['coherence']}")
    sep = pd.read_parquet(summary["files"]["separation"])
    print("held-out separation (response_avg projection, pos vs neg answers to the evaluation questions):")
    print("  layer  " + " ".join(f"{int(x):>5d}" for x in sep["layer"]))
    print("  AUROC  " + " ".join(f"{x:5.2f}" for x in sep["auroc"]))
    print("  d      " + " ".join(f"{x:5.1f}" for x in sep["cohens_d"]))
    b = summary["best_separation"]
    print(f"best layer {b['layer']}: AUROC {b['auroc']:.3f}, d {b['cohens_d']:.2f}")
    sel = summary.get("selection")
    if sel:
        units = sel.get("units") or (sel.get("grid") or {}).get("units") or "raw"  # raw: before grids had units
        if sel.get("chosen_layer") is None:
            print(f"selection: none ({sel['reason']})")
        else:
            suppress = sel.get("suppress_coef")
            suppress = (f"suppressing coefficient {suppress:+g} ({units} units)" if suppress is not None
                        else "no readable suppressing coefficient")
            print(f"selection: layer {sel['chosen_layer']}, coefficient {sel['chosen_coef']:+g} ({units} units), "
                  f"{suppress} ({sel['reason']})")
        steer_path = Path(summary["run_dir"]) / "steering.parquet"
        if steer_path.exists():
            t = pd.read_parquet(steer_path)
            nan = float("nan")
            print("steering (trait / coherence / projection / fluency in nats per token / degenerate answers, by "
                  f"layer x coefficient in {units} units; n sampled answers per cell):")
            for layer, g in t.groupby("layer"):
                cells = "  ".join(f"{r.coef:+g}: {fmt(r.trait_mean)}/{fmt(r.coherence_mean)}/"
                                  f"{fmt(r.projection_mean)}/{fmt(getattr(r, 'fluency_mean', nan))}/"
                                  f"{fmt(100 * getattr(r, 'degenerate_share', nan))}%" for r in g.itertuples())
                print(f"  L{layer} (n {int(g['n'].iloc[0])}): {cells}")
    cap = summary.get("capability")
    if cap:
        units = sorted({str(r.get("units") or "raw") for r in cap["steered"]})  # raw: before rows had units
        steered = ", ".join(f"{r['coef']:+g}: {r['accuracy']:.2f}" for r in cap["steered"])
        steered = (f"steered at the chosen layer (coefficients in {', '.join(units)} units) {steered}" if steered
                   else "not steered (no chosen layer)")
        print(f"multiple choice ({cap['data']}): unsteered {cap['baseline']['accuracy']:.2f}; {steered}")
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in summary["stage_seconds"].items())
          + f"; wall {summary['wall_seconds']}s")
    print(f"vector -> {summary['files']['vector']}")


def cmd_report(args: argparse.Namespace) -> None:
    from ..run.report import write_report

    print(f"report -> {write_report(args.run_dir)}")
