"""Exact attribution: feature, bias and error terms add up to the response-average projection on real activations."""

from __future__ import annotations

import pytest
import torch

from personavec.errors import PersonavecError
from personavec.model.activations import encode_for, iter_token_states
from personavec.model.projection import project_pairs
from personavec.sae.attribution import attribute, response_latents
from sae.test_autoencoder import random_sae

PROMPTS = ["a b c", "d e", "f g h i j", "k"]
ANSWERS = [" x y", " z z z", " w v u t", " s"]


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_terms_sum_to_the_projection_to_1e_4_and_match_project_pairs(lm, activation):
    d = lm.hidden_size
    kw = {"topk": dict(k=5), "jumprelu": dict(threshold=torch.full((64,), 0.1))}.get(activation, {})
    sae = random_sae(d=d, n=64, activation=activation, layer=1, **kw)
    v = torch.randn(d, generator=torch.Generator().manual_seed(3))
    lat = response_latents(lm, sae, PROMPTS, ANSWERS, batch_size=3)
    att = attribute(lat, sae, v)
    total = att.features.sum(1) + att.bias + att.error
    assert torch.allclose(total, att.projection, atol=1e-4)
    ref = project_pairs(lm, PROMPTS, ANSWERS, {"v": {1: v}})
    assert torch.allclose(att.projection, torch.tensor(ref.sort_values("row")["projection"].to_numpy()), atol=1e-4)
    # the mean activations are the per-token encodings averaged over each answer
    states, rows, _ = next(iter_token_states(lm, encode_for(lm, PROMPTS, ANSWERS), 1, batch_size=8))
    for r in range(len(PROMPTS)):
        assert torch.allclose(lat.mean_latents[r].float(), sae.encode(states[rows == r]).mean(0), atol=1e-5)
    assert lat.n_tokens.tolist() == [int((rows == r).sum()) for r in range(len(PROMPTS))]


def test_a_direction_of_the_wrong_size_or_zero_is_refused(lm):
    sae = random_sae(d=lm.hidden_size, layer=1)
    lat = response_latents(lm, sae, PROMPTS[:1], ANSWERS[:1])
    with pytest.raises(PersonavecError, match="SAE reads"):
        attribute(lat, sae, torch.ones(lm.hidden_size + 1))
    with pytest.raises(PersonavecError, match="zero or not finite"):
        attribute(lat, sae, torch.zeros(lm.hidden_size))


def test_an_sae_of_another_width_is_refused_before_any_forward_pass(lm):
    with pytest.raises(PersonavecError, match="hidden size"):
        response_latents(lm, random_sae(d=lm.hidden_size + 2, layer=1), PROMPTS, ANSWERS)
