"""The worker side of the plugin, without vLLM: hooked decoder layers, each step's plan, the readings kept.

A vLLM decoder layer takes ``(positions, hidden_states, residual)`` and returns ``(hidden, residual)``: the
residual stream after the block is ``hidden + residual``, which the next block's fused add-norm forms. A
:class:`HookedLayer` forms it itself, edits it (:class:`~personavec.vllm.slots.Slots`) and hands it on as
``(stream, 0)``, so the next block sees exactly the edited stream — our layer ℓ is the output of block ℓ − 1.

:class:`Hooks` plans each step from the requests the runner schedules (:class:`StepRequest`), parsing each
request's persona once, and after the forward keeps the readings of the requests that sampled a token.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..serve.policy import BadRequest
from .slots import Slots, SlotsPlan, position_mask
from .spec import Program, Served, compile_request

KEPT = 4096  # readings of this many keys are kept (the oldest finished ones go first)


class HookedLayer(nn.Module):
    """A decoder block whose output stream goes through ``slots``."""

    def __init__(self, inner: nn.Module, slots: Slots) -> None:
        super().__init__()
        self.inner = inner
        self.slots = slots

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
                **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.inner(positions, hidden_states, residual, **kwargs)
        x = self.slots(hidden + residual)
        return x, torch.zeros_like(x)


@dataclass(frozen=True)
class StepRequest:
    """One request of a step: its tokens ``[start, stop)`` of the flattened batch sit at positions ``first ..``
    of its sequence; ``samples``: this pass ends at its newest token, so it produces a token (a chunk of a long
    prompt before the last does not)."""

    req_id: str
    extra_args: dict | None
    prompt_len: int
    first: int
    start: int
    stop: int
    samples: bool


@dataclass
class Record:
    """The readings of one key: per reading (by its key in the persona, ``NAME`` or ``NAME@after``), one value per
    generated token."""

    readings: dict[str, list[float]] = field(default_factory=dict)
    done: bool = False

    def view(self) -> dict[str, Any]:
        n = max((len(v) for v in self.readings.values()), default=0)
        return {"readings": {k: list(v) for k, v in self.readings.items()}, "tokens": n, "done": self.done}


class Hooks:
    """The hooked layers of one worker and the state of the requests it runs."""

    def __init__(self, served: Served, modules: dict[int, Slots]) -> None:
        self.served = served
        self.plans = {layer: SlotsPlan(m) for layer, m in modules.items()}
        self.max_tokens = min((m.max_tokens for m in modules.values()), default=0)
        self.programs: dict[str, Program] = {}
        self.records: OrderedDict[str, Record] = OrderedDict()
        self._records: dict[str, Record] = {}  # req_id -> its record, for the requests in flight that read
        self._due: list[tuple[Record, str, int, int, int]] = []  # (record, reading key, layer, slot, token)
        self._lock = threading.Lock()  # the RPC that fetches readings may run beside a step

    @staticmethod
    def install(layers: nn.ModuleList, served: Served, max_tokens: int, device: torch.device | str) -> Hooks:
        """Wrap ``layers[ℓ − 1]`` for every hooked layer ℓ (pipeline parallelism is refused at start)."""
        modules: dict[int, Slots] = {}
        for layer in served.layers:
            block = layers[layer - 1]
            slots = Slots(served.rows(layer), served.config.slots, served.config.reads, max_tokens).to(device)
            layers[layer - 1] = HookedLayer(block, slots)
            modules[layer] = slots
        return Hooks(served, modules)

    def program(self, req: StepRequest) -> Program:
        program = self.programs.get(req.req_id)
        if program is None:
            try:
                program = compile_request(req.extra_args, self.served)
            except BadRequest as e:  # the API server checked it with the same code: the configurations differ
                raise RuntimeError(f"personavec: request {req.req_id} was admitted but its persona is refused here "
                                   f"({e.param}: {e.message}); the API server and the workers must share one "
                                   "--additional-config") from None
            self.programs[req.req_id] = program
            if program.key is not None and program.reads:
                with self._lock:  # a key sent again starts afresh; a request still running keeps its own record
                    self.records.pop(program.key, None)
                    record = self.records[program.key] = Record({r.key: [] for r in program.reads})
                    self._records[req.req_id] = record
                    self._forget()
        return program

    def plan(self, requests: Iterable[StepRequest], n_tokens: int) -> None:
        """Write the step's per-token fields: each request's edits over its tokens, its reads at its newest one."""
        if n_tokens > self.max_tokens and self.plans:
            raise RuntimeError(f"personavec: a step of {n_tokens} tokens exceeds the {self.max_tokens} the hooks "
                               "were sized for (max_num_batched_tokens)")
        for plan in self.plans.values():
            plan.clear()
        self._due = []
        for req in requests:
            program = self.program(req)
            if not program.ops and not program.reads:
                continue
            tokens = slice(req.start, req.stop)
            pos = np.arange(req.first, req.first + req.stop - req.start)
            for layer, ops in program.ops.items():
                plan = self.plans[layer]  # compile_request admits hooked layers only
                for op in ops:
                    mask = position_mask(op.positions, pos, req.prompt_len)
                    if op.kind == "add":
                        plan.add(op.slot, tokens, mask, op.row, op.coef)
                    else:
                        plan.project(op.slot, tokens, mask, op.row, op.lo, op.hi)
            if req.samples and program.reads:
                record = self._records[req.req_id]
                for r in program.reads:
                    self.plans[r.layer].read(r.slot, req.stop - 1, r.row, r.where)
                    self._due.append((record, r.key, r.layer, r.slot, req.stop - 1))
        for plan in self.plans.values():
            plan.commit()

    def collect(self) -> None:
        """After the forward: the readings due this step, appended to their records."""
        if not self._due:
            return
        values = {layer: self.plans[layer].readings(1 + max(t for _, _, x, _, t in self._due if x == layer))
                  for layer in {x for _, _, x, _, _ in self._due}}
        with self._lock:
            for record, key, layer, slot, token in self._due:
                record.readings[key].append(float(values[layer][slot, token]))
        self._due = []

    def get(self, key: str, pop: bool = False) -> dict[str, Any] | None:
        """The readings under ``key`` so far; ``pop`` forgets them once their request has ended."""
        with self._lock:
            record = self.records.get(key)
            if record is not None and pop and record.done:
                del self.records[key]
            return None if record is None else record.view()

    def finished(self, req_ids: Iterable[str]) -> None:
        """These requests ended (finished or aborted: the runner's word): their programs go, their records are
        marked done."""
        for rid in req_ids:
            self._done(rid)

    def _done(self, rid: str) -> None:
        self.programs.pop(rid, None)
        with self._lock:
            record = self._records.pop(rid, None)
            if record is not None:
                record.done = True

    def _forget(self) -> None:
        """Past ``KEPT`` keys, the oldest finished ones go (running ones only when none has finished)."""
        while len(self.records) > KEPT:
            done = next((k for k, r in self.records.items() if r.done), None)
            if done is None:
                self.records.popitem(last=False)
            else:
                del self.records[done]
