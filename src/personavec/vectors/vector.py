"""The PersonaVector: per-layer directions for one trait, with the metadata to use them correctly.

Native file: ``.safetensors`` with one ``[L + 1, d]`` float32 tensor per pooling plus JSON metadata under the
safetensors header key ``personavec``; loading is exact. Other formats (the official ``.pt`` files, llama.cpp
control vectors) live in :mod:`personavec.vectors.formats`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import PersonavecError, finite, shown, whole
from ..files import atomic_path

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
        if not isinstance(self.tensors, dict) or not self.tensors:
            raise PersonavecError(f"PersonaVector tensors must be a non-empty dict of pooling -> [L+1, d] tensor, not "
                                  f"{shown(self.tensors)}")
        for k, v in self.tensors.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise PersonavecError(f"PersonaVector tensors must map pooling names (strings) to torch tensors, not "
                                      f"{shown(k)} to {shown(v)}")
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

    def get(self, layer: int | None = None, pooling: str | None = None, flag: str | None = None) -> torch.Tensor:
        """The ``[d]`` direction at ``layer`` (default: the chosen layer) for ``pooling``; ``flag`` names where the
        layer came from in a refusal."""
        pooling = pooling or self.default_pooling
        if pooling not in self.tensors:
            raise PersonavecError(f"this vector has no {pooling!r} pooling; it has {', '.join(self.tensors)}")
        if layer is None:
            if self.chosen_layer is None:
                raise PersonavecError(f"no layer given and the vector has no chosen layer; pass {flag or '--layer'}")
            layer = self.chosen_layer
        named = f"layer ({flag})" if flag else "layer"
        layer = whole(layer, named)
        if not 0 <= layer <= self.n_layers:
            raise PersonavecError(f"layer {layer}{f' ({flag})' if flag else ''} is out of range: the model has layers "
                                  f"0..{self.n_layers}")
        if layer == self.n_layers and self.extra.get("last_row") == "hf_final_norm" and not self._warned_last_row:
            self._warned_last_row = True
            log.warning("layer %d of this imported vector was taken AFTER the model's final norm (the official "
                        "format's last row), while personavec reads and edits layer %d before it: its scale and "
                        "direction do not match; prefer a layer below %d", layer, layer, layer)
        return self.tensors[pooling][layer]

    def direction(self, layer: int | None = None, pooling: str | None = None,
                  flag: str | None = None) -> torch.Tensor:
        """:meth:`get`, refusing a row that is zero or not finite: it has no direction to steer, export or project
        on (row 0, the embeddings, is zero in every extracted vector; so are layers that were not extracted)."""
        v = self.get(layer, pooling, flag)
        layer = self.chosen_layer if layer is None else layer
        if bool(torch.isfinite(v).all()) and bool(v.any()):
            return v
        t = self.tensors[pooling or self.default_pooling]
        good = (torch.isfinite(t).all(dim=-1) & t.any(dim=-1)).nonzero().flatten().tolist()
        has = f"it has one at layers {_spans(good)}" if good else "it is zero at every layer"
        raise PersonavecError(f"the {self.trait} vector has no direction at layer {layer} (its row there is "
                              f"{'zero' if bool(torch.isfinite(v).all()) else 'not finite'}); {has}")

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
        if not isinstance(other, PersonaVector):
            raise PersonavecError(f"a PersonaVector {op} {shown(other)}: vectors add to and subtract from vectors only "
                                  "(scale one with vec * k)")
        if (self.n_layers, self.hidden_size) != (other.n_layers, other.hidden_size):
            raise PersonavecError(
                f"cannot combine vectors of shape [{self.n_layers + 1}, {self.hidden_size}] and "
                f"[{other.n_layers + 1}, {other.hidden_size}]: they come from different models")
        common = [p for p in self.tensors if p in other.tensors]
        if not common:
            raise PersonavecError("the two vectors share no pooling")
        t = {p: self.tensors[p] + other.tensors[p] if op == "+" else self.tensors[p] - other.tensors[p]
             for p in common}
        # the readings of a sum are not the readings of either vector: no calibration carries over
        extra = {k: v for k, v in self.extra.items() if k != "calibration"}
        return replace(self, tensors=t, trait=f"({self.trait}{op}{other.trait})", chosen_layer=None,
                       counts={}, filter={}, extra=extra)

    def __add__(self, other: PersonaVector) -> PersonaVector:
        return self._binary(other, "+")

    def __sub__(self, other: PersonaVector) -> PersonaVector:
        return self._binary(other, "-")

    def __mul__(self, k: float) -> PersonaVector:
        k = finite(k, "the factor a vector is multiplied by")
        return replace(self, tensors={p: t * k for p, t in self.tensors.items()},
                       extra=_scaled_extra(self.extra, k))

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

    def digest(self) -> str:
        """sha256 (first 16 hex digits) of the float32 rows at every layer in the default pooling: two copies of
        one vector (a server's and a client's) have the same digest."""
        rows = torch.stack([self.get(x).float() for x in range(self.n_layers + 1)])
        return hashlib.sha256(rows.contiguous().numpy().tobytes()).hexdigest()[:16]

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
        """A vector from personavec's own ``.safetensors`` file (any format: :func:`~personavec.vectors.formats.
        load_vector`)."""
        path = Path(path)
        if not path.is_file():
            raise PersonavecError(f"vector file {path} does not exist")
        if path.suffix in (".pt", ".gguf"):
            raise PersonavecError(f"{path} is not a personavec vector file; read it with load_vector(path"
                                  + (", n_layers=...)" if path.suffix == ".gguf" else ")"))
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


def check_named(vectors: Any, what: str = "vectors") -> dict[str, PersonaVector]:
    """``vectors`` as a dict of name -> PersonaVector, or one clear line (a list of vectors has no names to give
    the output's columns: name them, e.g. ``{"evil": vec}``)."""
    from collections.abc import Mapping

    if not isinstance(vectors, Mapping):
        raise PersonavecError(f"{what} must be a dict of name -> PersonaVector, e.g. {{\"evil\": vec}}, not "
                              f"{shown(vectors)}")
    for name, vec in vectors.items():
        if not isinstance(name, str) or not isinstance(vec, PersonaVector):
            bad = vec if isinstance(name, str) else name
            raise PersonavecError(f"{what} must be a dict of name -> PersonaVector, e.g. {{\"evil\": vec}}, not a "
                                  f"dict holding {shown(bad)}")
    return dict(vectors)


def _scaled_extra(extra: dict[str, Any], k: float) -> dict[str, Any]:
    """The metadata of ``vec * k``: a calibration (readings on the unit direction) is kept for k > 0, mirrored for
    k < 0 (v̂ turns round: the q% quantile becomes minus the (100 − q)% one, and the sides swap: ``pos`` always
    holds the answers the vector points towards, so a negated vector's default guard and cap come from the answers
    that now read high) and dropped for k = 0."""
    cal = extra.get("calibration")
    if not isinstance(cal, dict) or k > 0:
        return dict(extra)
    out = {key: v for key, v in extra.items() if key != "calibration"}
    if k < 0:
        def mirror(q: dict[str, Any]) -> dict[str, Any]:
            return {key: None if q.get(str(100 - float(key)).removesuffix(".0")) is None
                    else -q[str(100 - float(key)).removesuffix(".0")] for key in q}
        def swap(key: str) -> str:
            return key.replace("pos", "\0").replace("neg", "pos").replace("\0", "neg")

        layers = {layer: {swap(side): mirror(q) for side, q in e.items()} for layer, e in cal.get("layers", {}).items()}
        counts = {swap(key): v for key, v in cal.items() if key.startswith(("n_pos", "n_neg"))}
        out["calibration"] = {**cal, **counts, "layers": layers, "negated": not cal.get("negated", False)}
    return out


def _spans(layers: list[int]) -> str:
    """``[1, 2, 3, 7]`` → ``1-3, 7``."""
    runs: list[list[int]] = []
    for x in layers:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def mean_difference(pos: dict[str, torch.Tensor], neg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per pooling, ``mean(pos) − mean(neg)`` (inputs already averaged over samples)."""
    return {p: pos[p] - neg[p] for p in pos if p in neg}
