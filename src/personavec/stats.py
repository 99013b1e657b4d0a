"""Small statistics on projections: AUROC and effect size (pure functions on tensors)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


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
