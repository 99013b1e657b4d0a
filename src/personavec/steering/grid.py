"""Steered evaluation over a grid of layers × coefficients.

For each cell, the trait's evaluation questions are answered with no system prompt while ``coef · v`` is added
at the layer (sampled, and once more greedily); the run judges the answers for the trait and coherence,
:func:`project_rows` projects them on v̂ and :func:`read_quality` reads their fluency and repetition — both read
by the *unsteered* model, so they measure what was written, not the edit itself. :func:`summarize` makes the
table that :mod:`.selection` chooses the layer and strength from: per cell n, means and 95 % bootstrap intervals
(resampling questions), and each cell's effect over the unsteered answers to the same questions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..engine.sampling import SamplingConfig, job_seed, run_sampling
from ..model.edits import STEER_POSITIONS, Edit
from ..model.loading import LoadedModel
from ..model.projection import column, project_pairs
from ..stats import bootstrap, mean_interval
from ..vectors.vector import PersonaVector
from .quality import REPETITION_CEILING, answer_quality


@dataclass
class SteerGrid:
    layers: list[int]
    coefs: list[float]
    n_samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    positions: str = STEER_POSITIONS  # what the official code steers during evaluation, and every default here
    units: str = "norm"  # coefficients as multiples of the typical residual norm at the layer (comparable across
    # layers); "raw": multiples of the vector
    batch_size: int | None = None  # rows decoded together (None: the engine's default)
    seed: int = 0
    greedy: bool = True  # each cell also answers every question once greedily (what the report shows side by side)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_grid(n_layers: int, quick: bool = True, units: str = "norm") -> SteerGrid:
    """Four layers spread over the middle of the network; coefficients in ``units``: norm (× the typical residual
    norm at the layer: on the embedded model raw +2 at layer 13, the readable setting a blind read found, is +0.11),
    or raw (× the vector: −4…4, the paper's range −2.5…2.5 for the full grid)."""
    lo, hi = max(1, round(n_layers * 0.25)), max(1, round(n_layers * 0.75))
    layers = sorted({round(lo + i * (hi - lo) / 3) for i in range(4)})
    if units == "raw":
        coefs = [-4.0, -2.0, 0.0, 2.0, 4.0] if quick else [-2.5, -1.5, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    else:
        coefs = [-0.2, -0.1, 0.0, 0.1, 0.2] if quick else [-0.25, -0.15, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2, 0.25]
    return SteerGrid(layers=layers, coefs=coefs, n_samples=1 if quick else 10, max_new_tokens=64 if quick else 1000,
                     units=units)


def grid_edit(vec: PersonaVector, grid: SteerGrid, layer: int, coef: float) -> Edit:
    """The edit of the grid's cell (layer, coef), its coefficient read in the grid's units."""
    return Edit.from_vector(vec, layer, coef, units=grid.units, positions=grid.positions)


def cells(grid: SteerGrid) -> list[tuple[int, float]]:
    """(layer, coef) cells; coefficient 0 is one shared baseline (layer -1)."""
    out = [(-1, 0.0)] if 0.0 in grid.coefs else []
    out += [(layer, c) for layer in grid.layers for c in grid.coefs if c != 0.0]
    return out


def steered_answers(lm: LoadedModel, questions: Sequence[str], vec: PersonaVector, grid: SteerGrid, out_dir: Path,
                    progress: bool = True, sampler: Any = None) -> pd.DataFrame:
    """Answers to ``questions`` (no system prompt) for every cell, as ONE stream of requests each with its own
    edit (``out_dir/answers.jsonl``, resumable). A question's k-th sample has the same seed in every cell, so cells
    differ by their steering, not by their luck. ``sampler``: an endpoint that applies each request's edits (a
    vLLM server with personavec's plugin: :meth:`~personavec.engine.remote.EndpointSampler.with_edits`); by
    default the local engine."""
    cfg = SamplingConfig(n_samples=grid.n_samples, temperature=grid.temperature, top_p=1.0,
                         max_new_tokens=grid.max_new_tokens, batch_size=grid.batch_size, seed=grid.seed)
    per_cell = [(q, s, question) for q, question in enumerate(questions) for s in range(grid.n_samples)]
    prompts = [lm.format_chat(question) for question in questions]
    jobs = [{"layer": layer, "coef": coef, "question_id": q, "sample_id": s, "question": question,
             "prompt": prompts[q], "seed": job_seed(grid.seed, k)}
            for layer, coef in cells(grid) for k, (q, s, question) in enumerate(per_cell)]
    if grid.greedy:  # after the sampled jobs, so a log written without them resumes as it was
        jobs += [{"layer": layer, "coef": coef, "question_id": q, "sample_id": -1, "question": question,
                  "prompt": prompts[q], "seed": 0, "temperature": 0.0}
                 for layer, coef in cells(grid) for q, question in enumerate(questions)]
    def edits(job: dict[str, Any]) -> list[Edit]:
        if job["layer"] < 0:
            return []
        return [grid_edit(vec, grid, job["layer"], job["coef"])]

    rows = run_sampling(lm, jobs, cfg, out_dir / "answers.jsonl", progress="steering grid" if progress else False,
                        edits=edits, sampler=sampler)
    return pd.DataFrame(rows)


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


def read_quality(lm: LoadedModel, df: pd.DataFrame, batch_size: int = 16,
                 ceiling: float = REPETITION_CEILING) -> pd.DataFrame:
    """Adds ``fluency`` (mean NLL per answer token under ``lm``, unsteered), ``repetition`` (share of repeated
    token 3-grams), ``flags`` (``empty``, ``repetitive``; comma-separated) and ``degenerate`` (any flag)."""
    df = df.copy()
    q = answer_quality(lm, df["prompt"].tolist(), df["answer"].tolist(), batch_size=batch_size, ceiling=ceiling)
    df["fluency"] = [x.fluency for x in q]
    df["repetition"] = [x.repetition for x in q]
    df["flags"] = [",".join(x.flags) for x in q]
    df["degenerate"] = [x.degenerate for x in q]
    return df


#: the per-answer columns :func:`summarize` reports per cell as mean, interval and n
MEASURES = {"trait": "trait", "coherence": "coherence", "fluency": "fluency", "repetition": "repetition"}


def summarize(df: pd.DataFrame, layers: Sequence[int], seed: int = 0) -> pd.DataFrame:
    """One row per (layer, coef): n, the sampled answers' means with 95 % bootstrap intervals (``*_lo``/``*_hi``,
    resampling questions), the share of degenerate answers (sampled and greedy), and the cell's effect on the trait
    score and on the projection over the unsteered answers to the same questions (``*_effect`` with its interval).
    The shared baseline is repeated for every layer at coef 0."""
    greedy = df["sample_id"] < 0 if "sample_id" in df else pd.Series(False, index=df.index)
    sampled, base = df[~greedy], df[~greedy & (df["layer"] < 0)]
    rows = []
    for layer in layers:
        proj = f"proj_L{layer}"
        cells_ = [(0.0, base), *((c, g) for c, g in sampled[sampled["layer"] == layer].groupby("coef"))]
        for coef, cell in cells_:
            if len(cell) == 0:
                continue
            row: dict[str, Any] = {"layer": int(layer), "coef": float(coef), "n": len(cell),
                                   "n_questions": int(cell["question_id"].nunique())}
            for name, col in {**MEASURES, "projection": proj}.items():
                if col not in cell:
                    continue
                row.update(_mean_and_interval(cell[col], cell["question_id"], name, seed))
            row["trait_missing"] = int(cell["trait"].isna().sum())
            everything = df[(df["layer"] == (-1 if coef == 0.0 else layer)) & (df["coef"] == coef)]
            if "degenerate" in everything:
                row["degenerate_share"] = float(everything["degenerate"].mean())
                row["n_greedy"] = int((everything["sample_id"] < 0).sum()) if "sample_id" in everything else 0
            for name, col in (("trait", "trait"), ("projection", proj)):
                if col in cell:
                    row.update(_effect(cell, base, col, name, seed))
            rows.append(row)
    return pd.DataFrame(rows).sort_values(["layer", "coef"]).reset_index(drop=True)


def _mean_and_interval(values: pd.Series, questions: pd.Series, name: str, seed: int) -> dict[str, float]:
    x = pd.to_numeric(values, errors="coerce").astype(float)
    lo, hi = mean_interval(x.to_numpy(), questions.to_numpy(), seed=seed)
    return {f"{name}_mean": float(x.mean()), f"{name}_lo": lo, f"{name}_hi": hi, f"{name}_n": int(x.notna().sum())}


def _effect(cell: pd.DataFrame, base: pd.DataFrame, col: str, name: str, seed: int) -> dict[str, float]:
    """Mean over questions of (the cell's mean on a question − the baseline's on it), with a bootstrap interval
    over questions: the cells share the baseline's seeds, so the pairing removes each question's own level."""
    a = pd.to_numeric(cell[col], errors="coerce").groupby(cell["question_id"]).mean()
    b = pd.to_numeric(base[col], errors="coerce").groupby(base["question_id"]).mean()
    d = (a - b).dropna()
    if d.empty:
        return {f"{name}_effect": float("nan"), f"{name}_effect_lo": float("nan"),
                f"{name}_effect_hi": float("nan")}
    x = d.to_numpy()
    lo, hi = bootstrap(lambda idx: float(x[idx].mean()), list(range(len(x))), seed=seed)
    return {f"{name}_effect": float(np.mean(x)), f"{name}_effect_lo": lo, f"{name}_effect_hi": hi}
