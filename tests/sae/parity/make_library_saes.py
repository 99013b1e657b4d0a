"""Run under the libraries' venv (.venv-sae, `make sae-venv`): each library builds SAEs with random weights with its
own code, saves them in its own format, and encodes and decodes the same random activations; the results go to
``OUT/<case>/expected.safetensors`` beside the saved SAE, for tests/sae/test_parity.py to compare with load_sae.

    .venv-sae/bin/python tests/sae/parity/make_library_saes.py OUT

Also, with ``--check-ours DIR X.safetensors``: sae-lens loads our save_sae output at DIR, encodes ``x`` from
X.safetensors and writes ``latents`` and ``recon`` next to it (``X.saelens.safetensors``).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

D, N, K, ROWS = 16, 64, 6, 40


def activations(seed: int) -> torch.Tensor:
    return torch.randn(ROWS, D, generator=torch.Generator().manual_seed(seed)) * 2.0


def randomize(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Every floating parameter of ``module`` set to seeded random values (decoder norms not 1, biases non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def record(out: Path, case: str, x: torch.Tensor, latents: torch.Tensor, recon: torch.Tensor) -> None:
    d = out / case
    d.mkdir(parents=True, exist_ok=True)
    save_file({"x": x.contiguous(), "latents": latents.detach().contiguous(), "recon": recon.detach().contiguous()},
              str(d / "expected.safetensors"))
    print(f"{case}: latents nonzero per row {float((latents != 0).sum(-1).float().mean()):.1f}")


# ------------------------------------------------------------------------------------------------ sae-lens

def saelens_cases(out: Path) -> None:
    from sae_lens import SAE
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    meta = {"model_name": "tiny-random", "hook_name": "blocks.2.hook_resid_post"}
    builds = {
        "saelens_standard": (StandardSAE, StandardSAEConfig(d_in=D, d_sae=N)),
        "saelens_standard_no_bdec": (StandardSAE, StandardSAEConfig(d_in=D, d_sae=N, apply_b_dec_to_input=False)),
        "saelens_topk": (TopKSAE, TopKSAEConfig(d_in=D, d_sae=N, k=K)),
        "saelens_topk_rescaled": (TopKSAE, TopKSAEConfig(d_in=D, d_sae=N, k=K, rescale_acts_by_decoder_norm=True)),
        "saelens_jumprelu": (JumpReLUSAE, JumpReLUSAEConfig(d_in=D, d_sae=N)),
    }
    for i, (case, (cls, cfg)) in enumerate(builds.items()):
        for key, value in meta.items():
            cfg.metadata[key] = value
        sae = cls(cfg)
        randomize(sae, 100 + i)
        if case == "saelens_jumprelu":  # thresholds of both signs: the ReLU under the mask matters for negative ones
            with torch.no_grad():
                sae.threshold.copy_(torch.linspace(-0.5, 1.5, N))
        d = out / case / "sae"
        sae.save_model(d)
        loaded = SAE.load_from_disk(str(d))  # what a user of the library gets from that directory
        x = activations(i)
        z = loaded.encode(x)
        record(out, case, x, z, loaded.decode(z))

    # BatchTopK: trained as batch top-k, saved for inference as JumpReLU with its learned scalar threshold
    cfg = BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K)
    for key, value in meta.items():
        cfg.metadata[key] = value
    train = BatchTopKTrainingSAE(cfg)
    randomize(train, 200)
    with torch.no_grad():
        train.topk_threshold.fill_(0.4)
    d = out / "saelens_batchtopk" / "sae"
    train.save_inference_model(d)
    loaded = SAE.load_from_disk(str(d))
    x = activations(20)
    z = loaded.encode(x)
    record(out, "saelens_batchtopk", x, z, loaded.decode(z))

    # the pre-6.0 flat layout (hook_name, activation_fn_str + activation_fn_kwargs.k, boolean normalize_activations)
    d = out / "saelens_old_topk" / "sae"
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=N, k=K))
    randomize(sae, 300)
    sae.save_model(d)
    flat = {"d_in": D, "d_sae": N, "dtype": "float32", "device": "cpu", "model_name": "tiny-random",
            "hook_name": "blocks.1.hook_resid_pre", "hook_layer": 1, "hook_head_index": None,
            "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True,
            "normalize_activations": False, "finetuning_scaling_factor": False, "context_size": 128,
            "prepend_bos": True, "sae_lens_training_version": "3.13.0"}
    (d / "cfg.json").write_text(json.dumps(flat))
    loaded = SAE.load_from_disk(str(d))
    assert loaded.cfg.architecture() == "topk" and loaded.cfg.k == K, loaded.cfg
    x = activations(30)
    z = loaded.encode(x)
    record(out, "saelens_old_topk", x, z, loaded.decode(z))

    d = out / "saelens_old_standard" / "sae"
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=N))
    randomize(sae, 310)
    sae.save_model(d)
    flat.update(activation_fn_str="relu", activation_fn_kwargs={}, hook_name="blocks.0.hook_resid_post")
    (d / "cfg.json").write_text(json.dumps(flat))
    loaded = SAE.load_from_disk(str(d))
    x = activations(31)
    z = loaded.encode(x)
    record(out, "saelens_old_standard", x, z, loaded.decode(z))


# ------------------------------------------------------------------------------------------------ sparsify

def sparsify_cases(out: Path) -> None:
    from sparsify import SparseCoder, SparseCoderConfig

    run = out / "sparsify_topk" / "run"
    for i, hookpoint in enumerate(("layers.1", "layers.3")):
        coder = SparseCoder(D, SparseCoderConfig(num_latents=N, k=K))
        randomize(coder, 400 + i)
        coder.save_to_disk(run / hookpoint)
    (run / "config.json").write_text(json.dumps({"model": "tiny-random-sparsify", "hookpoints": ["layers.1",
                                                                                                "layers.3"]}))
    loaded = SparseCoder.load_from_disk(run / "layers.3")
    x = activations(40)
    enc = loaded.encode(x)
    latents = torch.zeros(ROWS, N).scatter(-1, enc.top_indices, enc.top_acts)
    record(out, "sparsify_topk", x, latents, loaded.decode(enc.top_acts, enc.top_indices))


# ------------------------------------------------------------------------------------- dictionary_learning

def dictionary_learning_cases(out: Path) -> None:
    from dictionary_learning import AutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    def save(case: str, ae: torch.nn.Module, dict_class: str, layer: int, extra: dict) -> Path:
        d = out / case / f"resid_post_layer_{layer}" / "trainer_0"
        d.mkdir(parents=True, exist_ok=True)
        torch.save(ae.state_dict(), d / "ae.pt")
        trainer = {"dict_class": dict_class, "activation_dim": D, "dict_size": N, "layer": layer,
                   "lm_name": "tiny-random-dl", "submodule_name": f"resid_post_layer_{layer}", **extra}
        (d / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128}}))
        return d / "ae.pt"

    ae = AutoEncoder(D, N)
    randomize(ae, 500)
    path = save("dl_standard", ae, "AutoEncoder", 2, {})
    loaded = AutoEncoder.from_pretrained(path, normalize_decoder=False)  # the decoder as stored
    x = activations(50)
    z = loaded.encode(x)
    record(out, "dl_standard", x, z, loaded.decode(z))

    ae = AutoEncoderTopK(D, N, K)
    randomize(ae, 510)
    path = save("dl_topk", ae, "AutoEncoderTopK", 1, {"k": K})
    loaded = AutoEncoderTopK.from_pretrained(path)
    x = activations(51)
    z = loaded.encode(x)
    record(out, "dl_topk", x, z, loaded.decode(z))

    ae = BatchTopKSAE(D, N, K)
    randomize(ae, 520)
    ae.threshold.fill_(0.3)  # the threshold training learns; inference keeps latents above it
    path = save("dl_batchtopk", ae, "BatchTopKSAE", 3, {"k": K})
    loaded = BatchTopKSAE.from_pretrained(path)
    x = activations(52)
    z = loaded.encode(x)  # use_threshold=True: the inference rule
    record(out, "dl_batchtopk", x, z, loaded.decode(z))


# ------------------------------------------------------------------------------ our save_sae, read by sae-lens

def check_ours(directory: Path, x_path: Path) -> None:
    from sae_lens import SAE

    sae = SAE.load_from_disk(str(directory))
    x = load_file(str(x_path))["x"]
    z = sae.encode(x)
    save_file({"latents": z.detach().contiguous(), "recon": sae.decode(z).detach().contiguous()},
              str(x_path.with_suffix(".saelens.safetensors")))
    print(json.dumps({"architecture": sae.cfg.architecture(), "hook_name": sae.cfg.metadata.hook_name,
                      "model_name": sae.cfg.metadata.model_name}))


def main(argv: list[str]) -> None:
    if argv[:1] == ["--check-ours"]:
        for directory, x in zip(argv[1::2], argv[2::2]):
            check_ours(Path(directory), Path(x))
        return
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    saelens_cases(out)
    sparsify_cases(out)
    dictionary_learning_cases(out)
    versions = {name: version(name) for name in ("sae-lens", "eai-sparsify", "dictionary-learning", "torch",
                                                 "transformer-lens", "transformers")}
    (out / "versions.json").write_text(json.dumps(versions))
    print(json.dumps(versions))


if __name__ == "__main__":
    main(sys.argv[1:])
