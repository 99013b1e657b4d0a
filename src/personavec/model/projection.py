"""Scalar projections of (prompt, answer) pairs on unit directions: one batched pass, any layers and poolings.

The one routine behind held-out separation, steering read-outs, the monitoring experiment, fine-tuning
evaluation and data screening: pairs are tokenized once (exact boundary), batched by length, the forward pass
stops after the highest layer needed, and each pooled activation is dotted with every direction requested
at its layer. An answer-average of an empty answer is NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from ..model.activations import encode_for, iter_pooled
from ..model.loading import LoadedModel

#: ``{name: {layer: unit direction [d]}}``
Units = Mapping[str, Mapping[int, torch.Tensor]]
Key = tuple[str, int, str]


def unit(v: torch.Tensor) -> torch.Tensor:
    v = v.float()
    return v / v.norm().clamp(min=1e-12)


@torch.no_grad()
def project_pairs(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str], units: Units,
                  poolings: Sequence[str] = ("response_avg",), batch_size: int = 16, max_length: int | None = None,
                  stop_early: bool = True, sort_by_length: bool = True,
                  progress: bool | str = False) -> tuple[dict[Key, list[float]], list[int]]:
    """``{(name, layer, pooling): [projection per pair]}`` and each pair's token count."""
    n = len(prompts)
    out: dict[Key, list[float]] = {(name, layer, pool): [math.nan] * n
                                   for name, per in units.items() for layer in per for pool in poolings}
    if n == 0:
        return out, []
    encs = encode_for(lm, list(prompts), list(answers), max_length)
    layers = sorted({layer for per in units.values() for layer in per})
    col = {layer: i for i, layer in enumerate(layers)}
    for idx, pooled in iter_pooled(lm, encs, layers, list(poolings), batch_size=batch_size, stop_early=stop_early,
                                   sort_by_length=sort_by_length, progress=progress):
        for pool in poolings:
            h = pooled[pool].cpu()
            for name, per in units.items():
                for layer, u in per.items():
                    vals = (h[:, col[layer]] @ u.float().cpu()).tolist()
                    dest = out[(name, layer, pool)]
                    for j, i in enumerate(idx):
                        if pool == "response_avg" and encs[i].n_response == 0:
                            continue
                        dest[i] = vals[j]
    return out, [len(e.ids) for e in encs]
