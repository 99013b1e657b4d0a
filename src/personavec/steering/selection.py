"""The automatic choice of steering layer and strength from a steering table (pure functions).

* **layer**: the one with the largest trait increase over the unsteered baseline, among cells whose mean
  coherence stays ≥ ``coherence_min`` (default 50). When the judge gives no usable scores (a weak local
  judge), the trait increase is replaced by the increase in projection and coherence is not checked — the
  result says so.
* **coefficient**: the strongest positive coefficient at that layer that keeps coherence ≥ ``coherence_min``;
  and the largest suppressing (negative) coefficient that keeps coherence ≥ ``suppress_coherence_min``
  (default 80), as in the paper's comparisons.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd


@dataclass
class Selection:
    chosen_layer: int | None
    chosen_coef: float | None
    suppress_coef: float | None
    coherence_min: float
    suppress_coherence_min: float
    criterion: str
    reason: str
    effects: dict[int, float] = field(default_factory=dict)
    skipped_baseline: bool = field(default=False, repr=False)  # a layer was skipped for an unscored baseline

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("skipped_baseline")
        return d


def choose(table: pd.DataFrame, coherence_min: float = 50.0, suppress_coherence_min: float = 80.0,
           gaps: dict[int, float] | None = None) -> Selection:
    """Pick the layer and coefficients from a :func:`summarize` table (pure function).

    Without usable judge scores the projection is the criterion; projections at different layers have
    different scales, so with ``gaps`` (per layer: mean projection of held-out pos answers minus neg answers)
    the increase is measured in units of that gap — the fraction of the way from neg to pos answers. Cells
    without a value for the criterion are skipped, and so is a layer whose unsteered baseline has none; the
    reason says which. When the judge scores but left the baseline unscored, the projection decides.
    """
    scored = table["trait_mean"].notna().mean() >= 0.5 and table["coherence_mean"].notna().all()
    if scored:
        sel = _choose(table, "trait_mean", True, coherence_min, suppress_coherence_min)
        if sel.chosen_layer is not None or not sel.skipped_baseline:
            return sel
        fallback = "the judge scored no unsteered answer (baseline), so no judged increase can be measured; "
    else:
        fallback = ""
    metric = "projection_mean"
    if gaps:
        table = table.copy()
        scale = table["layer"].map(lambda x: gaps.get(int(x), float("nan")))
        table["projection_mean"] = table["projection_mean"] / scale.where(scale.abs() > 1e-9)
        metric = "projection_gap_units"
    sel = _choose(table, metric, False, coherence_min, suppress_coherence_min)
    sel.reason = fallback + sel.reason
    return sel


def _choose(table: pd.DataFrame, metric: str, scored: bool, coherence_min: float,
            suppress_coherence_min: float) -> Selection:
    col = "projection_mean" if metric == "projection_gap_units" else metric
    effects: dict[int, float] = {}
    best: tuple[float, int, float] | None = None
    no_baseline, no_scores = [], []
    for layer, g in table.groupby("layer"):
        base = g[g["coef"] == 0.0]
        if base.empty:
            continue
        b = float(base[col].iloc[0])
        if math.isnan(b):
            no_baseline.append(int(layer))
            continue
        pos = g[g["coef"] > 0]
        if scored:
            pos = pos[pos["coherence_mean"] >= coherence_min]
        if not pos.empty and pos[col].isna().all():
            no_scores.append(int(layer))
            continue
        pos = pos[pos[col].notna()]
        if pos.empty:
            continue
        top = pos.loc[pos[col].idxmax()]
        effects[int(layer)] = float(top[col]) - b
        if best is None or effects[int(layer)] > best[0]:
            best = (effects[int(layer)], int(layer), float(top["coef"]))
    what = "trait score" if metric == "trait_mean" else "projection"
    skipped = ""
    if no_baseline:
        skipped += f"; skipped {_layers(no_baseline)}: the unsteered baseline has no {what}"
    if no_scores:
        skipped += f"; skipped {_layers(no_scores)}: no {what} at any coherent positive coefficient"
    if best is None:
        sel = Selection(None, None, None, coherence_min, suppress_coherence_min, metric,
                        f"no positive coefficient kept coherence >= {coherence_min} with a {what}" + skipped, effects)
        sel.skipped_baseline = bool(no_baseline)
        return sel
    layer = best[1]
    g = table[(table["layer"] == layer) & table[col].notna()]
    pos_ok = g[g["coef"] > 0]
    if scored:
        pos_ok = pos_ok[pos_ok["coherence_mean"] >= coherence_min]
    chosen_coef = float(pos_ok["coef"].max())
    neg = g[g["coef"] < 0]
    if scored:
        neg = neg[neg["coherence_mean"] >= suppress_coherence_min]
    suppress = float(neg["coef"].min()) if len(neg) else None
    if scored:
        reason = (f"largest judged trait increase ({best[0]:+.1f}) with coherence >= {coherence_min}; strongest "
                  f"coherent coefficient {chosen_coef:g}")
    else:
        unit = " held-out pos-neg gaps" if metric == "projection_gap_units" else ""
        reason = (f"the judge gave no usable trait scores: chosen by the increase in projection of the steered "
                  f"answers ({best[0]:+.2f}{unit}); coherence was not checked")
    return Selection(layer, chosen_coef, suppress, coherence_min, suppress_coherence_min, metric, reason + skipped,
                     effects)


def _layers(layers: list[int]) -> str:
    return ("layer " if len(layers) == 1 else "layers ") + ", ".join(map(str, layers))
