"""`personavec finetune`, `trait-data`, `shift` and `finetune-experiment`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PersonavecError
from ..run.format import with_interval
from .common import (
    check_experiment_layer,
    experiment_args,
    finite_float,
    load_lm,
    model_args,
    model_vectors,
    named_vectors,
    out_file,
    parse_layers,
    run_args,
    run_from_args,
    train_args,
    train_config,
)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ft = sub.add_parser("finetune", help="LoRA fine-tune on chat JSONL, optionally with preventative steering/CAFT",
                        description="Loss on assistant tokens only; checkpoints every --save-every steps; rerun "
                                    "the same command to resume. Writes OUT/adapter (peft) and OUT/train.json.")
    ft.add_argument("data", help="JSONL/CSV/Parquet rows with 'messages' or 'prompt' + 'answer'")
    ft.add_argument("--out", required=True, help="output directory")
    ft.add_argument("--vector", default=None, help="persona vector for the interventions")
    ft.add_argument("--prevent-coef", type=finite_float, default=None,
                    help="preventative steering: add this multiple of the raw vector during training (paper: 5)")
    ft.add_argument("--caft", action="store_true", help="CAFT: ablate the vector's direction during training")
    ft.add_argument("--intervention-layers", default=None, help="default: the vector's chosen layer")
    train_args(ft)
    model_args(ft)
    ft.set_defaults(func=cmd_finetune)

    td = sub.add_parser("trait-data", help="trait / normal / mixed fine-tuning sets from a run's own answers")
    td.add_argument("run_dir")
    td.add_argument("--out", required=True)
    td.add_argument("--percents", default="0,25,50,75,100", help="trait percentages of the mixtures")
    td.add_argument("--seed", type=int, default=0)
    td.set_defaults(func=cmd_trait_data)

    sh = sub.add_parser("shift", help="fine-tuning shift: last-prompt activation change projected on vectors")
    sh.add_argument("--adapter", required=True, help="a fine-tune's output directory (or its adapter/)")
    sh.add_argument("--vector", required=True, action="append", help="vector file (repeat for several traits)")
    sh.add_argument("--prompts", default=None, help="table with 'question' or chat-formatted 'prompt' "
                                                    "(default: the trait's built-in evaluation questions)")
    sh.add_argument("--trait", default=None, help="built-in trait whose evaluation questions to use")
    sh.add_argument("--out", default="shift.parquet")
    model_args(sh)
    sh.set_defaults(func=cmd_shift)

    fx = sub.add_parser("finetune-experiment", help="shift vs trait across fine-tunes; preventative steering, CAFT",
                        description="Runs (or resumes) the trait's run, builds trait/normal mixtures from its "
                                    "answers, fine-tunes each mixture plain / with preventative steering / with "
                                    "CAFT, and evaluates every model (shift, judged trait and coherence, the "
                                    "answers' projection, multiple choice). Resumable.")
    run_args(fx)
    fx.add_argument("--percents", default="0,25,50,75,100", help="trait percentages of the mixtures")
    fx.add_argument("--prevent-percents", default=None, help="mixtures also trained with preventative steering "
                                                             "(default: every one above 0)")
    fx.add_argument("--caft-percents", default="100", help="mixtures also trained with CAFT ('' for none)")
    fx.add_argument("--prevent-coef", default="5", help="raw-vector multiple(s), comma-separated (paper: 5)")
    experiment_args(fx)
    fx.set_defaults(func=cmd_finetune_experiment)


def cmd_finetune(args: argparse.Namespace) -> None:
    from ..finetuning.conversations import read_chats
    from ..finetuning.lora import intervention_edits, train_lora

    if args.prevent_coef and args.caft:
        raise PersonavecError(f"--prevent-coef {args.prevent_coef:g} with --caft cancel each other: CAFT ablates the "
                              "vector's direction right after preventative steering adds it at the same layers; "
                              "pass one of them")
    cfg = train_config(args)
    chats = read_chats(args.data)
    vec, edits = None, []
    if args.prevent_coef or args.caft:
        if not args.vector:
            raise PersonavecError("--prevent-coef and --caft need --vector")
        (vec,) = model_vectors(args, [args.vector])
        layers = parse_layers(args.intervention_layers, "--intervention-layers") or (
            [vec.chosen_layer] if vec.chosen_layer is not None else None)
        if not layers:
            raise PersonavecError("the vector has no chosen layer; pass --intervention-layers")
        edits = intervention_edits(vec, layers, prevent_coef=args.prevent_coef, caft=args.caft)
    lm = load_lm(args)
    res = train_lora(lm, chats, cfg, args.out, edits=edits, progress=True)
    if res.extra["complete"]:
        print(f"{res.n_examples} conversations, {res.steps} steps (resumed from {res.resumed_from}), "
              f"final loss {res.losses[-1] if res.losses else float('nan'):.4f} -> adapter {res.adapter_dir}")
    else:
        print(f"stopped after step {res.steps} of {res.extra['total_steps']}; run the same command to continue")


def cmd_trait_data(args: argparse.Namespace) -> None:
    import pandas as pd

    from ..finetuning.datasets import write_mixtures
    from ..finetuning.experiment import parse_percents

    judged = Path(args.run_dir) / "judged.parquet"
    if not judged.exists():
        raise PersonavecError(f"{args.run_dir} has no judged.parquet; finish `personavec run` there first")
    files = write_mixtures(pd.read_parquet(judged), args.out, parse_percents(args.percents) or [], seed=args.seed)
    for name, path in files.items():
        print(f"{name:>8}: {path}")


def cmd_shift(args: argparse.Namespace) -> None:
    from ..files import TABLE_SUFFIXES, read_table, write_table
    from ..finetuning.lora import adapter_path, load_adapter
    from ..finetuning.shift import last_prompt_means, plot_shifts, shift_table
    from ..run.artifacts import builtin

    adapter_path(args.adapter)  # the adapter exists: checked before the base model loads and is read
    vectors = named_vectors(args, args.vector)
    out_file(args.out, "--out", TABLE_SUFFIXES)
    if args.prompts:
        df = read_table(args.prompts)
        col = next((c for c in ("question", "prompt") if c in df.columns), None)
        if col is None:
            raise PersonavecError(f"{args.prompts} needs a 'question' (plain) or 'prompt' (chat-formatted) column")
        questions = df[col].astype(str).tolist()
    else:
        trait = args.trait or next(iter(vectors.values())).trait
        questions = builtin(trait).evaluation_questions
        col = "question"
    base = load_lm(args)
    prompts = questions if col == "prompt" else [base.format_chat(q) for q in questions]
    base_means = last_prompt_means(base, prompts, progress="base model")
    tuned = load_adapter(base, args.adapter)  # the base means are taken: wrap the same weights, no second load
    table = shift_table(base_means, last_prompt_means(tuned, prompts, progress="fine-tuned"), vectors)
    out = Path(args.out)
    write_table(table, out)
    plot_shifts(table, out.with_suffix(".png"), f"shift of {args.adapter}")
    for name, g in table.groupby("vector"):
        best = g.iloc[int(g["shift"].abs().fillna(-1).to_numpy().argmax())]
        print(f"{name}: largest shift {best['shift']:+.3f} at layer {int(best['layer'])} "
              f"(cosine with v {best['cosine']:+.3f})")
    print(f"table -> {out}, plot -> {out.with_suffix('.png')}")


def cmd_finetune_experiment(args: argparse.Namespace) -> None:
    from ..finetuning.experiment import FineTuneExperiment, FTExperimentConfig, parse_percents

    check_experiment_layer(args)  # the experiment's settings are checked before its run starts
    cfg = FTExperimentConfig(
        percents=parse_percents(args.percents), prevent_percents=parse_percents(args.prevent_percents),
        caft_percents=parse_percents(args.caft_percents) or [], layer=args.layer,
        prevent_coefs=parse_percents(args.prevent_coef) or [], train=train_config(args),
        eval_samples=args.ft_eval_samples, max_new_tokens=args.ft_max_new_tokens, seed=args.seed)
    for flag, values in (("--percents", cfg.percents), ("--prevent-percents", cfg.prevent_percents or []),
                         ("--caft-percents", cfg.caft_percents)):
        bad = [p for p in values if not 0 <= p <= 100]
        if bad:
            raise PersonavecError(f"{flag}: {bad[0]:g} is not a percentage; give numbers from 0 to 100")
    run = run_from_args(args)
    run.run()
    summary = FineTuneExperiment(run, cfg).run_all()
    print_finetune_summary(summary)
    print(f"table -> {run.dir / 'finetune' / 'finetune.parquet'}, plots -> {run.dir / 'finetune'}/*.png")


def print_finetune_summary(s: dict) -> None:
    print(f"\n{s['n_finetunes']} fine-tunes, read out at layer {s['layer']} "
          f"({s['trait_scored']} answers with a judged trait score)")
    def r(key: str) -> str:
        return with_interval(s.get(key), s.get(key + "_interval"))

    print(f"  Pearson r [95% interval over fine-tunes], shift vs judged trait: {r('r_shift_trait')} (plain "
          f"fine-tunes only {r('r_shift_trait_plain')})")
    print(f"  Pearson r, shift vs the answers' projection: {r('r_shift_answer_projection')} (plain only "
          f"{r('r_shift_answer_projection_plain')})")
    rl = s.get("r_by_layer", {}).get("r") or []
    if rl:
        best = max(range(len(rl)), key=lambda i: -1 if rl[i] != rl[i] else rl[i])
        print(f"  shift at each layer vs {s['r_by_layer']['against']}: highest r {rl[best]:.3f} at layer {best}")
    for p in s["prevention"]:
        print(f"  {p['intervention']:>9} on {p['percent']:.0f}% trait data: answer-projection increase "
              f"{p['answer_projection_increase_with']:+.2f} vs {p['answer_projection_increase_plain']:+.2f} plain "
              f"({100 * p['answer_projection_prevented']:.0f}% prevented); trait increase "
              f"{p['trait_increase_with']:+.1f} vs {p['trait_increase_plain']:+.1f}; coherence change "
              f"{p['coherence_change']:+.1f} (plain {p['coherence_change_plain']:+.1f}); answer NLL change "
              f"{p['answer_nll_change']:+.3f} (plain {p['answer_nll_change_plain']:+.3f})")
        if "answer_projection_increase_plain_vs_normal" in p:
            print(f"  {'':>9}   against the 0% (normal data) fine-tune: answer-projection increase "
                  f"{p['answer_projection_increase_with_vs_normal']:+.2f} vs "
                  f"{p['answer_projection_increase_plain_vs_normal']:+.2f} plain "
                  f"({100 * p['answer_projection_prevented_vs_normal']:.0f}% prevented); trait increase "
                  f"{p['trait_increase_with_vs_normal']:+.1f} vs {p['trait_increase_plain_vs_normal']:+.1f} "
                  f"({100 * p['trait_prevented_vs_normal']:.0f}% prevented)")
