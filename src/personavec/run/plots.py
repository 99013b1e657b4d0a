"""The report's plots (matplotlib's Agg canvas directly: no pyplot, no global state): separation per layer, the
steering sweep, and capability under steering; each written atomically as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..files import save_figure
from ..stats import wilson
from .format import number


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


def plot_separation(sep: pd.DataFrame, best_layer: int | None, path: Path, title: str) -> None:
    fig, (ax1, ax2) = _new_figure(10, 3.8, 2)
    layer = sep["layer"].to_numpy()
    ax1.plot(layer, sep["auroc"].to_numpy(), marker="o", ms=3, color="#1f77b4")
    for ax, col, color in ((ax1, "auroc", "#1f77b4"), (ax2, "cohens_d", "#d62728")):
        if f"{col}_lo" in sep and f"{col}_hi" in sep:  # 95 % bootstrap intervals over the evaluation questions
            ax.fill_between(layer, sep[f"{col}_lo"].to_numpy(dtype=float), sep[f"{col}_hi"].to_numpy(dtype=float),
                            color=color, alpha=0.15, lw=0, label="95 % interval" if col == "auroc" else None)
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
    save_figure(fig, path, dpi=110)


#: the steering sweep's panels: column prefix, y label, title; a panel is drawn only where its column has data
STEERING_PANELS = (("trait", "trait score (0-100)", "Trait expression (judge)"),
                   ("coherence", "coherence (0-100)", "Coherence (judge)"),
                   ("projection", "mean projection on unit vector (raw units)", "Answers' projection (unsteered read)"),
                   ("fluency", "NLL per answer token (nats)", "Fluency (unsteered read; lower is more fluent)"))


#: what a grid coefficient multiplies, per unit (a selection made before grids had units was in raw units)
COEF_UNITS = {"raw": "raw units: × the vector", "norm": "norm units: × residual norm"}


def coef_units(selection: dict[str, Any]) -> str:
    """The units of a selection's coefficients: its own, else its grid's, else raw (made before grids had units)."""
    units = selection.get("units") or (selection.get("grid") or {}).get("units")
    return str(units) if units in COEF_UNITS else "raw"


def steering_panels(steer: pd.DataFrame) -> list[str]:
    """The panels of :func:`plot_steering` that have data (a judge that scored nothing leaves out its two)."""
    return [name for name, _, _ in STEERING_PANELS
            if f"{name}_mean" in steer.columns and steer[f"{name}_mean"].notna().any()]


def plot_steering(steer: pd.DataFrame, selection: dict[str, Any], path: Path, title: str) -> None:
    """One panel per reading with data, each mean with its 95 % interval (shaded) where the table has one."""
    import matplotlib

    chosen_layer = number(selection.get("chosen_layer"))
    coherence_min = number(selection.get("coherence_min"))
    layers = sorted(steer["layer"].dropna().unique())
    # distinct colours for the other layers (tab10 without its red, which marks the chosen layer); viridis when many
    tab = [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 3]
    viridis = matplotlib.colormaps["viridis"]

    def colour(i: int) -> Any:
        return tab[i % len(tab)] if len(layers) <= len(tab) else viridis(i / max(1, len(layers) - 1) * 0.85)

    names = steering_panels(steer) or ["projection"]
    spec = {name: (ylabel, ptitle) for name, ylabel, ptitle in STEERING_PANELS}
    fig, axes = _new_figure(5.2 * len(names) + 0.6, 4.2, len(names))
    panel = dict(zip(names, axes))
    for i, layer in enumerate(layers):
        d = steer[steer["layer"] == layer].sort_values("coef")
        chosen = chosen_layer is not None and layer == chosen_layer
        style = ({"color": "#d62728", "lw": 2.8, "alpha": 1.0, "zorder": 5, "marker": "o", "ms": 5}
                 if chosen else
                 {"color": colour(i), "lw": 1.2, "alpha": 0.7, "marker": ".", "ms": 5})
        label = f"layer {int(layer)}" + (" (chosen)" if chosen else "")
        if not chosen and len(layers) > 12:
            label = None  # too many layers for a legend: label only the chosen one
        for k, (name, ax) in enumerate(panel.items()):
            if f"{name}_mean" not in d:
                continue
            ax.plot(d["coef"], d[f"{name}_mean"], label=label if k == 0 else None, **style)
            if f"{name}_lo" in d and f"{name}_hi" in d:
                ax.fill_between(d["coef"], d[f"{name}_lo"], d[f"{name}_hi"], color=style["color"],
                                alpha=0.18 if chosen else 0.08, lw=0)
    if coherence_min is not None and "coherence" in panel:
        panel["coherence"].axhline(coherence_min, color="black", ls="--", lw=1.2,
                                   label=f"coherence min {coherence_min:g}")
    for key, name, color in (("chosen_coef", "chosen coef", "#d62728"), ("suppress_coef", "suppress coef", "black")):
        c = number(selection.get(key))
        if c is not None:
            for k, ax in enumerate(panel.values()):
                ax.axvline(c, color=color, ls=":", lw=1.2, label=f"{name} {c:g}" if k == 0 else None)
    for name, ax in panel.items():
        ylabel, ptitle = spec[name]
        ax.set(xlabel=f"steering coefficient ({COEF_UNITS[coef_units(selection)]})", ylabel=ylabel, title=ptitle)
        ax.axvline(0, color="grey", lw=0.8)
    for ax in panel.values():
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(handles, labels, loc="best", fontsize=8, ncol=2 if len(handles) > 6 else 1)
    fig.suptitle(title + " — means with 95 % intervals (bootstrap over questions)")
    save_figure(fig, path, dpi=110)


def plot_capability(cap: dict[str, Any], path: Path, title: str) -> None:
    fig, (ax,) = _new_figure(6.5, 3.8)
    base = number(cap["baseline"].get("accuracy"))
    steered = pd.DataFrame(cap["steered"])
    if len(steered) and {"layer", "coef", "accuracy"} <= set(steered.columns):
        steered = numeric(steered, ["layer", "coef", "accuracy"])
        n = number(cap["baseline"].get("n")) or 0
        for layer, d in steered.groupby("layer", sort=True):
            d = d.sort_values("coef")
            if n:  # 95 % Wilson intervals of each accuracy (n questions)
                acc = d["accuracy"].to_numpy(dtype=float)
                lo, hi = (np.array(x, dtype=float) for x in zip(*(wilson(a * n, int(n)) for a in acc)))
                ax.errorbar(d["coef"], acc, yerr=[acc - lo, hi - acc], marker="o", capsize=3,
                            label=f"layer {int(layer)} (95 % interval)")
            else:
                ax.plot(d["coef"], d["accuracy"], marker="o", label=f"layer {int(layer)}")
    if base is not None:
        ax.axhline(base, color="black", ls="--", lw=1.2, label=f"unsteered {base:.3g}")
        chance = number(cap.get("chance"))
        if chance is not None:
            ax.axhline(chance, color="grey", ls=":", lw=1.2, label=f"chance {chance:.2f}")
    units = {str(r.get("units") or "raw") for r in cap["steered"] if isinstance(r, dict)}  # raw: before grids had units
    unit = f" ({COEF_UNITS[units.pop()]})" if len(units) == 1 and units <= set(COEF_UNITS) else ""
    ax.set(xlabel=f"steering coefficient{unit}", ylabel="accuracy", title="Capability under steering")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path, dpi=110)


def numeric(df: pd.DataFrame, cols: Any) -> pd.DataFrame:
    df = df.copy()
    for c in cols:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c], errors="coerce")
    return df
