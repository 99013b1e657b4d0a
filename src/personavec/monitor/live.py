"""The live monitor: during generation, the projection of the newest position at one layer, reported per token;
above a threshold it can stop the answer or switch on suppressive steering for the rest of it."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PersonavecError
from ..model.layers import capture, decoder_layers, edit
from ..model.projection import unit


@dataclass
class LiveMonitor:
    """Per-token projection of the newest position at ``layer`` during generation.

    ``on_token(step, projections)`` gets, for every forward pass (step 0 = the prompt's last token, then one
    per generated token), the projection of each row's newest position on v̂. When a row's projection exceeds
    ``threshold``: ``action="stop"`` ends generation (use :meth:`stopping_criteria`), ``action="steer"`` adds
    ``steer_coef · v`` (negative: suppressive) at the layer from the next token on.
    """

    vector: torch.Tensor
    layer: int
    threshold: float = math.inf
    action: str = "stop"  # stop | steer | none
    steer_coef: float = -1.0
    on_token: Callable[[int, torch.Tensor], None] | None = None
    history: list[torch.Tensor] = field(default_factory=list)
    triggered: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.action not in ("stop", "steer", "none"):
            raise PersonavecError(f"monitor action must be stop, steer or none, not {self.action!r}")
        self.unit = unit(self.vector)

    def _observe(self, _layer: int, hidden: torch.Tensor) -> None:
        p = (hidden[:, -1].float() @ self.unit.to(hidden.device)).cpu()
        step = len(self.history)
        self.history.append(p)
        hit = p > self.threshold
        self.triggered = hit if self.triggered is None else (self.triggered | hit)
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
        self.history, self.triggered = [], None
        delta = self.steer_coef * self.vector.float()

        def maybe_steer(h: torch.Tensor) -> torch.Tensor:
            if self.action != "steer" or self.triggered is None or not bool(self.triggered.any()):
                return h
            rows = self.triggered.to(h.device)[:, None, None].to(h.dtype)
            return h + rows * delta.to(device=h.device, dtype=h.dtype)

        with contextlib.ExitStack() as stack:
            # the edit is a prepended hook, so it runs before the observer in each pass: the decision to steer
            # comes from earlier passes' projections, and the observer reads the (possibly) edited stream
            stack.enter_context(capture(m, [self.layer], self._observe, stop_early=False))
            stack.enter_context(edit(m, self.layer, maybe_steer))
            yield self
