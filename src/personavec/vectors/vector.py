"""The PersonaVector: per-layer directions for one trait, with the metadata to use them correctly.

Files:

* ``.safetensors`` (native): one ``[L + 1, d]`` float32 tensor per pooling plus JSON metadata under the
  safetensors header key ``personavec``. Load is exact.
* official persona_vectors ``.pt`` (import only): a ``[L + 1, d]`` tensor saved with ``torch.save``,
  read with ``weights_only=True`` (no unpickling of arbitrary objects). The official code takes rows
  from Hugging Face ``hidden_states``, whose last entry (``ℓ = L``) is *after* the model's final norm,
  while personavec's row ``L`` is before it. Rows ``0..L-1`` mean the same thing in both; an imported
  row ``L`` is kept as is and flagged in the metadata (``last_row``: ``"hf_final_norm"``).
* llama.cpp control vector ``.gguf`` (export + read back): F32 1-D tensors ``direction.k`` (k ≥ 1)
  that llama.cpp adds to the output of block ``k``; personavec row ``ℓ`` is the output of block
  ``ℓ − 1``, so row ``ℓ`` is written as ``direction.(ℓ − 1)``. Rows 0 and 1 have no slot.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PersonavecError
from ..files import atomic_path
from ..model.activations import POOLINGS

log = logging.getLogger(__name__)

LAYER_CONVENTION = "residual-after-l-blocks;0=embeddings;L=last-block-output-before-final-norm"
FORMAT_VERSION = 1


def _version() -> str:
    from ..version import __version__

    return __version__


@dataclass
class PersonaVector:
    """Per-layer trait directions ``tensors[pooling]`` of shape ``[n_layers + 1, hidden_size]``."""

    tensors: dict[str, torch.Tensor]
    model_id: str
    model_revision: str = "unknown"
    trait: str = "unknown"
    layer_convention: str = LAYER_CONVENTION
    chosen_layer: int | None = None
    counts: dict[str, int] = field(default_factory=dict)
    filter: dict[str, Any] = field(default_factory=dict)
    layers: list[int] | None = None  # layers actually computed (others are zero rows)
    extra: dict[str, Any] = field(default_factory=dict)
    personavec_version: str = field(default_factory=_version)
    _warned_last_row: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.tensors:
            raise PersonavecError("a persona vector needs at least one pooling tensor")
        shapes = {tuple(t.shape) for t in self.tensors.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise PersonavecError(f"pooling tensors must all be [L+1, d]; got shapes {sorted(shapes)}")
        self.tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in self.tensors.items()}
        for pooling, t in self.tensors.items():
            bad = (~torch.isfinite(t)).any(dim=-1).nonzero().flatten().tolist()
            if bad:
                raise PersonavecError(f"the {pooling} vector holds NaN or infinite values at layer(s) "
                                      f"{', '.join(map(str, bad[:8]))}; it cannot steer or project: extract it again")

    # ----- shape -----
    @property
    def n_layers(self) -> int:
        return next(iter(self.tensors.values())).shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return next(iter(self.tensors.values())).shape[1]

    @property
    def poolings(self) -> list[str]:
        return list(self.tensors)

    @property
    def default_pooling(self) -> str:
        return "response_avg" if "response_avg" in self.tensors else next(iter(self.tensors))

    def get(self, layer: int | None = None, pooling: str | None = None) -> torch.Tensor:
        """The ``[d]`` direction at ``layer`` (default: the chosen layer) for ``pooling``."""
        pooling = pooling or self.default_pooling
        if pooling not in self.tensors:
            raise PersonavecError(f"this vector has no {pooling!r} pooling; it has {', '.join(self.tensors)}")
        if layer is None:
            if self.chosen_layer is None:
                raise PersonavecError("no layer given and the vector has no chosen layer; pass --layer")
            layer = self.chosen_layer
        if not 0 <= layer <= self.n_layers:
            raise PersonavecError(f"layer {layer} out of range 0..{self.n_layers}")
        if layer == self.n_layers and self.extra.get("last_row") == "hf_final_norm" and not self._warned_last_row:
            self._warned_last_row = True
            log.warning("layer %d of this imported vector was taken AFTER the model's final norm (the official "
                        "format's last row), while personavec reads and edits layer %d before it: its scale and "
                        "direction do not match; prefer a layer below %d", layer, layer, layer)
        return self.tensors[pooling][layer]

    def norms(self, pooling: str | None = None) -> list[float]:
        return [float(x) for x in self.tensors[pooling or self.default_pooling].norm(dim=-1)]

    # ----- compatibility -----
    def check_compatible(self, model: Any) -> None:
        """Refuse a vector made for a model with another hidden size or layer count."""
        from ..model.layers import decoder_layers, hidden_size

        m = getattr(model, "model", model)
        self.check_shape(len(decoder_layers(m)), hidden_size(m), getattr(model, "model_id", type(m).__name__))

    def check_shape(self, n_layers: int, hidden_size: int, model_name: str) -> None:
        """Refuse a vector whose shape is not ``[n_layers + 1, hidden_size]`` (read from a model's config)."""
        if (n_layers, hidden_size) != (self.n_layers, self.hidden_size):
            raise PersonavecError(
                f"vector for {self.model_id} has {self.n_layers} layers x {self.hidden_size} dims but model "
                f"{model_name} has {n_layers} layers x {hidden_size} dims; extract a vector for this model instead")

    # ----- arithmetic -----
    def _binary(self, other: PersonaVector, op: str) -> PersonaVector:
        if (self.n_layers, self.hidden_size) != (other.n_layers, other.hidden_size):
            raise PersonavecError(
                f"cannot combine vectors of shape [{self.n_layers + 1}, {self.hidden_size}] and "
                f"[{other.n_layers + 1}, {other.hidden_size}]: they come from different models")
        common = [p for p in self.tensors if p in other.tensors]
        if not common:
            raise PersonavecError("the two vectors share no pooling")
        t = {p: self.tensors[p] + other.tensors[p] if op == "+" else self.tensors[p] - other.tensors[p]
             for p in common}
        return replace(self, tensors=t, trait=f"({self.trait}{op}{other.trait})", chosen_layer=None,
                       counts={}, filter={})

    def __add__(self, other: PersonaVector) -> PersonaVector:
        return self._binary(other, "+")

    def __sub__(self, other: PersonaVector) -> PersonaVector:
        return self._binary(other, "-")

    def __mul__(self, k: float) -> PersonaVector:
        return replace(self, tensors={p: t * float(k) for p, t in self.tensors.items()})

    __rmul__ = __mul__

    def __neg__(self) -> PersonaVector:
        return self * -1.0

    def unit(self) -> PersonaVector:
        """Each layer's row scaled to norm 1 (zero rows stay zero)."""
        return replace(self, tensors={p: t / t.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                                      for p, t in self.tensors.items()})

    def cosine(self, other: PersonaVector, pooling: str | None = None) -> torch.Tensor:
        """Per-layer cosine similarity ``[L + 1]`` with another vector of the same model."""
        pooling = pooling or self.default_pooling
        if pooling not in other.tensors or (self.n_layers, self.hidden_size) != (other.n_layers,
                                                                                   other.hidden_size):
            raise PersonavecError("cosine needs two vectors of the same model with the same pooling")
        return torch.nn.functional.cosine_similarity(self.tensors[pooling], other.tensors[pooling], dim=-1)

    # ----- files -----
    def metadata(self) -> dict[str, Any]:
        meta = {k: v for k, v in asdict(self).items() if k not in ("tensors", "_warned_last_row")}
        meta.update(format_version=FORMAT_VERSION, n_layers=self.n_layers, hidden_size=self.hidden_size,
                    poolings=self.poolings, norms={p: self.norms(p) for p in self.tensors})
        return meta

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vector as safetensors with JSON metadata (atomically)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise PersonavecError(f"save vectors as .safetensors, not {path.suffix or 'no suffix'}")
        with atomic_path(path) as tmp:
            save_file(self.tensors, str(tmp), metadata={"personavec": json.dumps(self.metadata())})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> PersonaVector:
        path = Path(path)
        if not path.is_file():
            raise PersonavecError(f"vector file {path} does not exist")
        if path.suffix == ".pt":
            return import_official(path)
        if path.suffix == ".gguf":
            raise PersonavecError(f"{path} is a llama.cpp control vector, which does not record the model's layer "
                                  "count; load it with load_vector(path, n_layers=...)")
        try:
            tensors = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("personavec")
        except (SafetensorError, OSError) as e:
            raise PersonavecError(f"{path} is not a readable safetensors file ({e})") from None
        if raw is None:
            raise PersonavecError(f"{path} has no personavec metadata; was it written by personavec?")
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            raise PersonavecError(f"{path}: personavec metadata is not valid JSON") from None
        known = {f for f in cls.__dataclass_fields__ if f != "tensors"}
        return cls(tensors=tensors, **{k: v for k, v in meta.items() if k in known})


def mean_difference(pos: dict[str, torch.Tensor], neg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per pooling, ``mean(pos) − mean(neg)`` (inputs already averaged over samples)."""
    return {p: pos[p] - neg[p] for p in pos if p in neg}


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
                               coef: float = 1.0, pooling: str | None = None) -> Path:
    """Write a llama.cpp control vector: row ``ℓ`` × ``coef`` as ``direction.(ℓ − 1)``.

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
    bad = [x for x in layers if not 2 <= x <= vec.n_layers]
    if bad:
        raise PersonavecError(f"layers {bad} cannot go into a llama.cpp control vector "
                              f"(which covers layers 2..{vec.n_layers})")
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), "controlvector")
        try:
            writer.add_string("controlvector.model_hint", vec.model_id)
            writer.add_uint32("controlvector.layer_count", len(layers))
            writer.add_string("personavec.trait", vec.trait)
            writer.add_string("personavec.pooling", pooling)
            writer.add_float32("personavec.coef", float(coef))
            for layer in sorted(layers):
                arr = (vec.tensors[pooling][layer] * float(coef)).numpy().astype(np.float32)
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
    path = Path(path)
    if path.suffix == ".gguf":
        if n_layers is None:
            raise PersonavecError(f"{path}: reading a llama.cpp control vector needs the model's layer count")
        if not path.is_file():
            raise PersonavecError(f"vector file {path} does not exist")
        return from_control_vector_gguf(path, n_layers, model_id=model_id)
    return PersonaVector.load(path)
