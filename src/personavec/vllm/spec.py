"""What the plugin is told: the server's configuration and each request's persona, checked (no vLLM import here).

Server: ``--additional-config '{"personavec": {"vectors": ["evil=runs/.../vectors.safetensors@13"], ...}}'``
(:class:`PluginConfig`). Request: ``vllm_xargs`` (the ``openai`` client's ``extra_body``) with ``persona`` — the
same object as ``personavec serve`` takes (``steer``, ``cap``, ``edits``, ``monitor``), as a JSON string or an
object — and ``persona_key``, the key its readings are fetched under. :func:`compile_request` turns it into a
:class:`Program`: which slot of which layer does what to which tokens, and where each reading is taken.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import PersonavecError
from ..model.edits import Edit
from ..serve.policy import MAX_COEF, BadRequest, ServedVector, parse_persona, parse_vector_spec, serve_vectors
from ..vectors.formats import load_vector

CONFIG_KEY = "personavec"
CONFIG_FIELDS = ("vectors", "layers", "slots", "reads")
DEFAULT_SLOTS = 2  # rounds of the edit formula per hooked layer (an add then a projection edit fill one)
DEFAULT_READS = 2  # readings per layer a request may take
MAX_KEY = 200


class ConfigError(PersonavecError, ValueError):
    """A personavec configuration the server cannot start with (one line: what to change)."""


@dataclass(frozen=True)
class PluginConfig:
    """The server-wide settings: the vectors by name (``NAME=PATH[@LAYER]``, as ``personavec serve --vector``), the
    layers that get hooks (default: every layer 1..L), the edit rounds per layer (``slots``) and the readings per
    layer (``reads``) a request may use."""

    vectors: tuple[str, ...]
    layers: tuple[int, ...] | None = None
    slots: int = DEFAULT_SLOTS
    reads: int = DEFAULT_READS

    @classmethod
    def from_additional(cls, additional: Any) -> PluginConfig | None:
        """The configuration in vLLM's ``additional_config`` (None: the plugin stays idle)."""
        raw = additional.get(CONFIG_KEY) if isinstance(additional, dict) else None
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise ConfigError(f"--additional-config {CONFIG_KEY} must be an object with {', '.join(CONFIG_FIELDS)}")
        unknown = [k for k in raw if k not in CONFIG_FIELDS and not k.startswith("_")]
        if unknown:
            raise ConfigError(f"--additional-config {CONFIG_KEY}: unknown field {unknown[0]!r}; fields: "
                              f"{', '.join(CONFIG_FIELDS)}")
        vectors = raw.get("vectors")
        if not isinstance(vectors, list) or not vectors or not all(isinstance(v, str) for v in vectors):
            raise ConfigError(f"--additional-config {CONFIG_KEY}.vectors must be a non-empty list of "
                              '"NAME=PATH[@LAYER]" strings')
        layers = raw.get("layers")
        if layers is not None and (not isinstance(layers, list) or not layers or
                                   not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            raise ConfigError(f"--additional-config {CONFIG_KEY}.layers must be a non-empty list of layers (1..L)")
        sizes = {"slots": raw.get("slots", DEFAULT_SLOTS), "reads": raw.get("reads", DEFAULT_READS)}
        for name, value in sizes.items():
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 16:
                raise ConfigError(f"--additional-config {CONFIG_KEY}.{name} must be an integer from 1 to 16")
        return cls(tuple(vectors), None if layers is None else tuple(sorted(set(layers))), **sizes)

    def load(self, n_layers: int, hidden_size: int, model: str = "served") -> Served:
        """The vectors loaded and checked against the model ``model`` (``n_layers`` blocks of ``hidden_size``)."""
        layers = tuple(range(1, n_layers + 1)) if self.layers is None else self.layers
        bad = [x for x in layers if not 1 <= x <= n_layers]
        if bad:
            raise ConfigError(f"--additional-config {CONFIG_KEY}.layers: layer {bad[0]} is out of range; this model "
                              f"has layers 1..{n_layers}")
        where = f"--additional-config {CONFIG_KEY}.vectors"
        try:
            specs = [parse_vector_spec(s) for s in self.vectors]
            vecs = []
            for _, path, _ in specs:
                if not Path(path).is_file():
                    raise ConfigError(f"no vector file at {path}")
                vec = load_vector(path, n_layers=n_layers)
                vec.check_shape(n_layers, hidden_size, model)
                vecs.append(vec)
            served = serve_vectors(specs, vecs)
        except PersonavecError as e:  # its line names --vector, personavec serve's flag: say where it is here
            raise ConfigError(f"{where}: {str(e).replace('--vector ', '')}") from None
        return Served(self, served, layers, n_layers)


@dataclass(frozen=True)
class Op:
    """One round's half at one layer: an ``add`` of ``coef`` × row, or a projection edit clamping to [lo, hi]."""

    slot: int
    kind: str  # "add" or "project"
    row: int
    positions: str
    coef: float = 0.0
    lo: float = float("-inf")
    hi: float = float("inf")


@dataclass(frozen=True)
class ReadOp:
    """The request's ``index``-th reading: at ``layer``, in read slot ``slot``, on row ``row``, ``where``."""

    index: int
    key: str
    layer: int
    slot: int
    row: int
    where: str


@dataclass
class Program:
    """A request's edits and reads as the hooks run them."""

    ops: dict[int, list[Op]] = field(default_factory=dict)  # by layer, in the order they act
    reads: list[ReadOp] = field(default_factory=list)
    key: str | None = None
    digest: str = ""  # what its edits are, for the prefix-cache salt ("" when it has none)

    @property
    def edits(self) -> bool:
        return bool(self.ops)


@dataclass
class Served:
    """The loaded configuration: the vectors, the hooked layers, and each layer's rows (row 0 zero, then one per
    vector in the configuration's order)."""

    config: PluginConfig
    vectors: dict[str, ServedVector]
    layers: tuple[int, ...]
    n_layers: int

    def rows(self, layer: int) -> torch.Tensor:
        dirs = [sv.vector.get(layer).float() for sv in self.vectors.values()]
        return torch.stack([torch.zeros_like(dirs[0]), *dirs])

    def row_of(self, name: str) -> int:
        return list(self.vectors).index(name) + 1

    def describe(self) -> dict[str, Any]:
        """What ``GET /v1/persona/vectors`` lists: each vector as ``personavec serve`` lists it plus the digest of
        its rows (a client checks it holds the same vector), and the hooks' sizes."""
        return {"vectors": [{**sv.describe(), "digest": sv.vector.digest()} for sv in self.vectors.values()],
                "layers": list(self.layers), "slots": self.config.slots, "reads": self.config.reads,
                "max_coef": MAX_COEF}


def persona_of(extra_args: dict | None) -> tuple[Any, Any]:
    """(persona object or None, key or None) from a request's ``extra_args``; a persona sent as a JSON string is
    parsed (vLLM's ``vllm_xargs`` carries no nested objects)."""
    extra = extra_args or {}
    persona, key = extra.get("persona"), extra.get("persona_key")
    if isinstance(persona, str):
        try:
            persona = json.loads(persona)
        except json.JSONDecodeError as e:
            raise BadRequest("vllm_xargs.persona", f"vllm_xargs.persona is not valid JSON ({e.msg} at character "
                                                   f"{e.pos}); send the persona object as a JSON string") from None
    return persona, key


def compile_request(extra_args: dict | None, served: Served) -> Program:
    """A request's persona as a :class:`Program`, or :class:`BadRequest` naming the field: what
    :func:`personavec.serve.policy.parse_persona` refuses, a layer without hooks, more edit rounds or readings at a
    layer than the server has, a guard (not served here), readings without a key."""
    persona, key = persona_of(extra_args)
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_KEY):
        raise BadRequest("vllm_xargs.persona_key", f"vllm_xargs.persona_key must be a non-empty string of at most "
                                                   f"{MAX_KEY} characters")
    if isinstance(persona, dict) and persona.get("guard") is not None:
        raise BadRequest("persona.guard", "persona.guard is not served by the vLLM plugin (a worker cannot end an "
                                          "answer); read persona.monitor and stop on the client, or use "
                                          "personavec serve")
    edits, readings, _ = parse_persona(persona, served.vectors, served.n_layers)
    program = Program(key=key)
    for i, e in enumerate(edits):
        _place(program, e, _row(e, served, i), served)
    per_layer: dict[int, int] = {}
    for i, r in enumerate(readings):
        where = f"persona.monitor[{i}]"
        if r.layer not in served.layers:
            raise BadRequest(where, f"{where}: layer {r.layer} has no hooks on this server (hooked: "
                                    f"{_spans(served.layers)}); start it with that layer in personavec.layers")
        slot = per_layer.get(r.layer, 0)
        if slot >= served.config.reads:
            raise BadRequest(where, f"{where}: more than {served.config.reads} readings at layer {r.layer}; the "
                                    "server takes that many (personavec.reads in --additional-config)")
        per_layer[r.layer] = slot + 1
        program.reads.append(ReadOp(i, r.key, r.layer, slot, served.row_of(r.vector), r.where))
    if program.reads and key is None:
        raise BadRequest("vllm_xargs.persona_key", "persona.monitor needs vllm_xargs.persona_key: the key its "
                                                   "readings are fetched under (GET /v1/persona/reads/KEY)")
    if program.ops:
        canon = [(layer, [(o.slot, o.kind, o.row, o.positions, o.coef, o.lo, o.hi) for o in ops])
                 for layer, ops in sorted(program.ops.items())]
        program.digest = hashlib.sha256(repr(canon).encode()).hexdigest()[:32]
    return program


