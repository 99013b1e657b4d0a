"""A static HTML report of one run directory: tables, plots and example answers.

``write_report(run_dir)`` reads whatever the run left behind (``summary.json`` is required; ``separation.parquet``,
``steering.parquet``, ``examples.jsonl``, ``capability.json`` and the experiments' results are optional) and
writes ``report.html`` plus the plots of :mod:`.plots` next to them, each atomically. The page comes from the
Jinja2 template ``templates/report.html`` with autoescaping on: all text from the run (answers included) is
HTML-escaped. It is one self-contained file: inline CSS, no JavaScript, no external resources; images are
referenced by relative name. Missing or non-finite numbers are shown as "–".
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import PersonavecError
from ..files import read_json, write_text
from ..pages import template
from ..stats import wilson
from .format import DASH, coef, fixed, integer, number, value, with_interval
from .plots import STEERING_PANELS, numeric, plot_capability, plot_separation, plot_steering, steering_panels

REPORT_NAME = "report.html"
SEPARATION_PNG = "separation.png"
STEERING_PNG = "steering.png"
CAPABILITY_PNG = "capability.png"
STEERING_COLUMNS = ("layer", "coef", "trait_mean", "coherence_mean", "n", "trait_missing", "projection_mean",
                    "fluency_mean", "degenerate_share")
STEERING_CELL = {"trait_mean": "trait", "coherence_mean": "coherence", "projection_mean": "projection",
                 "fluency_mean": "fluency (nats/token)", "degenerate_share": "degenerate answers"}


# --------------------------------------------------------------------------------------------- reading


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise PersonavecError(f"{path} does not exist; run `personavec run` first (or pass the run directory)")
    summary = read_json(path)
    if not isinstance(summary, dict):
        raise PersonavecError(f"{path}: expected a JSON object")
    return summary


def _read_parquet(path: Path, required: Iterable[str], notes: list[str]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # a damaged optional file must not stop the report
        notes.append(f"{path.name} could not be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return None
    missing = [c for c in required if c not in df.columns]
    if missing:
        notes.append(f"{path.name} lacks column(s) {', '.join(missing)}; section left out")
        return None
    return df


def _read_examples(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError:
                    notes.append(f"{path.name}:{n}: malformed JSON line skipped")
                    continue
                if isinstance(obj, dict):
                    rows.append(obj)
    except (OSError, UnicodeDecodeError) as e:
        notes.append(f"{path.name} could not be read ({e})")
    return rows


def _read_capability(path: Path, notes: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        cap = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        notes.append(f"{path.name} could not be read ({e})")
        return None
    if not isinstance(cap, dict):
        notes.append(f"{path.name}: expected a JSON object; section left out")
        return None
    base = cap.get("baseline") if isinstance(cap.get("baseline"), dict) else {}
    steered = [s for s in cap.get("steered") or [] if isinstance(s, dict)]
    if not base and not steered:
        return None
    return {"baseline": base, "steered": steered}


# --------------------------------------------------------------------------------------------- sections
# Each returns what its part of the template shows (already formatted text; the template escapes it).


def _items(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [(str(k), value(v)) for k, v in d.items()]


def _overview(summary: dict[str, Any]) -> list[tuple[str, str]]:
    items = [("trait", value(summary.get("trait"))), ("model", value(summary.get("model"))),
             ("judge", value(summary.get("judge")))]
    for key, label in (("artifacts_source", "artifacts source"), ("run_dir", "run directory"),
                       ("wall_seconds", "wall time (s)")):
        if key in summary:
            items.append((label, value(summary[key])))
    return items


def _mean_scores(summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    ms = summary.get("mean_scores")
    if not isinstance(ms, dict):
        return []
    return [(str(side), fixed((d or {}).get("trait"), 1), fixed((d or {}).get("coherence"), 1))
            for side, d in ms.items()]


def _filter(summary: dict[str, Any]) -> list[tuple[str, str]]:
    filt = summary.get("filter")
    if not isinstance(filt, dict) or not filt:
        return []
    return [("applied", value(filt.get("applied"))), ("reason", value(filt.get("reason"))),
            *[(str(k), value(v)) for k, v in filt.items() if k not in ("applied", "reason")]]


def _selection(summary: dict[str, Any]) -> list[tuple[str, str]]:
    sel = summary.get("selection")
    if not isinstance(sel, dict) or not sel:
        return []
    def with_unit(x: Any) -> str:
        return coef(x) + (f" ({_units(sel)} units)" if x is not None else "")

    return [("chosen layer", integer(sel.get("chosen_layer"))),
            ("chosen coefficient (amplify)", with_unit(sel.get("chosen_coef"))),
            ("suppress coefficient", with_unit(sel.get("suppress_coef"))),
            ("coherence threshold", fixed(sel.get("coherence_min"), 1)),
            ("defensible", "no — nothing chosen" if sel.get("defensible") is False else "yes"),
            ("reason", value(sel.get("reason")))]


def _units(selection: dict[str, Any]) -> str:
    """The units of a selection's coefficients: its grid's (raw for selections made before grids had units)."""
    return str(selection.get("units") or (selection.get("grid") or {}).get("units") or "raw")


def _separation(sep: pd.DataFrame | None, best_layer: int | None, png: str | None) -> dict[str, Any] | None:
    if sep is None:
        return None
    extra = [c for c in ("pos_mean", "neg_mean", "norm") if c in sep.columns]
    counts = [c for c in ("n_pos", "n_neg", "n_questions") if c in sep.columns]

    def interval(r: Any, col: str, digits: int) -> str:
        lo, hi = getattr(r, f"{col}_lo", None), getattr(r, f"{col}_hi", None)
        if number(lo) is None or number(hi) is None:
            return fixed(getattr(r, col), digits)
        return f"{fixed(getattr(r, col), digits)} [{fixed(lo, digits)}, {fixed(hi, digits)}]"

    rows = [(best_layer is not None and number(r.layer) == best_layer,
             [integer(r.layer), interval(r, "auroc", 3), interval(r, "cohens_d", 2),
              *[fixed(getattr(r, c), 2) for c in extra], *[integer(getattr(r, c)) for c in counts]])
            for r in sep.itertuples(index=False)]
    header = ["layer", "AUROC [95 % interval]", "Cohen's d [95 % interval]", *extra, *counts]
    return {"best": best_layer, "png": png, "header": header, "rows": rows}


def _steering(steer: pd.DataFrame | None, selection: dict[str, Any], png: str | None) -> dict[str, Any] | None:
    if steer is None or not len(steer):
        return None
    chosen_layer, chosen = number(selection.get("chosen_layer")), number(selection.get("chosen_coef"))
    suppress = number(selection.get("suppress_coef"))
    cols = ["trait_mean", "coherence_mean"] + [c for c in ("projection_mean", "fluency_mean", "degenerate_share")
                                                if c in steer.columns]
    agg = steer.groupby(["layer", "coef"], sort=True)[cols].mean()
    coefs = sorted(steer["coef"].dropna().unique())
    unreadable = {(number(x[0]), number(x[1])) for x in selection.get("unreadable") or [] if len(x) == 2}

    def cell(layer: float, c: float) -> str:
        if (layer, c) not in agg.index:
            return DASH
        text = " / ".join(fixed(100 * x, 0) + "%" if k == "degenerate_share" else fixed(x, 1)
                          for k, x in agg.loc[(layer, c)].items())
        return text + (" (broken text: left out)" if (layer, c) in unreadable else "")

    rows = []
    for layer in sorted(steer["layer"].dropna().unique()):
        cells = [(cell(layer, c), chosen_layer is not None and layer == chosen_layer and c in (chosen, suppress))
                 for c in coefs]
        rows.append((integer(layer), cells))
    missing = int(pd.to_numeric(steer.get("trait_missing", pd.Series(dtype=float)), errors="coerce").fillna(0).sum())
    n = sorted({int(x) for x in pd.to_numeric(steer.get("n", pd.Series(dtype=float)), errors="coerce").dropna()})
    return {"png": png, "coefs": [(coef(c), c in (chosen, suppress)) for c in coefs], "rows": rows,
            "missing": missing, "columns": " / ".join(STEERING_CELL[c] for c in cols),
            "left_out": [t for name, _, t in STEERING_PANELS if name not in steering_panels(steer)],
            "n": ", ".join(map(str, n)) or DASH, "units": _units(selection)}


def _capability(cap: dict[str, Any] | None, png: str | None) -> dict[str, Any] | None:
    if cap is None:
        return None
    base = cap["baseline"]

    def acc(r: dict[str, Any]) -> str:
        a, n = number(r.get("accuracy")), number(r.get("n", base.get("n")))
        if a is None or not n:
            return fixed(a, 3)
        lo, hi = wilson(a * n, int(n))
        return f"{fixed(a, 3)} [{fixed(lo, 2)}, {fixed(hi, 2)}]"

    rows = [("unsteered", DASH, DASH, acc(base), integer(base.get("n")))]
    rows += [("steered", integer(s.get("layer")), coef(s.get("coef")), acc(s),
              integer(s.get("n", base.get("n")))) for s in cap["steered"]]
    chance = number(cap.get("chance")) or 0.25
    a, n = number(base.get("accuracy")), number(base.get("n"))
    at_chance = a is not None and bool(n) and wilson(a * n, int(n))[0] <= chance
    note = (f"The unsteered accuracy's 95 % interval reaches chance ({chance:.2f}): this model cannot answer these "
            "questions, so the check cannot show what steering costs — uninformative here; pass --mmlu with questions "
            "the model can answer, or use a larger model." if at_chance else None)
    units = sorted({str(s.get("units") or "raw") for s in cap["steered"]})  # raw: made before grids had units
    return {"png": png, "rows": rows, "note": note, "units": ", ".join(units)}


def _browser(df: pd.DataFrame | None, selection: dict[str, Any]) -> list[dict[str, Any]]:
    """Every cell's answers, question by question: the sampled ones and the greedy one side by side, with their
    readings; degenerate ones flagged."""
    if df is None or not len(df):
        return []
    chosen = (number(selection.get("chosen_layer")), number(selection.get("chosen_coef")))
    unreadable = {(number(x[0]), number(x[1])) for x in selection.get("unreadable") or [] if len(x) == 2}
    cells = []
    for (layer, c), g in df.groupby(["layer", "coef"], sort=True):
        questions = []
        for _, rows in g.groupby("question_id", sort=True):
            sid = rows["sample_id"] if "sample_id" in rows else pd.Series(0, index=rows.index)
            questions.append({"question": str(rows["question"].iloc[0]),
                              "sampled": [_answer(r) for _, r in rows[sid >= 0].iterrows()],
                              "greedy": [_answer(r) for _, r in rows[sid < 0].iterrows()]})
        key = (number(layer), number(c))
        label = "unsteered" if key[0] is not None and key[0] < 0 else f"layer {integer(layer)}, {coef(c)}"
        cells.append({"label": label, "questions": questions, "n": len(g), "chosen": key == chosen,
                      "degenerate": int(g["degenerate"].sum()) if "degenerate" in g else 0,
                      "broken": key in unreadable})
    return cells


def _answer(r: Any) -> dict[str, str]:
    """One answer of the browser with its readings and flags."""
    return {"answer": str(r["answer"]), "flags": str(r.get("flags") or "").replace(",", ", "),
            "reading": f"fluency {fixed(r.get('fluency'), 2)} · repetition {fixed(r.get('repetition'), 2)} · "
                       f"trait {fixed(r.get('trait'), 1)} · coherence {fixed(r.get('coherence'), 1)}"}


def _greedy_reading(example: dict[str, Any], side: str) -> str | None:
    """The fluency and repetition of one side of a greedy example (None for examples written without them)."""
    f, r = example.get(f"{side}_fluency"), example.get(f"{side}_repetition")
    if number(f) is None and number(r) is None:
        return None
    return f"fluency {fixed(f, 2)} nats/token · repetition {fixed(r, 2)}"


def _why_layers(best_layer: int | None, selection: dict[str, Any]) -> str | None:
    layer = number(selection.get("chosen_layer"))
    if layer is None or best_layer is None or int(layer) == best_layer:
        return None
    grid = (selection.get("grid") or {}).get("layers") or []
    where = ""
    if grid and best_layer not in grid:
        where = f" (layer {best_layer} is not in the steering grid, layers {', '.join(map(str, grid))})"
    return (f"The steering layer ({int(layer)}) differs from the best-separating layer ({best_layer}): separation "
            "measures where eliciting and suppressing answers differ most once written; steering needs a layer where "
            "adding the direction changes what the model writes next while the text stays readable, which is usually "
            f"earlier — late layers leave few blocks for the change to act through{where}.")


def _read_json_section(path: Path) -> dict[str, Any] | None:
    """An experiment's JSON result: None when absent, ``{"unreadable": True}`` when damaged."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"unreadable": True}
    return data if isinstance(data, dict) else {"unreadable": True}


