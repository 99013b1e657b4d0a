"""SAE formats: hook names to our layer on every form, the SAELens writer round-trips exactly, and every bad file is
one clear line (the libraries' own files are compared in test_parity.py)."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from personavec.errors import PersonavecError
from personavec.sae.autoencoder import SparseAutoencoder
from personavec.sae.formats import detect_format, hook_of_layer, layer_of_hook, load_sae, save_sae


def random_sae(d: int = 8, n: int = 24, seed: int = 0, **kw) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    kw.setdefault("layer", 3)
    return SparseAutoencoder(W_enc=torch.randn(d, n, generator=g), b_enc=torch.randn(n, generator=g) * 0.1,
                             W_dec=torch.randn(n, d, generator=g), b_dec=torch.randn(d, generator=g) * 0.1, **kw)


@pytest.mark.parametrize(("name", "layer"), [
    ("blocks.0.hook_resid_pre", 0), ("blocks.7.hook_resid_pre", 7), ("blocks.0.hook_resid_post", 1),
    ("blocks.12.hook_resid_post", 13), ("layers.0", 1), ("layers.11", 12), ("layers_11", 12),
    ("model.layers.19", 20), ("gpt_neox.layers.5", 6), ("transformer.h.3", 4), ("h.3", 4),
    ("resid_post_layer_3", 4), ("layer_20", 21), ("hook_embed", 0), ("embed_tokens", 0), ("embedding", 0),
    ("something_else", None), ("", None), (None, None),
])
def test_layer_of_hook_maps_every_form_to_our_layer(name, layer):
    assert layer_of_hook(name) == layer


@pytest.mark.parametrize("name", ["blocks.3.hook_mlp_out", "blocks.3.attn.hook_z", "blocks.3.hook_resid_mid",
                                  "blocks.3.hook_attn_out"])
def test_a_hook_off_the_residual_stream_is_refused(name):
    with pytest.raises(PersonavecError, match="not the residual stream"):
        layer_of_hook(name)


def test_hook_of_layer_inverts_layer_of_hook():
    for layer in range(0, 30):
        assert layer_of_hook(hook_of_layer(layer)) == layer
    assert hook_of_layer(5) == "blocks.4.hook_resid_post"


@pytest.mark.parametrize("kw", [dict(), dict(apply_b_dec_to_input=False), dict(activation="topk", k=5),
                                dict(activation="jumprelu", threshold=torch.linspace(-0.5, 1.0, 24)),
                                dict(layer=0), dict(layer=None)])
def test_save_then_load_round_trips_exactly(tmp_path, kw):
    sae = random_sae(model_id="org/tiny", provenance={"trained": "here"}, **kw)
    out = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    back = load_sae(out, layer=None if sae.layer is not None else 4)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(sae, name))
    if sae.activation == "jumprelu":
        assert torch.equal(back.threshold, sae.threshold)
    assert (back.activation, back.k, back.apply_b_dec_to_input) == (sae.activation, sae.k, sae.apply_b_dec_to_input)
    assert back.layer == (sae.layer if sae.layer is not None else 4)
    assert back.model_id == "org/tiny" and back.provenance["trained"] == "here"
    x = torch.randn(7, 8)
    assert torch.equal(back.encode(x), sae.encode(x))


def test_a_training_directory_is_read_as_the_sae_it_holds(tmp_path):
    sae = random_sae(layer=3, activation="topk", k=4)
    save_sae(sae, tmp_path / "run" / "sae")
    with pytest.raises(PersonavecError, match="found no SAE"):
        load_sae(tmp_path / "run")  # a folder that merely holds an SAE somewhere is not one
    (tmp_path / "run" / "settings.json").write_text("{}")  # what `sae train --out` leaves beside it
    assert torch.equal(load_sae(tmp_path / "run").W_dec, sae.W_dec)


def test_save_writes_the_current_saelens_layout_with_our_layer(tmp_path):
    save_sae(random_sae(layer=5, model_id="org/m", activation="topk", k=4), tmp_path / "s")
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_in"] == 8 and cfg["d_sae"] == 24
    assert cfg["normalize_activations"] == "none" and cfg["rescale_acts_by_decoder_norm"] is False
    meta = cfg["metadata"]
    assert meta["hook_name"] == "blocks.4.hook_resid_post" and meta["model_name"] == "org/m"
    assert meta["personavec"]["layer"] == 5 and int(meta["sae_lens_version"].split(".")[0]) >= 6


def test_save_replaces_an_sae_directory_but_never_one_holding_other_files(tmp_path):
    save_sae(random_sae(seed=1), tmp_path / "s")
    save_sae(random_sae(seed=2), tmp_path / "s")
    assert torch.equal(load_sae(tmp_path / "s").W_enc, random_sae(seed=2).W_enc)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(PersonavecError, match="holds other things"):
        save_sae(random_sae(), tmp_path / "run")
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"


def write_saelens(d, cfg: dict, tensors: dict) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(d / "sae_weights.safetensors"))


def saelens_tensors(d=8, n=24, seed=0) -> dict:
    sae = random_sae(d, n, seed)
    return {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}


NEW_CFG = {"architecture": "standard", "d_in": 8, "d_sae": 24, "apply_b_dec_to_input": True,
           "normalize_activations": "none", "metadata": {"sae_lens_version": "6.54.12",
                                                         "hook_name": "blocks.2.hook_resid_post", "model_name": "m"}}


def test_saelens_layer_from_the_hook_and_a_conflicting_layer_is_refused(tmp_path):
    write_saelens(tmp_path / "s", NEW_CFG, saelens_tensors())
    assert load_sae(tmp_path / "s").layer == 3
    assert load_sae(tmp_path / "s", layer=3).layer == 3
    with pytest.raises(PersonavecError, match=r"is for layer 3.*--layer 5"):
        load_sae(tmp_path / "s", layer=5)


def test_a_layer_the_file_does_not_tell_needs_layer(tmp_path):
    write_saelens(tmp_path / "s", {**NEW_CFG, "metadata": {"sae_lens_version": "6.1.0"}}, saelens_tensors())
    with pytest.raises(PersonavecError, match="give --layer"):
        load_sae(tmp_path / "s")
    assert load_sae(tmp_path / "s", layer=2).layer == 2


@pytest.mark.parametrize(("change", "message"), [
    ({"architecture": "gated"}, "architecture \"gated\" is not one personavec reads"),
    ({"normalize_activations": "expected_average_only_in"}, "normalize_activations is \"expected_average_only_in\""),
    ({"normalize_activations": "constant_norm_rescale"}, "normalize_activations is \"constant_norm_rescale\""),
    ({"normalize_activations": "layer_norm"}, "normalize_activations is \"layer_norm\""),
    ({"architecture": "topk"}, "topk SAE without k"),
])
def test_saelens_configs_we_cannot_reproduce_are_refused_in_one_line(tmp_path, change, message):
    write_saelens(tmp_path / "s", {**NEW_CFG, **change}, saelens_tensors())
    with pytest.raises(PersonavecError, match=message) as e:
        load_sae(tmp_path / "s")
    assert "\n" not in str(e.value)


def test_old_flat_saelens_layout_boolean_normalisation_means_the_unfolded_scale(tmp_path):
    flat = {"d_in": 8, "d_sae": 24, "hook_name": "blocks.0.hook_resid_pre", "activation_fn_str": "relu",
            "normalize_activations": True}
    write_saelens(tmp_path / "s", flat, saelens_tensors())
    with pytest.raises(PersonavecError, match="expected_average_only_in"):
        load_sae(tmp_path / "s")
    write_saelens(tmp_path / "t", {**flat, "normalize_activations": False, "activation_fn_str": "tanh-relu"},
                  saelens_tensors())
    with pytest.raises(PersonavecError, match="tanh-relu"):
        load_sae(tmp_path / "t")


def test_an_old_topk_cfg_without_k_says_what_is_missing(tmp_path):
    flat = {"d_in": 8, "d_sae": 24, "hook_name": "blocks.0.hook_resid_pre", "activation_fn_str": "topk",
            "activation_fn_kwargs": {}}
    write_saelens(tmp_path / "s", flat, saelens_tensors())
    with pytest.raises(PersonavecError, match="topk SAE without k in activation_fn_kwargs") as e:
        load_sae(tmp_path / "s")
    assert "not one personavec reproduces" not in str(e.value)


def test_a_zero_decoder_row_in_a_rescaled_topk_sae_stays_a_latent_that_decodes_to_nothing(tmp_path):
    t = saelens_tensors()
    t["W_dec"][5] = 0.0
    write_saelens(tmp_path / "s", {**NEW_CFG, "architecture": "topk", "k": 4, "rescale_acts_by_decoder_norm": True},
                  t)
    sae = load_sae(tmp_path / "s")
    assert all(bool(torch.isfinite(x).all()) for x in (sae.W_enc, sae.b_enc, sae.W_dec))
    x = torch.randn(16, 8)
    # the file's own rule: top-k of pre·‖d_i‖, decoded by (a/‖d_i‖)·d_i, a zero row contributing nothing
    norms = t["W_dec"].norm(dim=-1)
    pre = ((x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]) * norms
    top = pre.topk(4, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    live = norms > 0
    want = (acts[:, live] / norms[live]) @ t["W_dec"][live] + t["b_dec"]
    assert torch.allclose(sae.decode(sae.encode(x)), want, atol=1e-5)


def test_dictionary_learning_in_a_folder_of_the_users_naming_reads_the_configs_layer(tmp_path):
    sae = random_sae()
    state = {"encoder.weight": sae.W_enc.T.contiguous(), "encoder.bias": sae.b_enc,
             "decoder.weight": sae.W_dec.T.contiguous(), "bias": sae.b_dec}
    for folder, layer in (("run_layer_3", 7), ("attn_out_layer_3", None)):
        d = tmp_path / folder / "trainer_0"
        d.mkdir(parents=True)
        torch.save(state, d / "ae.pt")
        (d / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "layer": 6}}))
        if layer is None:  # the library's own name for an SAE on the attention output
            with pytest.raises(PersonavecError, match="not the residual stream"):
                load_sae(d)
        else:
            assert load_sae(d).layer == layer


def test_a_missing_tensor_a_truncated_file_and_nan_weights_are_one_line_each(tmp_path):
    t = saelens_tensors()
    write_saelens(tmp_path / "a", NEW_CFG, {k: v for k, v in t.items() if k != "b_enc"})
    with pytest.raises(PersonavecError, match="no tensor \"b_enc\""):
        load_sae(tmp_path / "a")
    write_saelens(tmp_path / "b", NEW_CFG, t)
    w = tmp_path / "b" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(PersonavecError, match=r"not a readable safetensors file.*cut short") as e:
        load_sae(tmp_path / "b")
    assert "\n" not in str(e.value)
    bad = dict(t)
    bad["W_dec"] = bad["W_dec"].clone()
    bad["W_dec"][3, 2] = float("nan")
    write_saelens(tmp_path / "c", NEW_CFG, bad)
    with pytest.raises(PersonavecError, match="NaN"):
        load_sae(tmp_path / "c")


class NotATensor:
    """A pickled object: loading it would run code, which weights_only refuses."""


def test_a_pickle_that_is_not_weights_only_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "Model-SAE-l4.pth"
    torch.save({"encoder_linear.weight": NotATensor()}, path)
    with pytest.raises(PersonavecError, match="not a weights-only pickle"):
        load_sae(path, layer=5)
    raw = tmp_path / "raw.pth"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(PersonavecError, match="not a weights-only pickle"):
        load_sae(raw, layer=1)
    cut = tmp_path / "cut.pth"
    torch.save({"encoder_linear.weight": torch.zeros(3, 3)}, cut)
    cut.write_bytes(cut.read_bytes()[:100])
    with pytest.raises(PersonavecError, match="not a readable torch file"):
        load_sae(cut, layer=1)


def test_nothing_recognisable_says_what_was_expected(tmp_path):
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(PersonavecError, match=r"found no SAE.*sae_weights.safetensors"):
        load_sae(tmp_path)
    with pytest.raises(PersonavecError, match="does not exist"):
        load_sae(tmp_path / "missing")


def write_sparsify(d, seed: int, k: int = 4) -> None:
    sae = random_sae(seed=seed)
    d.mkdir(parents=True)
    save_file({"encoder.weight": sae.W_enc.T.contiguous(), "encoder.bias": sae.b_enc, "W_dec": sae.W_dec,
               "b_dec": sae.b_dec}, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"activation": "topk", "num_latents": 24, "k": k, "d_in": 8}))


def test_sparsify_run_with_several_hookpoints_needs_layer_and_names_them(tmp_path):
    write_sparsify(tmp_path / "run" / "layers.2", 1)
    write_sparsify(tmp_path / "run" / "layers.5", 2)
    with pytest.raises(PersonavecError, match=r"several hookpoints \(layers.2, layers.5\).*--layer"):
        load_sae(tmp_path / "run")
    sae = load_sae(tmp_path / "run", layer=6)
    assert (sae.layer, sae.hook_name, sae.activation, sae.k) == (6, "layers.5", "topk", 4)
    assert torch.equal(sae.W_enc, random_sae(seed=2).W_enc)
    with pytest.raises(PersonavecError, match="no sparsify SAE for layer 4"):
        load_sae(tmp_path / "run", layer=4)
    assert load_sae(tmp_path / "run" / "layers.2").layer == 3
    assert detect_format(tmp_path / "run" / "layers.2" / "sae.safetensors")[0] == "sparsify"


def test_sparsify_coders_we_cannot_reproduce_are_refused(tmp_path):
    write_sparsify(tmp_path / "layers.1", 1)
    cfg = json.loads((tmp_path / "layers.1" / "cfg.json").read_text())
    for change, message in (({"transcode": True}, "transcode"), ({"activation": "groupmax"}, "groupmax")):
        (tmp_path / "layers.1" / "cfg.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(PersonavecError, match=message):
            load_sae(tmp_path / "layers.1")


def test_dictionary_learning_layer_from_the_config_when_no_folder_says_it(tmp_path):
    sae = random_sae()
    torch.save({"encoder.weight": sae.W_enc.T.contiguous(), "encoder.bias": sae.b_enc,
                "decoder.weight": sae.W_dec.T.contiguous(), "bias": sae.b_dec}, tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder", "layer": 6,
                                                                  "lm_name": "org/lm"}}))
    got = load_sae(tmp_path)
    assert (got.layer, got.model_id, got.activation, got.apply_b_dec_to_input) == (7, "org/lm", "relu", True)
    assert torch.equal(got.W_dec, sae.W_dec)
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "GatedAutoEncoder"}}))
    with pytest.raises(PersonavecError, match="GatedAutoEncoder"):
        load_sae(tmp_path)


def test_gemma_scope_off_the_residual_stream_is_refused(tmp_path):
    d = tmp_path / "gemma-scope-2b-pt-mlp" / "layer_3" / "width_16k" / "average_l0_50"
    d.mkdir(parents=True)
    np.savez(d / "params.npz", W_enc=np.zeros((8, 24), np.float32))
    with pytest.raises(PersonavecError, match="not the residual stream"):
        load_sae(d)


def test_dictionary_learning_jumprelu_and_the_classes_we_cannot_tell_or_read(tmp_path):
    sae = random_sae()
    d = tmp_path / "resid_post_layer_4" / "trainer_1"
    d.mkdir(parents=True)
    torch.save({"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec,
                "threshold": torch.full((24,), 0.2)}, d / "ae.pt")
    got = load_sae(d)
    assert (got.layer, got.activation, got.apply_b_dec_to_input) == (5, "jumprelu", False)
    x = torch.randn(5, 8)
    pre = x @ sae.W_enc + sae.b_enc
    assert torch.equal(got.encode(x), torch.relu(pre * (pre > 0.2)))  # JumpReluAutoEncoder.encode
    torch.save({"encoder.weight": sae.W_enc.T.contiguous(), "encoder.bias": sae.b_enc, "b_dec": sae.b_dec,
                "decoder.weight": sae.W_dec.T.contiguous(), "k": torch.tensor(4), "threshold": torch.tensor(-1.0)},
               d / "ae.pt")
    with pytest.raises(PersonavecError, match="put its config"):
        load_sae(d)
    (d / "config.json").write_text(json.dumps({"trainer": {"dict_class": "MatryoshkaBatchTopKSAE"}}))
    with pytest.raises(PersonavecError, match="MatryoshkaBatchTopKSAE"):
        load_sae(d)
    (d / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK", "layer": 9}}))
    with pytest.raises(PersonavecError, match="resid_post_layer_4"):  # the folder and the config must agree
        load_sae(d, layer=10)
    assert load_sae(d).k == 4


def test_a_goodfire_file_beside_a_config_is_still_read_as_goodfire(tmp_path):
    g = torch.Generator().manual_seed(1)
    torch.save({"encoder_linear.weight": torch.randn(24, 8, generator=g), "encoder_linear.bias": torch.zeros(24),
                "decoder_linear.weight": torch.randn(8, 24, generator=g), "decoder_linear.bias": torch.zeros(8)},
               tmp_path / "sae.pth")
    (tmp_path / "config.json").write_text("{}")
    sae = load_sae(tmp_path, layer=2)
    assert (sae.provenance["format"], sae.apply_b_dec_to_input, sae.layer) == ("goodfire", False, 2)
