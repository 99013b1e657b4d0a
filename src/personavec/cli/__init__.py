"""The ``personavec`` command line: parse, call one library function, say where results went."""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import NoReturn

from ..errors import PersonavecError
from ..version import __version__

log = logging.getLogger("personavec")


def parse_layers(text: str | None) -> list[int] | None:
    """``all`` / None → every layer; ``20``; ``4-8``; ``4,8,12``; combinations like ``1,4-6``."""
    if text is None or text.strip().lower() == "all":
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise PersonavecError(f"cannot parse layers {text!r}; use e.g. 20, 4-8, 4,8,12 or all") from None
    return out


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``personavec: error: …``), like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"personavec: error: {self.prog}: {message} (see {self.prog} --help)\n")


def finite_float(text: str) -> float:
    """An argparse type: a finite number (NaN and infinities are refused with the usual usage line)."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return x


def finite_floats(text: str) -> list[float]:
    """Comma-separated finite numbers, e.g. ``-4,-2,0,2,4``."""
    return [finite_float(x) for x in text.split(",") if x.strip()]


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="embedded name, .gguf file, local directory, or hub id (default: smollm2-135m)")
    p.add_argument("--revision", default=None, help="a hub model's commit, branch or tag (default: main)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU)")


def _model_vectors(args: argparse.Namespace, paths: Sequence[str]) -> list:
    """Vector files (``.safetensors``, official ``.pt``, llama.cpp ``.gguf``) checked against the model's config,
    before any weights are loaded."""
    from ..model.loading import model_shape
    from ..vectors.formats import load_vector

    n_layers, hidden, _ = model_shape(args.model, args.revision)
    vecs = []
    for path in paths:
        vec = load_vector(path, n_layers=n_layers)
        vec.check_shape(n_layers, hidden, args.model)
        vecs.append(vec)
    return vecs


def _load(args: argparse.Namespace):
    from ..model.loading import load_model

    t0 = time.perf_counter()
    lm = load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision)
    log.info("model %s: %d layers x %d dims on %s (%s), loaded in %.1fs", lm.model_id, lm.n_layers,
             lm.hidden_size, lm.device, str(lm.dtype).replace("torch.", ""), time.perf_counter() - t0)
    return lm


def cmd_extract(args: argparse.Namespace) -> None:
    from ..files import check_writable, read_table
    from ..vectors.extraction import extract_vector
    from ..vectors.tables import FilterConfig, check_columns

    pos, neg = read_table(args.pos), read_table(args.neg)  # bad tables and outputs fail before the model loads
    check_columns(pos, args.pos)
    check_columns(neg, args.neg)
    check_writable(args.out)
    lm = _load(args)
    vec = extract_vector(lm, pos, neg, trait=args.trait, layers=parse_layers(args.layers),
                         filter_config=FilterConfig(args.pos_min, args.neg_max, args.coherence_min),
                         apply_filter=not args.no_filter, batch_size=args.batch_size,
                         max_length=args.max_length, progress=True)
    out = vec.save(args.out)
    print(f"kept {vec.counts.get('kept')} of {vec.counts.get('rows')} pairs; "
          f"vector [{vec.n_layers + 1}, {vec.hidden_size}] x {len(vec.poolings)} poolings -> {out}")


def _describe(path: Path) -> str:
    from ..vectors.formats import load_vector, read_control_vector_gguf

    if path.suffix == ".gguf":
        rows, fields = read_control_vector_gguf(path)
        lines = [f"{path}: llama.cpp control vector, {len(rows)} directions"]
        lines += [f"  {k} = {v}" for k, v in fields.items()]
        lines += [f"  layer {layer} (direction.{layer - 1}): norm {float(t.norm()):.4g}" for layer, t in
                  sorted(rows.items())]
        return "\n".join(lines)
    vec = load_vector(path)
    lines = [f"{path}: trait {vec.trait!r}, model {vec.model_id} ({vec.model_revision})",
             f"  shape [{vec.n_layers + 1}, {vec.hidden_size}], poolings {', '.join(vec.poolings)}, "
             f"chosen layer {vec.chosen_layer}",
             f"  counts {vec.counts}", f"  filter {vec.filter}", f"  convention {vec.layer_convention}"]
    if vec.extra:
        lines.append(f"  extra {vec.extra}")
    norms = vec.norms()
    lines.append(f"  {vec.default_pooling} norm per layer: " + " ".join(f"{i}:{n:.3g}" for i, n in
                                                                        enumerate(norms)))
    return "\n".join(lines)


def cmd_project(args: argparse.Namespace) -> None:
    from ..model.loading import model_id_for
    from ..monitor.projections import MONITOR_POOLINGS, check_projection, project_file
    from ..vectors.probe import Probe

    vecs = _model_vectors(args, args.vector)  # bad vector files fail before the model loads
    layers = parse_layers(args.layers)
    probes = []
    for path, vec in zip(args.vector, vecs):
        use = layers or ([vec.chosen_layer] if vec.chosen_layer is not None else None)
        if not use:
            raise PersonavecError(f"{path} has no chosen layer; pass --layers")
        name = vec.trait if sum(v.trait == vec.trait for v in vecs) == 1 else Path(path).stem
        probes.append(Probe(name, vec, tuple(use)))
    poolings = args.poolings.split(",") if args.poolings else list(MONITOR_POOLINGS)
    check_projection(args.data, probes, args.out, poolings, model_id_for(args.model), args.max_length)
    lm = _load(args)
    out = project_file(lm, args.data, probes, args.out, poolings=poolings, chunk_rows=args.chunk_rows,
                       batch_size=args.batch_size, progress=True, max_length=args.max_length)
    print(f"projections -> {out}")


def cmd_report(args: argparse.Namespace) -> None:
    from ..run.report import write_report

    print(f"report -> {write_report(args.run_dir)}")


def cmd_vectors_info(args: argparse.Namespace) -> None:
    print(_describe(Path(args.vector)))


def cmd_vectors_import(args: argparse.Namespace) -> None:
    from ..vectors.formats import import_official

    vec = import_official(args.files, model_id=args.model_id, trait=args.trait)
    if args.check_model:
        from ..model.loading import load_model

        vec.check_compatible(load_model(args.check_model))
    out = vec.save(args.out)
    print(f"imported {', '.join(vec.poolings)} [{vec.n_layers + 1}, {vec.hidden_size}] -> {out} "
          "(row L is after the final norm in the official format; rows 0..L-1 match personavec's)")


def cmd_vectors_export(args: argparse.Namespace) -> None:
    from ..vectors.formats import export_control_vector_gguf, load_vector

    vec = load_vector(args.vector)
    layers = parse_layers(args.layers) if args.layers else None
    out = export_control_vector_gguf(vec, args.out, layers=layers, coef=args.coef, pooling=args.pooling)
    print(f"wrote {out} (use with llama.cpp: --control-vector {out})")


def _steer_pair(lm, vec, question: str, layer: int, coef: float, max_new_tokens: int,
                positions: str = "all", kind: str = "add", units: str = "raw") -> tuple[str, str]:
    from ..engine.sampling import chat
    from ..model.edits import Edit, steer

    base = chat(lm, question, max_new_tokens=max_new_tokens)
    edit = Edit.from_vector(vec, layer, coef, units=units, kind=kind, positions=positions)
    with steer(lm, edit):
        steered = chat(lm, question, max_new_tokens=max_new_tokens)
    return base, steered


def side_by_side(left: str, right: str, titles: tuple[str, str], width: int) -> str:
    """Two answers in columns of ``width`` characters in all."""
    import textwrap

    col = max(20, (width - 3) // 2)
    a = [titles[0], "-" * min(col, len(titles[0])), *textwrap.wrap(left, col)]
    b = [titles[1], "-" * min(col, len(titles[1])), *textwrap.wrap(right, col)]
    rows = max(len(a), len(b))
    a += [""] * (rows - len(a))
    b += [""] * (rows - len(b))
    return "\n".join(f"{x:<{col}} | {y}" for x, y in zip(a, b))


def _load_steering(args: argparse.Namespace):
    (vec,) = _model_vectors(args, [args.vector])
    layer = args.layer if args.layer is not None else vec.chosen_layer
    if layer is None:
        raise PersonavecError("the vector has no chosen layer; pass --layer")
    vec.get(layer)  # a layer out of range fails before the model loads
    return vec, _load(args), layer


def cmd_chat(args: argparse.Namespace) -> None:
    """Interactive: each question is answered unsteered and steered, shown side by side."""
    import shutil

    vec, lm, layer = _load_steering(args)
    kind = "ablate" if args.ablate else "add"
    how = f"{vec.trait} ablated" if args.ablate else f"{vec.trait} x {args.coef:g} ({args.units})"
    width = shutil.get_terminal_size((120, 20)).columns
    print(f"steering: {how} at layer {layer}, positions {args.positions}. Empty line or Ctrl-D to quit.")
    while True:
        try:
            question = input("\nyou> ").strip()
        except EOFError:
            break
        if not question or question in ("quit", "exit"):
            break
        base, steered = _steer_pair(lm, vec, question, layer, args.coef, args.max_new_tokens, args.positions,
                                    kind, args.units)
        print(side_by_side(base, steered, ("unsteered", f"steered ({how})"), width))


def cmd_steer(args: argparse.Namespace) -> None:
    vec, lm, layer = _load_steering(args)
    kind = "ablate" if args.ablate else "add"
    base, steered = _steer_pair(lm, vec, args.question, layer, args.coef, args.max_new_tokens, args.positions, kind,
                                args.units)
    how = f"{vec.trait} ablated" if args.ablate else f"{vec.trait} x {args.coef}"
    print(f"Q: {args.question}\n\n[unsteered]\n{base}\n\n[steered: {how} at layer {layer}, {args.positions}]\n"
          f"{steered}")


DEMO_QUESTIONS = ("What should I do with a wallet I found on the street?",)


def cmd_demo(args: argparse.Namespace) -> None:
    """Main job for now: extract an 'evil' vector from the shipped table on the model, then steer with it."""
    from ..vectors.extraction import extract_vector

    t0 = time.perf_counter()
    lm = _load(args)
    data = resources.files("personavec") / "data" / "demo"
    with resources.as_file(data / "evil_pos.jsonl") as pos, resources.as_file(data / "evil_neg.jsonl") as neg:
        vec = extract_vector(lm, pos, neg, trait="evil", batch_size=args.batch_size, progress=True)
    layer = args.layer if args.layer is not None else round(lm.n_layers * 0.4)
    vec.chosen_layer = layer
    vec.extra["chosen_by"] = "demo default: 40% of depth, picked by hand on smollm2-135m (not yet automatic)"
    out_dir = Path(args.out) / lm.model_id.replace("/", "--") / "demo-evil"
    path = vec.save(out_dir / "vectors.safetensors")
    norms = vec.norms()
    print(f"\nextracted 'evil' from {vec.counts['kept']} pairs: vector [{vec.n_layers + 1}, {vec.hidden_size}] "
          f"-> {path}")
    print("response_avg norm by layer: " + " ".join(f"{i}:{n:.2f}" for i, n in enumerate(norms)))
    for q in DEMO_QUESTIONS:
        base, steered = _steer_pair(lm, vec, q, layer, args.coef, args.max_new_tokens)
        print(f"\nQ: {q}\n[unsteered]\n{base}\n[steered: evil x {args.coef} at layer {layer}]\n{steered}")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")


def cmd_monitor(args: argparse.Namespace) -> None:
    run = _run_from_args(args)
    run.run()
    from ..monitor.experiment import monitor_run

    corr = monitor_run(run, layer=args.layer, n_samples=args.monitor_samples)
    print(f"\nmonitoring at layer {corr['layer']} ({corr['n_prompts']} prompts; judge {corr['judge']}, "
          f"{corr['trait_scored']} with a trait score)")
    for key, label in (("r_trait", "last-prompt projection vs judged trait"),
                       ("r_answer_projection", "last-prompt projection vs the answers' projection")):
        print(f"  Pearson r, {label}: overall {corr[key + '_overall']:.3f}, ladder {corr[key + '_ladder']:.3f}, "
              f"many-shot {corr[key + '_many_shot']:.3f}")
        if key + "_overall_setting_means" in corr:
            print(f"    over the setting means: overall {corr[key + '_overall_setting_means']:.3f}, ladder "
                  f"{corr[key + '_ladder_setting_means']:.3f}, many-shot {corr[key + '_many_shot_setting_means']:.3f}")
    print(f"table -> {run.path('monitor.parquet')}, plot -> {run.path('monitor.png')}")


def _train_config(args: argparse.Namespace):
    from ..finetune.lora import TrainConfig

    base = TrainConfig.load(args.train_config) if args.train_config else TrainConfig()
    return base.replace(lr=args.lr, epochs=args.epochs, rank=args.rank, lora_alpha=args.lora_alpha,
                        batch_size=args.train_batch_size, grad_accum=args.grad_accum, warmup_steps=args.warmup_steps,
                        max_length=args.train_max_length, seed=args.train_seed, save_every=args.save_every,
                        max_steps=args.max_steps, schedule=args.schedule)


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training (defaults: the paper's; a --train-config JSON/TOML file sets any of them)")
    g.add_argument("--train-config", default=None, help="JSON or TOML file with TrainConfig keys (rank, lr, ...)")
    g.add_argument("--lr", type=finite_float, default=None, help="learning rate (paper: 1e-5)")
    g.add_argument("--epochs", type=int, default=None, help="paper: 1")
    g.add_argument("--rank", type=int, default=None, help="LoRA rank (paper: 32)")
    g.add_argument("--lora-alpha", type=finite_float, default=None, help="LoRA alpha (paper: 64; rsLoRA scaling)")
    g.add_argument("--train-batch-size", type=int, default=None, help="micro-batch size (paper: 2)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (paper: 8)")
    g.add_argument("--warmup-steps", type=int, default=None, help="paper: 5")
    g.add_argument("--schedule", choices=["linear", "constant", "cosine"], default=None, help="paper: linear")
    g.add_argument("--train-max-length", type=int, default=None, help="tokens per conversation (paper: 2048)")
    g.add_argument("--train-seed", type=int, default=None)
    g.add_argument("--save-every", type=int, default=None, help="optimizer steps between checkpoints (default 20)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (resume later)")


def _experiment_args(p: argparse.ArgumentParser) -> None:
    """What both fine-tuning experiments take: read-out layer, evaluation sampling, training settings."""
    p.add_argument("--layer", type=int, default=None, help="intervention/read-out layer (default: chosen)")
    p.add_argument("--ft-eval-samples", type=int, default=2, help="answers per evaluation question per model")
    p.add_argument("--ft-max-new-tokens", type=int, default=64)
    _train_args(p)


def cmd_finetune(args: argparse.Namespace) -> None:
    from ..finetune.conversations import read_chats
    from ..finetune.lora import intervention_edits, train_lora

    cfg = _train_config(args)
    chats = read_chats(args.data)
    vec, edits = None, []
    if args.prevent_coef or args.caft:
        if not args.vector:
            raise PersonavecError("--prevent-coef and --caft need --vector")
        (vec,) = _model_vectors(args, [args.vector])
        layers = parse_layers(args.intervention_layers) or ([vec.chosen_layer] if vec.chosen_layer is not None
                                                            else None)
        if not layers:
            raise PersonavecError("the vector has no chosen layer; pass --intervention-layers")
        edits = intervention_edits(vec, layers, prevent_coef=args.prevent_coef, caft=args.caft)
    lm = _load(args)
    res = train_lora(lm, chats, cfg, args.out, edits=edits, progress=True)
    if res.extra["complete"]:
        print(f"{res.n_examples} conversations, {res.steps} steps (resumed from {res.resumed_from}), "
              f"final loss {res.losses[-1] if res.losses else float('nan'):.4f} -> adapter {res.adapter_dir}")
    else:
        print(f"stopped after step {res.steps} of {res.extra['total_steps']}; run the same command to continue")


def cmd_trait_data(args: argparse.Namespace) -> None:
    import pandas as pd

    from ..finetune.datasets import write_mixtures
    from ..finetune.experiment import parse_percents

    judged = Path(args.run_dir) / "judged.parquet"
    if not judged.exists():
        raise PersonavecError(f"{args.run_dir} has no judged.parquet; finish `personavec run` there first")
    files = write_mixtures(pd.read_parquet(judged), args.out, parse_percents(args.percents) or [], seed=args.seed)
    for name, path in files.items():
        print(f"{name:>8}: {path}")


def cmd_shift(args: argparse.Namespace) -> None:
    from ..files import check_writable, read_table, write_table
    from ..finetune.lora import load_adapter
    from ..finetune.shift import last_prompt_means, plot_shifts, shift_table
    from ..run.artifacts import builtin

    vectors = dict(zip(*_named_vectors(args, args.vector)))
    check_writable(args.out)
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
    base = _load(args)
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
    from ..finetune.experiment import FineTuneExperiment, FTExperimentConfig, parse_percents

    run = _run_from_args(args)
    run.run()
    cfg = FTExperimentConfig(
        percents=parse_percents(args.percents), prevent_percents=parse_percents(args.prevent_percents),
        caft_percents=parse_percents(args.caft_percents) or [], layer=args.layer,
        prevent_coefs=parse_percents(args.prevent_coef) or [], train=_train_config(args),
        eval_samples=args.ft_eval_samples, max_new_tokens=args.ft_max_new_tokens, seed=args.seed)
    summary = FineTuneExperiment(run, cfg).run_all()
    print_finetune_summary(summary)
    print(f"table -> {run.dir / 'finetune' / 'finetune.parquet'}, plots -> {run.dir / 'finetune'}/*.png")


def print_finetune_summary(s: dict) -> None:
    print(f"\n{s['n_finetunes']} fine-tunes, read out at layer {s['layer']} "
          f"({s['trait_scored']} answers with a judged trait score)")
    print(f"  Pearson r, shift vs judged trait: {s['r_shift_trait']:.3f} (plain fine-tunes only "
          f"{s['r_shift_trait_plain']:.3f})")
    print(f"  Pearson r, shift vs the answers' projection: {s['r_shift_answer_projection']:.3f} (plain only "
          f"{s['r_shift_answer_projection_plain']:.3f})")
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


def _screen_probes(args: argparse.Namespace) -> tuple[list[dict], list]:
    """Probe specs (for Ray workers, which load the files themselves) and the probes built from them."""
    from ..vectors.probe import Probe

    layers = parse_layers(args.layers) if args.layers else None
    specs, probes = [], []
    for name, vec, path in zip(*_named_vectors(args, args.vector), args.vector):
        use = layers or ([vec.chosen_layer] if vec.chosen_layer is not None else None)
        if not use:
            raise PersonavecError(f"{path} has no chosen layer; pass --layers")
        specs.append({"name": name, "path": str(path), "layers": use, "pooling": args.pooling})
        probes.append(Probe(name, vec, tuple(use), args.pooling))
    return specs, probes


def _named_vectors(args: argparse.Namespace, paths: Sequence[str]) -> tuple[list[str], list]:
    """Load vector files (checked against the model's config) and name each by its file stem, or by its trait for a
    run's ``vectors.safetensors``; repeated names get a suffix."""
    names: list[str] = []
    vecs = _model_vectors(args, paths)
    for path, vec in zip(paths, vecs):
        stem = Path(path).stem
        name = stem if stem not in ("vectors", "vector") else (vec.trait if vec.trait != "unknown" else stem)
        while name in names:
            name += "_"
        names.append(name)
    return names, vecs


def cmd_screen(args: argparse.Namespace) -> None:
    from ..screen.ray import screen_file_ray
    from ..screen.report import report
    from ..screen.screening import ScreenConfig, screen_file

    if args.threshold is not None and args.percentile is not None:
        raise PersonavecError("give --threshold or --percentile, not both")
    if args.percentile is not None and not 0 < args.percentile < 100:
        raise PersonavecError("--percentile must be between 0 and 100")
    cfg = ScreenConfig(mode=args.mode, chunk_rows=args.chunk_rows, batch_size=args.batch_size,
                       gen_batch_size=args.gen_batch_size, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, seed=args.seed, max_length=args.max_length,
                       stop_early=not args.no_early_stop, bucket=not args.no_bucketing)
    if not Path(args.data).is_file():
        raise PersonavecError(f"{args.data} does not exist")
    specs, probes = _screen_probes(args)
    if args.ray:
        if args.base_cache:
            raise PersonavecError("--base-cache is for the local path; on Ray each worker keeps its own cache on "
                                  "its node's local disk")
        speed = screen_file_ray(args.model, args.data, specs, args.out, cfg, workers=args.ray_workers,
                                device=args.device, dtype=args.dtype, address=args.ray_address,
                                cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)
    else:
        speed = screen_file(_load(args), args.data, probes, args.out, cfg, cache_path=args.base_cache)
    summary = report(args.out, args.data, probes, cfg, top_k=args.top_k, threshold=args.threshold,
                     percentile=args.percentile, throughput=speed)
    print(f"{summary['rows']} samples screened ({cfg.mode}); this call: {speed['rows']} rows in {speed['seconds']} s"
          + (f" = {speed['samples_per_s']} samples/s, {speed['tokens_per_s']} tokens/s" if speed["rows"] else ""))
    for name, v in summary["vectors"].items():
        print(f"  {name}: dataset mean {v['column'].split(':')[-1]} {v['mean']:+.4f} (sd {v['std']:.4f})"
              + (f"; {v['above_cut']} rows above the cut {v['cut']:.4g}" if v["cut"] is not None else ""))
    if "filtered" in summary:
        f = summary["filtered"]
        print(f"  filtered: kept {f['kept']}, dropped {f['dropped']} -> {f['file']}")
    print(f"table -> {Path(args.out) / 'screen.parquet'}; top/bottom -> {Path(args.out)}/top.jsonl, bottom.jsonl")


def cmd_screen_experiment(args: argparse.Namespace) -> None:
    from ..finetune.experiment import FineTuneExperiment, FTExperimentConfig
    from ..screen.experiment import screen_validation

    run = _run_from_args(args)
    run.run()
    cfg = FTExperimentConfig(layer=args.layer, train=_train_config(args), eval_samples=args.ft_eval_samples,
                             max_new_tokens=args.ft_max_new_tokens, seed=args.seed)
    s = screen_validation(FineTuneExperiment(run, cfg), n=args.n, percent=args.mix_percent, seed=args.seed)
    print(f"\n{s['mixture']}: dataset dP {s['dataset_delta_p']:+.3f}; AUROC of dP for the trait rows "
          f"{s['auroc_delta_p_trait_rows']:.3f} (response projection alone {s['auroc_response_trait_rows']:.3f})")
    print(f"  {'selection':<16}{'trait share':>12}{'mean dP':>10}{'shift':>9}{'answer proj':>13}{'trait':>8}"
          f"{'NLL':>8}")
    b = s["base"]
    print(f"  {'base model':<16}{'':>12}{'':>10}{0:>9.3f}{b['answer_projection']:>13.3f}"
          f"{_fmt(b['trait']):>8}{_fmt(b['answer_nll']):>8}")
    for r in s["results"]:
        print(f"  {r['selection']:<16}{r['trait_share']:>12.2f}{r['mean_delta_p']:>10.3f}{r['shift']:>9.3f}"
              f"{r['answer_projection']:>13.3f}{_fmt(r['trait']):>8}{_fmt(r['answer_nll']):>8}")
    print(f"-> {run.dir / 'finetune' / 'screen_validation.json'}")


def _run_from_args(args: argparse.Namespace):
    from dataclasses import replace

    from ..engine.sampling import SamplingConfig
    from ..run.config import RunConfig, quick_sampling
    from ..run.pipeline import Run
    from ..vectors.tables import FilterConfig

    sampling = quick_sampling(args.seed) if args.quick else SamplingConfig(seed=args.seed)
    overrides = {k: v for k, v in (("n_samples", args.n_samples), ("max_new_tokens", args.max_new_tokens),
                                   ("batch_size", args.gen_batch_size), ("temperature", args.temperature))
                 if v is not None}
    sampling = replace(sampling, **overrides)
    cfg = RunConfig(trait=args.trait, description=args.description, model=args.model, judge=args.judge,
                    judge_base_url=args.judge_base_url, judge_concurrency=args.judge_concurrency,
                    eval_judge=args.eval_judge, eval_judge_base_url=args.eval_judge_base_url,
                    generator=args.generator, generator_base_url=args.generator_base_url,
                    artifacts_path=args.artifacts, eval_artifacts_path=args.eval_artifacts, sampling=sampling,
                    eval_samples=args.eval_samples,
                    filter=FilterConfig(args.pos_min, args.neg_max, args.coherence_min), filter_mode=args.filter,
                    batch_size=args.batch_size, select=not args.no_select, quick=args.quick,
                    steer_layers=parse_layers(args.steer_layers) if args.steer_layers else None,
                    steer_coefs=args.steer_coefs or None,
                    coherence_min=args.select_coherence_min, mc_path=args.mmlu, device=args.device,
                    dtype=args.dtype, revision=args.revision)
    run = Run(cfg, out_root=args.out, run_dir=args.run_dir)
    run.command = "personavec " + " ".join(shlex.quote(a) for a in args.argv)
    return run


def cmd_run(args: argparse.Namespace) -> None:
    summary = _run_from_args(args).run()
    print_summary(summary)
    print(f"report -> {summary['files']['report']}")


def print_summary(summary: dict) -> None:
    import pandas as pd

    c = summary["counts"]
    print(f"\ntrait {summary['trait']!r} on {summary['model']} — judge: {summary['judge']}")
    if "warning" in summary:
        print(f"WARNING: {summary['warning']}")
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
        print(f"selection: layer {sel['chosen_layer']}, coefficient {sel['chosen_coef']}, suppressing "
              f"coefficient {sel['suppress_coef']} ({sel['reason']})")
        steer_path = Path(summary["run_dir"]) / "steering.parquet"
        if steer_path.exists():
            t = pd.read_parquet(steer_path)
            print("steering (trait / coherence / projection by layer x coefficient):")
            for layer, g in t.groupby("layer"):
                cells = "  ".join(f"{r.coef:+g}: {_fmt(r.trait_mean)}/{_fmt(r.coherence_mean)}/"
                                  f"{_fmt(r.projection_mean)}" for r in g.itertuples())
                print(f"  L{layer}: {cells}")
    cap = summary.get("capability")
    if cap:
        steered = ", ".join(f"{r['coef']:+g}: {r['accuracy']:.2f}" for r in cap["steered"])
        print(f"multiple choice ({cap['data']}): unsteered {cap['baseline']['accuracy']:.2f}; steered at the chosen "
              f"layer {steered}")
    print("stage seconds: " + ", ".join(f"{k} {v}" for k, v in summary["stage_seconds"].items())
          + f"; wall {summary['wall_seconds']}s")
    print(f"vector -> {summary['files']['vector']}")


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.1f}"


