"""A static HTML report of one run directory: tables, plots and example answers.

``write_report(run_dir)`` reads whatever the run left behind (``summary.json`` is required; ``separation.parquet``,
``steering.parquet``, ``examples.jsonl`` and ``capability.json`` are optional) and writes ``report.html`` plus
``separation.png``, ``steering.png`` and ``capability.png`` next to them, each atomically. The page is one
self-contained file: inline CSS, no JavaScript, no external resources; images are referenced by relative name.
Missing or non-finite numbers are shown as "–", and all text from the run (answers included) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import PersonavecError
from ..files import save_figure, write_text

DASH = "–"
REPORT_NAME = "report.html"
SEPARATION_PNG = "separation.png"
STEERING_PNG = "steering.png"
CAPABILITY_PNG = "capability.png"
STEERING_COLUMNS = ("layer", "coef", "trait_mean", "coherence_mean", "n", "trait_missing", "projection_mean")


# --------------------------------------------------------------------------------------------- formatting


def _num(x: Any) -> float | None:
    """A finite float, or None for None / NaN / inf / non-numbers."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(x: Any, digits: int = 2) -> str:
    v = _num(x)
    return DASH if v is None else f"{v:.{digits}f}"


def _fmt_int(x: Any) -> str:
    v = _num(x)
    return DASH if v is None else str(round(v))


def _fmt_coef(x: Any) -> str:
    v = _num(x)
    return DASH if v is None else f"{v:g}"


def _fmt_value(x: Any) -> str:
    """Any summary value as display text (not yet escaped)."""
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return _fmt(x, 4).rstrip("0").rstrip(".") if _num(x) is not None else DASH
    if isinstance(x, (list, dict)):
        return json.dumps(x, allow_nan=True, default=str).replace("NaN", DASH)
    return str(x)


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


# --------------------------------------------------------------------------------------------- reading


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise PersonavecError(f"{path} does not exist; run `personavec run` first (or pass the run directory)")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise PersonavecError(f"cannot read {path}: {e}") from None
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


def _numeric(df: pd.DataFrame, cols: Iterable[str]) -> pd.DataFrame:
    df = df.copy()
    for c in cols:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df


# --------------------------------------------------------------------------------------------- writing


def _save_figure(fig: Any, path: Path) -> None:
    save_figure(fig, path, dpi=110)


def _new_figure(width: float, height: float, ncols: int = 1) -> tuple[Any, list[Any]]:
    # Figure + Agg canvas directly: no pyplot, so no global backend or figure state is touched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, list(axes)


def _plot_separation(sep: pd.DataFrame, best_layer: int | None, path: Path, title: str) -> None:
    fig, (ax1, ax2) = _new_figure(10, 3.8, 2)
    layer = sep["layer"].to_numpy()
    ax1.plot(layer, sep["auroc"].to_numpy(), marker="o", ms=3, color="#1f77b4")
    ax1.axhline(0.5, color="grey", ls="--", lw=1, label="chance (0.5)")
    ax1.set(xlabel="layer", ylabel="AUROC", title="AUROC (pos vs neg projections)")
    ax2.plot(layer, sep["cohens_d"].to_numpy(), marker="o", ms=3, color="#d62728")
    ax2.axhline(0.0, color="grey", ls="--", lw=1)
    ax2.set(xlabel="layer", ylabel="Cohen's d", title="Cohen's d")
    if best_layer is not None:
        for ax in (ax1, ax2):
            ax.axvline(best_layer, color="#2ca02c", lw=1.5, alpha=0.8, label=f"best layer {best_layer}")
    ax1.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    _save_figure(fig, path)


