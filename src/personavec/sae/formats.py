"""The field's SAE files on disk, read into the one :class:`~personavec.sae.autoencoder.SparseAutoencoder` type, and
ours written in SAELens' format.

:func:`load_sae` tells the format from what is on disk:

============================  =====================================================  ===============================
format                        on disk                                                layer (ours)
============================  =====================================================  ===============================
SAELens                       ``cfg.json`` + ``sae_weights.safetensors``             ``metadata.hook_name``
EleutherAI sparsify           ``<hookpoint>/cfg.json`` + ``sae.safetensors``         the hookpoint (``layers.N``)
Gemma Scope                   ``params.npz``                                         a ``layer_N`` path component
dictionary_learning           ``ae.pt`` + ``config.json``                            ``resid_post_layer_N`` / config
Goodfire                      one ``.pth`` / ``.pt`` state dict                      ``layer=`` (``--layer``)
============================  =====================================================  ===============================

Hook names map to our layer exactly (:func:`layer_of_hook`): the output of block N (``blocks.N.hook_resid_post``,
sparsify's ``layers.N``, dictionary_learning's ``resid_post_layer_N``, Gemma Scope's ``layer_N``) is our layer N+1;
the input of block N (``blocks.N.hook_resid_pre``) is our layer N. Pickled files are read only through
``torch.load(weights_only=True)``. Every problem a file can have (truncated, a tensor missing, NaN weights, an
architecture or normalisation we cannot reproduce exactly, no layer) is one :class:`PersonavecError` line.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PersonavecError, shown, whole
from ..files import atomic_dir, read_json, write_json
from .autoencoder import SparseAutoencoder

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
# the cfg layout save_sae writes: sae-lens reads a cfg whose metadata.sae_lens_version is >= 6.0.0 as its current
# (nested ``metadata``) layout and older ones through its pre-6.0 converter
SAELENS_LAYOUT_VERSION = "6.0.0"

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|.+)$")
_MODULE_PATH = re.compile(r"^(?:[A-Za-z_]\w*\.)*(?:layers|h)[._](\d+)$")  # sparsify / HF module paths
_RESID_POST_DIR = re.compile(r"^resid_post_layer_(\d+)$")  # dictionary_learning's release folders
_OTHER_SITE_DIR = re.compile(r"^(attn|mlp)(_out)?_layer_\d+$")  # its SAEs on other sites than the residual stream
_GEMMA_LAYER_DIR = re.compile(r"^layer_(\d+)$")


# ----------------------------------------------------------------------------------------------- hook names

def layer_of_hook(name: str | None) -> int | None:
    """Our layer for a hook or module name, or None when the name does not say one.

    ``blocks.N.hook_resid_post``, ``layers.N`` / ``model.layers.N`` / ``h.N`` (a block's output),
    ``resid_post_layer_N`` and ``layer_N`` → N+1; ``blocks.N.hook_resid_pre`` → N; ``hook_embed`` /
    ``embed_tokens`` / ``embedding`` → 0. A hook that reads something other than the residual stream
    (``blocks.N.hook_mlp_out``, ``blocks.N.attn.hook_z``, ``hook_resid_mid``) raises: no layer of ours is that.
    """
    if not name:
        return None
    name = str(name).strip()
    m = _BLOCK_HOOK.match(name)
    if m:
        n, site = int(m.group(1)), m.group(2)
        if site == "hook_resid_post":
            return n + 1
        if site == "hook_resid_pre":
            return n
        raise PersonavecError(f"the SAE reads {name}, not the residual stream between blocks; personavec decomposes "
                              "residual-stream vectors: use an SAE on blocks.N.hook_resid_post or hook_resid_pre")
    if name in ("hook_embed", "embed_tokens", "model.embed_tokens", "embedding"):
        return 0
    for pattern in (_MODULE_PATH, _RESID_POST_DIR, _GEMMA_LAYER_DIR):
        m = pattern.match(name)
        if m:
            return int(m.group(1)) + 1
    return None


def hook_of_layer(layer: int) -> str:
    """The SAELens hook name of our layer: ``blocks.{layer-1}.hook_resid_post`` (``blocks.0.hook_resid_pre`` for 0)."""
    return f"blocks.{layer - 1}.hook_resid_post" if layer >= 1 else "blocks.0.hook_resid_pre"


def _settle_layer(from_file: int | None, given: int | None, where: str, told_by: str) -> int:
    """The layer: the file's, the caller's, both when they agree, else one line."""
    if given is not None:
        given = whole(given, "--layer", 0)
    if from_file is not None and given is not None and from_file != given:
        raise PersonavecError(f"{where} is for layer {from_file} ({told_by}) but --layer {given} was given: drop "
                              "--layer or give the SAE's own layer")
    layer = from_file if from_file is not None else given
    if layer is None:
        raise PersonavecError(f"{where} does not say which layer it reads ({told_by}): give --layer (in personavec's "
                              "convention: the output of block N is layer N+1)")
    return layer


# ------------------------------------------------------------------------------------------ reading files

def _tensor(tensors: dict[str, Any], name: str, where: Path | str) -> torch.Tensor:
    """``tensors[name]`` as a torch tensor, or one line naming what the file holds instead."""
    if name not in tensors:
        held = ", ".join(sorted(tensors)) or "nothing"
        raise PersonavecError(f"{where} has no tensor {shown(name)} (it holds {held}): not an SAE of this format, "
                              "or a damaged file")
    t = tensors[name]
    t = torch.from_numpy(np.array(t)) if isinstance(t, np.ndarray) else t
    if not isinstance(t, torch.Tensor):
        raise PersonavecError(f"{where}: {shown(name)} is {shown(t)}, not a tensor")
    return t


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except Exception as e:  # SafetensorError (truncated, bad header) or OSError
        raise PersonavecError(f"{path} is not a readable safetensors file ({_first_line(e)}): it was cut short or "
                              "damaged; fetch it again") from None


def _pickle(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a pickle, through ``torch.load(weights_only=True)`` only."""
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise PersonavecError(f"{path} is not a weights-only pickle (it holds code or objects, which personavec never "
                              "unpickles): load it where you trust it and save its state dict (tensors only)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise PersonavecError(f"{path} is not a readable torch file ({_first_line(e)}): it was cut short or damaged; "
                              "fetch it again") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PersonavecError(f"{path} holds {shown(obj)}, not a state dict of tensors")
    return obj


def _npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(str(path), allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise PersonavecError(f"{path} is not a readable .npz file ({_first_line(e)}): it was cut short or damaged; "
                              "fetch it again") from None


def _config(path: Path) -> dict[str, Any]:
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise PersonavecError(f"{path} holds {shown(cfg)}, not a JSON object")
    return cfg


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:200]


def _int(cfg: dict[str, Any], key: str, where: Path) -> int:
    if key not in cfg:
        raise PersonavecError(f"{where} has no {shown(key)}: not a config of this format, or a damaged file")
    return whole(cfg[key], f"{where}'s {key}", 1)


# --------------------------------------------------------------------------------------------- SAELens

def _saelens_cfg(cfg: dict[str, Any], where: Path) -> dict[str, Any]:
    """SAELens' cfg in one shape whether written in the current layout (``architecture``, ``metadata.*``) or the
    pre-6.0 flat one (``hook_name``, ``activation_fn_str`` with ``activation_fn_kwargs.k``, boolean
    ``normalize_activations``), as sae-lens itself converts it."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    version = str(cfg.get("sae_lens_version") or meta.get("sae_lens_version") or "")
    current = bool(version) and _version_at_least(version, 6)
    out = dict(cfg)
    if not current:  # flat layout: hook and model at the top, the activation as a function name
        meta = {**{k: cfg[k] for k in ("hook_name", "hook_point", "model_name", "hook_head_index") if k in cfg}, **meta}
        if "hook_point" in meta and "hook_name" not in meta:
            meta["hook_name"] = meta["hook_point"]
        fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu")) or "relu"
        kwargs = cfg.get("activation_fn_kwargs") or {}
        arch = cfg.get("architecture", "standard")
        if fn == "topk" and kwargs.get("k") is None:
            raise PersonavecError(f"{where}: a topk SAE without k in activation_fn_kwargs; the file is incomplete: "
                                  "add its k there, or use the SAE's current sae-lens export")
        if fn == "topk":
            arch, out["k"] = "topk", kwargs["k"]
        elif fn != "relu" and arch == "standard":
            raise PersonavecError(f"{where}: activation function {shown(fn)} is not one personavec reproduces "
                                  "(relu, topk): use an SAE with one of those")
        out["architecture"] = arch
        norm = cfg.get("normalize_activations")
        out["normalize_activations"] = ("expected_average_only_in" if norm else "none") if isinstance(norm, bool) \
            else (norm or "none")
    out["metadata"] = meta
    return out


def _version_at_least(version: str, major: int) -> bool:
    m = re.match(r"^(\d+)", version)
    return bool(m) and int(m.group(1)) >= major


def read_saelens(directory: Path, layer: int | None = None, model_id: str | None = None) -> SparseAutoencoder:
    """A SAELens SAE (``cfg.json`` + ``sae_weights.safetensors``): standard, topk, jumprelu (BatchTopK is saved as
    jumprelu); ``rescale_acts_by_decoder_norm`` TopK SAEs are folded exactly into unit decoder rows."""
    cfg_path = directory / SAELENS_CFG
    cfg = _saelens_cfg(_config(cfg_path), cfg_path)
    arch = cfg.get("architecture", "standard")
    if arch not in ("standard", "topk", "jumprelu"):
        raise PersonavecError(f"{cfg_path}: architecture {shown(arch)} is not one personavec reads (standard, topk, "
                              "jumprelu; BatchTopK saved as jumprelu)")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise PersonavecError(f"{cfg_path}: normalize_activations is {shown(norm)}, which rescales each input at run "
                              "time by a factor the file does not fold in; personavec reads only \"none\" (sae-lens: "
                              "fold the scale with fold_activation_norm_scaling_factor, then save_model)")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise PersonavecError(f"{cfg_path}: reshape_activations {shown(cfg['reshape_activations'])} (attention "
                              "heads) is not a residual-stream SAE")
    weights = directory / SAELENS_WEIGHTS
    tensors = _safetensors(weights)
    if "scaling_factor" in tensors and not torch.all(tensors["scaling_factor"] == 1):
        raise PersonavecError(f"{weights} holds a fine-tuning scaling_factor that is not 1; personavec does not apply "
                              "it: use an SAE without one")
    W_enc, b_enc, W_dec, b_dec = (_tensor(tensors, n, weights) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    k = threshold = None
    activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    if arch == "topk":
        k = cfg.get("k")
        if k is None:
            raise PersonavecError(f"{cfg_path} is a topk SAE without k")
        if isinstance(k, float) and k.is_integer():
            k = int(k)
        if cfg.get("rescale_acts_by_decoder_norm"):  # top-k of pre·‖d_i‖, decoded by (a/‖d_i‖)·d_i: fold exactly
            norms = W_dec.norm(dim=-1)  # a zero row (a latent that decodes to nothing) stays zero
            W_enc, b_enc, W_dec = W_enc * norms, b_enc * norms, W_dec / norms.where(norms > 0, 1)[:, None]
    if arch == "jumprelu":
        threshold = _tensor(tensors, "threshold", weights)
    meta = cfg["metadata"]
    ours = meta.get("personavec") if isinstance(meta.get("personavec"), dict) else {}
    hook = meta.get("hook_name")
    file_layer = ours.get("layer") if ours.get("layer") is not None else layer_of_hook(hook)
    where = str(directory)
    sae = SparseAutoencoder(
        W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, activation=activation, k=k, threshold=threshold,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        layer=_settle_layer(file_layer, layer, where, f"hook {hook}" if hook else "no metadata.hook_name"),
        model_id=model_id or ours.get("model_id") or meta.get("model_name") or "unknown", hook_name=hook,
        provenance={**(ours.get("provenance") or {}), "format": "saelens", "path": where, "architecture": arch})
    _check_width(sae, cfg, cfg_path, "d_in", "d_sae")
    return sae


def _check_width(sae: SparseAutoencoder, cfg: dict[str, Any], where: Path, d_key: str, n_key: str | None) -> None:
    for key, have in ((d_key, sae.d_in), (n_key, sae.n_latents)):
        if key and cfg.get(key) not in (None, 0) and cfg[key] != have:
            raise PersonavecError(f"{where} says {key} {cfg[key]} but the weights have {have}: a damaged or "
                                  "mismatched file")


# --------------------------------------------------------------------------------------------- sparsify

def read_sparsify(directory: Path, layer: int | None = None, model_id: str | None = None) -> SparseAutoencoder:
    """An EleutherAI sparsify SAE: ``<hookpoint>/cfg.json`` + ``sae.safetensors``; encode = top-k of
    relu((x − b_dec) @ encoder.weightᵀ + encoder.bias), decode = acts @ W_dec + b_dec."""
    cfg_path = directory / SAELENS_CFG
    cfg = _config(cfg_path)
    if cfg.get("activation", "topk") != "topk":
        raise PersonavecError(f"{cfg_path}: activation {shown(cfg['activation'])} is not one personavec reads (topk)")
    for flag in ("transcode", "skip_connection", "signed"):
        if cfg.get(flag):
            raise PersonavecError(f"{cfg_path}: a sparse coder with {flag} is not an SAE personavec reads (it "
                                  "reconstructs its input with top-k latents only)")
    weights = directory / SPARSIFY_WEIGHTS
    tensors = _safetensors(weights)
    enc_w = _tensor(tensors, "encoder.weight", weights)
    run_cfg_path = directory.parent / "config.json"
    run_cfg = _config(run_cfg_path) if run_cfg_path.is_file() else {}
    hookpoint = directory.name
    where = str(directory)
    sae = SparseAutoencoder(
        W_enc=enc_w.T.contiguous(), b_enc=_tensor(tensors, "encoder.bias", weights),
        W_dec=_tensor(tensors, "W_dec", weights), b_dec=_tensor(tensors, "b_dec", weights),
        activation="topk", k=_int(cfg, "k", cfg_path), apply_b_dec_to_input=True,
        layer=_settle_layer(layer_of_hook(hookpoint), layer, where, f"hookpoint {hookpoint}"),
        model_id=model_id or run_cfg.get("model") or "unknown", hook_name=hookpoint,
        provenance={"format": "sparsify", "path": where})
    _check_width(sae, cfg, cfg_path, "d_in", "num_latents")
    return sae


def _sparsify_hookpoint(directory: Path, layer: int | None) -> Path:
    """The one hookpoint folder under a sparsify run directory: the only one, or the one at ``layer``."""
    points = sorted(p for p in directory.iterdir() if (p / SPARSIFY_WEIGHTS).is_file() and (p / SAELENS_CFG).is_file())
    names = ", ".join(p.name for p in points)
    if layer is not None:
        layer = whole(layer, "--layer", 0)
        hits = [p for p in points if _safe_layer(p.name) == layer]
        if not hits:
            raise PersonavecError(f"{directory} has no sparsify SAE for layer {layer} (hookpoints: {names}; "
                                  "layers.N is layer N+1)")
        return hits[0]
    if len(points) > 1:
        raise PersonavecError(f"{directory} holds SAEs for several hookpoints ({names}): give --layer to pick one "
                              "(layers.N is layer N+1)")
    return points[0]


def _safe_layer(name: str) -> int | None:
    try:
        return layer_of_hook(name)
    except PersonavecError:
        return None


# ------------------------------------------------------------------------------------------- Gemma Scope

def read_gemma_scope(path: Path, layer: int | None = None, model_id: str | None = None) -> SparseAutoencoder:
    """A Gemma Scope SAE (``params.npz``: ``W_enc [d, n]``, ``W_dec [n, d]``, ``b_enc``, ``b_dec``, ``threshold``):
    JumpReLU, relu(pre) where pre > threshold, with pre = x @ W_enc + b_enc (no b_dec at the input). A residual
    SAE under ``layer_N`` reads ``blocks.N.hook_resid_post`` (as sae-lens maps it): our layer N+1."""
    parts = path.resolve().parts
    for part in parts:
        if re.search(r"gemma-scope.*-(mlp|att|transcoders?)\b", part):
            raise PersonavecError(f"{path} is a Gemma Scope SAE on {part.rsplit('-', 1)[-1]} outputs, not the "
                                  "residual stream: use one from a gemma-scope-*-res release")
    dirs = [p for p in parts[:-1] if _GEMMA_LAYER_DIR.match(p)]
    told = f"path component {dirs[-1]}" if dirs else "no layer_N folder in its path"
    file_layer = layer_of_hook(dirs[-1]) if dirs else (0 if "embedding" in parts else None)
    t = _npz(path)
    where = str(path)
    return SparseAutoencoder(
        W_enc=_tensor(t, "W_enc", path), b_enc=_tensor(t, "b_enc", path), W_dec=_tensor(t, "W_dec", path),
        b_dec=_tensor(t, "b_dec", path), activation="jumprelu", threshold=_tensor(t, "threshold", path),
        apply_b_dec_to_input=False, layer=_settle_layer(file_layer, layer, where, told),
        model_id=model_id or "unknown", hook_name=hook_of_layer(file_layer) if file_layer is not None else None,
        provenance={"format": "gemma-scope", "path": where})


# ------------------------------------------------------------------------------------- dictionary_learning

_DL_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder")


def read_dictionary_learning(path: Path, layer: int | None = None, model_id: str | None = None) -> SparseAutoencoder:
    """A dictionary_learning SAE (``ae.pt`` + ``config.json``; the persona-vector paper's authors' format).

    - ``AutoEncoder``: relu(encoder(x − bias)), decoder(f) + bias (``decoder.weight [d, n]``, no decoder bias);
    - ``AutoEncoderTopK``: top-k of relu(encoder(x − b_dec)) (its encode does not use its threshold by default);
    - ``BatchTopKSAE``: at inference relu(encoder(x − b_dec)) kept where it exceeds
      the one scalar ``threshold``: a JumpReLU with that threshold for every latent;
    - ``JumpReluAutoEncoder``: SAELens-named tensors, no b_dec at the input.
    The layer: a ``resid_post_layer_N`` folder, else the config's ``trainer.layer`` (block N's output): our N+1.
    """
    cfg_path = path.parent / "config.json"
    cfg = _config(cfg_path) if cfg_path.is_file() else {}
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    t = _pickle(path)
    if "encoder_linear.weight" in t:  # a Goodfire state dict beside a config.json
        return read_goodfire(path, layer, model_id, tensors=t)
    cls = trainer.get("dict_class") or _guess_dl_class(t)
    if cls is None:
        raise PersonavecError(f"{path}: no config.json with trainer.dict_class beside it, and its tensors do not tell "
                              "the class (AutoEncoderTopK and BatchTopKSAE hold the same ones): put its config.json "
                              "beside it")
    if cls not in _DL_CLASSES:
        raise PersonavecError(f"{cfg_path}: dict_class {shown(cls)} is not one personavec reads "
                              f"({', '.join(_DL_CLASSES)})")
    k = threshold = None
    apply_b_dec = True
    if cls == "JumpReluAutoEncoder":
        W_enc, b_enc, W_dec, b_dec = (_tensor(t, n, path) for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
        activation, threshold, apply_b_dec = "jumprelu", _tensor(t, "threshold", path), False
    else:
        W_enc = _tensor(t, "encoder.weight", path).T.contiguous()
        b_enc = _tensor(t, "encoder.bias", path)
        W_dec = _tensor(t, "decoder.weight", path).T.contiguous()
        b_dec = _tensor(t, "bias" if cls == "AutoEncoder" else "b_dec", path)
        if cls == "AutoEncoder":
            activation = "relu"
        elif cls == "AutoEncoderTopK":
            activation, k = "topk", int(_tensor(t, "k", path).item())
        else:
            activation, threshold = "jumprelu", _tensor(t, "threshold", path).float()
    # the layer: resid_post_layer_N in the path wins; the config's trainer.layer is block N's output too
    # (a folder of the user's own naming, "run_layer_3" say, is neither: only the library's site names count)
    dirs = [p for p in path.resolve().parts[:-1] if _RESID_POST_DIR.match(p) or _OTHER_SITE_DIR.match(p)]
    sub = trainer.get("submodule_name")
    site = dirs[-1] if dirs else sub
    if site and _OTHER_SITE_DIR.match(str(site)):
        raise PersonavecError(f"{path} is an SAE on {site}, not the residual stream after a block: use a "
                              "resid_post_layer_N SAE")
    if dirs:
        file_layer, told = layer_of_hook(dirs[-1]), f"path component {dirs[-1]}"
    elif trainer.get("layer") is not None:
        file_layer, told = whole(trainer["layer"], f"{cfg_path}'s trainer.layer", 0) + 1, \
            f"config trainer.layer {trainer['layer']}"
    else:
        file_layer, told = None, "no resid_post_layer_N folder and no config.json trainer.layer"
    where = str(path)
    sae = SparseAutoencoder(
        W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=b_dec, activation=activation, k=k, threshold=threshold,
        apply_b_dec_to_input=apply_b_dec, layer=_settle_layer(file_layer, layer, where, told),
        model_id=model_id or trainer.get("lm_name") or "unknown",
        hook_name=hook_of_layer(file_layer) if file_layer is not None else None,
        provenance={"format": "dictionary_learning", "path": where, "dict_class": cls})
    _check_width(sae, trainer, cfg_path, "activation_dim", "dict_size")
    return sae


def _guess_dl_class(t: dict[str, torch.Tensor]) -> str | None:
    if "W_enc" in t and "threshold" in t:
        return "JumpReluAutoEncoder"
    if "bias" in t and "encoder.weight" in t:
        return "AutoEncoder"
    return None  # AutoEncoderTopK and BatchTopKSAE hold the same tensors: only the config tells them apart


# ---------------------------------------------------------------------------------------------- Goodfire

def read_goodfire(path: Path, layer: int | None = None, model_id: str | None = None,
                  tensors: dict[str, torch.Tensor] | None = None) -> SparseAutoencoder:
    """A Goodfire SAE (one state dict: ``encoder_linear.weight [n, d]``, ``encoder_linear.bias``,
    ``decoder_linear.weight [d, n]``, ``decoder_linear.bias``): relu(encoder_linear(x)), decoder_linear(f) — no
    b_dec at the input. The file does not say its layer: ``layer=`` is needed (their ``-lN`` releases read the
    output of block N, as sae-lens maps them: our layer N+1)."""
    t = _pickle(path) if tensors is None else tensors
    where = str(path)
    m = re.search(r"-l(\d+)\.pth?$", path.name)
    hint = f"; {path.name} names block {m.group(1)}, whose output is --layer {int(m.group(1)) + 1}" if m else ""
    return SparseAutoencoder(
        W_enc=_tensor(t, "encoder_linear.weight", path).T.contiguous(), b_enc=_tensor(t, "encoder_linear.bias", path),
        W_dec=_tensor(t, "decoder_linear.weight", path).T.contiguous(), b_dec=_tensor(t, "decoder_linear.bias", path),
        activation="relu", apply_b_dec_to_input=False,
        layer=_settle_layer(None, layer, where, "a Goodfire state dict records no layer" + hint),
        model_id=model_id or "unknown", provenance={"format": "goodfire", "path": where})


# ------------------------------------------------------------------------------------------ the entry point

def detect_format(path: str | os.PathLike, layer: int | None = None) -> tuple[str, Path]:
    """``(format, the path its reader takes)`` for what is on disk at ``path``, or one line saying what was
    expected."""
    p = Path(path)
    if not p.exists():
        raise PersonavecError(f"{p} does not exist: give the SAE's directory or file")
    if p.is_file():
        if p.name in (SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, "config.json"):
            return detect_format(p.parent, layer)
        if p.suffix == ".npz":
            return "gemma-scope", p
        if p.suffix in (".pt", ".pth"):
            return ("dictionary_learning" if (p.parent / "config.json").is_file() or p.name == "ae.pt"
                    else "goodfire"), p
        raise PersonavecError(f"{p} is not an SAE file personavec reads ({_EXPECTED})")
    if (p / SAELENS_CFG).is_file() and (p / SAELENS_WEIGHTS).is_file():
        return "saelens", p
    if (p / SAELENS_CFG).is_file() and (p / SPARSIFY_WEIGHTS).is_file():
        return "sparsify", p
    if (p / "params.npz").is_file():
        return "gemma-scope", p / "params.npz"
    if (p / "ae.pt").is_file():
        return "dictionary_learning", p / "ae.pt"
    pickles = sorted([*p.glob("*.pth"), *p.glob("*.pt")])
    if len(pickles) == 1:
        return detect_format(pickles[0], layer)
    if any((q / SPARSIFY_WEIGHTS).is_file() for q in p.iterdir() if q.is_dir()):
        return "sparsify", _sparsify_hookpoint(p, layer)
    if (p / "sae" / SAELENS_CFG).is_file() and (p / "settings.json").is_file():  # a `sae train --out` directory
        return detect_format(p / "sae", layer)
    raise PersonavecError(f"found no SAE in {p} ({_EXPECTED})")


_EXPECTED = ("expected SAELens cfg.json + sae_weights.safetensors, sparsify <hookpoint>/cfg.json + sae.safetensors, "
             "Gemma Scope params.npz, dictionary_learning ae.pt + config.json, or a Goodfire .pth")

READERS = {"saelens": read_saelens, "sparsify": read_sparsify, "gemma-scope": read_gemma_scope,
           "dictionary_learning": read_dictionary_learning, "goodfire": read_goodfire}


def load_sae(path: str | os.PathLike, layer: int | None = None, model_id: str | None = None) -> SparseAutoencoder:
    """The SAE at ``path`` (a directory or file in any format above), with its layer in our convention.

    ``layer`` is needed when the file does not tell (and must agree when it does); ``model_id`` overrides the
    model the file names (``"unknown"`` when neither says)."""
    fmt, where = detect_format(path, layer)
    return READERS[fmt](where, layer=layer, model_id=model_id)


# ------------------------------------------------------------------------------------------------ writing

def saelens_cfg(sae: SparseAutoencoder) -> dict[str, Any]:
    """The SAELens ``cfg.json`` (current layout) of ``sae``: architecture, widths, our layer and model in
    ``metadata`` (``hook_name`` = ``blocks.{layer-1}.hook_resid_post``, ``personavec.layer``)."""
    arch = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[sae.activation]
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": sae.d_in, "d_sae": sae.n_latents,
        "dtype": str(sae.W_enc.dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": bool(sae.apply_b_dec_to_input), "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if arch == "topk":
        cfg.update(k=int(sae.k), rescale_acts_by_decoder_norm=False)
    cfg["metadata"] = {
        "sae_lens_version": SAELENS_LAYOUT_VERSION, "sae_lens_training_version": None,
        "model_name": sae.model_id, "hook_name": hook_of_layer(sae.layer) if sae.layer is not None else None,
        "hook_head_index": None,
        "personavec": {"layer": sae.layer, "model_id": sae.model_id, "provenance": _jsonable(sae.provenance)},
    }
    return cfg


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj, allow_nan=False)
        return obj
    except (TypeError, ValueError):
        return {str(k): str(v) for k, v in obj.items()} if isinstance(obj, dict) else str(obj)


def save_sae(sae: SparseAutoencoder, directory: str | os.PathLike) -> Path:
    """``sae`` in SAELens' format (``cfg.json`` + ``sae_weights.safetensors``) at ``directory``, written whole or
    not at all; an existing directory is replaced only when it holds an SAELens SAE and nothing else."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists():
        extra = sorted(q.name for q in directory.iterdir()) if directory.is_dir() else [directory.name]
        extra = [n for n in extra if n not in (SAELENS_CFG, SAELENS_WEIGHTS)] if directory.is_dir() else extra
        if extra:
            raise PersonavecError(f"{directory} exists and holds other things ({', '.join(extra[:5])}): give a new "
                                  "or an SAE-only directory")
    tensors = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if sae.activation == "jumprelu":
        tensors["threshold"] = sae.threshold
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_dir(directory) as tmp:
        save_file(tensors, str(tmp / SAELENS_WEIGHTS))
        write_json(tmp / SAELENS_CFG, saelens_cfg(sae))
    return directory
