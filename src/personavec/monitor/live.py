"""The live monitor: during generation, the projection of the newest position at one layer, reported per token;
above a threshold it can stop the answer or switch on suppressive steering for the rest of it. It reads the
residual before the edits at its layer (default: what the model itself carries, so steering there does not move
the meter by the injection) or after them."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PersonavecError, finite, shown, whole
from ..model.edits import as_direction
from ..model.layers import capture, decoder_layers, edit, hidden_size
from ..model.projection import unit


@dataclass
class LiveMonitor:
    """Per-token projection of the newest position at ``layer`` during generation.

    ``on_token(step, projections)`` gets, for every forward pass (step 0 = the prompt's last token, then one
    per generated token), the projection of each row's newest position on v̂. When a row's projection exceeds
    ``threshold``: ``action="stop"`` ends generation (use :meth:`stopping_criteria`), ``action="steer"`` adds
    ``steer_coef · v`` (negative: suppressive) at the layer from the next token on.

    ``where="before"`` (default) reads the residual at ``layer`` as it arrives, before every edit at ``layer``
    (``steer`` contexts entered before or after :meth:`attach`, and the monitor's own steering) acts; edits at
    earlier layers have acted. ``where="after"`` reads it after all of them (what block ``layer`` receives).
    """

    vector: torch.Tensor
    layer: int
    threshold: float = math.inf
    action: str = "stop"  # stop | steer | none
    steer_coef: float = -1.0
    where: str = "before"
    on_token: Callable[[int, torch.Tensor], None] | None = None
    history: list[torch.Tensor] = field(default_factory=list)
    triggered: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.action not in ("stop", "steer", "none"):
            raise PersonavecError(f"LiveMonitor action must be stop, steer or none, not {shown(self.action)}")
        if self.where not in ("before", "after"):
            raise PersonavecError(f"where must be 'before' or 'after' (the edits at the monitor's layer), not "
                                  f"{self.where}")
        self.layer = whole(self.layer, "LiveMonitor layer", low=0)
        self.vector = as_direction(self.vector, "LiveMonitor vector", self.layer)
        if not bool(self.vector.any()):
            raise PersonavecError(f"LiveMonitor vector at layer {self.layer} is zero: every reading would be 0; use a "
                                  "layer where the vector is non-zero")
        if not (isinstance(self.threshold, float) and math.isinf(self.threshold)):  # inf: never triggers
            self.threshold = finite(self.threshold, "LiveMonitor threshold")
        self.steer_coef = finite(self.steer_coef, "LiveMonitor steer_coef")
        self.unit = unit(self.vector)
        self._steering: torch.Tensor | None = None  # rows the monitor's own steering acts on in the pass under way

    def _observe(self, _layer: int, hidden: torch.Tensor) -> None:
        p = (hidden[:, -1].float() @ self.unit.to(hidden.device)).cpu()
        step = len(self.history)
        self.history.append(p)
        hit = p > self.threshold
        before = self.triggered
        self.triggered = hit if self.triggered is None else (self.triggered | hit)
        # the rows steered in this pass: those triggered in earlier passes (read before the steering, this pass's
        # reading comes first and acts from the next token on, like the engine's guard)
        self._steering = before if self.where == "before" else self.triggered
        if self.on_token is not None:
            self.on_token(step, p)

    def stopping_criteria(self) -> Any:
        from transformers import StoppingCriteria, StoppingCriteriaList

        monitor = self

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.Tensor:
                if monitor.action != "stop" or monitor.triggered is None:
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
                return monitor.triggered.to(input_ids.device)

        return StoppingCriteriaList([_Stop()])

    @contextlib.contextmanager
    def attach(self, model: Any) -> Iterator[LiveMonitor]:
        m = getattr(model, "model", model)
        n = len(decoder_layers(m))
        if not 1 <= self.layer <= n:
            raise PersonavecError(f"monitor layer {self.layer} out of range 1..{n}")
        if self.vector.numel() != hidden_size(m):
            raise PersonavecError(f"LiveMonitor vector has {self.vector.numel()} dims but the model's hidden size is "
                                  f"{hidden_size(m)}; use a vector extracted from this model")
        self.history, self.triggered, self._steering = [], None, None
        delta = self.steer_coef * self.vector.float()

        def maybe_steer(h: torch.Tensor) -> torch.Tensor:
            steering = self._steering
            if self.action != "steer" or steering is None or not bool(steering.any()):
                return h
            rows = steering.to(h.device)[:, None, None].to(h.dtype)
            return h + rows * delta.to(device=h.device, dtype=h.dtype)

        def read_first(h: torch.Tensor) -> torch.Tensor:
            self._observe(self.layer, h)
            return h

        with contextlib.ExitStack() as stack:
            if self.where == "before":  # the first edit of the layer's chain, whatever is entered after it
                stack.enter_context(edit(m, self.layer, read_first, first=True))
            else:  # edits are prepended hooks: a capture hook reads what they leave
                stack.enter_context(capture(m, [self.layer], self._observe, stop_early=False))
            stack.enter_context(edit(m, self.layer, maybe_steer))
            yield self
