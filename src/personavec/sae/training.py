"""Training a TopK sparse autoencoder offline on one layer's residual stream, resumably and exactly.

The recipe (Gao et al. 2024): ``k`` latents active per token (TopK, then ReLU); ``b_dec`` initialised to the data
mean; the encoder initialised as the decoder's transpose; unit-norm decoder rows, the gradient component parallel
to each row removed before every step and the rows renormalised after it; AuxK (the residual error reconstructed by
the ``k_aux`` largest latents among those dead for ``dead_tokens`` tokens, coefficient 1/32); the loss is the
squared error normalised by the batch's variance (a batch FVU); Adam with ``lr = 2e-4 / sqrt(n / 2^14)``.
Attention-sink / BOS tokens (norm above 10x the median of their batch) are dropped.

Scale. The activations are multiplied by one scalar ``s`` for training (``s`` makes their mean norm about
``sqrt(d_in)``) and ``s`` is folded back into the saved weights: ``b_enc / s``, ``b_dec / s``, decoder rows kept at
unit norm (the latents come out ``1/s`` as large). ``s`` is a power of two, so the fold is exact in floating point:
the saved SAE on raw activations gives bit for bit the trained one's reconstruction on normalised activations,
divided by ``s`` (a test checks this).

Activations. The corpus's residual states at the layer are computed once and written to ``DIR/activations/``
(chunks of ``chunk_tokens`` tokens, safetensors; the held-out documents' tokens beside them). Training reads them in
epochs: each epoch a seeded order of the chunks, taken in groups that fit ``shuffle_mib`` MiB, each group's tokens
shuffled with a seed and cut into batches. So the activations held in memory are at most ``shuffle_mib`` (default
256 MiB) while training and one chunk plus a forward batch while caching, and ``heldout_max_tokens`` x d_in x 4 bytes
(default 65 536 tokens: 144 MiB at d_in 576) while measuring, beside the model and the SAE with its Adam moments
(3 x 2 x latents x d_in x 4 bytes: 54 MiB at the defaults), whatever the corpus's size (disk: 4 bytes x d_in per
corpus token). The batch of step ``t`` is a function of the seed and ``t`` alone: a resumed run reads exactly the
batches an uninterrupted one would.

Resume. The whole training state (weights, Adam moments, the dead-latent counters, the step) is checkpointed to
``DIR/checkpoint/`` every ``checkpoint_minutes`` and at the end; killed (even by SIGKILL) and run again with the
same settings, training continues from the last checkpoint and, with a token budget, ends with weights equal bit
for bit to an uninterrupted run's. A time budget (``minutes``) counts training time over all runs together.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..errors import PersonavecError, finite, whole
from ..files import atomic_dir, claim_settings, fingerprint, locked, read_json, write_json
from ..model.activations import encode_for, iter_token_states, make_batch
from ..model.layers import edit, run_forward
from ..model.loading import LoadedModel, check_loaded, pad_token_id
from .autoencoder import SparseAutoencoder
from .corpus import CORPUS_SAMPLING, Document, read_corpus_files, run_documents, run_identity, sampled_corpus

log = logging.getLogger(__name__)
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 6.25e-10  # Gao et al.


@dataclass(frozen=True)
class SaeTrainConfig:
    """How a TopK SAE is trained (defaults: the recipe's, sized for the embedded model on 2 CPU cores).

    ``tokens``: training tokens (None: until ``minutes`` of training time have passed); ``lr`` None: the recipe's
    ``2e-4 / sqrt(latents / 2^14)``; ``k_aux`` None: ``d_in // 2``; ``checkpoint_steps`` (tests): also checkpoint
    every that many steps.
    """

    latents: int = 4096
    k: int = 32
    tokens: int | None = None
    minutes: float | None = 4.0
    seed: int = 0
    batch_size: int = 1024
    lr: float | None = None
    k_aux: int | None = None
    aux_coef: float = 1 / 32
    dead_tokens: int = 1 << 16
    heldout_share: float = 0.1
    sink_factor: float = 10.0
    chunk_tokens: int = 8192
    shuffle_mib: int = 256
    forward_batch: int = 16
    heldout_max_tokens: int = 1 << 16
    eval_docs: int = 48
    checkpoint_minutes: float = 2.0
    checkpoint_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("latents", "k", "batch_size", "dead_tokens", "chunk_tokens", "shuffle_mib", "forward_batch",
                     "heldout_max_tokens"):
            whole(getattr(self, name), name, 1)
        whole(self.seed, "seed", 0, 2**63 - 1)
        whole(self.eval_docs, "eval_docs", 0)
        if self.k > self.latents:
            raise PersonavecError(f"k ({self.k}) must be at most the number of latents ({self.latents}): lower --k "
                                  "or raise --latents")
        if self.tokens is not None:
            whole(self.tokens, "tokens", 1)
        if self.minutes is not None and not finite(self.minutes, "minutes") > 0:
            raise PersonavecError(f"minutes must be above 0, not {self.minutes:g}")
        if self.tokens is None and self.minutes is None:
            raise PersonavecError("give a token budget (--tokens) or a time budget (--minutes), or both")
        if self.lr is not None and not finite(self.lr, "lr") > 0:
            raise PersonavecError(f"lr must be above 0, not {self.lr:g}")
        if self.k_aux is not None:
            whole(self.k_aux, "k_aux", 1)
        if finite(self.aux_coef, "aux_coef") < 0:
            raise PersonavecError(f"aux_coef must be at least 0, not {self.aux_coef:g}")
        if not 0 < finite(self.heldout_share, "heldout_share") < 1:
            raise PersonavecError(f"heldout_share must lie between 0 and 1, not {self.heldout_share:g}")
        if not finite(self.sink_factor, "sink_factor") > 1:
            raise PersonavecError(f"sink_factor must be above 1, not {self.sink_factor:g}")
        if not finite(self.checkpoint_minutes, "checkpoint_minutes") > 0:
            raise PersonavecError("checkpoint_minutes must be above 0")
        if self.checkpoint_steps is not None:
            whole(self.checkpoint_steps, "checkpoint_steps", 1)

    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else 2e-4 / math.sqrt(self.latents / 2**14)

    def aux_k(self, d_in: int) -> int:
        return min(self.k_aux if self.k_aux is not None else max(1, d_in // 2), self.latents)

    def identity(self) -> dict[str, Any]:
        """The settings that define the trained weights (the time budget and checkpoint cadence do not)."""
        return {k: v for k, v in asdict(self).items() if k not in ("minutes", "checkpoint_minutes",
                                                                    "checkpoint_steps")}


# --------------------------------------------------------------------------------------------- activations


@dataclass
class ActivationCache:
    """The corpus's residual states at one layer on disk (see the module docstring)."""

    directory: Path
    d_in: int
    chunks: list[int]  # tokens per training chunk (train-00000.safetensors, ...)
    n_heldout: int
    n_dropped: int
    mean_norm: float
    scale: float  # a power of two: training reads x * scale
    mean: torch.Tensor  # [d_in] raw training mean (float32)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def n_train(self) -> int:
        return sum(self.chunks)

    def chunk(self, i: int) -> torch.Tensor:
        return load_file(self.directory / f"train-{i:05d}.safetensors")["x"]

    def heldout(self) -> torch.Tensor:
        return load_file(self.directory / "heldout.safetensors")["x"]

    @classmethod
    def open(cls, directory: Path) -> ActivationCache:
        meta = read_json(directory / "cache.json")
        mean = load_file(directory / "mean.safetensors")["mean"]
        return cls(directory, meta["d_in"], meta["chunks"], meta["n_heldout"], meta["n_dropped"], meta["mean_norm"],
                   meta["scale"], mean, meta)


def sink_mask(states: torch.Tensor, factor: float) -> torch.Tensor:
    """``[N]`` True for the tokens to keep: norm at most ``factor`` x the median norm of ``states``."""
    norms = states.norm(dim=-1)
    return norms <= factor * norms.median()


def power_of_two_scale(mean_norm: float, d_in: int) -> float:
    """The power of two nearest (in log) to ``sqrt(d_in) / mean_norm``."""
    return float(2.0 ** round(math.log2(math.sqrt(d_in) / mean_norm)))


def build_cache(lm: LoadedModel, layer: int, train: Sequence[Document], heldout: Sequence[Document],
                directory: Path, cfg: SaeTrainConfig, progress: bool = True) -> ActivationCache:
    """The activation cache of ``train`` and ``heldout`` documents at ``layer`` (read back when already written; a
    cache that was being written when the process died is written again)."""
    if (directory / "cache.json").is_file():
        return ActivationCache.open(directory)
    d = lm.hidden_size
    t0 = time.perf_counter()
    with atomic_dir(directory) as tmp:
        sums = {"n": 0, "norm": 0.0, "dropped": 0}
        total = torch.zeros(d, dtype=torch.float64)
        chunks: list[int] = []
        buffer: list[torch.Tensor] = []
        held: list[torch.Tensor] = []
        n_held = 0

        def flush(final: bool = False) -> None:
            nonlocal buffer
            x = torch.cat(buffer) if buffer else torch.zeros(0, d)
            while x.shape[0] >= cfg.chunk_tokens or (final and x.shape[0]):
                part, x = x[:cfg.chunk_tokens].contiguous(), x[cfg.chunk_tokens:]
                save_file({"x": part}, tmp / f"train-{len(chunks):05d}.safetensors")
                chunks.append(part.shape[0])
            buffer = [x] if x.shape[0] else []

        for docs, is_train in ((train, True), (heldout, False)):
            if not docs:
                continue
            encs = encode_for(lm, [doc.prompt for doc in docs], [doc.answer for doc in docs])
            for states, _rows, _pos in iter_token_states(lm, encs, layer, part="all", batch_size=cfg.forward_batch,
                                                         progress=("activations" if is_train else "held-out")
                                                         if progress else False):
                keep = sink_mask(states, cfg.sink_factor)
                x = states[keep]
                if is_train:
                    sums["dropped"] += int((~keep).sum())
                    sums["n"] += x.shape[0]
                    sums["norm"] += float(x.double().norm(dim=-1).sum())
                    total += x.double().sum(0)
                    buffer.append(x)
                    if sum(b.shape[0] for b in buffer) >= cfg.chunk_tokens:
                        flush()
                elif n_held < cfg.heldout_max_tokens:
                    x = x[:cfg.heldout_max_tokens - n_held]
                    held.append(x)
                    n_held += x.shape[0]
            if is_train:
                flush(final=True)
        if sums["n"] == 0:
            raise PersonavecError("the corpus gave no training tokens (every document empty, or all dropped as "
                                  "attention sinks); give a larger corpus")
        mean_norm = sums["norm"] / sums["n"]
        save_file({"x": torch.cat(held) if held else torch.zeros(0, d)}, tmp / "heldout.safetensors")
        save_file({"mean": (total / sums["n"]).float()}, tmp / "mean.safetensors")
        write_json(tmp / "cache.json", {
            "d_in": d, "layer": layer, "chunks": chunks, "n_train": sums["n"], "n_heldout": n_held,
            "n_dropped": sums["dropped"], "mean_norm": mean_norm, "scale": power_of_two_scale(mean_norm, d),
            "n_train_docs": len(train), "n_heldout_docs": len(heldout), "seconds": time.perf_counter() - t0,
            "tokens_per_s": (sums["n"] + sums["dropped"]) / max(time.perf_counter() - t0, 1e-9)})
    return ActivationCache.open(directory)


def batch_stream(cache: ActivationCache, cfg: SaeTrainConfig, start_step: int = 0) -> Iterator[torch.Tensor]:
    """The training batches (scaled by ``cache.scale``) from step ``start_step`` on, forever (see the module
    docstring): the batch of a step depends on the seed and the step only."""
    B = min(cfg.batch_size, cache.n_train)
    per_group = max(1, (cfg.shuffle_mib << 20) // max(1, cfg.chunk_tokens * cache.d_in * 4))
    n = len(cache.chunks)
    step, epoch = 0, 0
    while True:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).tolist()
        for g, start in enumerate(range(0, n, per_group)):
            group = order[start:start + per_group]
            n_tok = sum(cache.chunks[i] for i in group)
            n_batches = n_tok // B
            if step + n_batches <= start_step:  # batches before the resumed step: skipped without reading
                step += n_batches
                continue
            x = torch.cat([cache.chunk(i) for i in group])
            perm = torch.randperm(n_tok, generator=torch.Generator().manual_seed(
                (cfg.seed * 1_000_003 + epoch) * 1_009 + g))
            for b in range(n_batches):
                if step >= start_step:
                    yield x[perm[b * B:(b + 1) * B]] * cache.scale
                step += 1
        epoch += 1


# --------------------------------------------------------------------------------------------- the trainer


PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


class TopKTrainer:
    """The training state of a TopK SAE on normalised activations: weights, Adam moments, dead-latent counters."""

    def __init__(self, d_in: int, cfg: SaeTrainConfig, b_dec: torch.Tensor | None = None) -> None:
        self.cfg = cfg
        self.k_aux = cfg.aux_k(d_in)
        g = torch.Generator().manual_seed(cfg.seed)
        W_dec = torch.randn(cfg.latents, d_in, generator=g)
        W_dec /= W_dec.norm(dim=-1, keepdim=True)
        self.p: dict[str, torch.Tensor] = {
            "W_enc": W_dec.T.contiguous(), "b_enc": torch.zeros(cfg.latents), "W_dec": W_dec,
            "b_dec": torch.zeros(d_in) if b_dec is None else b_dec.float().clone()}
        self.m = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.p.items()}
        self.since_fired = torch.zeros(cfg.latents, dtype=torch.long)
        self.step_count = 0
        self.tokens = 0

    # ----- the step -----
    def losses(self, x: torch.Tensor, p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                            torch.Tensor]:
        """(total loss, batch FVU, AuxK loss, fired indices) of a batch under weights ``p``."""
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        top = pre.topk(self.cfg.k, dim=-1)
        vals = torch.relu(top.values)
        x_hat = F.embedding_bag(top.indices, p["W_dec"], per_sample_weights=vals, mode="sum") + p["b_dec"]
        err = x - x_hat
        fvu = err.pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp(min=1e-12)
        dead = self.since_fired >= self.cfg.dead_tokens
        n_dead = int(dead.sum())
        aux = torch.zeros(())
        if n_dead and self.cfg.aux_coef > 0:
            aux_top = pre.masked_fill(~dead, -torch.inf).topk(min(self.k_aux, n_dead), dim=-1)
            e_hat = F.embedding_bag(aux_top.indices, p["W_dec"], per_sample_weights=torch.relu(aux_top.values),
                                    mode="sum")
            target = err.detach()
            aux = (e_hat - target).pow(2).sum() / (target - target.mean(0)).pow(2).sum().clamp(min=1e-12)
        fired = top.indices[vals > 0]
        return fvu + self.cfg.aux_coef * aux, fvu, aux, fired

    def step(self, x: torch.Tensor) -> dict[str, float]:
        p = {k: v.detach().requires_grad_(True) for k, v in self.p.items()}
        loss, fvu, aux, fired = self.losses(x, p)
        loss.backward()
        with torch.no_grad():
            grads = {k: p[k].grad for k in PARAMS}
            W = self.p["W_dec"]
            grads["W_dec"] -= (grads["W_dec"] * W).sum(-1, keepdim=True) * W  # no change of the rows' norms
            self.step_count += 1
            lr = self.cfg.learning_rate()
            b1, b2 = ADAM_BETAS
            c1, c2 = 1 - b1 ** self.step_count, 1 - b2 ** self.step_count
            for k in PARAMS:
                self.m[k].mul_(b1).add_(grads[k], alpha=1 - b1)
                self.v[k].mul_(b2).addcmul_(grads[k], grads[k], value=1 - b2)
                denom = self.v[k].sqrt().div_(math.sqrt(c2)).add_(ADAM_EPS)
                self.p[k].addcdiv_(self.m[k], denom, value=-lr / c1)
            self.p["W_dec"] /= self.p["W_dec"].norm(dim=-1, keepdim=True)
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
            self.tokens += x.shape[0]
        return {"loss": float(loss.detach()), "fvu": float(fvu.detach()), "aux": float(aux.detach())}

    def dead_fraction(self) -> float:
        return float((self.since_fired >= self.cfg.dead_tokens).float().mean())

    # ----- the saved SAE -----
    def autoencoder(self, scale: float, layer: int, model_id: str) -> SparseAutoencoder:
        """The SAE on RAW activations: the scale folded into ``b_enc`` and ``b_dec`` (exact: ``scale`` is a power of
        two), unit-norm decoder rows."""
        return SparseAutoencoder(
            W_enc=self.p["W_enc"].clone(), b_enc=self.p["b_enc"] / scale, W_dec=self.p["W_dec"].clone(),
            b_dec=self.p["b_dec"] / scale, activation="topk", k=self.cfg.k, apply_b_dec_to_input=True, layer=layer,
            model_id=model_id, hook_name=hook_name(layer))

    def normalised_autoencoder(self) -> SparseAutoencoder:
        """The SAE as trained, on activations multiplied by the scale."""
        return SparseAutoencoder(W_enc=self.p["W_enc"].clone(), b_enc=self.p["b_enc"].clone(),
                                 W_dec=self.p["W_dec"].clone(), b_dec=self.p["b_dec"].clone(), activation="topk",
                                 k=self.cfg.k)

    # ----- checkpoints -----
    def save(self, directory: Path, extra: dict[str, Any]) -> None:
        tensors = {**{k: v for k, v in self.p.items()}, **{f"m.{k}": v for k, v in self.m.items()},
                   **{f"v.{k}": v for k, v in self.v.items()}, "since_fired": self.since_fired}
        with atomic_dir(directory) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / "state.safetensors")
            write_json(tmp / "state.json", {"step": self.step_count, "tokens": self.tokens, **extra})

    def load(self, directory: Path) -> dict[str, Any]:
        # fresh (aligned) memory: a matrix product's rounding may depend on its operands' alignment
        t = {k: v.clone() for k, v in load_file(directory / "state.safetensors").items()}
        for k in PARAMS:
            self.p[k], self.m[k], self.v[k] = t[k], t[f"m.{k}"], t[f"v.{k}"]
        self.since_fired = t["since_fired"]
        meta = read_json(directory / "state.json")
        self.step_count, self.tokens = int(meta["step"]), int(meta["tokens"])
        return meta


