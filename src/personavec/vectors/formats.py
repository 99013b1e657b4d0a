"""Vector files other than personavec's own: the official persona_vectors ``.pt`` (import) and llama.cpp control
vectors (``.gguf``, export and import), and :func:`load_vector`, which takes any of them.

* official ``.pt``: a ``[L + 1, d]`` tensor saved with ``torch.save``, read with ``weights_only=True`` (no
  unpickling of arbitrary objects). The official code takes rows from Hugging Face ``hidden_states``, whose
  last entry (``ℓ = L``) is *after* the model's final norm, while personavec's row ``L`` is before it. Rows
  ``0..L-1`` mean the same thing in both; an imported row ``L`` is kept as is and flagged in the metadata
  (``last_row``: ``"hf_final_norm"``; using it warns).
* llama.cpp control vector ``.gguf``: F32 1-D tensors ``direction.k`` (k ≥ 1) that llama.cpp adds to the output
  of block ``k``; personavec row ``ℓ`` is the output of block ``ℓ − 1``, so row ``ℓ`` is written as
  ``direction.(ℓ − 1)``. Rows 0 and 1 have no slot.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import PersonavecError, finite, shown, whole
from ..files import atomic_path
from ..model.activations import POOLINGS
from .vector import PersonaVector


def import_official(paths: str | os.PathLike | Iterable[str | os.PathLike], model_id: str = "unknown",
                    trait: str | None = None, pooling: str | None = None) -> PersonaVector:
    """Import official persona_vectors ``.pt`` files (``[L + 1, d]`` tensors) safely.

    The pooling is taken from the file name (``response_avg_diff.pt``, ``prompt_avg_diff.pt``,
    ``prompt_last_diff.pt``, possibly prefixed with the trait as ``evil_response_avg_diff.pt``) unless
    given. Loading uses ``weights_only=True``: files holding arbitrary pickled objects are refused.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    tensors: dict[str, torch.Tensor] = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_file():
            raise PersonavecError(f"{path} does not exist")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # pickle errors come in many types
            raise PersonavecError(f"{path} is not a plain tensor file ({type(e).__name__}); refusing to load") from None
        if not isinstance(obj, torch.Tensor) or obj.ndim != 2:
            shape = tuple(obj.shape) if isinstance(obj, torch.Tensor) else type(obj).__name__
            raise PersonavecError(f"{path} holds {shape}, expected an [n_layers+1, hidden] tensor")
        stem = path.name
        name = pooling
        if name is None:
            name = next((p for p in POOLINGS if p in stem), "response_avg")
        if trait is None and "_" in stem:
            for p in POOLINGS:
                if f"_{p}" in stem:
                    trait = stem.split(f"_{p}")[0]
        tensors[name] = obj.float()
    return PersonaVector(tensors=tensors, model_id=model_id, trait=trait or "unknown",
                         extra={"imported_from": "persona_vectors .pt", "last_row": "hf_final_norm"})


