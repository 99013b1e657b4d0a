"""The automatic choice of steering layer and strength from a steering table (pure functions).

* **readable cells only** — always, with or without a judge: a steered cell takes part only while its answers
  stay text — mean fluency (NLL per answer token under the unsteered model) at most ``fluency_margin`` nats above
  the unsteered answers', and a share of its answers (sampled and greedy) flagged degenerate (empty, or repeating
  themselves) at most ``degenerate_max`` above the unsteered answers' share. Then, when the judge scores, mean
  coherence ≥ ``coherence_min`` (default 50).
* **layer**: the one with the largest trait increase over the unsteered baseline among readable cells whose
  effect is measurable (its 95 % interval above zero, see below). When the
  judge gives no usable scores (a weak local judge), the trait increase is replaced by the increase in projection
  (in units of each layer's held-out pos − neg gap) — the result says so.
* **coefficient**: the strongest readable positive coefficient at that layer whose effect (paired over questions
  with the unsteered answers) has a 95 % interval above zero; and the largest readable suppressing (negative)
  coefficient, keeping judged coherence ≥ ``suppress_coherence_min`` (default 80) when there is a judge, as in the
  paper's comparisons.
* **no defensible choice** — when no steered cell is readable, or none moves the trait measurably: then nothing
  is chosen (``chosen_layer`` None, ``defensible`` False) and the reason says why, instead of taking the grid's edge.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

#: a readable cell's answers are at most this many nats per token less likely than the unsteered ones. Calibrated
#: on the embedded model's quick grid, 20 sampled answers per cell: unsteered 2.5-2.8; the +0.1 norm cells a read
#: finds readable sit +0.3 to +0.8 above (more on float32 than on bfloat16: sampled NLL varies by about ±0.4 over
#: 20 questions), the broken +0.2 cells +1.0 to +1.8 above. Loops are caught by the degenerate share, not here: a
#: looping answer is *likely* under the model
FLUENCY_MARGIN = 1.0
#: and at most this much more of them (sampled and greedy) is degenerate (empty, or looping: see :mod:`.quality`)
#: than unsteered: on the embedded model the broken cells had 15-28 % looping answers, the readable ones 0-8 %
DEGENERATE_MAX = 0.1


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
    defensible: bool = True
    fluency_margin: float = FLUENCY_MARGIN
    degenerate_max: float = DEGENERATE_MAX
    unreadable: list[list[float]] = field(default_factory=list)  # [layer, coef] cells left out as broken text
    skipped_baseline: bool = field(default=False, repr=False)  # a layer was skipped for an unscored baseline

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("skipped_baseline")
        return d


def readable(table: pd.DataFrame, fluency_margin: float = FLUENCY_MARGIN,
             degenerate_max: float = DEGENERATE_MAX) -> pd.Series:
    """Per row of a :func:`~personavec.steering.grid.summarize` table: whether its answers stay text (the
    unsteered baseline always does; a table without fluency readings has no readable steered cell)."""
    if "fluency_mean" not in table or "degenerate_share" not in table:
        return table["coef"] == 0.0
    base = table[table["coef"] == 0.0].groupby("layer")[["fluency_mean", "degenerate_share"]].first()
    ok = (table["fluency_mean"] <= table["layer"].map(base["fluency_mean"]) + fluency_margin) & \
        (table["degenerate_share"] <= table["layer"].map(base["degenerate_share"]) + degenerate_max)
    return ok.fillna(False) | (table["coef"] == 0.0)


def choose(table: pd.DataFrame, coherence_min: float = 50.0, suppress_coherence_min: float = 80.0,
           gaps: dict[int, float] | None = None, fluency_margin: float = FLUENCY_MARGIN,
           degenerate_max: float = DEGENERATE_MAX) -> Selection:
    """Pick the layer and coefficients from a :func:`summarize` table (pure function).

    Without usable judge scores the projection is the criterion; projections at different layers have
    different scales, so with ``gaps`` (per layer: mean projection of held-out pos answers minus neg answers)
    the increase is measured in units of that gap — the fraction of the way from neg to pos answers. Cells
    without a value for the criterion are skipped, and so is a layer whose unsteered baseline has none; the
    reason says which. When the judge scores but left the baseline unscored, the projection decides.
    """
    ok = readable(table, fluency_margin, degenerate_max)
    unreadable = [[int(r.layer), float(r.coef)] for r in table[~ok].itertuples()]
    gated = table[ok]
    # read on the cells that take part: a broken cell the judge gave no number for does not turn the judge off
    scored = gated["trait_mean"].notna().mean() >= 0.5 and gated["coherence_mean"].notna().all()
    if scored:
        sel = _choose(gated, "trait_mean", True, coherence_min, suppress_coherence_min)
        if sel.chosen_layer is not None or not sel.skipped_baseline:
            return _finish(sel, table, unreadable, fluency_margin, degenerate_max)
        fallback = "the judge scored no unsteered answer (baseline), so no judged increase can be measured; "
    else:
        fallback = ""
    metric = "projection_mean"
    if gaps:
        gated = gated.copy()
        scale = gated["layer"].map(lambda x: gaps.get(int(x), float("nan")))
        gated["projection_mean"] = gated["projection_mean"] / scale.where(scale.abs() > 1e-9)
        metric = "projection_gap_units"
    sel = _choose(gated, metric, False, coherence_min, suppress_coherence_min)
    sel.reason = fallback + sel.reason
    return _finish(sel, table, unreadable, fluency_margin, degenerate_max)


def _finish(sel: Selection, table: pd.DataFrame, unreadable: list[list[float]], fluency_margin: float,
            degenerate_max: float) -> Selection:
    """The readability gate's part of the result, and "no defensible choice" when nothing readable was chosen."""
    sel.unreadable, sel.fluency_margin, sel.degenerate_max = unreadable, fluency_margin, degenerate_max
    gate = (f"cells kept while their answers stay within {fluency_margin:g} nats/token of the unsteered answers' "
            f"fluency, with at most {degenerate_max:.0%} more of them degenerate")
    steered = int((table["coef"] != 0.0).sum())
    if sel.chosen_layer is None:
        sel.defensible = False
        why = (f"every steered cell ({steered}) reads as broken text" if steered and len(unreadable) >= steered
               else sel.reason)
        sel.reason = f"no defensible choice: {why} ({gate}; {len(unreadable)} of {steered} left out)"
    else:
        sel.reason += f"; {gate} ({len(unreadable)} of {steered} left out)"
    return sel