def hook_name(layer: int) -> str:
    """SAELens' name of our layer: the output of block ``layer - 1`` (the input of block 0 for layer 0)."""
    return "blocks.0.hook_resid_pre" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


# --------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def reconstruction_metrics(sae: SparseAutoencoder, x: torch.Tensor, chunk: int = 4096) -> dict[str, float]:
    """FVU (against the mean), L0 and the fraction of latents that never fire on ``x`` (raw activations), and the
    FVU of rank-k PCA fitted on the same tokens (the best any k-dimensional linear code does on them)."""
    mean = x.double().mean(0)
    err = 0.0
    l0 = 0.0
    fired = torch.zeros(sae.n_latents, dtype=torch.bool)
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk]
        z = sae.encode(xb)
        err += float((xb.double() - sae.decode(z).double()).pow(2).sum())
        l0 += float((z != 0).sum())
        fired |= (z != 0).any(0)
    centred = x.double() - mean
    total = float(centred.pow(2).sum())
    eig = torch.linalg.eigvalsh(centred.T @ centred).flip(0).clamp(min=0)
    k = sae.k or 0
    return {"fvu": err / total, "pca_fvu": float(1 - eig[:k].sum() / eig.sum()), "l0": l0 / x.shape[0],
            "dead_heldout": float((~fired).float().mean()), "n_tokens": int(x.shape[0])}