def _monitoring(run_dir: Path) -> dict[str, Any] | None:
    corr = _read_json_section(run_dir / "monitor.json")
    if corr is None or corr.get("unreadable"):
        return corr
    rows = []
    for key, label in (("r_trait", "judged trait score"), ("r_answer_projection", "their own projection")):
        for suffix, how in (("", ""), ("_setting_means", " (means of each setting)")):
            if suffix and f"{key}_overall{suffix}" not in corr:
                continue
            rows.append((label + how, [with_interval(corr.get(f"{key}_{part}{suffix}"),
                                                     corr.get(f"{key}_{part}{suffix}_interval"))
                                       for part in ("overall", "ladder", "many_shot")]))
    return {"layer": integer(corr.get("layer")), "n_prompts": integer(corr.get("n_prompts")),
            "judge": value(corr.get("judge", DASH)), "trait_scored": integer(corr.get("trait_scored")),
            "rows": rows, "png": (run_dir / "monitor.png").is_file()}


def _finetuning(run_dir: Path) -> dict[str, Any] | None:
    d = run_dir / "finetune"
    s = _read_json_section(d / "finetune.json")
    if s is None or s.get("unreadable") or not (d / "finetune.parquet").is_file():
        return s if s is None or s.get("unreadable") else None
    try:
        t = pd.read_parquet(d / "finetune.parquet")
    except (OSError, ValueError):
        return {"unreadable": True}
    keys = ("shift", "trait", "coherence", "answer_projection", "answer_nll", "mc_accuracy")
    return {"n": integer(s.get("n_finetunes")), "layer": integer(s.get("layer")),
            "r_trait": with_interval(s.get("r_shift_trait"), s.get("r_shift_trait_interval")),
            "r_projection": with_interval(s.get("r_shift_answer_projection"),
                                          s.get("r_shift_answer_projection_interval")),
            "rows": [(str(r["model"]), [fixed(r.get(k), 3) for k in keys]) for _, r in t.iterrows()],
            "pngs": [(png, alt) for png, alt in (("finetune.png", "shift vs trait"),
                                                 ("finetune_shift.png", "shift per layer")) if (d / png).is_file()]}


