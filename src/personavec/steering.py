"""Adding a persona vector to the residual stream during generation (at every position)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from .internals import edit


@contextlib.contextmanager
def add_vector(model: Any, direction: torch.Tensor, layer: int, coef: float = 1.0) -> Iterator[None]:
    """While active, ``h ← h + coef · direction`` at ``layer`` (output of block ``layer − 1``), all positions."""
    m = getattr(model, "model", model)  # LoadedModel or a bare HF model
    param = next(m.parameters())
    delta = (float(coef) * direction.to(torch.float32)).to(device=param.device, dtype=param.dtype)

    def fn(hidden: torch.Tensor) -> torch.Tensor:
        return hidden + delta

    with edit(m, layer, fn):
        yield
