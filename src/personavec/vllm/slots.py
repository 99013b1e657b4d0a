"""Per-request edits and reads of one decoder layer of a vLLM model, over persistent buffers (torch only).

vLLM runs the requests of a step as one flattened batch of tokens ``[T, d]``. A :class:`Slots` module sits on
the residual stream at one layer and applies, to every token, ``slots`` rounds of one formula; each round is what
one edit of :mod:`personavec.model.edits` does, or an ``add`` followed by a projection edit::

    x ← x + a·rows[i]                            (add: a = coef; i = 0, the zero row, where the token has none)
    p = x·units[j];  q = p − clamp(p, lo, hi)    (ablate: lo = hi = 0; cap c: lo = −inf, hi = c)
    x ← x − q·units[j]                           (j = 0 where the token has no projection edit: nothing moves)

``rows`` are the served vectors' directions at the layer (row 0 zero) and ``units`` their unit vectors, fixed at
load; ``i``, ``a``, ``j``, ``lo``, ``hi`` are written per token before each forward (:class:`SlotsPlan`). The
forward is the same tensor maths whatever the requests ask — no branch, no data-dependent shape — so it holds under
``torch.compile`` (traced once) and CUDA-graph replay (fixed buffer addresses). Reads: the projection of the
residual on ``units[k]`` as it arrives at the layer (``before`` the request's edits there) or after them,
written to ``readings`` for the host to collect.

In float32 each round is bit for bit what :func:`personavec.model.edits.edit_delta` adds (the projection's sum is
taken in another order, so it may differ in the last bit).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..model.edits import in_positions

#: the slot fields a plan writes per token, with what a token that has no edit there holds
_IDLE = {"add_row": 0, "add_coef": 0.0, "proj_row": 0, "lo": -np.inf, "hi": np.inf}


class Slots(nn.Module):
    """Edits and reads at one layer over buffers for up to ``max_tokens`` tokens a step.

    ``rows``: ``[R, d]`` float32 directions, row 0 zero (what a token without an edit adds and projects on)."""

    def __init__(self, rows: torch.Tensor, slots: int, reads: int, max_tokens: int) -> None:
        super().__init__()
        if rows.ndim != 2 or rows.shape[0] < 1 or bool(rows[0].any()):
            raise ValueError("rows must be [R, d] with row 0 zero")
        rows = rows.float()
        units = rows / rows.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        self.n_slots, self.n_reads, self.max_tokens = slots, reads, max_tokens
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("units", units, persistent=False)
        for name, idle in _IDLE.items():
            dtype = torch.long if isinstance(idle, int) else torch.float32
            self.register_buffer(name, torch.full((slots, max_tokens), idle, dtype=dtype), persistent=False)
        self.register_buffer("read_before", torch.zeros(reads, max_tokens, dtype=torch.long), persistent=False)
        self.register_buffer("read_after", torch.zeros(reads, max_tokens, dtype=torch.long), persistent=False)
        self.register_buffer("readings", torch.zeros(reads, max_tokens), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the step's columns of every buffer, gathered (not sliced: a slice of a fixed-size buffer by the token
        # count makes torch.compile specialise that count)
        cols = torch.arange(x.shape[0], device=x.device)
        add_row, add_coef, proj_row, lo, hi = (getattr(self, name).index_select(1, cols) for name in _IDLE)
        before = self._read(x, self.read_before.index_select(1, cols))
        for s in range(self.n_slots):
            add = add_coef[s, :, None] * self.rows.index_select(0, add_row[s])
            x = x + add.to(x.dtype)
            u = self.units.index_select(0, proj_row[s])
            p = (x.float() * u).sum(-1)
            q = p - torch.clamp(p, lo[s], hi[s])
            x = x + (-(q[:, None] * u)).to(x.dtype)
        self.readings.index_copy_(1, cols, before + self._read(x, self.read_after.index_select(1, cols)))
        return x

    def _read(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """``[reads, t]``: each token's projection on ``units[rows[r, token]]`` (0 where the row is 0)."""
        return torch.stack([(x.float() * self.units.index_select(0, rows[r])).sum(-1) for r in range(self.n_reads)])


class SlotsPlan:
    """The host-side copy of one :class:`Slots`' per-token fields for the step being planned: NumPy arrays written
    per request, then copied to the module's buffers in one go (:meth:`commit`), only over the tokens that changed.
    """

    def __init__(self, module: Slots) -> None:
        self.module = module
        n = module.max_tokens
        self.fields = {name: np.full((module.n_slots, n), idle, dtype=np.int64 if isinstance(idle, int)
                                     else np.float32) for name, idle in _IDLE.items()}
        self.reads = {"read_before": np.zeros((module.n_reads, n), np.int64),
                      "read_after": np.zeros((module.n_reads, n), np.int64)}
        self.written = 0  # tokens [0, written) of the buffers may hold a previous step's values
        self.high = 0  # tokens [0, high) are written this step

    def clear(self) -> None:
        """Begin a step: every token idle."""
        for name, array in self.fields.items():
            array[:, : self.written] = _IDLE[name]
        for array in self.reads.values():
            array[:, : self.written] = 0
        self.high = 0

    def add(self, slot: int, tokens: slice, mask: np.ndarray, row: int, coef: float) -> None:
        self.fields["add_row"][slot, tokens][mask] = row
        self.fields["add_coef"][slot, tokens][mask] = coef
        self.high = max(self.high, tokens.stop)

    def project(self, slot: int, tokens: slice, mask: np.ndarray, row: int, lo: float, hi: float) -> None:
        self.fields["proj_row"][slot, tokens][mask] = row
        self.fields["lo"][slot, tokens][mask] = lo
        self.fields["hi"][slot, tokens][mask] = hi
        self.high = max(self.high, tokens.stop)

    def read(self, slot: int, token: int, row: int, where: str) -> None:
        self.reads["read_before" if where == "before" else "read_after"][slot, token] = row
        self.high = max(self.high, token + 1)

    def commit(self) -> None:
        """Copy the step's fields to the module (over the tokens written now or at the last step)."""
        n = max(self.high, self.written)
        if n:
            with torch.no_grad():
                for name, array in (*self.fields.items(), *self.reads.items()):
                    getattr(self.module, name)[:, :n].copy_(torch.from_numpy(array[:, :n]), non_blocking=True)
        self.written = self.high

    def readings(self, n_tokens: int) -> np.ndarray:
        """``[reads, n_tokens]`` of the last forward (call after it ran)."""
        return self.module.readings[:, :n_tokens].float().cpu().numpy()


def position_mask(positions: str, pos: np.ndarray, prompt_len: int) -> np.ndarray:
    """Which of a request's token positions ``pos`` (0-based in its sequence) an edit at ``positions`` acts on,
    for a prompt of ``prompt_len`` tokens — the columns :mod:`personavec.model.edits` means (its rule)."""
    return np.asarray(in_positions(positions, pos, prompt_len), dtype=bool)