def _screening(run_dir: Path) -> dict[str, Any] | None:
    sv = _read_json_section(run_dir / "finetune" / "screen_validation.json")
    if sv is None or sv.get("unreadable"):
        return sv
    keys = ("trait_share", "mean_delta_p", "shift", "trait", "answer_projection", "answer_nll")
    return {"mixture": value(sv.get("mixture")),
            "auroc_delta_p": with_interval(sv.get("auroc_delta_p_trait_rows"),
                                           sv.get("auroc_delta_p_trait_rows_interval")),
            "auroc_response": with_interval(sv.get("auroc_response_trait_rows"),
                                            sv.get("auroc_response_trait_rows_interval")), "n": integer(sv.get("n")),
            "rows": [(value(r.get("selection")), [fixed(r.get(k), 3) for k in keys]) for r in sv.get("results", [])]}


DECOMPOSITION_JSON = "decomposition/decomposition.json"
DECOMPOSITION_PAGE = "decomposition/decomposition.html"


def _decomposition(run_dir: Path, n: int = 8) -> dict[str, Any] | None:
    """The SAE decomposition's short section (``personavec decompose --run``): its top features by cosine with
    their share of the pos − neg gap, and the link to its page."""
    doc = _read_json_section(run_dir / DECOMPOSITION_JSON)
    if doc is None or doc.get("unreadable"):
        return doc
    cards = {c.get("latent"): c for c in doc.get("cards") or [] if isinstance(c, dict)}
    rankings = doc.get("rankings") or {}
    att = (doc.get("attribution") or {}).get("gap") or {}

    def rows(key: str) -> list[list[str]]:
        out = []
        for i in (rankings.get(key) or [])[:n]:
            c = cards.get(i) or {}
            share = number(c.get("gap_share"))
            causal = (c.get("causal") or {}).get("projection_effect") or {}
            out.append([f"feature {i}", fixed(c.get("cosine"), 3), DASH if share is None else f"{100 * share:+.1f} %",
                        with_interval(causal.get("mean"), [causal.get("lo"), causal.get("hi")])
                        if number(causal.get("mean")) is not None else DASH])
        return out

    error = number(att.get("error_share"))
    return {"page": DECOMPOSITION_PAGE if (run_dir / DECOMPOSITION_PAGE).is_file() else None,
            "sae": value((doc.get("sae") or {}).get("describe")), "layer": integer(doc.get("layer")),
            "positive": rows("cosine_positive"), "negative": rows("cosine_negative"),
            "error_share": DASH if error is None else f"{100 * error:+.1f} %"}


