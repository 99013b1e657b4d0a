"""The one sparse-autoencoder type: weights, activation rule and where in the model it reads.

Every format on disk (:mod:`personavec.sae.formats`) loads into a :class:`SparseAutoencoder`, and everything that
uses an SAE (training, decomposition, screening attribution) works on this type alone::

    latents = sae.encode(x)            # [..., n_latents], sparse
    x_hat = sae.decode(latents)        # latents @ W_dec + b_dec
    x == x_hat + sae.error(x)          # exactly, by definition of the error term

Conventions. ``W_enc`` is ``[d_in, n_latents]`` and ``W_dec`` is ``[n_latents, d_in]`` (SAELens' layout); the
encoder's input is ``x - b_dec`` when ``apply_b_dec_to_input`` is true, else ``x``; the pre-activation is
``input @ W_enc + b_enc``; then the activation rule:

- ``relu``: ``relu(pre)``;
- ``topk``: the ``k`` largest pre-activations kept (then ReLU), all others zero;
- ``jumprelu``: ``relu(pre)`` where ``pre > threshold`` (per latent), else zero (BatchTopK SAEs are saved this
  way; the ReLU matters only for a negative threshold, and SAELens, Gemma Scope and dictionary_learning apply it).

``layer`` is in personavec's convention (the residual stream after ``layer`` decoder blocks; see
:mod:`personavec.model.layers`), never a hook name: the readers translate.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..errors import PersonavecError, shown, whole

ACTIVATIONS = ("relu", "topk", "jumprelu")


@dataclass
class SparseAutoencoder:
    """A sparse autoencoder over one layer's residual stream (see the module docstring for the conventions)."""

    W_enc: torch.Tensor  # [d_in, n_latents]
    b_enc: torch.Tensor  # [n_latents]
    W_dec: torch.Tensor  # [n_latents, d_in]; rows need not have unit norm (decoder_norms() says)
    b_dec: torch.Tensor  # [d_in]
    activation: str = "relu"
    k: int | None = None  # topk only
    threshold: torch.Tensor | None = None  # jumprelu only: [n_latents]
    apply_b_dec_to_input: bool = True
    layer: int | None = None  # personavec's convention; None when the file does not say
    model_id: str = "unknown"
    hook_name: str | None = None  # as the file named it, for the record
    provenance: dict[str, Any] = field(default_factory=dict)  # format, path, library, training summary, ...

    def __post_init__(self) -> None:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise PersonavecError(f"SAE {name} must be a torch tensor, not {shown(getattr(self, name))}")
        if self.W_enc.dim() != 2 or self.W_dec.dim() != 2:
            raise PersonavecError(f"SAE W_enc and W_dec must be matrices, not {shown(self.W_enc)} and "
                                  f"{shown(self.W_dec)}")
        d_in, n = self.W_enc.shape
        expected = {"W_dec": (n, d_in), "b_enc": (n,), "b_dec": (d_in,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise PersonavecError(f"SAE {name} has shape {list(getattr(self, name).shape)}; with W_enc "
                                      f"[{d_in}, {n}] it must be {list(shape)} (a file with transposed or mixed "
                                      f"weights?)")
        if self.activation not in ACTIVATIONS:
            raise PersonavecError(f"SAE activation must be one of {', '.join(ACTIVATIONS)}, not "
                                  f"{shown(self.activation)}")
        if self.activation == "topk":
            self.k = whole(self.k, "a TopK SAE's k", 1, n)
        if self.activation == "jumprelu":
            if not isinstance(self.threshold, torch.Tensor):
                raise PersonavecError("a JumpReLU SAE needs a threshold tensor (one value per latent)")
            if self.threshold.dim() == 0 or self.threshold.numel() == 1:
                self.threshold = self.threshold.reshape(()).expand(n).clone()
            if tuple(self.threshold.shape) != (n,):
                raise PersonavecError(f"SAE threshold has shape {list(self.threshold.shape)}; it must be [{n}]")
        elif self.threshold is not None:
            raise PersonavecError(f"a {self.activation} SAE has no threshold; only jumprelu uses one")
        if self.layer is not None:
            self.layer = whole(self.layer, "the SAE's layer", 0)
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            t = getattr(self, name)
            if t is not None and not bool(torch.isfinite(t).all()):
                raise PersonavecError(f"the SAE's {name} holds NaN or infinite values; the file is damaged or the "
                                      "training diverged: use another SAE")

    # ----- shape -----
    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[1]

    def decoder_norms(self) -> torch.Tensor:
        """``[n_latents]`` norms of the decoder rows (1 for SAEs trained with unit-norm rows)."""
        return self.W_dec.norm(dim=-1)

    def unit_decoder(self) -> torch.Tensor:
        """``[n_latents, d_in]`` decoder rows scaled to norm 1 (a zero row stays zero)."""
        return self.W_dec / self.decoder_norms().clamp(min=1e-12)[:, None]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> SparseAutoencoder:
        """The same SAE with its tensors in ``dtype`` on ``device``."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return replace(self, W_enc=move(self.W_enc), b_enc=move(self.b_enc), W_dec=move(self.W_dec),
                       b_dec=move(self.b_dec), threshold=move(self.threshold))

    def check_model(self, n_layers: int, hidden_size: int, model_name: str = "the model") -> None:
        """Refuse, in one line, an SAE that cannot read this model: another width, or a layer it does not have."""
        if self.d_in != hidden_size:
            raise PersonavecError(f"the SAE reads vectors of size {self.d_in} but {model_name} has hidden size "
                                  f"{hidden_size}: use an SAE trained on this model")
        if self.layer is not None and not 0 <= self.layer <= n_layers:
            raise PersonavecError(f"the SAE is for layer {self.layer} but {model_name} has layers 0..{n_layers}: "
                                  "use an SAE trained on this model")

    # ----- the map -----
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n_latents]`` encoder pre-activations of ``x`` (``[..., d_in]``), in the SAE's dtype."""
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """The activation rule applied to pre-activations."""
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n_latents]`` latent activations of residual vectors ``x`` ``[..., d_in]``."""
        return self.activate(self.pre_activations(x))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[..., d_in]`` reconstruction ``latents @ W_dec + b_dec``."""
        return latents.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """``x - reconstruct(x)``: what the SAE misses; the attribution's error term."""
        return x.to(self.W_dec.dtype) - self.reconstruct(x)

    def describe(self) -> str:
        """One line for the CLI."""
        rule = {"topk": f"TopK(k={self.k})", "jumprelu": "JumpReLU", "relu": "ReLU"}[self.activation]
        where = f"layer {self.layer}" if self.layer is not None else "layer unknown"
        hook = f" (hook {self.hook_name})" if self.hook_name else ""
        fmt = self.provenance.get("format", "in memory")
        return (f"{rule} SAE, {self.n_latents} latents over d_in {self.d_in}, {where}{hook}, model "
                f"{self.model_id}, {fmt}")
