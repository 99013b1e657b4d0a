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

**Defaults.** Steering an answer defaults to ``response_and_last_prompt`` (:data:`STEER_POSITIONS`) everywhere:
the steering grid selects its layer and coefficient with it, and ``Edit.from_vector``, ``personavec steer`` /
``chat`` and the server's ``persona.steer`` use it unless told otherwise, so a vector's chosen coefficient means the
same thing wherever it is used. A plain ``Edit(...)`` acts on ``all`` positions: what a training-time edit
(preventative steering, CAFT) or an edit of one teacher-forced forward pass needs.

An edit at layer ℓ acts on the output of block ℓ − 1 (see :mod:`personavec.model.layers`). Several edits may be
active at once (they compose in order); all hooks are removed on exit, including on exceptions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import PersonavecError, finite, shown, whole
from ..model.layers import backbone, decoder_layers, edit, hidden_size

POSITIONS = ("all", "prompt", "response", "response_and_last_prompt")
KINDS = ("add", "ablate", "cap")
#: where steering an answer acts unless told otherwise (the grid selects with it; see the module docstring)
STEER_POSITIONS = "response_and_last_prompt"
UNITS = ("raw", "norm")


def chosen_setting(vec: Any) -> tuple[int | None, float | None, str]:
    """(layer, coefficient, units) the vector's run chose, where it made a defensible choice; the coefficient is in
    the units of its grid (``raw`` for vectors chosen before grids had units)."""
    sel = getattr(vec, "extra", {}).get("selection") or {}
    units = (sel.get("grid") or {}).get("units", "raw")
    coef = sel.get("chosen_coef")
    return vec.chosen_layer, (float(coef) if coef is not None else None), units if units in UNITS else "raw"


def no_choice_note(vec: Any) -> str:
    """Why a vector has no chosen setting, for a refusal that asks for one: its run's "no defensible choice" (the
    steering grid found no readable cell that moves the trait measurably), or nothing to add."""
    sel = getattr(vec, "extra", {}).get("selection") or {}
    if sel.get("defensible") is False:
        return " (its run found no defensible steering setting: no readable grid cell moved the trait measurably)"
    return ""


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
    def from_vector(cls, vec: Any, layer: int | None = None, coef: float | None = None, units: str | None = None,
                    kind: str = "add", positions: str = STEER_POSITIONS, pooling: str | None = None) -> Edit:
        """An edit from a PersonaVector. ``units="raw"``: add ``coef · v``; ``units="norm"``: add a vector along
        v̂ whose length is ``coef`` × the typical residual norm at that layer (mean over answer tokens, measured at
        extraction and stored in the vector's metadata as ``resid_norm``).

        Left out, ``layer`` and ``coef`` are the vector's chosen setting (:func:`chosen_setting`), the coefficient
        then in the chosen setting's units (1, raw, for a vector without one); a coefficient given without
        ``units`` is in raw units."""
        if layer is not None:
            whole(layer, "layer", low=0)
        chosen_layer, chosen_coef, chosen_units = chosen_setting(vec)
        if coef is None and kind == "add" and chosen_coef is not None:
            if units is not None and units != chosen_units:
                raise PersonavecError(f"the vector's chosen coefficient {chosen_coef:g} is in {chosen_units} units, "
                                      f"not {shown(units)}; pass coef too, or leave units out")
            coef, units = chosen_coef, chosen_units
        units = "raw" if units is None else units
        if units not in UNITS:
            raise PersonavecError(f"units must be raw or norm, not {shown(units)}")
        coef = finite(1.0 if coef is None else coef, "coef")
        if layer is None and chosen_layer is None:
            raise PersonavecError(f"the {getattr(vec, 'trait', '')} vector has no chosen layer{no_choice_note(vec)}; "
                                  "pass layer")
        layer = chosen_layer if layer is None else layer
        # a zero row (layer 0, a layer not extracted) is refused naming the vector's non-zero layers; adding it
        # with coefficient 0 is a legitimate baseline
        v = vec.get(layer, pooling) if kind == "add" and coef == 0 else vec.direction(layer, pooling)
        if units == "norm":
            norms = vec.extra.get("resid_norm")
            if not norms:
                raise PersonavecError("this vector has no resid_norm metadata (extract it with personavec >= 0.1 "
                                      "or use --units raw)")
            coef = coef * float(norms[layer]) / float(v.norm().clamp(min=1e-12))
        return cls(layer=layer, direction=v, coef=coef, kind=kind, positions=positions)

    def __post_init__(self) -> None:
        """Every field checked here, so a bad edit is refused where it is written, not in a hook mid-generation.
        ``direction`` may be a list or NumPy array of numbers (converted to a float32 tensor)."""
        layer = whole(self.layer, "Edit layer", low=0)
        coef = finite(self.coef, "Edit coef")
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise PersonavecError(f"Edit kind must be one of {', '.join(KINDS)}, not {shown(self.kind)}")
        if not isinstance(self.positions, str) or self.positions not in POSITIONS:
            raise PersonavecError(f"Edit positions must be one of {', '.join(POSITIONS)}, not {shown(self.positions)}")
        direction = as_direction(self.direction, "Edit direction", layer)
        if (self.kind != "add" or coef != 0) and not bool(direction.any()):
            raise PersonavecError(f"Edit direction at layer {layer} is zero: {self.kind} along it would change "
                                  "nothing; use a layer where the vector is non-zero")
        object.__setattr__(self, "layer", layer)
        object.__setattr__(self, "coef", coef)
        object.__setattr__(self, "direction", direction)