def _plot_steering(steer: pd.DataFrame, selection: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    chosen_layer = _num(selection.get("chosen_layer"))
    coherence_min = _num(selection.get("coherence_min"))
    layers = sorted(steer["layer"].dropna().unique())
    # distinct colours for the other layers (tab10 without its red, which marks the chosen layer); viridis when many
    tab = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 3]
    viridis = matplotlib.colormaps["viridis"]

    def colour(i: int) -> Any:
        return tab[i % len(tab)] if len(layers) <= len(tab) else viridis(i / max(1, len(layers) - 1) * 0.85)

    has_proj = "projection_mean" in steer.columns and steer["projection_mean"].notna().any()
    fig, axes = _new_figure(16 if has_proj else 11, 4.2, 3 if has_proj else 2)
    ax1, ax2 = axes[0], axes[1]
    for i, layer in enumerate(layers):
        d = steer[steer["layer"] == layer].sort_values("coef")
        chosen = chosen_layer is not None and layer == chosen_layer
        style = ({"color": "#d62728", "lw": 2.8, "alpha": 1.0, "zorder": 5, "marker": "o", "ms": 5}
                 if chosen else
                 {"color": colour(i), "lw": 1.2, "alpha": 0.7, "marker": ".", "ms": 5})
        label = f"layer {int(layer)}" + (" (chosen)" if chosen else "")
        if not chosen and len(layers) > 12:
            label = None  # too many layers for a legend: label only the chosen one
        ax1.plot(d["coef"], d["trait_mean"], **style)
        ax2.plot(d["coef"], d["coherence_mean"], label=label, **style)
        if has_proj:
            axes[2].plot(d["coef"], d["projection_mean"], **style)
    if coherence_min is not None:
        ax2.axhline(coherence_min, color="black", ls="--", lw=1.2, label=f"coherence min {coherence_min:g}")
    for key, name, color in (("chosen_coef", "chosen coef", "#d62728"), ("suppress_coef", "suppress coef", "black")):
        c = _num(selection.get(key))
        if c is not None:
            ax1.axvline(c, color=color, ls=":", lw=1.2, label=f"{name} {c:g}")
            ax2.axvline(c, color=color, ls=":", lw=1.2)
    ax1.set(xlabel="steering coefficient", ylabel="trait score (0-100)", title="Trait expression (judge)")
    ax2.set(xlabel="steering coefficient", ylabel="coherence (0-100)", title="Coherence (judge)")
    if has_proj:
        axes[2].set(xlabel="steering coefficient", ylabel="mean projection on unit vector",
                    title="Answers' projection (unsteered read-out)")
    for ax in axes:
        ax.axvline(0, color="grey", lw=0.8)
    for ax in (ax1, ax2):
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, labels, loc="best", fontsize=8, ncol=2 if len(handles) > 6 else 1)
    fig.suptitle(title)
    _save_figure(fig, path)


def _plot_capability(cap: dict[str, Any], path: Path, title: str) -> None:
    fig, (ax,) = _new_figure(6.5, 3.8)
    base = _num(cap["baseline"].get("accuracy"))
    steered = pd.DataFrame(cap["steered"])
    if len(steered) and {"layer", "coef", "accuracy"} <= set(steered.columns):
        steered = _numeric(steered, ["layer", "coef", "accuracy"])
        for layer, d in steered.groupby("layer", sort=True):
            d = d.sort_values("coef")
            ax.plot(d["coef"], d["accuracy"], marker="o", label=f"layer {int(layer)}")
    if base is not None:
        ax.axhline(base, color="black", ls="--", lw=1.2, label=f"unsteered {base:.3g}")
    ax.set(xlabel="steering coefficient", ylabel="accuracy", title="Capability under steering")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    _save_figure(fig, path)


