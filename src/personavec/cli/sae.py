"""`personavec sae train | info`: train a TopK SAE on a model's residual stream offline, and describe an SAE."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import PersonavecError
from .common import as_typed, finite_float, load_lm, model_args, positive_int


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("sae", help="train a sparse autoencoder offline, or describe one")
    ssub = s.add_subparsers(dest="sae_command", required=True, metavar="ACTION")
    t = ssub.add_parser("train", help="train a TopK SAE on the residual stream at one layer (resumable)")
    t.add_argument("--layer", type=int, default=None,
                   help="our layer (the residual after that many blocks); default with --run: the run's chosen layer")
    t.add_argument("--out", required=True, help="output directory (a rerun of the same command continues in it)")
    t.add_argument("--corpus", nargs="+", default=None, metavar="FILE",
                   help=".txt (a document per paragraph), .jsonl/.json/.parquet/.csv with a messages, prompt(+answer), "
                        "question(+system, answer) or text column; default: the model's own answers to the built-in "
                        "traits' questions, sampled once into --out")
    t.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="a finished run: its answers join the corpus, and its chosen layer and model are the defaults")
    t.add_argument("--latents", type=positive_int, default=4096)
    t.add_argument("--k", type=positive_int, default=32, help="active latents per token (TopK)")
    t.add_argument("--tokens", type=positive_int, default=None,
                   help="training tokens (with it, no time budget unless --minutes is given too)")
    t.add_argument("--minutes", type=finite_float, default=None,
                   help="training time budget in minutes, over all reruns together (default 4 without --tokens; "
                        "the corpus sampling, activation pass and evaluation come on top)")
    t.add_argument("--batch-size", type=positive_int, default=1024, help="tokens per optimizer step")
    t.add_argument("--lr", type=finite_float, default=None, help="default 2e-4/sqrt(latents/2^14)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-steps", type=positive_int, default=None,
                   help="also checkpoint every this many steps (default: every 2 minutes and at the end)")
    model_args(t)
    t.set_defaults(func=cmd_sae_train, model=None)
    i = ssub.add_parser("info", help="describe an SAE (any format personavec reads)")
    i.add_argument("sae", help="an SAE directory or file, or a `sae train --out` directory")
    i.add_argument("--layer", type=int, default=None, help="the layer, for a file that does not say")
    i.set_defaults(func=cmd_sae_info)


def run_defaults(run_dir: Path) -> dict[str, Any]:
    """The model and chosen layer a finished run records (``run.json``, ``selection.json`` or its vector)."""
    from ..files import read_json

    if not run_dir.is_dir():
        raise PersonavecError(f"--run {as_typed(str(run_dir))} is not a directory; give a run directory")
    out: dict[str, Any] = {}
    if (run_dir / "run.json").is_file():
        config = read_json(run_dir / "run.json").get("config") or {}
        out["model"] = config.get("model")
    layer = None
    if (run_dir / "selection.json").is_file():
        layer = read_json(run_dir / "selection.json").get("chosen_layer")
    if layer is None and (run_dir / "vectors.safetensors").is_file():
        from ..vectors.formats import load_vector

        layer = load_vector(run_dir / "vectors.safetensors").chosen_layer
    out["layer"] = layer
    return out


def cmd_sae_train(args: argparse.Namespace) -> None:
    from ..model.loading import DEFAULT_MODEL, model_shape
    from ..sae.training import SaeTrainConfig, train_sae

    defaults = run_defaults(Path(args.run)) if args.run else {}
    if args.model is None:
        args.model = defaults.get("model") or DEFAULT_MODEL
    layer = args.layer if args.layer is not None else defaults.get("layer")
    if layer is None:
        raise PersonavecError("give --layer (or --run with a run that chose a layer)" if not args.run else
                              f"the run {args.run} chose no layer; give --layer")
    n_layers = model_shape(args.model, args.revision)[0]  # before any weights load
    if not 0 <= layer <= n_layers:
        raise PersonavecError(f"--layer {layer} is out of range: {args.model} has layers 0..{n_layers}")
    minutes = args.minutes if args.minutes is not None else (None if args.tokens else 4.0)
    if minutes is not None and minutes <= 0:
        raise PersonavecError(f"--minutes must be above 0, not {minutes:g}")
    if args.k > args.latents:
        raise PersonavecError(f"--k {args.k} is more than --latents {args.latents}: lower --k or raise --latents")
    cfg = SaeTrainConfig(latents=args.latents, k=args.k, tokens=args.tokens, minutes=minutes, seed=args.seed,
                         batch_size=args.batch_size, lr=args.lr, checkpoint_steps=args.checkpoint_steps)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise PersonavecError(f"--out {as_typed(args.out)} is a file; give a directory")
    if args.corpus:  # read before the model loads: a bad file is refused at once
        for path in args.corpus:
            if not Path(path).is_file():
                raise PersonavecError(f"--corpus {as_typed(path)} does not exist")
    lm = load_lm(args)
    sae = train_sae(lm, layer, corpus=args.corpus, out=out, config=cfg, run=args.run)
    print(sae.describe())
    training = sae.provenance.get("training")
    print(report(training if isinstance(training, dict) else {}))
    print(f"saved to {out / 'sae'}; metrics in {out / 'training.json'}")


def report(m: dict[str, Any]) -> str:
    """The training metrics as a few lines."""
    if not m:
        return "(no training metrics recorded)"
    r, s = m.get("recon", {}), m.get("spliced", {})
    lines = [f"held-out tokens {r.get('n_tokens')}: FVU {r.get('fvu', float('nan')):.4f} (rank-{m.get('k')} PCA "
             f"{r.get('pca_fvu', float('nan')):.4f}), L0 {r.get('l0', float('nan')):.1f}, dead "
             f"{r.get('dead_heldout', float('nan')):.1%} on held-out, {m.get('dead_training', float('nan')):.1%} in "
             f"the last {m.get('dead_window_tokens')} training tokens"]
    if s:
        lines.append(f"next-token loss on {s.get('n_tokens')} held-out tokens: clean {s['ce_clean']:.4f}, SAE spliced "
                     f"{s['ce_spliced']:.4f} ({s['ce_delta']:+.4f}), zero-ablated {s['ce_zero_ablated']:.4f}; "
                     f"ce_loss_score {_num(s.get('ce_loss_score'))}")
    lines.append(f"trained on {m.get('train_tokens')} tokens in {m.get('steps')} steps, {m.get('train_seconds', 0):.0f}"
                 f" s ({m.get('tokens_per_s', 0):.0f} tokens/s; stopped by {m.get('stopped_by')})")
    return "\n".join(lines)


def _num(x: Any) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def cmd_sae_info(args: argparse.Namespace) -> None:
    from ..sae.formats import load_sae

    path = Path(args.sae)
    if (path / "sae").is_dir() and (path / "settings.json").is_file():  # a `sae train --out` directory
        path = path / "sae"
    if not path.exists():
        raise PersonavecError(f"sae info {as_typed(args.sae)} does not exist; give an SAE directory or file")
    sae = load_sae(path, layer=args.layer)
    print(sae.describe())
    norms = sae.decoder_norms()
    print(f"  decoder row norms {float(norms.min()):.4g}..{float(norms.max()):.4g}, "
          f"apply_b_dec_to_input {sae.apply_b_dec_to_input}")
    training = sae.provenance.get("training") if isinstance(sae.provenance, dict) else None
    if isinstance(training, dict):
        print(report(training))