def _choose(table: pd.DataFrame, metric: str, scored: bool, coherence_min: float,
            suppress_coherence_min: float) -> Selection:
    col = "projection_mean" if metric == "projection_gap_units" else metric
    lo = "trait_effect_lo" if scored else "projection_effect_lo"
    effects: dict[int, float] = {}
    best: tuple[float, int, float] | None = None
    unmeasured: tuple[float, int, float] | None = None  # the largest readable increase not measurable: (effect,
    # layer, its interval's lower end)
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
        if lo in pos:  # an effect whose interval reaches zero is not one the grid can tell from no steering
            if unmeasured is None or effects[int(layer)] > unmeasured[0]:
                unmeasured = (effects[int(layer)], int(layer), float(top[lo]))
            pos = pos[pos[lo] > 0]
            if pos.empty:
                continue
            top = pos.loc[pos[col].idxmax()]
        effect = float(top[col]) - b
        if best is None or effect > best[0]:
            best = (effect, int(layer), float(top["coef"]))
    what = "trait score" if metric == "trait_mean" else "projection"
    skipped = ""
    if no_baseline:
        skipped += f"; skipped {_layers(no_baseline)}: the unsteered baseline has no {what}"
    if no_scores:
        skipped += f"; skipped {_layers(no_scores)}: no {what} at any coherent positive coefficient"
    if best is None and unmeasured is not None:
        return Selection(None, None, None, coherence_min, suppress_coherence_min, metric,
                         f"nothing measurably moves the {what}: the best readable cell (layer {unmeasured[1]}, "
                         f"{unmeasured[0]:+.2f}) has "
                         + ("a 95% interval that reaches 0" if math.isfinite(unmeasured[2]) else
                            "no 95% interval (too few questions to resample)") + skipped, effects)
    if best is None:
        sel = Selection(None, None, None, coherence_min, suppress_coherence_min, metric,
                        (f"no positive coefficient kept coherence >= {coherence_min} with a {what}" if scored else
                         f"no readable positive coefficient has a {what}") + skipped, effects)
        sel.skipped_baseline = bool(no_baseline)
        return sel
    layer = best[1]
    g = table[(table["layer"] == layer) & table[col].notna()]
    pos_ok = g[g["coef"] > 0]
    if scored:
        pos_ok = pos_ok[pos_ok["coherence_mean"] >= coherence_min]
    if lo in pos_ok:
        pos_ok = pos_ok[pos_ok[lo] > 0]
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
