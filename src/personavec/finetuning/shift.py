"""Fine-tuning shift: how far a fine-tune moves the model's state along a persona vector.

For a set of evaluation prompts (chat-formatted, ending with the assistant turn's opening), the mean
last-prompt-token activation at every layer is measured on the base and on the fine-tuned model; the shift
at layer ℓ is ``(mean_tuned[ℓ] − mean_base[ℓ]) · v̂[ℓ]`` (paper §4.2: it predicts the trait the fine-tuned
model will show). The table also gives ‖Δ‖ and the cosine between Δ and v, i.e. how much of the change
the trait direction accounts for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch

from ..errors import PersonavecError, shown
from ..files import save_figure
from ..model.activations import pooled_means
from ..model.loading import LoadedModel, check_loaded
from ..vectors.vector import PersonaVector, check_named


def last_prompt_means(lm: LoadedModel, prompts: Sequence[str], batch_size: int = 16,
                      progress: bool | str = False) -> torch.Tensor:
    """``[L + 1, d]`` mean residual at the last prompt token over ``prompts`` (float32, every layer)."""
    if not prompts:
        raise PersonavecError("no prompts to measure the shift on")
    pm = pooled_means(lm, list(prompts), [""] * len(prompts), poolings=["prompt_last"], batch_size=batch_size,
                      progress=progress)
    return pm.means["prompt_last"]


def shift_table(base: torch.Tensor, tuned: torch.Tensor, vectors: Mapping[str, PersonaVector],
                pooling: str | None = None) -> pd.DataFrame:
    """One row per (vector, layer): ``shift`` = Δ·v̂, ``delta_norm`` = ‖Δ‖, ``cosine`` = cos(Δ, v)."""
    if base.shape != tuned.shape:
        raise PersonavecError(f"base and tuned means differ in shape: {tuple(base.shape)} vs {tuple(tuned.shape)}")
    delta = (tuned - base).double()
    rows = []
    for name, vec in vectors.items():
        if vec.n_layers + 1 != delta.shape[0] or vec.hidden_size != delta.shape[1]:
            raise PersonavecError(f"vector {name!r} has shape [{vec.n_layers + 1}, {vec.hidden_size}] but the model's "
                                  f"activations are {list(delta.shape)}: it was made for another model")
        for layer in range(delta.shape[0]):
            v = vec.get(layer, pooling).double()
            vn = float(v.norm())
            dn = float(delta[layer].norm())
            shift = float(delta[layer] @ v) / vn if vn > 0 else math.nan
            rows.append({"vector": name, "layer": layer, "shift": shift, "delta_norm": dn,
                         "cosine": shift / dn if dn > 0 and vn > 0 else math.nan})
    return pd.DataFrame(rows)


def shift(base: LoadedModel, tuned: LoadedModel, questions: Sequence[str], vectors: Mapping[str, PersonaVector],
          batch_size: int = 16) -> pd.DataFrame:
    """How far a fine-tune moved the model along each vector: one row per (vector, layer) with ``shift`` (the mean
    last-prompt activation change on ``questions``, projected on v̂), ``delta_norm`` and ``cosine``."""
    check_loaded(base, "shift's base")
    check_loaded(tuned, "shift's tuned")
    vectors = check_named(vectors, "shift's vectors")
    if isinstance(questions, str) or not isinstance(questions, Sequence) or not questions or \
            not all(isinstance(q, str) for q in questions):
        bad = questions if isinstance(questions, str) or not isinstance(questions, Sequence) or not questions else \
            next(q for q in questions if not isinstance(q, str))
        raise PersonavecError(f"shift's questions must be a non-empty list of strings, not {shown(bad)}")
    prompts = [base.format_chat(q) for q in questions]
    return shift_table(last_prompt_means(base, prompts, batch_size), last_prompt_means(tuned, prompts, batch_size),
                       vectors)


def plot_shifts(table: pd.DataFrame, path: str | Path, title: str = "fine-tuning shift",
                mark_layer: int | None = None) -> Path:
    """Shift per layer, one line per model (``model`` column) and vector."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    group = ["model", "vector"] if "model" in table.columns else ["vector"]
    for key, g in table.groupby(group, sort=False):
        label = " / ".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
        ax.plot(g["layer"], g["shift"], marker=".", label=label)
    if mark_layer is not None:
        ax.axvline(mark_layer, color="grey", lw=0.8, ls="--")
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("layer")
    ax.set_ylabel("shift along v̂ (last prompt token)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return save_figure(fig, path)
