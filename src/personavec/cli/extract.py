"""`personavec extract`: a persona vector from pos/neg answer tables."""

from __future__ import annotations

import argparse

from .common import finite_float, load_lm, model_args, parse_layers, positive_int


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
    from ..files import check_writable, read_table
    from ..vectors.extraction import extract_vector
    from ..vectors.tables import FilterConfig, check_columns

    pos, neg = read_table(args.pos), read_table(args.neg)  # bad tables and outputs fail before the model loads
    check_columns(pos, args.pos)
    check_columns(neg, args.neg)
    check_writable(args.out)
    lm = load_lm(args)
    vec = extract_vector(lm, pos, neg, trait=args.trait, layers=parse_layers(args.layers),
                         filter_config=FilterConfig(args.pos_min, args.neg_max, args.coherence_min),
                         apply_filter=not args.no_filter, batch_size=args.batch_size,
                         max_length=args.max_length, progress=True)
    out = vec.save(args.out)
    print(f"kept {vec.counts.get('kept')} of {vec.counts.get('rows')} pairs; "
          f"vector [{vec.n_layers + 1}, {vec.hidden_size}] x {len(vec.poolings)} poolings -> {out}")
