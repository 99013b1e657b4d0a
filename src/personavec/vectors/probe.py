"""A Probe: one persona vector read at some layers (and one of its poolings), as projections and screening do."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import PersonavecError
from .vector import PersonaVector, check_named


@dataclass(frozen=True)
class Probe:
    """One vector at some layers, named for its output columns ``{name}@L{layer}:{pooling}``."""

    name: str
    vector: PersonaVector
    layers: tuple[int, ...]
    pooling: str | None = None  # which of the vector's poolings to project on (default: its default)

    def direction(self, layer: int) -> torch.Tensor:
        return self.vector.get(layer, self.pooling)


def directions(probes: Sequence[Probe]) -> dict[str, dict[int, torch.Tensor]]:
    """``{name: {layer: direction}}`` of several probes, as :func:`~personavec.model.projection.project_pairs` takes."""
    return {p.name: {layer: p.direction(layer) for layer in p.layers} for p in probes}


def probe_identity(probes: Sequence[Probe]) -> list[dict[str, Any]]:
    """What defines each probe's numbers: name, layers, pooling, and a digest of the directions used."""
    out = []
    for p in probes:
        h = hashlib.sha256()
        for layer in p.layers:
            h.update(p.direction(layer).float().numpy().tobytes())
        out.append({"name": p.name, "layers": list(p.layers), "pooling": p.pooling, "trait": p.vector.trait,
                    "model_id": p.vector.model_id, "digest": h.hexdigest()[:16]})
    return out


def make_probes(vectors: Mapping[str, PersonaVector], layers: Sequence[int] | None = None,
                pooling: str | None = None) -> list[Probe]:
    """One probe per named vector, read at ``layers`` (default: each vector's chosen layer)."""
    vectors = check_named(vectors)
    out = []
    for name, vec in vectors.items():
        use = tuple(layers) if layers else ((vec.chosen_layer,) if vec.chosen_layer is not None else ())
        if not use:
            raise PersonavecError(f"vector {name!r} has no chosen layer; pass the layers to read (--layers)")
        for layer in use:  # a zero row would read 0 for everything: refused, naming the layer
            vec.direction(layer, pooling)
        out.append(Probe(name, vec, use, pooling))
    return out