# --------------------------------------------------------------------------------------------- HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1150px;
 padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.sub{color:#666;margin-top:0}
.judge{font-size:1.15em;background:#eef4ff;border-left:5px solid #3867d6;padding:.6em 1em;margin:1em 0}
.warning{background:#fff3bf;border:1px solid #f0c000;border-left:6px solid #f0a000;padding:.7em 1em;margin:1em 0;
 font-weight:600}
.note{background:#f4f4f4;border-left:4px solid #999;padding:.4em 1em;margin:.5em 0;color:#444}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f2f2f2}td.k,th.k{text-align:left}
tr.best td,td.best{background:#d9f5d9;font-weight:600}th.best{background:#bfe8bf}
.scroll{overflow-x:auto}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
pre{background:#f6f8fa;border:1px solid #ddd;padding:.7em;white-space:pre-wrap;word-break:break-word}
.ex{border:1px solid #ddd;border-radius:4px;padding:.5em .9em;margin:.6em 0}
.ex .q{font-weight:600}.ex .a{white-space:pre-wrap;word-break:break-word;margin:.3em 0}
.ex .s{color:#555;font-size:.88em}
"""


def _kv_table(items: Iterable[tuple[str, str]]) -> str:
    rows = "".join(f"<tr><th class='k'>{_e(k)}</th><td class='k'>{_e(v)}</td></tr>" for k, v in items)
    return f"<table>{rows}</table>"


def _section_overview(summary: dict[str, Any]) -> list[str]:
    items = [("trait", _fmt_value(summary.get("trait"))), ("model", _fmt_value(summary.get("model"))),
             ("judge", _fmt_value(summary.get("judge")))]
    for key, label in (("artifacts_source", "artifacts source"), ("run_dir", "run directory"),
                       ("wall_seconds", "wall time (s)")):
        if key in summary:
            items.append((label, _fmt_value(summary[key])))
    return ["<h2>Run</h2>", _kv_table(items)]


def _section_counts(summary: dict[str, Any]) -> list[str]:
    counts = summary.get("counts")
    if not isinstance(counts, dict) or not counts:
        return []
    return ["<h2>Counts</h2>", _kv_table((str(k), _fmt_value(v)) for k, v in counts.items())]


def _section_mean_scores(summary: dict[str, Any]) -> list[str]:
    ms = summary.get("mean_scores")
    if not isinstance(ms, dict) or not ms:
        return []
    rows = []
    for side, d in ms.items():
        d = d if isinstance(d, dict) else {}
        rows.append(f"<tr><td class='k'>{_e(side)}</td><td>{_fmt(d.get('trait'), 1)}</td>"
                    f"<td>{_fmt(d.get('coherence'), 1)}</td></tr>")
    return ["<h2>Mean judge scores (extraction answers)</h2>",
            "<table><tr><th class='k'>side</th><th>trait</th><th>coherence</th></tr>", *rows, "</table>"]


def _section_filter(summary: dict[str, Any]) -> list[str]:
    filt = summary.get("filter")
    if not isinstance(filt, dict) or not filt:
        return []
    items = [("applied", _fmt_value(filt.get("applied"))), ("reason", _fmt_value(filt.get("reason")))]
    items += [(str(k), _fmt_value(v)) for k, v in filt.items() if k not in ("applied", "reason")]
    return ["<h2>Filter</h2>", _kv_table(items)]


def _section_selection(summary: dict[str, Any]) -> list[str]:
    sel = summary.get("selection")
    if not isinstance(sel, dict) or not sel:
        return []
    items = [("chosen layer", _fmt_int(sel.get("chosen_layer"))),
             ("chosen coefficient (amplify)", _fmt_coef(sel.get("chosen_coef"))),
             ("suppress coefficient", _fmt_coef(sel.get("suppress_coef"))),
             ("coherence threshold", _fmt(sel.get("coherence_min"), 1)),
             ("reason", _fmt_value(sel.get("reason")))]
    return ["<h2>Selected steering setting</h2>", _kv_table(items)]


def _section_separation(sep: pd.DataFrame | None, best_layer: int | None, has_png: bool) -> list[str]:
    if sep is None:
        return []
    out = ["<h2>Separation per layer</h2>",
           "<p>AUROC and Cohen's d of held-out pos vs neg answers projected on the layer's persona vector."
           + (f" Best layer: <b>{best_layer}</b>." if best_layer is not None else "") + "</p>"]
    if has_png:
        out.append(f'<img src="{SEPARATION_PNG}" alt="AUROC and Cohen\'s d per layer">')
    extra = [c for c in ("pos_mean", "neg_mean", "norm") if c in sep.columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in ("layer", "AUROC", "Cohen's d", *extra))
    rows = []
    for r in sep.itertuples(index=False):
        layer = _num(r.layer)
        cls = " class='best'" if best_layer is not None and layer == best_layer else ""
        cells = [_fmt_int(r.layer), _fmt(r.auroc, 3), _fmt(r.cohens_d, 2)]
        cells += [_fmt(getattr(r, c), 2) for c in extra]
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    out += ["<div class='scroll'><table>", f"<tr>{head}</tr>", *rows, "</table></div>"]
    return out


def _section_steering(steer: pd.DataFrame | None, selection: dict[str, Any], has_png: bool) -> list[str]:
    if steer is None or not len(steer):
        return []
    chosen_layer = _num(selection.get("chosen_layer"))
    chosen_coef = _num(selection.get("chosen_coef"))
    suppress_coef = _num(selection.get("suppress_coef"))
    out = ["<h2>Steering sweep</h2>",
           "<p>Mean judge scores of steered answers and their projection on the vector (read by the unsteered "
           "model); cells are <b>trait / coherence / projection</b>. The chosen layer and coefficient are "
           "highlighted.</p>"]
    if has_png:
        out.append(f'<img src="{STEERING_PNG}" alt="trait and coherence vs steering coefficient per layer">')
    cols = ["trait_mean", "coherence_mean"] + (["projection_mean"] if "projection_mean" in steer.columns else [])
    agg = steer.groupby(["layer", "coef"], sort=True)[cols].mean()
    layers = sorted(steer["layer"].dropna().unique())
    coefs = sorted(steer["coef"].dropna().unique())
    head = ["<th>layer \\ coef</th>"]
    for c in coefs:
        cls = " class='best'" if c in (chosen_coef, suppress_coef) else ""
        head.append(f"<th{cls}>{_e(_fmt_coef(c))}</th>")
    rows = []
    for layer in layers:
        is_layer = chosen_layer is not None and layer == chosen_layer
        cells = [f"<th>{_fmt_int(layer)}</th>"]
        for c in coefs:
            text = " / ".join(_fmt(x, 1) for x in agg.loc[layer, c]) if (layer, c) in agg.index else DASH
            cls = " class='best'" if is_layer and c in (chosen_coef, suppress_coef) else ""
            cells.append(f"<td{cls}>{_e(text)}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    out += ["<div class='scroll'><table>", "<tr>" + "".join(head) + "</tr>", *rows, "</table></div>"]
    missing = int(pd.to_numeric(steer.get("trait_missing", pd.Series(dtype=float)), errors="coerce").fillna(0).sum())
    if missing:
        out.append(f"<p class='note'>{missing} steered answer(s) got no usable trait score from the judge.</p>")
    return out


def _section_monitoring(run_dir: Path) -> list[str]:
    """The monitoring experiment (``personavec monitor``), when it has run."""
    path = run_dir / "monitor.json"
    if not path.is_file():
        return []
    try:
        corr = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return ["<div class='note'>monitor.json is unreadable.</div>"]
    out = ["<h2>Monitoring</h2>",
           f"<p>Pearson r between the last prompt token's projection (layer {_e(_fmt_int(corr.get('layer')))}) "
           f"and the answers, over {_e(_fmt_int(corr.get('n_prompts')))} prompts (8-step system-prompt ladder and "
           f"0-20-shot prompts on the evaluation questions); judge {_e(corr.get('judge', DASH))}, "
           f"{_e(_fmt_int(corr.get('trait_scored')))} prompts with a trait score.</p>",
           "<table><tr><th>answers measured by</th><th>overall</th><th>ladder</th><th>many-shot</th></tr>"]
    for key, label in (("r_trait", "judged trait score"), ("r_answer_projection", "their own projection")):
        for suffix, how in (("", ""), ("_setting_means", " (means of each setting)")):
            if suffix and f"{key}_overall{suffix}" not in corr:
                continue
            cells = "".join(f"<td>{_e(_fmt(corr.get(f'{key}_{part}{suffix}'), 3))}</td>"
                            for part in ("overall", "ladder", "many_shot"))
            out.append(f"<tr><th>{_e(label + how)}</th>{cells}</tr>")
    out.append("</table>")
    if (run_dir / "monitor.png").is_file():
        out.append('<img src="monitor.png" alt="last-prompt projection vs answers">')
    return out


def _section_finetuning(run_dir: Path) -> list[str]:
    """The fine-tuning experiment and the screening validation, when they have run."""
    d = run_dir / "finetune"
    out: list[str] = []
    table_path = d / "finetune.parquet"
    if (d / "finetune.json").is_file() and table_path.is_file():
        try:
            s = json.loads((d / "finetune.json").read_text(encoding="utf-8"))
            t = pd.read_parquet(table_path)
        except (OSError, ValueError):
            return ["<div class='note'>finetune/finetune.json is unreadable.</div>"]
        out += ["<h2>Fine-tuning</h2>",
                f"<p>{_e(_fmt_int(s.get('n_finetunes')))} LoRA fine-tunes on trait/normal mixtures of this run's "
                f"answers; shift = mean last-prompt activation change on the evaluation prompts, projected on v̂ at "
                f"layer {_e(_fmt_int(s.get('layer')))}. Pearson r of shift with the judged trait "
                f"{_e(_fmt(s.get('r_shift_trait'), 3))}, with the answers' projection "
                f"{_e(_fmt(s.get('r_shift_answer_projection'), 3))}.</p>",
                "<table><tr><th>model</th><th>shift</th><th>trait</th><th>coherence</th><th>answers' projection</th>"
                "<th>answer NLL</th><th>MC accuracy</th></tr>"]
        for _, r in t.iterrows():
            cells = "".join(f"<td>{_e(_fmt(r.get(k), 3))}</td>" for k in ("shift", "trait", "coherence",
                                                                           "answer_projection", "answer_nll",
                                                                           "mc_accuracy"))
            out.append(f"<tr><th>{_e(r['model'])}</th>{cells}</tr>")
        out.append("</table>")
        for png, alt in (("finetune.png", "shift vs trait"), ("finetune_shift.png", "shift per layer")):
            if (d / png).is_file():
                out.append(f'<img src="finetune/{png}" alt="{alt}">')
    sv_path = d / "screen_validation.json"
    if sv_path.is_file():
        try:
            sv = json.loads(sv_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return [*out, "<div class='note'>finetune/screen_validation.json is unreadable.</div>"]
        out += ["<h2>Data screening (ΔP) validation</h2>",
                f"<p>{_e(sv.get('mixture'))}: AUROC of ΔP for the trait rows "
                f"{_e(_fmt(sv.get('auroc_delta_p_trait_rows'), 3))} (response projection alone "
                f"{_e(_fmt(sv.get('auroc_response_trait_rows'), 3))}); fine-tuned on each selection of "
                f"{_e(_fmt_int(sv.get('n')))} samples:</p>",
                "<table><tr><th>selection</th><th>trait share</th><th>mean ΔP</th><th>shift</th><th>trait</th>"
                "<th>answers' projection</th><th>answer NLL</th></tr>"]
        for r in sv.get("results", []):
            cells = "".join(f"<td>{_e(_fmt(r.get(k), 3))}</td>" for k in ("trait_share", "mean_delta_p", "shift",
                                                                           "trait", "answer_projection",
                                                                           "answer_nll"))
            out.append(f"<tr><th>{_e(r.get('selection'))}</th>{cells}</tr>")
        out.append("</table>")
    return out


def _section_capability(cap: dict[str, Any] | None, has_png: bool) -> list[str]:
    if cap is None:
        return []
    base = cap["baseline"]
    out = ["<h2>Capability</h2>"]
    if has_png:
        out.append(f'<img src="{CAPABILITY_PNG}" alt="accuracy vs steering coefficient">')
    rows = [f"<tr><td class='k'>unsteered</td><td>{DASH}</td><td>{DASH}</td><td>{_fmt(base.get('accuracy'), 3)}</td>"
            f"<td>{_fmt_int(base.get('n'))}</td></tr>"]
    for s in cap["steered"]:
        rows.append(f"<tr><td class='k'>steered</td><td>{_fmt_int(s.get('layer'))}</td>"
                    f"<td>{_e(_fmt_coef(s.get('coef')))}</td><td>{_fmt(s.get('accuracy'), 3)}</td>"
                    f"<td>{_fmt_int(s.get('n', base.get('n')))}</td></tr>")
    out += ["<table><tr><th class='k'>setting</th><th>layer</th><th>coef</th><th>accuracy</th><th>n</th></tr>",
            *rows, "</table>"]
    return out


def _section_examples(examples: list[dict[str, Any]]) -> list[str]:
    if not examples:
        return []
    groups: dict[float | None, list[dict[str, Any]]] = {}
    for ex in examples:
        groups.setdefault(_num(ex.get("coef")), []).append(ex)
    out = ["<h2>Example answers</h2>"]
    for coef in sorted(groups, key=lambda c: (c is None, c if c is not None else 0.0)):
        label = "coefficient 0 (unsteered)" if coef == 0 else f"coefficient {_fmt_coef(coef)}"
        out.append(f"<h3>{_e(label)}</h3>")
        for ex in groups[coef]:
            out.append("<div class='ex'>"
                       f"<div class='q'>Q: {_e(ex.get('question', ''))}</div>"
                       f"<div class='a'>{_e(ex.get('answer', ''))}</div>"
                       f"<div class='s'>layer {_fmt_int(ex.get('layer'))} · trait {_fmt(ex.get('trait'), 1)}"
                       f" · coherence {_fmt(ex.get('coherence'), 1)}</div></div>")
    return out


def _section_timings(summary: dict[str, Any]) -> list[str]:
    st = summary.get("stage_seconds")
    if not isinstance(st, dict) or not st:
        return []
    items = [(str(k), _fmt(v, 2)) for k, v in st.items()]
    if "wall_seconds" in summary:
        items.append(("total (wall)", _fmt(summary["wall_seconds"], 1)))
    rows = "".join(f"<tr><td class='k'>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in items)
    return ["<h2>Stage timings</h2>", f"<table><tr><th class='k'>stage</th><th>seconds</th></tr>{rows}</table>"]


def _section_files(summary: dict[str, Any]) -> list[str]:
    files = summary.get("files")
    if not isinstance(files, dict) or not files:
        return []
    return ["<h2>Files</h2>", _kv_table((str(k), _fmt_value(v)) for k, v in files.items())]


def _best_layer(summary: dict[str, Any], sep: pd.DataFrame | None) -> int | None:
    best = summary.get("best_separation")
    if isinstance(best, dict) and _num(best.get("layer")) is not None:
        return round(_num(best["layer"]))  # type: ignore[arg-type]
    if sep is not None and sep["auroc"].notna().any():
        return int(sep.loc[sep["auroc"].idxmax(), "layer"])
    return None


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.html`` (and its PNG plots) into a run directory; returns the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PersonavecError(f"run directory {run_dir} does not exist")
    summary = _read_summary(run_dir)
    notes: list[str] = []
    sep = _read_parquet(run_dir / "separation.parquet", ("layer", "auroc", "cohens_d"), notes)
    if sep is not None:
        sep = _numeric(sep, sep.columns).sort_values("layer").reset_index(drop=True)
    steer = _read_parquet(run_dir / "steering.parquet", ("layer", "coef", "trait_mean", "coherence_mean"), notes)
    if steer is not None:
        steer = _numeric(steer, [c for c in STEERING_COLUMNS if c in steer.columns])
    examples = _read_examples(run_dir / "examples.jsonl", notes)
    cap = _read_capability(run_dir / "capability.json", notes)
    selection = summary.get("selection") if isinstance(summary.get("selection"), dict) else {}
    best_layer = _best_layer(summary, sep)

    trait = str(summary.get("trait") or run_dir.name)
    model = str(summary.get("model") or "unknown model")
    plot_title = f"{trait} — {model}"
    pngs: dict[str, bool] = {}
    plots: list[tuple[str, Callable[[Path], None]]] = []
    if sep is not None and len(sep):
        plots.append((SEPARATION_PNG, lambda p: _plot_separation(sep, best_layer, p, plot_title)))
    if steer is not None and len(steer):
        plots.append((STEERING_PNG, lambda p: _plot_steering(steer, selection, p, plot_title)))
    if cap is not None:
        plots.append((CAPABILITY_PNG, lambda p: _plot_capability(cap, p, plot_title)))
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            notes.append("plots left out: matplotlib is not installed (pip install matplotlib)")
            plots = []
    for name, plot in plots:
        plot(run_dir / name)
        pngs[name] = True

    judge = summary.get("judge")
    body = [f"<h1>Persona vector report: {_e(trait)}</h1>", f"<p class='sub'>model <b>{_e(model)}</b></p>",
            f"<div class='judge'>Judge: <b>{_e(judge if judge else 'none')}</b></div>"]
    if summary.get("warning"):
        body.append(f"<div class='warning'>⚠ Warning: {_e(summary['warning'])}</div>")
    body += [f"<div class='note'>{_e(n)}</div>" for n in notes]
    body += _section_overview(summary)
    body += _section_counts(summary)
    body += _section_mean_scores(summary)
    body += _section_filter(summary)
    body += _section_selection(summary)
    body += _section_separation(sep, best_layer, pngs.get(SEPARATION_PNG, False))
    body += _section_steering(steer, selection, pngs.get(STEERING_PNG, False))
    body += _section_capability(cap, pngs.get(CAPABILITY_PNG, False))
    body += _section_monitoring(run_dir)
    body += _section_finetuning(run_dir)
    body += _section_examples(examples)
    body += _section_timings(summary)
    if summary.get("command"):
        body += ["<h2>Reproduce</h2>", f"<pre><code>{_e(summary['command'])}</code></pre>"]
    body += _section_files(summary)
    page = ("<!DOCTYPE html>\n<html lang='en'>\n<head>\n<meta charset='utf-8'>\n"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>\n"
            f"<title>personavec: {_e(trait)} — {_e(model)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
    out = run_dir / REPORT_NAME
    write_text(out, page)
    return out