def as_direction(direction: Any, what: str, layer: int) -> torch.Tensor:
    """``direction`` as a 1-D tensor of finite real numbers (a list or NumPy array is converted to float32), or one
    clear line naming ``what`` and ``layer`` (Edit and LiveMonitor take their directions through it)."""
    given = direction
    if not isinstance(direction, torch.Tensor):
        try:
            direction = torch.as_tensor(direction, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            hint = "; take one layer's row with vec.get(layer)" if type(given).__name__ == "PersonaVector" else ""
            raise PersonavecError(f"{what} must be a 1-D torch tensor (or a list or NumPy array of numbers), not "
                                  f"{shown(given)}{hint}") from None
    if direction.ndim != 1 or direction.numel() == 0 or direction.is_complex() or direction.dtype == torch.bool:
        raise PersonavecError(f"{what} must be one non-empty row of [hidden_size] real numbers, not "
                              f"{shown(direction)} of {str(direction.dtype).replace('torch.', '')}")
    if not bool(torch.isfinite(direction).all()):
        raise PersonavecError(f"{what} at layer {layer} holds NaN or infinite values; it has no direction to steer "
                              "or read along: extract the vector again")
    return direction


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
        return in_positions(positions, torch.arange(self.offset, self.offset + t, device=device), self.prompt_len)


def in_positions(positions: str, pos: Any, prompt_len: int) -> Any:
    """Which of a sequence's token positions ``pos`` (0-based; a tensor or a NumPy array) an edit at ``positions``
    acts on, for a prompt of ``prompt_len`` tokens: the one rule of :func:`steer` and of the vLLM plugin."""
    if positions == "all":
        return pos >= 0
    if positions == "prompt":
        return pos < prompt_len
    if positions == "response":
        return pos >= prompt_len
    if positions == "response_and_last_prompt":
        return pos >= prompt_len - 1
    raise PersonavecError(f"positions must be one of {', '.join(POSITIONS)}, not {shown(positions)}")


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


def check_edits(edits: Any, n_layers: int, hidden_size: int) -> list[Edit]:
    """``edits`` (one Edit or a sequence of them) as a list, refused unless each fits a model of ``n_layers``
    blocks and ``hidden_size`` dims — the one check of :func:`steer` and of the engine's requests."""
    listed = [edits] if isinstance(edits, Edit) else list(edits) if isinstance(edits, (list, tuple)) else None
    if listed is None or not all(isinstance(e, Edit) for e in listed):
        bad = edits if listed is None else next(e for e in listed if not isinstance(e, Edit))
        raise PersonavecError(f"edits must be an Edit or a list of Edits, not {shown(bad)}")
    for e in listed:
        if e.layer > n_layers:
            raise PersonavecError(f"Edit layer {e.layer} is out of range: this model has layers 0..{n_layers}")
        if e.direction.numel() != hidden_size:
            raise PersonavecError(f"Edit direction at layer {e.layer} has {e.direction.numel()} dims but the model's "
                                  f"hidden size is {hidden_size}; use a vector extracted from this model")
    return listed


@contextlib.contextmanager
def steer(model: Any, edits: Edit | Sequence[Edit], prompt_len: int | None = None) -> Iterator[None]:
    """Apply edits while the context is active (``model``: a LoadedModel or a HF causal LM).

    ``prompt_len`` overrides the prompt/response split (in columns) — for teacher-forced passes over a prompt
    and its answer in one forward; by default the prefill of each generation is the prompt.
    """
    m = getattr(model, "model", model)
    edits = check_edits(edits, len(decoder_layers(m)), hidden_size(m))
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