@torch.no_grad()
def spliced_loss(lm: LoadedModel, layer: int, sae: SparseAutoencoder, docs: Sequence[Document],
                 sink_factor: float, batch_size: int = 4) -> dict[str, float]:
    """Mean next-token loss (nats) on ``docs`` with the clean residual at ``layer``, with the SAE's reconstruction
    spliced in, and with the residual zero-ablated, at every token but the attention sinks (norm above
    ``sink_factor`` x the batch median; they keep their residual, as they were left out of training); SAELens'
    ``ce_loss_score = (CE_zero - CE_sae) / (CE_zero - CE_clean)``."""
    if not docs:
        return {}
    encs = encode_for(lm, [d.prompt for d in docs], [d.answer for d in docs])
    pad = pad_token_id(lm.tokenizer)
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    n = 0
    sae_dev = sae.to(device=lm.device)
    for start in range(0, len(encs), batch_size):
        batch = make_batch(encs[start:start + batch_size], pad, "right", lm.device)
        valid = batch.attention_mask.bool()

        def replaced(h: torch.Tensor, valid: torch.Tensor = valid) -> torch.Tensor:
            norms = h.float().norm(dim=-1)
            return valid & (norms <= sink_factor * norms[valid].median())

        def splice(h: torch.Tensor) -> torch.Tensor:
            where = replaced(h)
            out = h.clone()
            out[where] = sae_dev.reconstruct(h[where].float()).to(h.dtype)
            return out

        def zero(h: torch.Tensor) -> torch.Tensor:
            return h.masked_fill(replaced(h)[..., None], 0)

        targets = batch.input_ids[:, 1:]
        scored = valid[:, 1:] & valid[:, :-1]
        for name, fn in (("clean", None), ("sae", splice), ("zero", zero)):
            if fn is None:
                out = run_forward(lm.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                  position_ids=batch.position_ids, use_cache=False)
            else:
                with edit(lm.model, layer, fn):
                    out = run_forward(lm.model, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                      position_ids=batch.position_ids, use_cache=False)
            logits = out.logits[:, :-1].float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
            sums[name] += float(ce.reshape(targets.shape)[scored].sum())
        n += int(scored.sum())
    ce = {k: v / max(n, 1) for k, v in sums.items()}
    score = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]) if ce["zero"] != ce["clean"] else None
    return {"ce_clean": ce["clean"], "ce_spliced": ce["sae"], "ce_zero_ablated": ce["zero"],
            "ce_delta": ce["sae"] - ce["clean"], "ce_loss_score": score, "n_tokens": n, "n_docs": len(docs)}


