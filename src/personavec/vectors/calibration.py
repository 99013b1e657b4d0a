"""A vector's calibration: where the meter's readings of eliciting (pos) and suppressing (neg) answers lie.

The live meter (the engine's reads, ``personavec serve``'s ``persona.monitor``, :class:`~personavec.monitor.live.
LiveMonitor`) reads, per generated token, the projection on the unit direction v̂ of the residual at the
vector's layer at the position that produced the token, before the request's edits. Calibration reads the same
thing on answers already written — unsteered, one forward pass over prompt + answer, at the position before
each answer token (the last prompt token for the first) — and keeps, per layer and side, quantiles of those
per-token readings, in the vector's metadata (``extra["calibration"]``, JSON). A run computes them on its
held-out evaluation answers; :func:`~personavec.vectors.extraction.extract_vector` on its extraction answers
(``held_out`` false).

Besides the per-token quantiles (``pos``, ``neg``), it keeps quantiles of each answer's running mean reading from
its ``FROM_TOKEN``-th token on (``pos_mean``, ``neg_mean``): what a guard ``over="answer"`` checks. The server's
default guard threshold and cap come from them (:func:`guard_threshold`, :func:`default_cap`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..model.activations import encode_for, length_batches, make_batch
from ..model.layers import backbone, capture, run_forward
from ..model.loading import LoadedModel, pad_token_id
from .vector import PersonaVector

QUANTILES = (1, 5, 25, 50, 75, 95, 99)  # percent
UNIT = "projection on v̂ (the vector's unit direction at the layer), raw residual units"
POSITION = ("per answer token, at the position that produced it (the last prompt token for the first), before any "
            "edit, unsteered")
HELD_OUT = "held-out evaluation answers of the run"
EXTRACTION = "extraction answers (not held out)"
FROM_TOKEN = 16  # a guard over the answer is checked from its 16th token on: before, a few words decide its mean
# The server's defaults, chosen by measurement on the demo run (docs/serve.md, bench/guard.py): one token's reading
# is too noisy to stop an answer on (ordinary answers of 128 tokens reach above the 99 % quantile of the eliciting
# answers' tokens), so the guard stops where the answer's running mean (from token 16) rises above the 99 %
# quantile of the eliciting answers' running means; the cap clamps a token's projection at the 99 % quantile of the
# eliciting answers' tokens (only their rarest tokens read higher).
GUARD_RULE = ("pos_mean", "99")
CAP_RULE = ("pos", "99")


@torch.no_grad()
def token_readings(lm: LoadedModel, prompts: Sequence[str], answers: Sequence[str],
                   directions: dict[int, torch.Tensor], batch_size: int = 16,
                   progress: bool | str = False) -> dict[int, list[list[float]]]:
    """Per layer, per pair, the meter's reading of each answer token: the projection on the unit direction of the
    residual at the position that produced it (unsteered, one forward pass per batch)."""
    from tqdm.auto import tqdm

    encs = encode_for(lm, list(prompts), list(answers))
    units = {layer: (v.float() / v.float().norm().clamp(min=1e-12)).to(lm.device) for layer, v in directions.items()}
    out: dict[int, list[list[float]]] = {layer: [[] for _ in encs] for layer in units}
    pad = pad_token_id(lm.tokenizer)
    bar = tqdm(total=len(encs), desc=progress if isinstance(progress, str) else "calibration", unit="pair",
               disable=not progress)
    for idx in length_batches([len(e.ids) for e in encs], batch_size):
        batch = make_batch([encs[i] for i in idx], pad, "right", lm.device)

        def on_layer(layer: int, hidden: torch.Tensor, idx: list[int] = idx) -> None:
            proj = (hidden.float() @ units[layer]).cpu()  # [B, T]
            for b, i in enumerate(idx):
                e = encs[i]
                out[layer][i] = proj[b, e.n_prompt - 1: len(e.ids) - 1].tolist()

        with capture(lm.model, sorted(units), on_layer):
            run_forward(backbone(lm.model), input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, use_cache=False)
        bar.update(len(idx))
    bar.close()
    return out


def calibrate(lm: LoadedModel, vec: PersonaVector, prompts: Sequence[str], answers: Sequence[str],
              sides: Sequence[str], held_out: bool, layers: Sequence[int] | None = None, batch_size: int = 16,
              progress: bool | str = False) -> dict[str, Any]:
    """The calibration of ``vec`` (its default pooling) on answers labelled ``sides`` (``pos`` / ``neg``), at
    ``layers`` (default: every layer where the vector has a direction); also stored in ``vec.extra``."""
    t = vec.tensors[vec.default_pooling]
    usable = [i for i in range(vec.n_layers + 1) if bool(torch.isfinite(t[i]).all()) and bool(t[i].any())]
    layers = [x for x in (usable if layers is None else layers) if x in usable]
    readings = token_readings(lm, prompts, answers, {layer: t[layer] for layer in layers}, batch_size, progress)
    per_layer = {}
    counts = {"pos": 0, "neg": 0, "pos_mean": 0, "neg_mean": 0}
    for layer in layers:
        entry = {}
        for side in ("pos", "neg"):
            rows = [r for r, s in zip(readings[layer], sides) if s == side]
            values = [x for r in rows for x in r]
            means = [x for r in rows for x in running_means(r, FROM_TOKEN)]
            counts[side], counts[side + "_mean"] = len(values), len(means)
            entry[side], entry[side + "_mean"] = _quantiles(values), _quantiles(means)
        per_layer[str(layer)] = entry
    cal = {"unit": UNIT, "where": "before", "position": POSITION, "pooling": vec.default_pooling,
           "source": HELD_OUT if held_out else EXTRACTION, "held_out": held_out, "quantiles": list(QUANTILES),
           "n_pos": counts["pos"], "n_neg": counts["neg"], "from_token": FROM_TOKEN,
           "n_pos_mean": counts["pos_mean"], "n_neg_mean": counts["neg_mean"],
           "n_pos_answers": sum(s == "pos" for s in sides), "n_neg_answers": sum(s == "neg" for s in sides),
           "layers": per_layer}
    vec.extra["calibration"] = cal
    return cal


def running_means(values: Sequence[float], from_token: int) -> list[float]:
    """The mean of ``values[:t]`` for every ``t`` from ``from_token`` on (what a guard over the answer checks)."""
    out, total = [], 0.0
    for t, x in enumerate(values, 1):
        total += x
        if t >= from_token:
            out.append(total / t)
    return out


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {str(q): None for q in QUANTILES}
    x = torch.tensor(values, dtype=torch.float64)
    qs = torch.quantile(x, torch.tensor([q / 100 for q in QUANTILES], dtype=torch.float64))
    return {str(q): round(float(v), 4) for q, v in zip(QUANTILES, qs)}


def at_layer(vec: PersonaVector, layer: int) -> dict[str, Any] | None:
    """The vector's calibration at ``layer`` as the server lists it (``unit``, ``layer``, ``pos``, ``neg``,
    ``n_pos``, ``n_neg``, ``source``, ``guard_threshold``, ``cap``), or None when it has none there."""
    cal = vec.extra.get("calibration")
    entry = (cal or {}).get("layers", {}).get(str(layer)) if isinstance(cal, dict) else None
    if not entry:
        return None
    out = {"unit": cal.get("unit", UNIT), "layer": layer, "where": cal.get("where", "before"),
           "pos": entry.get("pos", {}), "neg": entry.get("neg", {}), "pos_mean": entry.get("pos_mean", {}),
           "neg_mean": entry.get("neg_mean", {}), "n_pos": cal.get("n_pos"), "n_neg": cal.get("n_neg"),
           "source": cal.get("source"), "held_out": cal.get("held_out")}
    from_token = cal.get("from_token", FROM_TOKEN)
    out["guard_threshold"] = _rule(out, GUARD_RULE)
    out["guard_over"], out["guard_from_token"] = "answer", from_token
    out["cap"] = _rule(out, CAP_RULE)
    out["guard_rule"] = (f"the answer's running mean reading from token {from_token} above the {GUARD_RULE[1]}% "
                         "quantile of the eliciting answers' running means")
    out["cap_rule"] = f"the {CAP_RULE[1]}% quantile of the eliciting answers' per-token readings"
    return out


def _rule(entry: dict[str, Any], rule: tuple[str, str]) -> float | None:
    value = entry.get(rule[0], {}).get(rule[1])
    return float(value) if isinstance(value, (int, float)) else None


def guard_threshold(vec: PersonaVector, layer: int) -> float | None:
    """The default guard threshold at ``layer`` (:data:`GUARD_RULE`), None without calibration there."""
    entry = at_layer(vec, layer)
    return None if entry is None else entry["guard_threshold"]


def default_cap(vec: PersonaVector, layer: int) -> float | None:
    """The default cap at ``layer`` (:data:`CAP_RULE`), None without calibration there."""
    entry = at_layer(vec, layer)
    return None if entry is None else entry["cap"]