def _examples(examples: list[dict[str, Any]], units: str = "raw") -> list[tuple[str, list[dict[str, str]]]]:
    groups: dict[float | None, list[dict[str, Any]]] = {}
    for ex in examples:
        groups.setdefault(number(ex.get("coef")), []).append(ex)
    out = []
    for c in sorted(groups, key=lambda c: (c is None, c if c is not None else 0.0)):
        label = "coefficient 0 (unsteered)" if c == 0 else f"coefficient {coef(c)} ({units} units)"
        out.append((label, [{"question": str(ex.get("question", "")), "answer": str(ex.get("answer", "")),
                             "layer": integer(ex.get("layer")), "trait": fixed(ex.get("trait"), 1),
                             "coherence": fixed(ex.get("coherence"), 1)} for ex in groups[c]]))
    return out


def _timings(summary: dict[str, Any]) -> list[tuple[str, str]]:
    st = summary.get("stage_seconds")
    if not isinstance(st, dict) or not st:
        return []
    items = [(str(k), fixed(v, 2)) for k, v in st.items()]
    if "wall_seconds" in summary:
        items.append(("total (wall)", fixed(summary["wall_seconds"], 1)))
    return items


def _best_layer(summary: dict[str, Any], sep: pd.DataFrame | None) -> int | None:
    best = summary.get("best_separation")
    if isinstance(best, dict) and number(best.get("layer")) is not None:
        return round(number(best["layer"]))  # type: ignore[arg-type]
    if sep is not None and sep["auroc"].notna().any():
        return int(sep.loc[sep["auroc"].idxmax(), "layer"])
    return None


