"""`personavec decompose VECTOR --sae DIR`: what a persona vector is made of, in SAE features."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from ..errors import PersonavecError
from .common import as_typed, finite_float, load_lm, model_args, non_negative_int, positive_int, vector_file


def add_parsers(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("decompose", help="decompose a persona vector into SAE features (rank, attribute, explain, "
                                         "check causally)",
                       description="Ranks the SAE's features by the cosine of the unit vector with each decoder row "
                                   "(both signs; never through the encoder), attributes the response-average "
                                   "projection of real answers exactly to features, b_dec and error, shows each "
                                   "feature's top-activating contexts, and steers with the first --causal decoder "
                                   "rows alone. Writes decomposition.json, decomposition.parquet and "
                                   "decomposition.html into --out.")
    d.add_argument("vector", help="a vector file (.safetensors, .gguf control vector, official .pt)")
    d.add_argument("--sae", required=True, help="an SAE directory or file in a format personavec reads")
    src = d.add_mutually_exclusive_group()
    src.add_argument("--run", default=None, metavar="RUN_DIR",
                     help="a run directory: attribute over its held-out pos vs neg answers (else its extraction "
                          "answers); its evaluation questions for the causal check; the report links the page")
    src.add_argument("--texts", default=None, metavar="FILE",
                     help="CSV/JSONL/Parquet with messages, prompt+answer, question+answer, answer or text (and an "
                          "optional side column, pos/neg, for the gap)")
    d.add_argument("--top", type=positive_int, default=20, help="features per ranking (default 20)")
    d.add_argument("--out", default=None, help="output directory (default: RUN_DIR/decomposition, else "
                                               "decomposition/ next to the vector)")
    d.add_argument("--layer", type=non_negative_int, default=None, help="the SAE's layer, for a file that does "
                                                                        "not say")
    d.add_argument("--judge", default=None, help="score the causal check's answers for the trait: local, "
                                                 "local:MODEL or openai:MODEL (default: no judge)")
    d.add_argument("--judge-base-url", default=None, help="OpenAI-compatible base URL for an openai: judge")
    d.add_argument("--causal", type=non_negative_int, default=5,
                   help="steer with the decoder rows of the first N features by cosine (default 5, small enough for a "
                        "CPU: 10 questions, greedy, 48 tokens each; 0: none)")
    d.add_argument("--causal-coef", type=finite_float, default=0.1,
                   help="the row's length in norm units: x the typical residual norm at the layer (default 0.1)")
    d.add_argument("--causal-questions", type=positive_int, default=10,
                   help="questions per condition of the causal check (default 10; its intervals resample them)")
    d.add_argument("--max-new-tokens", type=positive_int, default=48, help="the causal check's answers")
    d.add_argument("--contexts", type=positive_int, default=5, help="top-activating contexts per feature")
    d.add_argument("--window", type=non_negative_int, default=8, help="tokens either side of the firing token")
    d.add_argument("--batch-size", type=positive_int, default=16)
    d.add_argument("--seed", type=int, default=0)
    model_args(d)
    d.set_defaults(func=cmd_decompose, model=None)


def load_sae(path: str, layer: int | None) -> Any:
    """The SAE at ``path`` (any format :mod:`personavec.sae.formats` reads)."""
    from ..sae.formats import load_sae as load

    return load(path, layer=layer)


def _run_model(run_dir: Path) -> str | None:
    from ..files import read_json

    p = run_dir / "run.json"
    if not p.is_file():
        return None
    try:
        return ((read_json(p) or {}).get("config") or {}).get("model")
    except (PersonavecError, AttributeError):
        return None


def cmd_decompose(args: argparse.Namespace) -> None:
    from ..judge.spec import make_judge
    from ..model.loading import DEFAULT_MODEL, model_shape
    from ..sae.decomposition import (
        DecomposeConfig,
        corpus_from_run,
        corpus_from_texts,
        decompose,
        sae_layer,
        vector_direction,
        write_decomposition,
    )
    from ..sae.intervention import CausalConfig
    from ..vectors.formats import load_vector

    vpath = vector_file(args.vector, "decompose")
    run_dir = Path(args.run) if args.run else None
    if run_dir is not None and not run_dir.is_dir():
        raise PersonavecError(f"--run {as_typed(args.run)} is not a directory; give a run directory")
    if args.texts and not Path(args.texts).is_file():
        raise PersonavecError(f"--texts {as_typed(args.texts)} does not exist; give a CSV, JSONL or Parquet file")
    vec = load_vector(vpath)
    vec.extra.setdefault("path", str(vpath))
    if not Path(args.sae).exists():
        raise PersonavecError(f"--sae {as_typed(args.sae)} does not exist; give an SAE directory or file")
    sae = load_sae(args.sae, args.layer)
    layer = sae_layer(sae, args.layer)
    vector_direction(vec, sae, layer)  # the vector and the SAE must meet before any model loads
    cfg = DecomposeConfig(top=args.top, layer=args.layer, contexts=args.contexts, window=args.window,
                          causal=args.causal, batch_size=args.batch_size,
                          causal_config=CausalConfig(coef=args.causal_coef, n_questions=args.causal_questions,
                                                     max_new_tokens=args.max_new_tokens, seed=args.seed))
    lm = None
    if run_dir is not None or args.texts or args.causal:
        if args.model is None:
            from ..model.loading import EMBEDDED

            embedded = {m.model_id: name for name, m in EMBEDDED.items()}  # an embedded model's hub id: its name
            known = embedded.get(vec.model_id, vec.model_id) if vec.model_id != "unknown" else None
            args.model = (_run_model(run_dir) if run_dir else None) or known or DEFAULT_MODEL
        n_layers, hidden, _ = model_shape(args.model, args.revision)  # before any weights load
        sae.check_model(n_layers, hidden, args.model)
        vec.check_shape(n_layers, hidden, args.model)
        lm = load_lm(args)
    corpus = corpus_from_run(run_dir) if run_dir else corpus_from_texts(args.texts, lm) if args.texts else None
    judge = None
    if args.judge and args.causal:
        from ..model.loading import load_model

        judge = make_judge(args.judge, args.judge_base_url, load=lambda spec: lm if spec == args.model else
                           load_model(spec, device=args.device, dtype=args.dtype))
    dec = decompose(vec, sae, lm, corpus, cfg, judge=judge, progress=True)
    out = Path(args.out) if args.out else (run_dir / "decomposition" if run_dir else vpath.parent / "decomposition")
    command = "personavec " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))
    paths = write_decomposition(dec, out, command=command)
    report = None
    if run_dir is not None and (run_dir / "summary.json").is_file():
        from ..run.report import write_report

        report = write_report(run_dir)
    print(summary_text(dec.to_json(), paths, report))


def summary_text(doc: dict[str, Any], paths: dict[str, Path], report: Path | None = None, n: int = 10) -> str:
    """What the command prints: the SAE, the top features of each ranking, the attribution and the causal check."""
    cards = {c["latent"]: c for c in doc["cards"]}
    lines = [f"{doc['vector']['trait']} vector at layer {doc['layer']}: {doc['sae']['describe']}"]
    for key, title in (("cosine_positive", "top positive cosine"), ("cosine_negative", "top negative cosine"),
                       ("gap", "top contributors to the pos - neg gap")):
        if key not in doc["rankings"]:
            continue
        lines.append(f"  {title}:")
        for i in doc["rankings"][key][:n]:
            c = cards.get(i, {})
            extra = ""
            if c.get("gap") is not None:
                share = c.get("gap_share")
                extra = f"  gap {c['gap']:+.4f}" + (f" ({100 * share:+.1f} %)" if share is not None else "")
            if c.get("firing_rate") is not None:
                extra += f"  fires on {100 * c['firing_rate']:.1f} % of answer tokens"
            lines.append(f"    feature {i:>6}  cosine {c.get('cosine', float('nan')):+.4f}{extra}")
    att = doc.get("attribution") or {}
    for key in ("pos", "neg", "gap"):
        t = att.get(key)
        if t:
            lines.append(f"  projection on v-hat, {key}: {t['projection']:+.4f} = features {t['features']:+.4f} + "
                         f"b_dec {t['bias']:+.4f} + error {t['error']:+.4f}")
    causal = doc.get("causal")
    if causal:
        s = causal["settings"]
        lines.append(f"  causal check ({len(s['questions'])} questions, {s['coef']:g} norm units at layer "
                     f"{s['layer']}): projection effect [95 % interval]")
        for name, r in causal["conditions"].items():
            e = r["projection_effect"]
            if name == "unsteered" or e["mean"] is None:
                continue
            ci = f" [{e['lo']:+.3f}, {e['hi']:+.3f}]" if e["lo"] is not None else ""
            trait = r["trait_effect"]
            judged = f", trait {trait['mean']:+.1f}" if trait["mean"] is not None else ""
            fluency = r["fluency_effect"]["mean"]
            lines.append(f"    {name:>14}: {e['mean']:+.3f}{ci}, fluency "
                         f"{'–' if fluency is None else format(fluency, '+.3f')}{judged} (n {r['n']})")
    for note in doc.get("notes") or []:
        lines.append(f"  note: {note}")
    lines.append(f"wrote {paths['json']}, {paths['table']}, {paths['page']}" + (f"; report {report}" if report else ""))
    return "\n".join(lines)
