"""Small statistics on projections: AUROC and effect size (pure functions on tensors)."""

from __future__ import annotations

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
