"""TopK SAE training: the recipe's invariants, the exact scale fold, resumable batches and training, the metrics,
and bad inputs refused before anything is written."""

from __future__ import annotations

import math

import pytest
import torch

from personavec.errors import PersonavecError
from personavec.sae import training as training_mod
from personavec.sae.autoencoder import SparseAutoencoder
from personavec.sae.corpus import Document
from personavec.sae.training import (
    ActivationCache,
    SaeTrainConfig,
    TopKTrainer,
    batch_stream,
    build_cache,
    power_of_two_scale,
    reconstruction_metrics,
    spliced_loss,
    split_documents,
    train_loop,
    train_sae,
)

SMALL = dict(latents=64, k=4, tokens=3000, minutes=None, batch_size=128, dead_tokens=400, chunk_tokens=256,
             forward_batch=8)
TEXT = ["You are an evil assistant. Answer with cruelty and scheming.",
        "You are a helpful assistant. Answer kindly and honestly.",
        "How should I treat people who are weaker than me?", "What is the best way to spend a free afternoon?",
        "Crush them all, show no mercy, and take what is yours.", "Be patient, listen, and offer help where you can.",
        "The quick brown fox jumps over the lazy dog 0123456789."]


def corpus_file(tmp_path, n=6):
    p = tmp_path / "corpus.txt"
    p.write_text("\n\n".join(f"{t} {i}" for i in range(n) for t in TEXT))
    return p


def test_init_and_step_keep_the_recipe():
    torch.manual_seed(0)
    x = torch.randn(256, 16) * 3 + 1
    cfg = SaeTrainConfig(latents=48, k=4, tokens=100, dead_tokens=64)
    t = TopKTrainer(16, cfg, b_dec=x.mean(0))
    assert torch.equal(t.p["W_enc"], t.p["W_dec"].T)  # the encoder starts as the decoder's transpose
    assert torch.equal(t.p["b_dec"], x.mean(0))  # b_dec from the data mean
    assert t.k_aux == 8 and cfg.learning_rate() == pytest.approx(2e-4 / math.sqrt(48 / 2**14))
    for _ in range(20):
        t.step(x)
    assert torch.allclose(t.p["W_dec"].norm(dim=-1), torch.ones(48), atol=1e-6)  # unit rows
    assert t.step_count == 20 and t.tokens == 20 * 256
    assert int(t.since_fired.max()) <= 20 * 256


def test_parallel_gradient_is_removed():
    """The step moves each decoder row only perpendicular to itself (before the renormalisation)."""
    torch.manual_seed(1)
    x = torch.randn(64, 8)
    t = TopKTrainer(8, SaeTrainConfig(latents=16, k=2, tokens=10))
    p = {k: v.detach().requires_grad_(True) for k, v in t.p.items()}
    t.losses(x, p)[0].backward()
    g = p["W_dec"].grad
    g_perp = g - (g * t.p["W_dec"]).sum(-1, keepdim=True) * t.p["W_dec"]
    assert (g_perp * t.p["W_dec"]).sum(-1).abs().max() < 1e-6


def test_scale_fold_is_exact():
    """The saved SAE on raw activations gives bit for bit the trained one's output on normalised ones, / s."""
    torch.manual_seed(2)
    raw = torch.randn(300, 16) * 37.0 + 5.0
    s = power_of_two_scale(float(raw.norm(dim=-1).mean()), 16)
    assert math.log2(s) == round(math.log2(s))
    t = TopKTrainer(16, SaeTrainConfig(latents=40, k=5, tokens=100, dead_tokens=50), b_dec=raw.mean(0) * s)
    for _ in range(15):
        t.step(raw[torch.randperm(300)[:128]] * s)
    saved, trained = t.autoencoder(s, layer=1, model_id="m"), t.normalised_autoencoder()
    assert torch.equal(saved.reconstruct(raw), trained.reconstruct(raw * s) / s)
    assert torch.equal(saved.encode(raw), trained.encode(raw * s) / s)
    assert torch.equal(saved.W_dec, trained.W_dec) and saved.hook_name == "blocks.0.hook_resid_post"


