"""Small statistics: AUROC, effect size, correlation, and seeded bootstrap intervals that resample clusters.

Intervals resample *questions* (clusters), not rows: the answers to one question share its topic and wording, so
resampling rows would treat them as independent and give intervals that are too narrow.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch

#: bootstrap resamples behind every interval personavec reports, and its level
N_BOOT = 1000
LEVEL = 0.95


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(a random pos score > a random neg score), ties counting half (Mann–Whitney U / (n_pos · n_neg))."""
    pos, neg = pos.double().flatten(), neg.double().flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (pos.numel() * neg.numel()))


def cohens_d(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Difference of means over the pooled standard deviation."""
    pos, neg = pos.double().flatten(), neg.double().flatten()
    if pos.numel() < 2 or neg.numel() < 2:
        return float("nan")
    pooled = (((pos.numel() - 1) * pos.var() + (neg.numel() - 1) * neg.var()) / (pos.numel() + neg.numel() - 2))
    return float((pos.mean() - neg.mean()) / pooled.sqrt().clamp(min=1e-12))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation over the pairs where both values are finite (NaN if fewer than 3)."""
    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return float("nan")
    t = torch.tensor(pairs, dtype=torch.float64)
    t = t - t.mean(0)
    denom = (t[:, 0].norm() * t[:, 1].norm()).item()
    return float((t[:, 0] @ t[:, 1]).item() / denom) if denom > 0 else float("nan")


def bootstrap(stat: Callable[[np.ndarray], float], clusters: Sequence[Hashable], n_boot: int = N_BOOT,
              level: float = LEVEL, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``stat(rows)`` over resamples of whole clusters with replacement.

    ``clusters[i]`` is row i's cluster (its question); each resample draws as many clusters as there are, with
    replacement, and passes ``stat`` the row indices of the drawn clusters (a cluster drawn twice appears twice).
    Resamples where ``stat`` is not finite are left out; ``(nan, nan)`` when fewer than half remain, or with fewer
    than two clusters. Seeded: the same call gives the same interval.
    """
    keys = list(dict.fromkeys(clusters))
    if len(keys) < 2:
        return (math.nan, math.nan)
    index = {k: i for i, k in enumerate(keys)}
    members: list[list[int]] = [[] for _ in keys]
    for row, c in enumerate(clusters):
        members[index[c]].append(row)
    rows_of = [np.asarray(m, dtype=np.int64) for m in members]
    rng = np.random.default_rng(seed)
    values = []
    for draw in rng.integers(0, len(keys), size=(n_boot, len(keys))):
        v = stat(np.concatenate([rows_of[k] for k in draw]))
        if math.isfinite(v):
            values.append(v)
    if len(values) < n_boot / 2:
        return (math.nan, math.nan)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(values, [tail, 100 - tail])
    return (float(lo), float(hi))


def mean_interval(values: Sequence[float], clusters: Sequence[Hashable], seed: int = 0, n_boot: int = N_BOOT
                  ) -> tuple[float, float]:
    """Bootstrap interval of the mean of the finite ``values``, resampling their clusters."""
    x = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(x)
    x, groups = x[keep], [c for c, k in zip(clusters, keep) if k]
    return bootstrap(lambda idx: float(x[idx].mean()) if len(idx) else math.nan, groups, n_boot=n_boot, seed=seed)


def pearson_interval(x: Sequence[float], y: Sequence[float], clusters: Sequence[Hashable], seed: int = 0
                     ) -> tuple[float, float]:
    """Bootstrap interval of :func:`pearson` over ``(x, y)`` pairs, resampling their clusters (questions)."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return bootstrap(lambda idx: pearson(a[idx].tolist(), b[idx].tolist()), list(clusters), seed=seed)


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (``successes`` of ``n``)."""
    if n <= 0:
        return (math.nan, math.nan)
    p = successes / n
    centre, half = p + z * z / (2 * n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


def finite_or_none(x: Any) -> float | None:
    """``x`` as a finite float, or None where it is missing, NaN or infinite (JSON has no such numbers)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None
