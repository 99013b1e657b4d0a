"""The layer convention, block discovery across architectures, and capture/edit hooks."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from personavec.errors import PersonavecError
from personavec.model.layers import backbone, capture, decoder_layers, edit, hidden_size, run_forward

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)


def _models():
    yield "qwen2", Qwen2ForCausalLM(Qwen2Config(**SMALL))
    yield "mistral", MistralForCausalLM(MistralConfig(**SMALL))
    yield "gemma", GemmaForCausalLM(GemmaConfig(**SMALL, head_dim=8))
    yield "gemma2", Gemma2ForCausalLM(Gemma2Config(**SMALL, head_dim=8))
    yield "phi3", Phi3ForCausalLM(Phi3Config(**{**SMALL, "pad_token_id": 0}))
    yield "phi", PhiForCausalLM(PhiConfig(**SMALL))
    yield "gpt2", GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4, n_positions=64))
    yield "neox", GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3,
                                                    num_attention_heads=4, intermediate_size=64))


@pytest.mark.parametrize("name,model", list(_models()), ids=lambda x: x if isinstance(x, str) else "")
def test_capture_matches_output_hidden_states_across_architectures(name, model):
    """Layer ℓ < L equals HF hidden_states[ℓ]; layer L equals the last block's own output (pre final norm)."""
    torch.manual_seed(0)
    model.eval()
    assert len(decoder_layers(model)) == 3
    assert hidden_size(model) == 32
    ids = torch.randint(1, 64, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
        got: dict[int, torch.Tensor] = {}
        last_block: dict[str, torch.Tensor] = {}
        h = decoder_layers(model)[-1].register_forward_hook(
            lambda m, a, o: last_block.__setitem__("o", o[0] if isinstance(o, tuple) else o))
        with capture(model, range(4), lambda layer, x: got.__setitem__(layer, x.clone()), stop_early=False):
            model(input_ids=ids)
        h.remove()
    for layer in range(3):
        torch.testing.assert_close(got[layer], ref[layer], msg=f"{name} layer {layer}")
    torch.testing.assert_close(got[3], last_block["o"])
    # HF's last entry is after the final norm: ours differs there (documented)
    assert not torch.allclose(got[3], ref[3])


def test_early_stop_skips_later_blocks(lm):
    calls: list[int] = []
    blocks = decoder_layers(lm.model)
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    got = {}
    ids = torch.randint(3, 100, (1, 5))
    with capture(lm.model, [1], lambda layer, x: got.__setitem__(layer, x)):
        out = run_forward(backbone(lm.model), input_ids=ids)
    for h in hooks:
        h.remove()
    assert out is None and calls == [0] and 1 in got
    # hooks are gone afterwards: a plain forward runs every block
    lm.model(input_ids=ids)
    assert all(len(b._forward_hooks) == 0 for b in blocks)


def test_edit_at_layer_l_changes_hidden_states_l_only():
    """Adding δ 'at layer ℓ' edits the output of block ℓ−1: hidden_states[ℓ] moves by exactly δ."""
    from conftest import tiny_llama

    model = tiny_llama(100, n_layers=3)
    ids = torch.randint(3, 100, (2, 6))
    delta = torch.randn(32)
    with torch.no_grad():
        base = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in (1, 2, 3):
            with edit(model, layer, lambda h: h + delta):
                new = model(input_ids=ids, output_hidden_states=True).hidden_states
            for j in range(layer):
                torch.testing.assert_close(new[j], base[j])
            if layer < 3:  # HF's hidden_states[L] is after the final norm
                torch.testing.assert_close(new[layer] - base[layer], delta.expand_as(base[layer]),
                                           rtol=1e-4, atol=1e-4)
                assert not torch.allclose(new[layer + 1], base[layer + 1])


def test_edit_at_layer_0_edits_the_embeddings():
    from conftest import tiny_llama

    model = tiny_llama(100, n_layers=2)
    ids = torch.randint(3, 100, (2, 6))
    delta = torch.randn(32)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        ref = model(inputs_embeds=emb + delta, output_hidden_states=True)
        with edit(model, 0, lambda h: h + delta):
            got = model(input_ids=ids, output_hidden_states=True)
    torch.testing.assert_close(got.logits, ref.logits)
    torch.testing.assert_close(got.hidden_states[0], emb + delta)
    torch.testing.assert_close(got.hidden_states[1], ref.hidden_states[1])


def test_edit_removed_on_exception(lm):
    ids = torch.randint(3, 100, (1, 4))
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
        with pytest.raises(RuntimeError), edit(lm.model, 1, lambda h: h + 1.0):
            raise RuntimeError("boom")
        torch.testing.assert_close(lm.model(input_ids=ids).logits, base)


def test_layers_path_override_and_errors(lm):
    assert decoder_layers(lm.model, "model.layers") is lm.model.model.layers
    with pytest.raises(PersonavecError, match="does not exist"):
        decoder_layers(lm.model, "model.blocks")
    with pytest.raises(PersonavecError, match="out of range"), capture(lm.model, [5], lambda layer, x: None):
        pass


def test_unknown_architecture_found_by_config_layer_count():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_hidden_layers": 3, "hidden_size": 8})()
            self.stuff = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(3)])
            self.heads = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])

    assert decoder_layers(Odd()) is not None and len(decoder_layers(Odd())) == 3
