"""`personavec extract`: a persona vector from pos/neg answer tables."""

from __future__ import annotations

import argparse

from ..errors import PersonavecError
from .common import as_typed, finite_float, load_lm, model_args, out_file, parse_layers, positive_int


def add_parsers(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("extract", help="extract a persona vector from pos/neg response tables",
                       description="Per layer: mean activation over kept pos answers minus kept neg answers. "
                                   "Tables: CSV/JSONL/Parquet with 'prompt' (chat-formatted) or 'question' "
                                   "(+ optional 'system') and 'answer'; optional trait and 'coherence' scores.")
    e.add_argument("--pos", required=True, help="table of answers showing the trait")
    e.add_argument("--neg", required=True, help="table of answers not showing it (row-paired with --pos)")
    e.add_argument("--out", required=True, help="output .safetensors")
    e.add_argument("--trait", default=None, help="trait name (also the score column name, as in the official CSV)")
    e.add_argument("--layers", default=None, help="layers to compute: all (default), 20, 4-8, 4,8,12")
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--max-length", type=positive_int, default=None,
                   help="cut pairs to this many tokens (default: the model's context length)")
    e.add_argument("--pos-min", type=finite_float, default=50.0, help="keep pairs whose pos trait score >= this")
    e.add_argument("--neg-max", type=finite_float, default=50.0, help="keep pairs whose neg trait score < this")
    e.add_argument("--coherence-min", type=finite_float, default=50.0, help="both sides' coherence >= this")
    e.add_argument("--no-filter", action="store_true", help="use every pair, ignoring scores")
    model_args(e)
    e.set_defaults(func=cmd_extract)


def cmd_extract(args: argparse.Namespace) -> None:
    from ..model.loading import model_shape
    from ..vectors.extraction import extract_vector, select_pairs
    from ..vectors.tables import FilterConfig

    # everything checkable before the model loads: the tables (columns, text cells, the filter, pos != neg), the
    # layers against the model's config, the output
    pairs = select_pairs(args.pos, args.neg, args.trait, FilterConfig(args.pos_min, args.neg_max, args.coherence_min),
                         apply_filter=not args.no_filter, names=("--pos", "--neg"))
    layers = parse_layers(args.layers)
    if layers is not None:
        n_layers = model_shape(args.model, args.revision)[0]
        bad = [x for x in layers if not 0 <= x <= n_layers]
        if bad:
            raise PersonavecError(f"--layers {as_typed(args.layers)}: layer {bad[0]} is out of range; {args.model} has "
                                  f"layers 0..{n_layers}")
    out_file(args.out, "--out", (".safetensors",))
    lm = load_lm(args)
    vec = extract_vector(lm, pairs, trait=args.trait, layers=layers, apply_filter=not args.no_filter,
                         batch_size=args.batch_size, max_length=args.max_length, progress=True)
    out = vec.save(args.out)
    print(f"kept {vec.counts.get('kept')} of {vec.counts.get('rows')} pairs; "
          f"vector [{vec.n_layers + 1}, {vec.hidden_size}] x {len(vec.poolings)} poolings -> {out}")