def export_control_vector_gguf(vec: PersonaVector, path: str | os.PathLike, layers: Sequence[int] | None = None,
                               coef: float = 1.0, pooling: str | None = None, coef_name: str = "coef") -> Path:
    """Write a llama.cpp control vector: row ``ℓ`` × ``coef`` as ``direction.(ℓ − 1)``.

    Refused before anything is written: a layer where the vector has no direction (a zero row) and ``coef`` 0
    (``coef_name``: how the caller calls it, e.g. the CLI's ``--coef``), both of which would export zeros.

    ``layers`` defaults to the chosen layer. llama.cpp adds every direction in the file, so export only
    the layers you mean to steer at. Rows 0 and 1 cannot be represented (llama.cpp has no slot for the
    embeddings or block 0's output).
    """
    import gguf
    import numpy as np

    pooling = pooling or vec.default_pooling
    if layers is None:
        if vec.chosen_layer is None:
            raise PersonavecError("vector has no chosen layer; pass the layers to export")
        layers = [vec.chosen_layer]
    layers = [whole(x, "layers", low=0) for x in layers]
    bad = [x for x in layers if not 2 <= x <= vec.n_layers]
    if bad:
        raise PersonavecError(f"layers {bad} cannot go into a llama.cpp control vector "
                              f"(which covers layers 2..{vec.n_layers})")
    if finite(coef, coef_name) == 0:
        raise PersonavecError(f"{coef_name} 0 would write a control vector of zeros, which steers nothing; export "
                              f"with a non-zero {coef_name}")
    rows = {layer: vec.direction(layer, pooling) for layer in layers}  # a zero row is refused, naming the layer
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        try:
            writer.add_string("controlvector.model_hint", vec.model_id)
            writer.add_uint32("controlvector.layer_count", len(layers))
            writer.add_string("personavec.trait", vec.trait)
            writer.add_string("personavec.pooling", pooling)
            writer.add_float32("personavec.coef", float(coef))
            for layer in sorted(rows):
                arr = (rows[layer] * float(coef)).numpy().astype(np.float32)
                writer.add_tensor(f"direction.{layer - 1}", arr)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    return path


def read_control_vector_gguf(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Read a llama.cpp control vector: ``{personavec layer ℓ: [d] tensor}`` and the header fields."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise PersonavecError(f"{path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise PersonavecError(f"{path} is not a readable GGUF file ({e})") from None
    fields: dict[str, Any] = {}
    for name, f in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            fields[name] = f.contents()
        except Exception:
            continue
    rows: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        if not t.name.startswith("direction."):
            continue
        k = int(t.name.split(".", 1)[1])
        rows[k + 1] = torch.from_numpy(t.data.copy()).float().reshape(-1)
    if not rows:
        raise PersonavecError(f"{path} holds no direction.k tensors; it is not a control vector")
    return rows, fields


def from_control_vector_gguf(path: str | os.PathLike, n_layers: int, model_id: str = "unknown") -> PersonaVector:
    """A PersonaVector (``response_avg`` pooling) from a control vector; absent rows are zero."""
    rows, fields = read_control_vector_gguf(path)
    d = next(iter(rows.values())).numel()
    if max(rows) > n_layers:
        raise PersonavecError(f"{path} has direction.{max(rows) - 1}, beyond a {n_layers}-layer model")
    t = torch.zeros(n_layers + 1, d)
    for layer, row in rows.items():
        t[layer] = row
    hint = fields.get("controlvector.model_hint", model_id)
    return PersonaVector(tensors={str(fields.get("personavec.pooling", "response_avg")): t},
                         model_id=str(hint), trait=str(fields.get("personavec.trait", "unknown")),
                         chosen_layer=next(iter(rows)) if len(rows) == 1 else None,
                         layers=sorted(rows), extra={"imported_from": "llama.cpp control vector",
                                                     "coef": fields.get("personavec.coef", 1.0)})


def load_vector(path: str | os.PathLike, n_layers: int | None = None, model_id: str = "unknown") -> PersonaVector:
    """A vector from any file personavec takes: ``.safetensors`` (native), official ``.pt``, or a llama.cpp control
    vector ``.gguf`` (which needs the model's ``n_layers``: its rows are only the layers it steers)."""
    if not isinstance(path, (str, os.PathLike)):
        raise PersonavecError(f"load_vector takes the path of a vector file, not {shown(path)}")
    if n_layers is not None:
        n_layers = whole(n_layers, "load_vector's n_layers", low=1)
    path = Path(path)
    if path.suffix == ".gguf":
        if n_layers is None:
            raise PersonavecError(f"{path}: reading a llama.cpp control vector needs the model's layer count")
        if not path.is_file():
            raise PersonavecError(f"vector file {path} does not exist")
        return from_control_vector_gguf(path, n_layers, model_id=model_id)
    if path.suffix == ".pt":
        return import_official(path, model_id=model_id)
    return PersonaVector.load(path)
