"""Format parity against the real libraries: sae-lens, eai-sparsify and dictionary_learning each build random SAEs
with their own code in their own venv (.venv-sae, `make sae-venv`; tests/sae/parity/make_library_saes.py), save them
in their own format and encode and decode random activations; load_sae reads each file and our encode and decode
equal the library's to 1e-5. Our save_sae output is read back by sae-lens and encodes identically there. Gemma Scope
and Goodfire files are written here per their published layout, with their encode rules written out.

A missing library venv fails (with the command that builds it), never skips.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from personavec.sae.autoencoder import SparseAutoencoder
from personavec.sae.formats import load_sae, save_sae

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "sae" / "parity" / "make_library_saes.py"
TOL = 1e-5


def library_python() -> Path:
    venv = Path(os.environ.get("PERSONAVEC_SAE_VENV", ROOT / ".venv-sae"))
    python = venv / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"the SAE libraries' venv {venv} is missing: build it with `make sae-venv` (make test does)",
                    pytrace=False)
    return python


def run_library(*args: str) -> str:
    done = subprocess.run([str(library_python()), str(SCRIPT), *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": ""})
    if done.returncode:
        pytest.fail(f"the libraries' parity script failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


@pytest.fixture(scope="module")
def library_saes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("library_saes")
    print(run_library(str(out)), file=sys.stderr)
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def assert_parity(sae: SparseAutoencoder, expected: dict[str, torch.Tensor], case: str) -> None:
    x, latents, recon = expected["x"], expected["latents"], expected["recon"]
    ours = sae.encode(x)
    d_enc, d_dec, d_rec = max_diff(ours, latents), max_diff(sae.decode(latents), recon), max_diff(sae.decode(ours),
                                                                                                   recon)
    print(f"PARITY {case}: encode {d_enc:.2e} decode {d_dec:.2e} reconstruct {d_rec:.2e}", file=sys.stderr)
    assert torch.equal(ours != 0, latents != 0) or d_enc <= TOL, case
    assert d_enc <= TOL and d_dec <= TOL and d_rec <= TOL, (case, d_enc, d_dec, d_rec)


# (case, the path given to load_sae, layer=, the layer we must read, architecture)
CASES = [
    ("saelens_standard", "sae", None, 3, "relu"),
    ("saelens_standard_no_bdec", "sae", None, 3, "relu"),
    ("saelens_topk", "sae", None, 3, "topk"),
    ("saelens_topk_rescaled", "sae", None, 3, "topk"),
    ("saelens_jumprelu", "sae", None, 3, "jumprelu"),
    ("saelens_batchtopk", "sae", None, 3, "jumprelu"),
    ("saelens_old_topk", "sae", None, 1, "topk"),
    ("saelens_old_standard", "sae", None, 1, "relu"),
    ("sparsify_topk", "run", 4, 4, "topk"),
    ("dl_standard", "resid_post_layer_2/trainer_0", None, 3, "relu"),
    ("dl_topk", "resid_post_layer_1/trainer_0/ae.pt", None, 2, "topk"),
    ("dl_batchtopk", "resid_post_layer_3/trainer_0", None, 4, "jumprelu"),
]


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.parametrize(("case", "where", "layer", "want_layer", "activation"), CASES, ids=[c[0] for c in CASES])
def test_ours_encodes_and_decodes_as_the_library_does(library_saes, case, where, layer, want_layer, activation):
    sae = load_sae(library_saes / case / where, layer=layer)
    assert (sae.layer, sae.activation) == (want_layer, activation)
    assert_parity(sae, load_file(str(library_saes / case / "expected.safetensors")), case)


@pytest.mark.slow
@pytest.mark.parity
def test_library_versions_are_the_pinned_ones(library_saes):
    versions = json.loads((library_saes / "versions.json").read_text())
    print(f"PARITY versions {versions}", file=sys.stderr)
    assert versions["torch"].startswith("2.13.0") and "+cpu" in versions["torch"]
    assert {versions["sae-lens"], versions["eai-sparsify"], versions["dictionary-learning"]} <= {
        "6.54.12", "1.3.3", "0.1.0"}


@pytest.mark.slow
@pytest.mark.parity
def test_our_saelens_output_loads_in_sae_lens_and_encodes_identically(tmp_path):
    g = torch.Generator().manual_seed(7)
    d, n = 16, 48

    def sae(**kw) -> SparseAutoencoder:
        return SparseAutoencoder(W_enc=torch.randn(d, n, generator=g), b_enc=torch.randn(n, generator=g) * 0.3,
                                 W_dec=torch.randn(n, d, generator=g), b_dec=torch.randn(d, generator=g) * 0.3,
                                 layer=4, model_id="org/tiny", **kw)

    ours = {"relu": sae(), "relu_no_bdec": sae(apply_b_dec_to_input=False), "topk": sae(activation="topk", k=5),
            "jumprelu": sae(activation="jumprelu", threshold=torch.linspace(-0.5, 1.5, n))}
    args = []
    for name, s in ours.items():
        save_sae(s, tmp_path / name)
        save_file({"x": torch.randn(30, d, generator=g)}, str(tmp_path / f"{name}.safetensors"))
        args += [str(tmp_path / name), str(tmp_path / f"{name}.safetensors")]
    lines = [json.loads(line) for line in run_library("--check-ours", *args).splitlines() if line.startswith("{")]
    assert [line["hook_name"] for line in lines] == ["blocks.3.hook_resid_post"] * 4
    assert [line["architecture"] for line in lines] == ["standard", "standard", "topk", "jumprelu"]
    for name, s in ours.items():
        x = load_file(str(tmp_path / f"{name}.safetensors"))["x"]
        theirs = load_file(str(tmp_path / f"{name}.saelens.safetensors"))
        assert_parity(s, {"x": x, **theirs}, f"save_sae {name} -> sae-lens")


# ------------------------------------------------------------------ Gemma Scope and Goodfire, as published

def test_gemma_scope_params_npz_encodes_by_its_published_rule(tmp_path):
    """Gemma Scope: params.npz with W_enc [d, n], W_dec [n, d], b_enc, b_dec, threshold; JumpReLU with no b_dec at
    the input; ``layer_N`` of a residual release reads blocks.N.hook_resid_post, our layer N+1."""
    rng = np.random.default_rng(0)
    d, n = 16, 40
    p = {"W_enc": rng.normal(size=(d, n)), "W_dec": rng.normal(size=(n, d)), "b_enc": rng.normal(size=n) * 0.3,
         "b_dec": rng.normal(size=d) * 0.3, "threshold": np.abs(rng.normal(size=n)) * 0.5}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    where = tmp_path / "gemma-scope-2b-pt-res" / "layer_5" / "width_16k" / "average_l0_71"
    where.mkdir(parents=True)
    np.savez(where / "params.npz", **p)
    x = torch.from_numpy(rng.normal(size=(30, d)).astype(np.float32) * 2)
    t = {k: torch.from_numpy(v) for k, v in p.items()}
    # the published rule (their tutorial, in torch): pre = x @ W_enc + b_enc; acts = (pre > threshold) * relu(pre);
    # recon = acts @ W_dec + b_dec
    pre = x @ t["W_enc"] + t["b_enc"]
    acts = (pre > t["threshold"]) * torch.relu(pre)
    recon = acts @ t["W_dec"] + t["b_dec"]
    sae = load_sae(where)
    assert (sae.layer, sae.activation, sae.apply_b_dec_to_input) == (6, "jumprelu", False)
    assert_parity(sae, {"x": x, "latents": acts, "recon": recon}, "gemma-scope")
    assert load_sae(where / "params.npz", layer=6).layer == 6
    flat = tmp_path / "elsewhere"
    flat.mkdir()
    np.savez(flat / "params.npz", **p)
    with pytest.raises(Exception, match="give --layer"):
        load_sae(flat)
    assert load_sae(flat, layer=2).layer == 2


def test_goodfire_state_dict_encodes_by_its_published_rule(tmp_path):
    """Goodfire: a state dict with encoder_linear.weight [n, d] / .bias and decoder_linear.weight [d, n] / .bias;
    encode relu(encoder_linear(x)) with no b_dec at the input, decode decoder_linear(f)."""
    g = torch.Generator().manual_seed(3)
    d, n = 16, 40
    enc, dec = torch.nn.Linear(d, n), torch.nn.Linear(n, d)
    with torch.no_grad():
        for t in (enc.weight, enc.bias, dec.weight, dec.bias):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
    path = tmp_path / "Llama-3.1-8B-Instruct-SAE-l19.pth"
    torch.save({"encoder_linear.weight": enc.weight.detach(), "encoder_linear.bias": enc.bias.detach(),
                "decoder_linear.weight": dec.weight.detach(), "decoder_linear.bias": dec.bias.detach()}, path)
    x = torch.randn(30, d, generator=g) * 2
    with torch.no_grad():
        acts = torch.relu(enc(x))  # the published encode
        recon = dec(acts)  # the published decode
    with pytest.raises(Exception, match="--layer 20"):
        load_sae(path)
    sae = load_sae(tmp_path, layer=20)
    assert (sae.layer, sae.activation, sae.apply_b_dec_to_input) == (20, "relu", False)
    assert_parity(sae, {"x": x, "latents": acts, "recon": recon}, "goodfire")
