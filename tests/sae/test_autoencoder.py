"""The SAE type: its activation rules, exact reconstruction identity, and refusals of malformed weights."""

from __future__ import annotations

import pytest
import torch

from personavec.errors import PersonavecError
from personavec.sae.autoencoder import SparseAutoencoder


def random_sae(d: int = 8, n: int = 32, seed: int = 0, **kw) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    return SparseAutoencoder(W_enc=torch.randn(d, n, generator=g), b_enc=torch.randn(n, generator=g) * 0.1,
                             W_dec=torch.randn(n, d, generator=g), b_dec=torch.randn(d, generator=g) * 0.1, **kw)


def test_relu_encode_is_the_formula_and_error_closes_the_reconstruction_exactly():
    sae = random_sae()
    x = torch.randn(5, 8)
    want = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert torch.equal(sae.encode(x), want)
    assert torch.allclose(sae.reconstruct(x) + sae.error(x), x, atol=1e-6)
    no_bdec = random_sae(apply_b_dec_to_input=False)
    assert torch.equal(no_bdec.encode(x), torch.relu(x @ no_bdec.W_enc + no_bdec.b_enc))


def test_topk_keeps_exactly_the_k_largest_positive_pre_activations():
    sae = random_sae(activation="topk", k=4)
    x = torch.randn(6, 8)
    z = sae.encode(x)
    pre = sae.pre_activations(x)
    assert ((z != 0).sum(-1) <= 4).all()
    for row_z, row_pre in zip(z, pre):
        top = row_pre.topk(4).indices
        assert torch.equal(row_z[top], torch.relu(row_pre[top]))
        rest = torch.ones_like(row_z, dtype=torch.bool)
        rest[top] = False
        assert (row_z[rest] == 0).all()


def test_jumprelu_passes_pre_activations_above_the_threshold_and_a_scalar_threshold_broadcasts():
    sae = random_sae(activation="jumprelu", threshold=torch.full((32,), 0.5))
    x = torch.randn(4, 8)
    pre = sae.pre_activations(x)
    assert torch.equal(sae.encode(x), torch.where(pre > 0.5, pre, torch.zeros_like(pre)))
    scalar = random_sae(activation="jumprelu", threshold=torch.tensor(0.5))
    assert torch.equal(scalar.encode(x), sae.encode(x))


def test_unit_decoder_rows_have_norm_one_and_describe_names_the_rule():
    sae = random_sae(activation="topk", k=3, layer=2)
    assert torch.allclose(sae.unit_decoder().norm(dim=-1), torch.ones(32))
    assert "TopK(k=3)" in sae.describe() and "layer 2" in sae.describe()


@pytest.mark.parametrize("change, message", [
    (dict(W_dec=torch.zeros(8, 32)), "W_dec has shape"),
    (dict(b_dec=torch.zeros(9)), "b_dec has shape"),
    (dict(activation="gated"), "activation must be one of"),
    (dict(activation="topk"), "k must be a whole number"),
    (dict(activation="topk", k=33), "k must be between 1 and 32"),
    (dict(activation="jumprelu"), "needs a threshold"),
    (dict(threshold=torch.zeros(32)), "has no threshold"),
    (dict(b_enc=torch.full((32,), float("nan"))), "NaN or infinite"),
    (dict(layer=-1), "layer must be at least 0"),
])
def test_malformed_saes_are_refused_in_one_line(change, message):
    g = torch.Generator().manual_seed(0)
    weights = dict(W_enc=torch.randn(8, 32, generator=g), b_enc=torch.zeros(32), W_dec=torch.randn(32, 8,
                   generator=g), b_dec=torch.zeros(8))
    with pytest.raises(PersonavecError, match=message):
        SparseAutoencoder(**{**weights, **change})


def test_check_model_refuses_another_width_or_a_layer_the_model_lacks():
    sae = random_sae(layer=5)
    sae.check_model(n_layers=6, hidden_size=8)
    with pytest.raises(PersonavecError, match="hidden size 16"):
        sae.check_model(n_layers=6, hidden_size=16)
    with pytest.raises(PersonavecError, match=r"layers 0\.\.4"):
        sae.check_model(n_layers=4, hidden_size=8)