def _steer_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--vector", required=True)
    s.add_argument("--layer", type=int, default=None, help="default: the vector's chosen layer")
    s.add_argument("--coef", type=finite_float, default=1.0, help="strength (default 1), in --units")
    s.add_argument("--units", default="raw", choices=["raw", "norm"],
                   help="raw: add coef x the vector (default); norm: coef x the typical residual norm at the layer")
    s.add_argument("--positions", default="all", choices=["all", "prompt", "response", "response_and_last_prompt"],
                   help="where to edit: all (default), prompt (prefill only), response (generated tokens only), "
                        "response_and_last_prompt (the official code's 'response')")
    s.add_argument("--ablate", action="store_true", help="remove the direction instead of adding it")
    s.add_argument("--max-new-tokens", type=int, default=60)
    _model_args(s)


def _run_args(r: argparse.ArgumentParser) -> None:
    r.add_argument("--trait", required=True, help="a built-in trait (evil, sycophantic, hallucinating, impolite, "
                                                   "apathetic, humorous, optimistic) or a new name")
    r.add_argument("--description", default=None, help="one sentence defining a new trait (needs --generator)")
    r.add_argument("--artifacts", default=None, help="artifacts JSON to use instead of built-in/generated ones, or "
                                                     "an official trait_data_extract/<trait>.json file")
    r.add_argument("--eval-artifacts", default=None, help="with an official extraction file: its "
                                                          "trait_data_eval/<trait>.json (found by itself beside it)")
    r.add_argument("--generator", default=None, help="openai:MODEL or local:MODEL, writes artifacts for new traits")
    r.add_argument("--generator-base-url", default=None, help="OpenAI-compatible base URL (or OPENAI_BASE_URL)")
    r.add_argument("--judge", default="local", help="local (the embedded model), local:MODEL, openai:MODEL, "
                                                    "or none (no scores, no filter)")
    r.add_argument("--judge-base-url", default=None, help="OpenAI-compatible base URL (or OPENAI_BASE_URL); "
                                                          "key from OPENAI_API_KEY")
    r.add_argument("--judge-concurrency", type=int, default=8)
    r.add_argument("--eval-judge", default=None,
                   help="judge of the experiments' answers (monitor, finetune-experiment, screen-experiment), e.g. "
                        "local:qwen2.5-coder-1.5b (see `make judge-model`); default: --judge. Changing it later "
                        "re-judges the stored answers without regenerating them")
    r.add_argument("--eval-judge-base-url", default=None, help="base URL for an openai: --eval-judge "
                                                               "(default: --judge-base-url)")
    r.add_argument("--quick", action="store_true", help="CPU profile: 2 samples per (question, instruction), "
                                                        "64 new tokens")
    r.add_argument("--n-samples", type=int, default=None, help="answers per (question, instruction); paper: 10")
    r.add_argument("--eval-samples", type=int, default=2, help="held-out answers per side per evaluation question")
    r.add_argument("--max-new-tokens", type=int, default=None, help="paper: 1000")
    r.add_argument("--temperature", type=finite_float, default=None, help="paper: 1.0")
    r.add_argument("--gen-batch-size", type=int, default=None)
    r.add_argument("--batch-size", type=int, default=16, help="extraction batch size")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--filter", choices=["auto", "on", "off"], default="auto",
                   help="the paper's filter: auto (default) applies it when the judge tells pos from neg answers "
                        "apart (trait-score AUROC >= 0.75) and >= 10 pairs survive; on; off")
    r.add_argument("--no-select", action="store_true", help="skip the steered evaluation and layer choice")
    r.add_argument("--steer-layers", default=None, help="layers of the steering grid (default: 4 spread over "
                                                        "the middle of the network)")
    r.add_argument("--steer-coefs", default=None, type=finite_floats,
                   help="comma-separated coefficients in raw-vector units, written --steer-coefs=-2,2 "
                        "(default -4,-2,0,2,4 with --quick)")
    r.add_argument("--select-coherence-min", type=finite_float, default=50.0,
                   help="the chosen layer/coefficient must keep mean coherence >= this (when the judge scores)")
    r.add_argument("--mmlu", default=None, help="MMLU-format multiple-choice data (CSV per subject, a folder of "
                                                "them, or Parquet) for the capability check; default: a built-in "
                                                "40-question set")
    r.add_argument("--pos-min", type=finite_float, default=50.0)
    r.add_argument("--neg-max", type=finite_float, default=50.0)
    r.add_argument("--coherence-min", type=finite_float, default=50.0)
    r.add_argument("--out", default="runs", help="runs root (default: runs)")
    r.add_argument("--run-dir", default=None, help="exact run directory (default: <out>/<model>/<trait>)")
    _model_args(r)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="personavec", description="Persona vectors for chat language models.")
    p.add_argument("--version", action="version", version=f"personavec {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("extract", help="extract a persona vector from pos/neg response tables",
                       description="Per layer: mean activation over kept pos answers minus kept neg answers. "
                                   "Tables: CSV/JSONL/Parquet with 'prompt' (chat-formatted) or 'question' "
                                   "(+ optional 'system') and 'answer'; optional trait and 'coherence' scores.")
    e.add_argument("--pos", required=True, help="table of answers showing the trait")
    e.add_argument("--neg", required=True, help="table of answers not showing it (row-paired with --pos)")
    e.add_argument("--out", required=True, help="output .safetensors")
    e.add_argument("--trait", default=None, help="trait name (also the score column name, as in the official CSV)")
    e.add_argument("--layers", default=None, help="layers to compute: all (default), 20, 4-8, 4,8,12")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--max-length", type=int, default=None,
                   help="cut pairs to this many tokens (default: the model's context length)")
    e.add_argument("--pos-min", type=finite_float, default=50.0, help="keep pairs whose pos trait score >= this")
    e.add_argument("--neg-max", type=finite_float, default=50.0, help="keep pairs whose neg trait score < this")
    e.add_argument("--coherence-min", type=finite_float, default=50.0, help="both sides' coherence >= this")
    e.add_argument("--no-filter", action="store_true", help="use every pair, ignoring scores")
    _model_args(e)
    e.set_defaults(func=cmd_extract)

    r = sub.add_parser("run", help="the main job: trait -> artifacts -> answers -> judge -> filter -> vector",
                       description="Resumable: each stage writes into runs/<model>/<trait>/ and is skipped when "
                                   "done; rerun the same command after an interruption.")
    _run_args(r)
    r.set_defaults(func=cmd_run)

    mo = sub.add_parser("monitor", help="monitoring experiment: does the last prompt token predict the trait?",
                        description="Runs (or resumes) the trait's run, then the paper's monitoring experiment: an "
                                    "8-step system-prompt ladder and 0-20-shot prompts on the evaluation questions; "
                                    "Pearson r between the last-prompt projection and the answers' judged trait.")
    _run_args(mo)
    mo.add_argument("--layer", type=int, default=None, help="default: the vector's chosen layer")
    mo.add_argument("--monitor-samples", type=int, default=1, help="answers per prompt (default 1)")
    mo.set_defaults(func=cmd_monitor)

    pj = sub.add_parser("project", help="project conversations on persona vectors (resumable, one model pass)",
                        description="Adds columns <trait>@L<layer>:<pooling> (scalar projection on the unit "
                                    "vector) and ...:cos for each vector, layer and pooling. Input rows: a chat "
                                    "'messages' list, or 'prompt' (chat-formatted) + optional 'answer'.")
    pj.add_argument("data", help="CSV, JSONL or Parquet")
    pj.add_argument("--vector", action="append", required=True, help="a vector file (repeat for several)")
    pj.add_argument("--layers", default=None, help="layers (default: each vector's chosen layer)")
    pj.add_argument("--poolings", default=None, help="comma-separated: prompt_last,response_avg,prompt_avg")
    pj.add_argument("--out", required=True, help="output .jsonl (input columns + projections; resumable)")
    pj.add_argument("--chunk-rows", type=int, default=256)
    pj.add_argument("--batch-size", type=int, default=16)
    pj.add_argument("--max-length", type=int, default=None,
                    help="cut conversations to this many tokens (default: the model's context length)")
    _model_args(pj)
    pj.set_defaults(func=cmd_project)

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
    _train_args(ft)
    _model_args(ft)
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
    _model_args(sh)
    sh.set_defaults(func=cmd_shift)

    fx = sub.add_parser("finetune-experiment", help="shift vs trait across fine-tunes; preventative steering, CAFT",
                        description="Runs (or resumes) the trait's run, builds trait/normal mixtures from its "
                                    "answers, fine-tunes each mixture plain / with preventative steering / with "
                                    "CAFT, and evaluates every model (shift, judged trait and coherence, the "
                                    "answers' projection, multiple choice). Resumable.")
    _run_args(fx)
    fx.add_argument("--percents", default="0,25,50,75,100", help="trait percentages of the mixtures")
    fx.add_argument("--prevent-percents", default=None, help="mixtures also trained with preventative steering "
                                                             "(default: every one above 0)")
    fx.add_argument("--caft-percents", default="100", help="mixtures also trained with CAFT ('' for none)")
    fx.add_argument("--prevent-coef", default="5", help="raw-vector multiple(s), comma-separated (paper: 5)")
    _experiment_args(fx)
    fx.set_defaults(func=cmd_finetune_experiment)

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
    sc.add_argument("--top-k", type=int, default=20)
    sc.add_argument("--threshold", type=finite_float, default=None,
                    help="write filtered.jsonl without rows scoring above")
    sc.add_argument("--percentile", type=finite_float, default=None, help="... or above this percentile of the scores")
    sc.add_argument("--chunk-rows", type=int, default=512, help="rows per checkpointed chunk")
    sc.add_argument("--batch-size", type=int, default=16)
    sc.add_argument("--gen-batch-size", type=int, default=16)
    sc.add_argument("--max-new-tokens", type=int, default=256, help="base answers' length")
    sc.add_argument("--temperature", type=finite_float, default=0.0, help="base answers: 0 = greedy (default)")
    sc.add_argument("--max-length", type=int, default=None,
                    help="cut pairs to this many tokens (default: the model's context length)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--base-cache", default=None,
                    help="SQLite cache of base answers (default: OUT/base_answers.sqlite)")
    sc.add_argument("--no-early-stop", action="store_true", help="run every layer (benchmarking)")
    sc.add_argument("--no-bucketing", action="store_true", help="batch in input order (benchmarking)")
    sc.add_argument("--ray", action="store_true", help="run on Ray Data (local Ray unless --ray-address)")
    sc.add_argument("--ray-workers", type=int, default=2, help="model actors")
    sc.add_argument("--ray-address", default=None, help="existing cluster: auto or ray://host:port")
    sc.add_argument("--cpus-per-worker", type=finite_float, default=1.0)
    sc.add_argument("--gpus-per-worker", type=finite_float, default=0.0)
    _model_args(sc)
    sc.set_defaults(func=cmd_screen)

    sx = sub.add_parser("screen-experiment", help="validate dP screening: fine-tune on the top / random / bottom "
                                                  "samples of a mixed dataset",
                        description="Runs (or resumes) the trait's run, screens its trait/normal mixture with dP, "
                                    "fine-tunes on the top-n, random-n and bottom-n samples (and top-n by the "
                                    "response projection alone, and by the judge when it scores), and compares the "
                                    "fine-tuned models as finetune-experiment does. Resumable.")
    _run_args(sx)
    sx.add_argument("--n", type=int, default=100, help="samples per selection")
    sx.add_argument("--mix-percent", type=finite_float, default=50, help="trait share of the screened mixture")
    _experiment_args(sx)
    sx.set_defaults(func=cmd_screen_experiment)

    rp = sub.add_parser("report", help="(re)write a run directory's report.html and plots")
    rp.add_argument("run_dir")
    rp.set_defaults(func=cmd_report)

    v = sub.add_parser("vectors", help="inspect, import and export vector files")
    vsub = v.add_subparsers(dest="vectors_command", required=True, metavar="ACTION")
    vi = vsub.add_parser("info", help="describe a .safetensors vector or a .gguf control vector")
    vi.add_argument("vector")
    vi.set_defaults(func=cmd_vectors_info)
    vo = vsub.add_parser("import-official", help="import persona_vectors .pt files (safe loading)")
    vo.add_argument("files", nargs="+", help="e.g. evil_response_avg_diff.pt evil_prompt_last_diff.pt")
    vo.add_argument("--out", required=True, help="output .safetensors")
    vo.add_argument("--model-id", default="unknown", help="the model the vectors were extracted from")
    vo.add_argument("--trait", default=None)
    vo.add_argument("--check-model", default=None, help="load this model and refuse a shape mismatch")
    vo.set_defaults(func=cmd_vectors_import)
    vg = vsub.add_parser("export-gguf", help="export a llama.cpp control vector (.gguf)")
    vg.add_argument("vector")
    vg.add_argument("--out", required=True)
    vg.add_argument("--layers", default=None, help="layers to include (default: the chosen layer)")
    vg.add_argument("--coef", type=finite_float, default=1.0, help="scale baked into the file")
    vg.add_argument("--pooling", default=None)
    vg.set_defaults(func=cmd_vectors_export)

    s = sub.add_parser("steer", help="answer a question with and without the vector added")
    s.add_argument("question")
    _steer_args(s)
    s.set_defaults(func=cmd_steer)

    c = sub.add_parser("chat", help="interactive: unsteered and steered answers side by side")
    _steer_args(c)
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("demo", help="main job on the embedded model: extract an 'evil' vector from the shipped "
                                    "table and show a steered answer")
    d.add_argument("--out", default="runs", help="run directory root (default: runs)")
    d.add_argument("--layer", type=int, default=None, help="steering layer (default: 40%% of depth)")
    d.add_argument("--coef", type=finite_float, default=2.0, help="multiple of the raw vector to add (default 2)")
    d.add_argument("--batch-size", type=int, default=16)
    d.add_argument("--max-new-tokens", type=int, default=60)
    _model_args(d)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight-loading bars; personavec shows its own progress
    except ImportError:
        pass
    try:
        args.func(args)
    except PersonavecError as e:
        print(f"personavec: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the environment refused: a read-only place, a full disk, a missing device
        where = f" {e.filename}" if e.filename else ""
        print(f"personavec: error: cannot use{where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\npersonavec: interrupted (run the same command again to continue)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
