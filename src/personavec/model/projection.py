"""Scalar projections of (prompt, answer) pairs on directions: one batched pass, any layers and poolings.

The one routine behind held-out separation, steering read-outs, the monitoring experiment, fine-tuning
evaluation, data screening and the ``project`` command: pairs are tokenized once (exact boundary), batched by
length, the forward pass stops after the highest layer needed, and each pooled activation ``h`` is read along
every direction ``v`` requested at its layer as the scalar projection ``h·v/‖v‖`` and the cosine
``h·v/(‖h‖‖v‖)``. The result is a tidy table, one row per (pair, direction, layer, pooling). An answer-average
of an empty answer is NaN.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from .activations import encode_for, iter_pooled
from .loading import LoadedModel

#: ``{name: {layer: direction [d]}}`` (any norm: projections are on the unit direction)
Directions = Mapping[str, Mapping[int, torch.Tensor]]
COLUMNS = ("row", "name", "layer", "pooling", "projection", "cosine")


def unit(v: torch.Tensor) -> torch.Tensor:
    v = v.float()
    return v / v.norm().clamp(min=1e-12)


@torch.no_grad()
def project_pairs(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], directions: Directions,
                  poolings: Sequence[str] = ("response_avg",), batch_size: int = 16, max_length: int | None = None,
                  stop_early: bool = True, sort_by_length: bool = True, progress: bool | str = False) -> pd.DataFrame:
    """The tidy projection table: columns ``row`` (index into the pairs), ``name``, ``layer``, ``pooling``,
    ``projection``, ``cosine``; ``table.attrs["n_tokens"]`` holds each pair's token count."""
    n = len(prompts)
    units = {(name, layer): unit(v).cpu() for name, per in directions.items() for layer, v in per.items()}
    parts: dict[str, list[np.ndarray]] = {c: [] for c in COLUMNS}
    if n == 0:
        return _frame(parts, [])
    encs = encode_for(lm, list(prompts), list(answers), max_length)
    layers = sorted({layer for _, layer in units})
    col = {layer: i for i, layer in enumerate(layers)}
    for idx, pooled in iter_pooled(lm, encs, layers, list(poolings), batch_size=batch_size, stop_early=stop_early,
                                   sort_by_length=sort_by_length, progress=progress):
        rows = np.asarray(idx)
        empty = np.array([encs[i].n_response == 0 for i in idx])
        for pool in poolings:
            h = pooled[pool].cpu()  # [B, layers, d]
            norms = h.norm(dim=-1)  # [B, layers]
            for (name, layer), u in units.items():
                proj = (h[:, col[layer]] @ u).numpy().astype(np.float64)
                cos = proj / norms[:, col[layer]].clamp(min=1e-12).numpy()
                if pool == "response_avg":
                    proj[empty], cos[empty] = np.nan, np.nan
                parts["row"].append(rows)
                parts["name"].append(np.full(len(rows), name, dtype=object))
                parts["layer"].append(np.full(len(rows), layer))
                parts["pooling"].append(np.full(len(rows), pool, dtype=object))
                parts["projection"].append(proj)
                parts["cosine"].append(cos)
    return _frame(parts, [len(e.ids) for e in encs])


def _frame(parts: dict[str, list[np.ndarray]], n_tokens: list[int]) -> pd.DataFrame:
    table = pd.DataFrame({c: np.concatenate(v) if v else [] for c, v in parts.items()}, columns=list(COLUMNS))
    table = table.sort_values(["row", "name", "layer", "pooling"], kind="stable").reset_index(drop=True)
    table.attrs["n_tokens"] = n_tokens
    return table


def column(table: pd.DataFrame, n: int, name: str, layer: int, pooling: str = "response_avg",
           value: str = "projection") -> list[float]:
    """The values of one (name, layer, pooling) for pairs ``0..n-1`` in order."""
    sel = table[(table["name"] == name) & (table["layer"] == layer) & (table["pooling"] == pooling)]
    out = np.full(n, np.nan)
    out[sel["row"].to_numpy(dtype=int)] = sel[value].to_numpy(dtype=float)
    return out.tolist()