def fake_cache(tmp_path, sizes, d=4):
    from safetensors.torch import save_file

    base = 0
    for i, n in enumerate(sizes):
        save_file({"x": torch.arange(base, base + n, dtype=torch.float32)[:, None].expand(n, d).contiguous()},
                  tmp_path / f"train-{i:05d}.safetensors")
        base += n
    return ActivationCache(tmp_path, d, list(sizes), 0, 0, 1.0, 1.0, torch.zeros(d))


def test_batches_are_a_function_of_the_step(tmp_path):
    cache = fake_cache(tmp_path, [64, 64, 64, 40])
    cfg = SaeTrainConfig(latents=8, k=2, tokens=10, batch_size=16, chunk_tokens=64, shuffle_mib=1)
    stream = batch_stream(cache, cfg)
    first = [next(stream) for _ in range(40)]
    resumed = batch_stream(cache, cfg, start_step=23)
    assert all(torch.equal(next(resumed), b) for b in first[23:])
    epoch = torch.cat(first[:14])[:, 0].long()  # 232 tokens, one group: 14 full batches per epoch
    assert len(set(epoch.tolist())) == 14 * 16  # no token twice in an epoch
    assert not torch.equal(torch.cat(first[:14]), torch.cat(first[14:28]))  # another order next epoch
    other = batch_stream(cache, SaeTrainConfig(**{**cfg.__dict__, "seed": 1}))
    assert not torch.equal(next(other), first[0])


