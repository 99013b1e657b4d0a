"""`personavec vectors info | import-official | export-gguf`: inspect and convert vector files."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import PersonavecError
from .common import as_typed, finite_float, out_file, parse_layers, vector_file


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    vg.add_argument("--pooling", default=None, help="which of the file's poolings to export (default: its default, "
                                                    "response_avg; `vectors info` lists them)")
    vg.set_defaults(func=cmd_vectors_export)


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
    extra = {k: v for k, v in vec.extra.items() if k != "calibration"}
    if extra:
        lines.append(f"  extra {extra}")
    cal = vec.extra.get("calibration")
    if isinstance(cal, dict):  # quantiles at every layer: one line of what they are, not the numbers
        lines.append(f"  calibration: the meter's readings of {cal.get('n_pos_answers')} pos and "
                     f"{cal.get('n_neg_answers')} neg answers ({cal.get('source')}) at "
                     f"{len(cal.get('layers', {}))} layers; GET /v1/persona/vectors of `personavec serve` lists them")
    norms = vec.norms()
    lines.append(f"  {vec.default_pooling} norm per layer: " + " ".join(f"{i}:{n:.3g}" for i, n in
                                                                        enumerate(norms)))
    return "\n".join(lines)


def cmd_vectors_info(args: argparse.Namespace) -> None:
    print(_describe(vector_file(args.vector, "vectors info")))


def cmd_vectors_import(args: argparse.Namespace) -> None:
    from ..vectors.formats import import_official

    for path in args.files:
        if Path(path).suffix.lower() != ".pt":
            raise PersonavecError(f"vectors import-official {as_typed(path)}: takes the official persona_vectors .pt "
                                  "files (e.g. evil_response_avg_diff.pt); a .safetensors or .gguf vector is read "
                                  "as it is, without importing")
        vector_file(path, "vectors import-official")
    out_file(args.out, "--out", (".safetensors",))
    vec = import_official(args.files, model_id=args.model_id, trait=args.trait)
    if args.check_model:
        from ..model.loading import load_model

        vec.check_compatible(load_model(args.check_model))
    out = vec.save(args.out)
    print(f"imported {', '.join(vec.poolings)} [{vec.n_layers + 1}, {vec.hidden_size}] -> {out} "
          "(row L is after the final norm in the official format; rows 0..L-1 match personavec's)")


def cmd_vectors_export(args: argparse.Namespace) -> None:
    from ..vectors.formats import export_control_vector_gguf, load_vector

    out_file(args.out, "--out", (".gguf",))
    vec = load_vector(vector_file(args.vector, "vectors export-gguf"))
    layers = parse_layers(args.layers) if args.layers else None
    if args.pooling is not None and args.pooling not in vec.tensors:
        raise PersonavecError(f"--pooling {as_typed(args.pooling)}: {args.vector} holds the poolings "
                              f"{', '.join(vec.tensors)}; pass one of them")
    out = export_control_vector_gguf(vec, args.out, layers=layers, coef=args.coef, pooling=args.pooling,
                                     coef_name="--coef")
    print(f"wrote {out} (use with llama.cpp: --control-vector {out})")