# --------------------------------------------------------------------------------------------- the whole job


def split_documents(docs: Sequence[Document], share: float, seed: int) -> tuple[list[Document], list[Document]]:
    """(training, held-out) documents: a seeded ``share`` of the documents (at least one) is held out."""
    if len(docs) < 2:
        raise PersonavecError(f"the corpus has {len(docs)} document(s); it needs at least 2 (a share is held out "
                              "to measure the SAE)")
    perm = torch.randperm(len(docs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_held = min(len(docs) - 1, max(1, round(share * len(docs))))
    held = sorted(perm[:n_held])
    held_set = set(held)
    return [d for i, d in enumerate(docs) if i not in held_set], [docs[i] for i in held]


def check_layer(lm: LoadedModel, layer: Any) -> int:
    n = lm.n_layers
    layer = whole(layer, "the layer", None, None)
    if not 0 <= layer <= n:
        raise PersonavecError(f"layer {layer} is out of range: {lm.model_id} has layers 0..{n}")
    return layer


def train_sae(lm: LoadedModel, layer: int, corpus: Sequence[str | os.PathLike] | None = None,
              out: str | os.PathLike = "sae", config: SaeTrainConfig | None = None,
              run: str | os.PathLike | None = None, progress: bool = True) -> SparseAutoencoder:
    """Train a TopK SAE on ``lm``'s residual stream at ``layer`` (our convention) and save it to ``out/sae``.

    ``corpus``: the user's files (see :mod:`personavec.sae.corpus`), or None for the default corpus (the model's own
    answers to the built-in traits' questions, sampled once into ``out/corpus``); ``run``: a finished run directory
    whose answers join the corpus. Resumable (see the module docstring): the same call after a kill continues. Returns
    the SAE on raw activations; its ``provenance["training"]`` holds the metrics written to ``out/training.json``.
    """
    lm = check_loaded(lm, "train_sae")
    cfg = config if config is not None else SaeTrainConfig()
    if not isinstance(cfg, SaeTrainConfig):
        raise PersonavecError("config must be a SaeTrainConfig")
    layer = check_layer(lm, layer)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PersonavecError(f"{out} is a file; give a directory for the SAE's training")
    files = [Path(p) for p in (corpus or [])]
    docs = read_corpus_files(files, lm.tokenizer) if files else []
    run_docs = run_documents(run) if run is not None else []
    if files and not docs + run_docs:
        raise PersonavecError(f"the corpus ({', '.join(map(str, files))}) holds no text; give files with text in them")
    settings = {"model": lm.model_id, "revision": lm.revision, "dtype": str(lm.dtype).replace("torch.", ""),
                "layer": layer, **cfg.identity(),
                "corpus": [fingerprint(p) for p in files] if files else {
                    "sampled": "built-in traits' questions", **CORPUS_SAMPLING.to_dict()},
                "run": run_identity(run) if run is not None else None}
    with locked(out, "the SAE"):
        claim_settings(out / "settings.json", settings, "an SAE's training")
        if (out / "training.json").is_file() and (out / "sae").is_dir():
            sae = load_trained(out / "sae")
            return sae
        t_start = time.perf_counter()
        if not files:
            docs = sampled_corpus(lm, out / "corpus", seed=cfg.seed, progress="corpus" if progress else False)
        docs = docs + run_docs
        t_corpus = time.perf_counter() - t_start
        train_docs, held_docs = split_documents(docs, cfg.heldout_share, cfg.seed)
        cache = build_cache(lm, layer, train_docs, held_docs, out / "activations", cfg, progress)
        trainer, info = train_loop(cache, cfg, out / "checkpoint", progress)
        sae = trainer.autoencoder(cache.scale, layer, lm.model_id)
        metrics = {"recon": reconstruction_metrics(sae, cache.heldout())}
        metrics["spliced"] = spliced_loss(lm, layer, sae, held_docs[:cfg.eval_docs], cfg.sink_factor)
        metrics.update({
            "dead_training": trainer.dead_fraction(), "dead_window_tokens": cfg.dead_tokens,
            "train_tokens": trainer.tokens, "steps": trainer.step_count, "train_seconds": info["elapsed"],
            "tokens_per_s": trainer.tokens / max(info["elapsed"], 1e-9), "scale": cache.scale,
            "mean_norm": cache.mean_norm, "n_train_tokens_corpus": cache.n_train, "n_dropped_sinks": cache.n_dropped,
            "n_docs": len(docs), "n_heldout_docs": len(held_docs), "cache_seconds": cache.stats.get("seconds"),
            "cache_tokens_per_s": cache.stats.get("tokens_per_s"), "corpus_seconds_this_call": t_corpus,
            "layer": layer, "model": lm.model_id, "dtype": settings["dtype"], "latents": cfg.latents, "k": cfg.k,
            "lr": cfg.learning_rate(), "k_aux": trainer.k_aux, "stopped_by": info["stopped_by"]})
        sae.provenance = {"format": "personavec training", "training": metrics, "settings": settings}
        save_trained(sae, out / "sae")
        write_json(out / "training.json", metrics)
    return sae


def train_loop(cache: ActivationCache, cfg: SaeTrainConfig, ckpt: Path, progress: bool = True
               ) -> tuple[TopKTrainer, dict[str, Any]]:
    """Train from the last checkpoint (or from the start) until the token or time budget is spent."""
    trainer = TopKTrainer(cache.d_in, cfg, b_dec=cache.mean * cache.scale)
    elapsed = 0.0
    if (ckpt / "state.json").is_file():
        meta = trainer.load(ckpt)
        elapsed = float(meta.get("elapsed", 0.0))  # a finished checkpoint: the loop below has nothing to do
    B = min(cfg.batch_size, cache.n_train)
    n_steps = None if cfg.tokens is None else math.ceil(cfg.tokens / B)
    budget = None if cfg.minutes is None else cfg.minutes * 60
    bar = tqdm(total=n_steps, initial=trainer.step_count, desc="training", unit="step", disable=not progress)
    t0 = time.perf_counter()
    last_ckpt = t0
    stopped_by = "tokens"
    stats: dict[str, float] = {}

    def now() -> float:
        return elapsed + time.perf_counter() - t0

    stream = batch_stream(cache, cfg, trainer.step_count)
    while n_steps is None or trainer.step_count < n_steps:
        if budget is not None and now() >= budget:
            stopped_by = "minutes"
            break
        stats = trainer.step(next(stream))
        bar.update(1)
        if trainer.step_count % 10 == 0:
            bar.set_postfix(fvu=f"{stats['fvu']:.3f}", dead=f"{trainer.dead_fraction():.1%}")
        due = (cfg.checkpoint_steps is not None and trainer.step_count % cfg.checkpoint_steps == 0) or \
            time.perf_counter() - last_ckpt >= cfg.checkpoint_minutes * 60
        if due:
            trainer.save(ckpt, {"elapsed": now(), "done": False, **stats})
            last_ckpt = time.perf_counter()
    bar.close()
    info = {"elapsed": now(), "done": True, "stopped_by": stopped_by, **stats}
    trainer.save(ckpt, info)
    return trainer, info


# --------------------------------------------------------------------------------------------- the output


def save_trained(sae: SparseAutoencoder, directory: Path) -> None:
    """The trained SAE in SAELens' format (:func:`personavec.sae.formats.save_sae`; the training metrics and
    settings ride in its provenance)."""
    from .formats import save_sae

    save_sae(sae, directory)


def load_trained(directory: Path) -> SparseAutoencoder:
    from .formats import load_sae

    return load_sae(directory)