def salted(salt: str | None, program: Program, prompt_len: int) -> str | None:
    """The prefix-cache salt of a request: its own (if any) joined with its edits' digest, so no two requests with
    different edits share cached KV, and a request with edits shares none with one without. vLLM caches the blocks
    of generated tokens too: where an edit's positions depend on where the prompt ends (all but ``all``), the
    prompt's length joins the salt, so a later turn whose prompt holds this answer does not reuse KV computed with
    those tokens as answer."""
    if not program.edits:
        return salt
    own = f"personavec:{program.digest}"
    if any(op.positions != "all" for ops in program.ops.values() for op in ops):
        own += f"@{prompt_len}"
    return f"{salt}|{own}" if salt else own


def _row(e: Edit, served: Served, i: int) -> int:
    """The row of the vector ``e`` acts along: the served vector whose direction at the layer it is."""
    for name, sv in served.vectors.items():
        if torch.equal(sv.vector.get(e.layer).float(), e.direction.float()):
            return served.row_of(name)
    raise BadRequest("persona", f"edit {i}: its direction is not a served vector's")  # inline vectors: not served


def _place(program: Program, e: Edit, row: int, served: Served) -> None:
    """Put ``e`` after the edits already at its layer: an add starts a new round unless the current one is empty;
    a projection edit fills the current round's second half unless taken."""
    where = "persona"
    if e.layer not in served.layers:
        raise BadRequest(where, f"an edit at layer {e.layer}: that layer has no hooks on this server (hooked: "
                                f"{_spans(served.layers)}); start it with that layer in personavec.layers")
    ops = program.ops.setdefault(e.layer, [])
    slot = ops[-1].slot if ops else 0
    if ops and (e.kind == "add" or ops[-1].kind == "project"):
        slot += 1
    if slot >= served.config.slots:
        raise BadRequest(where, f"too many edits at layer {e.layer}: they need {slot + 1} rounds and this server "
                                f"runs {served.config.slots} per layer (personavec.slots in --additional-config; an "
                                "add followed by an ablate or cap fills one round)")
    if e.kind == "add":
        ops.append(Op(slot, "add", row, e.positions, coef=float(e.coef)))
    elif e.kind == "ablate":
        ops.append(Op(slot, "project", row, e.positions, lo=0.0, hi=0.0))
    else:
        ops.append(Op(slot, "project", row, e.positions, hi=float(e.coef)))


def _spans(layers: tuple[int, ...]) -> str:
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)