def _template() -> Any:
    return template("run", REPORT_NAME)


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.html`` (and its PNG plots) into a run directory; returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PersonavecError(f"run directory {run_dir} does not exist")
    summary = _read_summary(run_dir)
    notes: list[str] = []
    sep = _read_parquet(run_dir / "separation.parquet", ("layer", "auroc", "cohens_d"), notes)
    if sep is not None:
        sep = numeric(sep, sep.columns).sort_values("layer").reset_index(drop=True)
    steer = _read_parquet(run_dir / "steering.parquet", ("layer", "coef", "trait_mean", "coherence_mean"), notes)
    if steer is not None:
        steer = numeric(steer, [c for c in STEERING_COLUMNS if c in steer.columns])
    examples = _read_examples(run_dir / "examples.jsonl", notes)
    greedy = [{"question": str(g.get("question", "")), "unsteered": str(g.get("unsteered", "")),
               "steered": str(g.get("steered", "")), "layer": integer(g.get("layer")), "coef": coef(g.get("coef")),
               **{f"{side}_reading": _greedy_reading(g, side) for side in ("unsteered", "steered")}}
              for g in _read_examples(run_dir / "examples_greedy.jsonl", notes)]
    cap = _read_capability(run_dir / "capability.json", notes)
    answers = _read_parquet(run_dir / "steering_answers.parquet", ("layer", "coef", "question_id", "question",
                                                                    "answer"), notes)
    selection = summary.get("selection") if isinstance(summary.get("selection"), dict) else {}
    best_layer = _best_layer(summary, sep)

    trait = str(summary.get("trait") or run_dir.name)
    model = str(summary.get("model") or "unknown model")
    title = f"{trait} — {model}"
    plots: list[tuple[str, Callable[[Path], None]]] = []
    if sep is not None and len(sep):
        plots.append((SEPARATION_PNG, lambda p: plot_separation(sep, best_layer, p, title)))
    if steer is not None and len(steer):
        plots.append((STEERING_PNG, lambda p: plot_steering(steer, selection, p, title)))
    if cap is not None:
        plots.append((CAPABILITY_PNG, lambda p: plot_capability(cap, p, title)))
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            notes.append("plots left out: matplotlib is not installed (pip install matplotlib)")
            plots = []
    for name, plot in plots:
        plot(run_dir / name)
    drawn = {name for name, _ in plots}

    def png(name: str) -> str | None:
        return name if name in drawn else None

    counts = summary.get("counts")
    files = summary.get("files")
    page = _template().render(
        trait=trait, model=model, judge=summary.get("judge") or "none", warning=summary.get("warning"), notes=notes,
        overview=_overview(summary), counts=_items(counts) if isinstance(counts, dict) else [],
        mean_scores=_mean_scores(summary), filter=_filter(summary), selection=_selection(summary),
        separation=_separation(sep, best_layer, png(SEPARATION_PNG)),
        steering=_steering(steer, selection, png(STEERING_PNG)), capability=_capability(cap, png(CAPABILITY_PNG)),
        monitoring=_monitoring(run_dir), finetuning=_finetuning(run_dir), screening=_screening(run_dir),
        decomposition=_decomposition(run_dir),
        examples=_examples(examples, _units(selection)), greedy=greedy, units=_units(selection),
        judge_note=summary.get("judge_note"),
        browser=_browser(answers, selection), why_layers=_why_layers(best_layer, selection),
        timings=_timings(summary), command=summary.get("command"),
        files=_items(files) if isinstance(files, dict) else [])
    return write_text(run_dir / REPORT_NAME, page)
