"""The SAE features that carry each screened row's score: the reason a flagged sample is flagged.

With an SAE at one of a probe's layers, a row's response projection splits exactly into feature terms, the
decoder-bias term and the SAE's error (:mod:`personavec.sae.attribution`). ΔP is a difference of two response
projections (the dataset's answer minus the base model's), so it splits the same way with the bias cancelling::

    score == sum(sae_terms) + sae_rest + sae_bias + sae_error      (sae_bias is 0 for ΔP)

The table gets, per probe at the SAE's layer, the ``TOP`` features with the largest terms (what pushes the score
up most), their terms, the sum of all other features' terms (``sae_rest``), the decoder-bias term and the error
term, so every row's score is accounted for in full.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..errors import PersonavecError
from ..model.loading import LoadedModel
from ..sae.attribution import attribute, response_latents
from ..sae.autoencoder import SparseAutoencoder
from ..vectors.probe import Probe

#: features listed per row
TOP = 5


def check_sae(sae: SparseAutoencoder, probes: Sequence[Probe], mode: str, n_layers: int, hidden_size: int) -> None:
    """Refuse, before anything runs, an SAE that cannot explain these scores."""
    if mode == "prompt_last":
        raise PersonavecError("--sae explains response scores (ΔP or the response projection); --mode prompt_last "
                              "has none: use --mode delta or response")
    sae.check_model(n_layers, hidden_size)
    if sae.layer is None:
        raise PersonavecError("the SAE's file does not say which layer it reads: give --sae-layer")
    if not any(sae.layer in p.layers for p in probes):
        layers = sorted({layer for p in probes for layer in p.layers})
        raise PersonavecError(f"the SAE reads layer {sae.layer} but the vectors are screened at layer(s) "
                              f"{', '.join(map(str, layers))}: add {sae.layer} to --layers, or use an SAE of one of "
                              "those layers")


def identity(sae: SparseAutoencoder) -> dict[str, Any]:
    """What of the SAE changes the table (for the screening directory's claimed settings)."""
    h = hashlib.sha256()
    for t in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, sae.threshold):
        if t is not None:
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    h.update(repr((sae.activation, sae.k, sae.apply_b_dec_to_input)).encode())
    return {"layer": sae.layer, "n_latents": sae.n_latents, "activation": sae.activation, "k": sae.k,
            "source": str(sae.provenance.get("path", "in memory")), "weights_sha256": h.hexdigest()[:16]}


def feature_columns(lm: LoadedModel, sae: SparseAutoencoder, probes: Sequence[Probe], prompts: Sequence[str],
                    answers: Sequence[str], base: Sequence[str] | None, batch_size: int = 16,
                    max_length: int | None = None) -> pd.DataFrame:
    """Columns ``{probe}@L{layer}:sae_features`` (feature ids, best first), ``:sae_terms``, ``:sae_rest``,
    ``:sae_bias`` and ``:sae_error`` for every probe screened at the SAE's layer; ``base`` given: of ΔP, else of
    the response projection."""
    layer = sae.layer
    data = response_latents(lm, sae, prompts, answers, layer, batch_size, max_length=max_length)
    ref = response_latents(lm, sae, prompts, base, layer, batch_size, max_length=max_length) if base is not None \
        else None
    out: dict[str, Any] = {}
    for p in probes:
        if layer not in p.layers:
            continue
        direction = p.direction(layer)
        att = attribute(data, sae, direction)
        terms, error, bias = att.features, att.error, att.bias
        if ref is not None:
            other = attribute(ref, sae, direction)
            terms, error, bias = terms - other.features, error - other.error, 0.0
        terms = terms.numpy()
        k = min(TOP, terms.shape[1])
        finite = np.isfinite(terms).all(axis=1)
        order = np.argsort(-np.nan_to_num(terms, nan=-np.inf), axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(terms, order, axis=1)
        rest = terms.sum(axis=1) - top.sum(axis=1)
        prefix = f"{p.name}@L{layer}"
        out[f"{prefix}:sae_features"] = [list(map(int, o)) if ok else [] for o, ok in zip(order, finite)]
        out[f"{prefix}:sae_terms"] = [list(map(float, t)) if ok else [] for t, ok in zip(top, finite)]
        out[f"{prefix}:sae_rest"] = np.where(finite, rest, np.nan)
        out[f"{prefix}:sae_bias"] = np.where(finite, bias, np.nan)
        out[f"{prefix}:sae_error"] = np.where(finite, error.numpy(), np.nan)
    return pd.DataFrame(out)