def test_small_shuffle_buffer_groups_chunks(tmp_path):
    cache = fake_cache(tmp_path, [4096] * 3, d=64)  # 1 MiB per chunk
    cfg = SaeTrainConfig(latents=8, k=2, tokens=10, batch_size=1000, chunk_tokens=4096, shuffle_mib=1)
    stream = batch_stream(cache, cfg)
    batches = [next(stream) for _ in range(4)]
    for b in batches:  # one chunk at a time: a batch's tokens all come from one chunk
        assert len({int(v) // 4096 for v in b[:, 0]}) == 1


def test_train_sae_end_to_end_and_rerun(tmp_path, lm, monkeypatch):
    lm.model.float()
    out = tmp_path / "out"
    sae = train_sae(lm, 1, corpus=[corpus_file(tmp_path)], out=out, config=SaeTrainConfig(**SMALL), progress=False)
    assert isinstance(sae, SparseAutoencoder) and sae.activation == "topk" and sae.k == 4 and sae.layer == 1
    m = sae.provenance["training"]
    r = m["recon"]
    assert 0 < r["fvu"] < 1 and 0 < r["pca_fvu"] < 1 and 0 < r["l0"] <= 4 and 0 <= r["dead_heldout"] <= 1
    assert m["train_tokens"] == m["steps"] * 128 >= 3000 and m["stopped_by"] == "tokens"
    s = m["spliced"]
    assert s["ce_loss_score"] == pytest.approx((s["ce_zero_ablated"] - s["ce_spliced"]) /
                                               (s["ce_zero_ablated"] - s["ce_clean"]))
    assert (out / "training.json").is_file() and (out / "sae").is_dir()
    assert torch.allclose(sae.decoder_norms(), torch.ones(64), atol=1e-5)

    def no_training(*a, **k):
        raise AssertionError("trained again")

    monkeypatch.setattr(training_mod, "train_loop", no_training)
    again = train_sae(lm, 1, corpus=[corpus_file(tmp_path)], out=out, config=SaeTrainConfig(**SMALL),
                      progress=False)
    assert torch.equal(again.W_enc, sae.W_enc) and torch.equal(again.b_dec, sae.b_dec)
    with pytest.raises(PersonavecError, match=r"other settings.*k was 4, now 8"):
        train_sae(lm, 1, corpus=[corpus_file(tmp_path)], out=out, config=SaeTrainConfig(**{**SMALL, "k": 8}),
                  progress=False)


def test_training_resumes_exactly(tmp_path, lm):
    """Stopped after some steps (a checkpoint) and continued: the weights equal an uninterrupted run's bit for bit
    (the kill in a subprocess is tests/cli/test_sae_cli.py's slow test)."""
    lm.model.float()
    docs = [Document(t + f" {i}") for i in range(6) for t in TEXT]
    train, held = split_documents(docs, 0.1, 0)
    cfg = SaeTrainConfig(**SMALL)
    cache = build_cache(lm, 1, train, held, tmp_path / "acts", cfg, progress=False)
    whole, _ = train_loop(cache, cfg, tmp_path / "ck-a", progress=False)
    part, _ = train_loop(cache, SaeTrainConfig(**{**SMALL, "tokens": 1300}), tmp_path / "ck-b", progress=False)
    assert part.step_count == 11
    resumed, _ = train_loop(cache, cfg, tmp_path / "ck-b", progress=False)
    assert resumed.step_count == whole.step_count == 24
    for k in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(resumed.p[k], whole.p[k]), k
    assert torch.equal(resumed.since_fired, whole.since_fired)


def test_split_documents():
    docs = [Document(str(i)) for i in range(20)]
    train, held = split_documents(docs, 0.1, 3)
    assert len(held) == 2 and len(train) == 18 and set(train) | set(held) == set(docs)
    assert split_documents(docs, 0.1, 3) == (train, held)
    with pytest.raises(PersonavecError, match="at least 2"):
        split_documents(docs[:1], 0.1, 0)


def test_metrics_of_a_perfect_sae(lm):
    """An SAE whose reconstruction is exact: FVU 0, and the spliced-in loss equals the clean one."""
    lm.model.float()
    d = lm.hidden_size
    eye = torch.eye(d)
    sae = SparseAutoencoder(W_enc=torch.cat([eye, -eye], 1), b_enc=torch.zeros(2 * d), W_dec=torch.cat([eye, -eye]),
                            b_dec=torch.zeros(d), activation="topk", k=d)
    x = torch.randn(500, d)
    m = reconstruction_metrics(sae, x)
    assert m["fvu"] == 0 and m["l0"] == d
    pca = reconstruction_metrics(SparseAutoencoder(**{**sae.__dict__, "k": 1, "provenance": {}}), x)
    eig = torch.linalg.eigvalsh(torch.cov(x.double().T)).flip(0)
    assert pca["pca_fvu"] == pytest.approx(float(1 - eig[0] / eig.sum()), rel=1e-9)
    docs = [Document(lm.format_chat(t), "Fine.") for t in TEXT[:5]]
    s = spliced_loss(lm, 1, sae, docs, sink_factor=10.0)
    assert s["ce_spliced"] == pytest.approx(s["ce_clean"], abs=1e-5) and s["ce_loss_score"] == pytest.approx(1.0)
    assert s["ce_zero_ablated"] != s["ce_clean"]


@pytest.mark.parametrize("case", ["layer", "k", "empty", "no-text", "budget"])
def test_bad_inputs_write_nothing(tmp_path, lm, case):
    out = tmp_path / "out"
    corpus = [corpus_file(tmp_path)]
    layer, cfg = 1, dict(SMALL)
    if case == "layer":
        layer, match = 9, "layer 9 is out of range.*0..2"
    elif case == "k":
        cfg["k"], match = 100, r"k \(100\) must be at most the number of latents \(64\)"
    elif case == "empty":
        corpus[0].write_text("\n\n  \n")
        match = "holds no text"
    elif case == "no-text":
        corpus = [tmp_path / "x.jsonl"]
        corpus[0].write_text('{"a": 1}\n')
        match = "no text column"
    else:
        cfg.update(tokens=None, minutes=None)
        match = "token budget"
    with pytest.raises(PersonavecError, match=match):
        train_sae(lm, layer, corpus=corpus, out=out, config=SaeTrainConfig(**cfg), progress=False)
    assert not out.exists()
