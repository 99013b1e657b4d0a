"""Edits of the residual stream during generation: add α·v, or ablate the direction v̂, at chosen positions.

Usable around any ``generate`` or forward call, batched (left padding) and KV-cache correct::

    with steer(lm, Edit(layer=12, direction=v, coef=2.0, positions="response")):
        lm.model.generate(...)

Positions are sequence *columns* of the running generation. The prompt is what the first forward pass of a
sequence (the prefill, with an empty KV cache) processes; with left padding every row's prompt ends at the
same column, so the split is exact for the whole batch:

* ``all``      — every position of every forward pass;
* ``prompt``   — the prompt columns only (the prefill); generated tokens are not edited;
* ``response`` — generated tokens only: the columns after the prompt. The first answer token is predicted
  from the last prompt position, which is *not* edited, so steering acts from the second answer token on.
  The official persona_vectors code instead edits "the newest position of every forward pass", i.e. the last
  prompt token at prefill and every generated token after; that is ``response_and_last_prompt`` here.

An edit at layer ℓ acts on the output of block ℓ − 1 (see :mod:`personavec.model.layers`). Several edits may be
active at once (they compose in order); all hooks are removed on exit, including on exceptions.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PersonavecError
from ..model.layers import backbone, decoder_layers, edit

POSITIONS = ("all", "prompt", "response", "response_and_last_prompt")
KINDS = ("add", "ablate", "cap")


@dataclass(frozen=True)
class Edit:
    """One edit of the residual stream at ``layer``, at ``positions``:

    * ``add``: ``h + coef·direction``;
    * ``ablate``: ``h − (h·v̂) v̂`` (``coef`` ignored);
    * ``cap``: where the projection ``h·v̂`` exceeds ``coef``, it is clamped to ``coef`` (the component along v̂ is
      reduced, nothing else changes) — activation capping.
    """

    layer: int
    direction: torch.Tensor
    coef: float = 1.0
    kind: str = "add"
    positions: str = "all"

    @classmethod
    def from_vector(cls, vec: Any, layer: int | None = None, coef: float = 1.0, units: str = "raw",
                    kind: str = "add", positions: str = "all", pooling: str | None = None) -> Edit:
        """An edit from a PersonaVector. ``units="raw"``: add ``coef · v``; ``units="norm"``: add a vector along
        v̂ whose length is ``coef`` × the typical residual norm at that layer (mean over answer tokens, measured at
        extraction and stored in the vector's metadata as ``resid_norm``)."""
        layer = vec.chosen_layer if layer is None else layer
        v = vec.get(layer, pooling)
        if units == "norm":
            norms = vec.extra.get("resid_norm")
            if not norms:
                raise PersonavecError("this vector has no resid_norm metadata (extract it with personavec >= 0.1 "
                                      "or use --units raw)")
            coef = coef * float(norms[layer]) / float(v.norm().clamp(min=1e-12))
        elif units != "raw":
            raise PersonavecError(f"units must be 'raw' or 'norm', not {units!r}")
        return cls(layer=layer, direction=v, coef=coef, kind=kind, positions=positions)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PersonavecError(f"edit kind must be one of {KINDS}, not {self.kind!r}")
        if self.positions not in POSITIONS:
            raise PersonavecError(f"positions must be one of {', '.join(POSITIONS)}, not {self.positions!r}")
        if self.direction.ndim != 1:
            raise PersonavecError(f"a steering direction is one [d] row, got shape {tuple(self.direction.shape)}")
        if not math.isfinite(self.coef):
            raise PersonavecError(f"an edit's coefficient must be a finite number, not {self.coef}")


class _Tracker:
    """Knows, for the forward pass under way, which sequence columns it covers and where the prompt ends."""

    def __init__(self, prompt_len: int | None = None) -> None:
        self.fixed_prompt_len = prompt_len
        self.prompt_len = 0
        self.offset = 0

    def pre_hook(self, _mod: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        emb = kwargs.get("inputs_embeds")
        t = int(ids.shape[1]) if ids is not None else int(emb.shape[1])
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        self.offset = past
        if past == 0:
            self.prompt_len = self.fixed_prompt_len if self.fixed_prompt_len is not None else t

    def mask(self, positions: str, t: int, device: torch.device) -> torch.Tensor | None:
        """``[t]`` bool mask of the columns to edit in the current pass (None: all of them)."""
        if positions == "all":
            return None
        cols = torch.arange(self.offset, self.offset + t, device=device)
        if positions == "prompt":
            return cols < self.prompt_len
        if positions == "response":
            return cols >= self.prompt_len
        return cols >= self.prompt_len - 1  # response_and_last_prompt


def edit_delta(h: torch.Tensor, kind: str, directions: torch.Tensor, coefs: torch.Tensor) -> torch.Tensor:
    """What one edit per row adds to ``h`` ``[n, t, d]``: ``directions`` ``[n, d]`` (float32) and ``coefs`` ``[n]``.

    The one formula behind :func:`steer` (one edit for every row) and the engine (each request its own edit).
    """
    if kind == "add":
        return (coefs[:, None] * directions).to(h.dtype)[:, None, :].expand_as(h)
    u = directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # [n, d]
    proj = torch.einsum("ntd,nd->nt", h.float(), u)  # [n, t]
    if kind == "cap":
        proj = (proj - coefs[:, None]).clamp(min=0.0)  # only the excess above the cap is removed
    return -(proj[..., None] * u[:, None, :]).to(h.dtype)


def _apply(h: torch.Tensor, e: Edit, mask: torch.Tensor | None) -> torch.Tensor:
    n = h.shape[0]
    v = e.direction.to(device=h.device, dtype=torch.float32).expand(n, -1)
    delta = edit_delta(h, e.kind, v, torch.full((n,), float(e.coef), device=h.device))
    if mask is not None:
        delta = delta * mask.to(h.dtype)[None, :, None]
    return h + delta


@contextlib.contextmanager
def steer(model: Any, edits: Edit | Sequence[Edit], prompt_len: int | None = None) -> Iterator[None]:
    """Apply edits while the context is active (``model``: a LoadedModel or a HF causal LM).

    ``prompt_len`` overrides the prompt/response split (in columns) — for teacher-forced passes over a prompt
    and its answer in one forward; by default the prefill of each generation is the prompt.
    """
    m = getattr(model, "model", model)
    edits = [edits] if isinstance(edits, Edit) else list(edits)
    n = len(decoder_layers(m))
    d = next(iter(e.direction.numel() for e in edits)) if edits else 0
    for e in edits:
        if not 0 <= e.layer <= n:
            raise PersonavecError(f"steering layer {e.layer} out of range 0..{n}")
        if e.direction.numel() != d:
            raise PersonavecError("all edits must use directions of the same hidden size")
    tracker = _Tracker(prompt_len)
    with contextlib.ExitStack() as stack:
        handle = backbone(m).register_forward_pre_hook(tracker.pre_hook, with_kwargs=True)
        stack.callback(handle.remove)
        for e in edits:
            def fn(h: torch.Tensor, e: Edit = e) -> torch.Tensor:
                return _apply(h, e, tracker.mask(e.positions, h.shape[1], h.device))
            stack.enter_context(edit(m, e.layer, fn))
        yield


@contextlib.contextmanager
def add_vector(model: Any, direction: torch.Tensor, layer: int, coef: float = 1.0,
               positions: str = "all") -> Iterator[None]:
    """While active, ``h ← h + coef · direction`` at ``layer`` (output of block ``layer − 1``)."""
    with steer(model, Edit(layer=layer, direction=direction, coef=coef, positions=positions)):
        yield


@contextlib.contextmanager
def ablate(model: Any, direction: torch.Tensor, layers: int | Sequence[int], positions: str = "all") -> Iterator[None]:
    """While active, remove the component along ``direction`` at each of ``layers``."""
    layers = [layers] if isinstance(layers, int) else list(layers)
    with steer(model, [Edit(layer=x, direction=direction, kind="ablate", positions=positions) for x in layers]):
        yield
