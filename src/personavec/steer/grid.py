"""Steered evaluation over a grid of layers × coefficients, and the automatic choice of layer and strength.

For each cell, the trait's evaluation questions are answered with no system prompt while ``coef · v`` is added
at the layer; answers are judged for the trait and coherence, and projected on v̂ (read by the *unsteered*
model, so the projection measures what was written, not the edit itself). Choice:

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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..engine.sampling import SamplingConfig, run_sampling
from ..judge.rubrics import coherence_prompt
from ..model.edits import Edit, steer
from ..model.loading import LoadedModel
from ..model.projection import column, project_pairs
from ..run.artifacts import TraitArtifacts
from ..vectors.vector import PersonaVector


@dataclass
class SteerGrid:
    layers: list[int]
    coefs: list[float]
    n_samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    positions: str = "response_and_last_prompt"  # what the official code steers during evaluation
    batch_size: int = 20
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_grid(n_layers: int, quick: bool = True) -> SteerGrid:
    """Four layers spread over the middle of the network; coefficients in units of the raw vector."""
    lo, hi = max(1, round(n_layers * 0.25)), max(1, round(n_layers * 0.75))
    layers = sorted({round(lo + i * (hi - lo) / 3) for i in range(4)})
    coefs = [-4.0, -2.0, 0.0, 2.0, 4.0] if quick else [-2.5, -1.5, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    return SteerGrid(layers=layers, coefs=coefs, n_samples=1 if quick else 10, max_new_tokens=64 if quick else 1000)


def cells(grid: SteerGrid) -> list[tuple[int, float]]:
    """(layer, coef) cells; coefficient 0 is one shared baseline (layer -1)."""
    out = [(-1, 0.0)] if 0.0 in grid.coefs else []
    out += [(layer, c) for layer in grid.layers for c in grid.coefs if c != 0.0]
    return out


def steered_answers(lm: LoadedModel, art: TraitArtifacts, vec: PersonaVector, grid: SteerGrid, out_dir: Path,
                    progress: bool = True) -> pd.DataFrame:
    """Answers to the evaluation questions for every cell; each cell resumable on its own JSONL file."""
    frames = []
    jobs = [{"question_id": q, "sample_id": s, "question": question, "prompt": lm.format_chat(question)}
            for q, question in enumerate(art.evaluation_questions) for s in range(grid.n_samples)]
    cfg = SamplingConfig(n_samples=grid.n_samples, temperature=grid.temperature, top_p=1.0,
                         max_new_tokens=grid.max_new_tokens, batch_size=grid.batch_size, seed=grid.seed)
    for layer, coef in cells(grid):
        path = out_dir / f"layer{layer}_coef{coef:+g}.jsonl"
        desc = f"steer L{layer} x{coef:+g}" if progress else False
        if layer < 0:
            rows = run_sampling(lm, jobs, cfg, path, progress=desc)
        else:
            with steer(lm, Edit(layer=layer, direction=vec.get(layer), coef=coef, positions=grid.positions)):
                rows = run_sampling(lm, jobs, cfg, path, progress=desc)
        df = pd.DataFrame(rows)
        df["layer"], df["coef"] = layer, coef
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def judge_rows(judge: Any | None, art: TraitArtifacts, df: pd.DataFrame, progress: bool = True,
               desc: str = "judging steered") -> pd.DataFrame:
    """``df`` (with ``question`` and ``answer``) plus the judge's ``trait`` and ``coherence`` (NaN where the
    judge gives no score, everywhere when there is no judge)."""
    if judge is None:
        return df.assign(trait=math.nan, coherence=math.nan)
    df = df.copy()
    trait = [art.judge_prompt(q, a) for q, a in zip(df["question"], df["answer"])]
    coh = [coherence_prompt(q, a) for q, a in zip(df["question"], df["answer"])]
    scores = judge.score(trait + coh, progress=desc if progress else False)
    n = len(trait)
    df["trait"] = [math.nan if s is None else s for s in scores[:n]]
    df["coherence"] = [math.nan if s is None else s for s in scores[n:]]
    return df


def project_rows(lm: LoadedModel, vec: PersonaVector, df: pd.DataFrame, batch_size: int = 16) -> pd.DataFrame:
    """Response-average projection of each answer on v̂ at its cell's layer (baseline rows: every grid layer)."""
    df = df.copy()
    answers = [a if a.strip() else "." for a in df["answer"]]
    layers = sorted({int(x) for x in df["layer"] if x >= 0})
    rows = vec.tensors["response_avg"]
    table = project_pairs(lm, df["prompt"].tolist(), answers, {"v": {layer: rows[layer] for layer in layers}},
                          batch_size=batch_size)
    for layer in layers:
        df[f"proj_L{layer}"] = column(table, len(df), "v", layer)
    return df


def summarize(df: pd.DataFrame, layers: Sequence[int]) -> pd.DataFrame:
    """One row per (layer, coef) with means; the shared baseline is repeated for every layer at coef 0."""
    rows = []
    base = df[df["layer"] < 0]
    for layer in layers:
        for coef, cell in [(0.0, base), *((c, g) for c, g in df[df["layer"] == layer].groupby("coef"))]:
            if len(cell) == 0:
                continue
            rows.append({"layer": int(layer), "coef": float(coef), "n": len(cell),
                         "trait_mean": float(cell["trait"].mean()), "coherence_mean": float(cell["coherence"].mean()),
                         "trait_missing": int(cell["trait"].isna().sum()),
                         "projection_mean": float(cell[f"proj_L{layer}"].mean())})
    return pd.DataFrame(rows).sort_values(["layer", "coef"]).reset_index(drop=True)


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
