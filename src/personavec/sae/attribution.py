"""Exact attribution of a response-average projection to SAE features.

For one answer with response tokens ``t`` at the SAE's layer, and a unit direction ``u``::

    mean_t <h_t, u> = sum_i mean_t(a_ti) * <W_dec[i], u>  +  <b_dec, u>  +  <mean_t(h_t) - decode(mean_t(a_t)), u>

Each feature's term is its mean activation over the answer times its decoder row's component along ``u``; the
bias term is the same for every answer; the error term is what the SAE does not reconstruct. The three add up to
the projection exactly (the decoder is affine, so the mean reconstruction is the decoding of the mean activations),
up to float rounding. The same holds for a difference of two answers' projections (screening's ΔP) with the bias
term cancelling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import PersonavecError
from ..model.activations import encode_for, iter_token_states
from ..model.loading import LoadedModel
from .autoencoder import SparseAutoencoder


@dataclass
class ResponseLatents:
    """Per answer (row): the mean residual state over its response tokens, the mean of each latent's activation,
    and the share of its tokens on which each latent fired."""

    mean_state: torch.Tensor    # [R, d] float64
    mean_latents: torch.Tensor  # [R, n] float64
    firing: torch.Tensor        # [R, n] float32, share of the row's tokens with a non-zero activation
    n_tokens: torch.Tensor      # [R] response tokens per row (0: an empty answer, whose means are NaN)
    layer: int


@torch.no_grad()
def response_latents(lm: LoadedModel, sae: SparseAutoencoder, prompts: Sequence[str], answers: Sequence[str],
                     layer: int | None = None, batch_size: int = 16, progress: bool | str = False,
                     max_length: int | None = None) -> ResponseLatents:
    """Encode every response token of each (prompt, answer) pair at the SAE's layer and average per answer."""
    layer = sae.layer if layer is None else layer
    if layer is None:
        raise PersonavecError("the SAE's file does not say which layer it reads: give --layer")
    sae.check_model(lm.n_layers, lm.hidden_size, lm.model_id)
    encs = encode_for(lm, list(prompts), list(answers), max_length)
    R, n, d = len(encs), sae.n_latents, sae.d_in
    sums = torch.zeros(R, d, dtype=torch.float64)
    lat = torch.zeros(R, n, dtype=torch.float64)
    fired = torch.zeros(R, n, dtype=torch.float32)
    counts = torch.zeros(R, dtype=torch.float64)
    sae32 = sae.to(torch.float32, "cpu")
    for states, rows, _pos in iter_token_states(lm, encs, layer, "response", batch_size, progress=progress):
        if not len(rows):
            continue
        a = sae32.encode(states)
        sums.index_add_(0, rows, states.double())
        lat.index_add_(0, rows, a.double())
        fired.index_add_(0, rows, (a != 0).float())
        counts.index_add_(0, rows, torch.ones(len(rows), dtype=torch.float64))
    denom = counts[:, None]
    return ResponseLatents(mean_state=sums / denom, mean_latents=lat / denom, firing=(fired / denom.float()),
                           n_tokens=counts.long(), layer=layer)


@dataclass
class Attribution:
    """``projection[r] == features[r].sum() + bias + error[r]`` for every row ``r`` (float64)."""

    features: torch.Tensor    # [R, n] mean activation x decoder component along u
    bias: float               # <b_dec, u>
    error: torch.Tensor       # [R]
    projection: torch.Tensor  # [R] <mean state, u>
    component: torch.Tensor   # [n] <W_dec[i], u>


def attribute(latents: ResponseLatents, sae: SparseAutoencoder, direction: torch.Tensor) -> Attribution:
    """Split each row's response-average projection on ``direction`` (any norm) into feature, bias and error
    terms that sum to it exactly."""
    v = direction.detach().double().cpu().flatten()
    if v.numel() != sae.d_in:
        raise PersonavecError(f"the direction has {v.numel()} values but the SAE reads {sae.d_in}")
    norm = float(v.norm())
    if not norm or not bool(torch.isfinite(v).all()):
        raise PersonavecError("the direction is zero or not finite; it has nothing to attribute")
    u = v / norm
    W_dec, b_dec = sae.W_dec.double().cpu(), sae.b_dec.double().cpu()
    component = W_dec @ u
    features = latents.mean_latents * component
    bias = float(b_dec @ u)
    recon = latents.mean_latents @ W_dec + b_dec
    error = (latents.mean_state - recon) @ u
    return Attribution(features=features, bias=bias, error=error, projection=latents.mean_state @ u,
                       component=component)
