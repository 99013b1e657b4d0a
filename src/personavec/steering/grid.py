"""Steered evaluation over a grid of layers × coefficients.

For each cell, the trait's evaluation questions are answered with no system prompt while ``coef · v`` is added
at the layer; the run judges the answers for the trait and coherence, and :func:`project_rows` projects them on
v̂ (read by the *unsteered* model, so the projection measures what was written, not the edit itself).
:func:`summarize` makes the table that :mod:`.selection` chooses the layer and strength from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..engine.sampling import SamplingConfig, job_seed, run_sampling
from ..model.edits import Edit
from ..model.loading import LoadedModel
from ..model.projection import column, project_pairs
from ..vectors.vector import PersonaVector


@dataclass
class SteerGrid:
    layers: list[int]
    coefs: list[float]
    n_samples: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    positions: str = "response_and_last_prompt"  # what the official code steers during evaluation
    batch_size: int | None = None  # rows decoded together (None: the engine's default)
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


def steered_answers(lm: LoadedModel, questions: Sequence[str], vec: PersonaVector, grid: SteerGrid, out_dir: Path,
                    progress: bool = True) -> pd.DataFrame:
    """Answers to ``questions`` (no system prompt) for every cell, as ONE stream of requests each with its own
    edit (``out_dir/answers.jsonl``, resumable). A question's k-th sample has the same seed in every cell, so cells
    differ by their steering, not by their luck."""
    cfg = SamplingConfig(n_samples=grid.n_samples, temperature=grid.temperature, top_p=1.0,
                         max_new_tokens=grid.max_new_tokens, batch_size=grid.batch_size, seed=grid.seed)
    per_cell = [(q, s, question) for q, question in enumerate(questions) for s in range(grid.n_samples)]
    jobs = [{"layer": layer, "coef": coef, "question_id": q, "sample_id": s, "question": question,
             "prompt": lm.format_chat(question), "seed": job_seed(grid.seed, k)}
            for layer, coef in cells(grid) for k, (q, s, question) in enumerate(per_cell)]
    directions = {layer: vec.get(layer) for layer in grid.layers}

    def edits(job: dict[str, Any]) -> list[Edit]:
        if job["layer"] < 0:
            return []
        return [Edit(layer=job["layer"], direction=directions[job["layer"]], coef=job["coef"],
                     positions=grid.positions)]

    rows = run_sampling(lm, jobs, cfg, out_dir / "answers.jsonl", progress="steering grid" if progress else False,
                        edits=edits)
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
