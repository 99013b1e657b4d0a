"""From a chat-completions request body to an engine :class:`~personavec.engine.decoder.Request`.

Every field is checked here, and a bad one raises :class:`BadRequest` naming it (the server answers 400 with an
OpenAI-style error body). Nothing in a request can name a file: vectors are the ones the server loaded.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.decoder import Guard, Request
from ..model.edits import POSITIONS, Edit
from ..model.loading import LoadedModel
from ..vectors.vector import PersonaVector

MAX_COEF = 64.0  # |coef| and |max| bound, in units of the raw vector: far beyond any useful steering
MAX_TOKENS = 4096
MAX_ENTRIES = 32  # entries of each persona list (steer, cap, cap.layers, monitor): every one costs every step
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant")


class BadRequest(Exception):
    """A request the server refuses: ``status`` (400 unless said), the field (``param``) and what to do."""

    def __init__(self, param: str | None, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.message, self.status = param, message, status


@dataclass(frozen=True)
class ServedVector:
    """A vector the server loaded: its name in requests, the layer it acts at by default, and its file."""

    name: str
    vector: PersonaVector
    layer: int
    path: str

    def direction(self, layer: int | None = None) -> torch.Tensor:
        return self.vector.get(self.layer if layer is None else layer)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "trait": self.vector.trait, "layer": self.layer,
                "hidden_size": self.vector.hidden_size, "n_layers": self.vector.n_layers,
                "norm": round(float(self.direction().norm()), 4), "source": self.path}


@dataclass
class ChatCall:
    """A checked request: what the engine runs, which vectors it reads, and how to answer."""

    request: Request
    monitor: list[tuple[str, int]]  # (vector name, layer), in the order of request.reads
    guarded: str | None  # the vector the guard watches
    stream: bool
    prompt_tokens: int


def parse_chat(body: Any, lm: LoadedModel, vectors: dict[str, ServedVector], key: Any,
               defaults: dict[str, Any] | None = None) -> ChatCall:
    """``defaults``: the server's persona policy (``cap``, ``guard``), used for what a request's ``persona``
    does not set."""
    if not isinstance(body, dict):
        raise BadRequest(None, "the request body must be a JSON object")
    messages = _messages(body.get("messages"))
    if _int(body, "n", 1) != 1:
        raise BadRequest("n", "only n = 1 is served; send several requests for several answers")
    length_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, length_field, DEFAULT_MAX_TOKENS)
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise BadRequest(length_field, f"{length_field} must be between 1 and {MAX_TOKENS}, not {max_tokens}")
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise BadRequest("temperature", f"temperature must be between 0 and 2, not {temperature}")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest("top_p", f"top_p must be in (0, 1], not {top_p}")
    seed = _int(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise BadRequest("seed", f"seed must be between 0 and 2**63 - 1, not {seed}")
    stream = _or(body.get("stream"), False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", "stream must be true or false")
    persona = body.get("persona")
    if defaults and (persona is None or isinstance(persona, dict)):
        persona = {**defaults, **(persona or {})}
    edits, monitor, guard = _persona(persona, vectors, lm.n_layers)
    try:
        prompt = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the model's template refuses this chat (e.g. roles that do not alternate)
        raise BadRequest("messages", f"the model's chat template refuses these messages: {str(e)[:200]}") from None
    ids = lm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    context = lm.context_length
    if context and len(ids) + max_tokens > context:
        raise BadRequest("messages", f"the prompt has {len(ids)} tokens and {length_field} is {max_tokens}: "
                                     f"together more than the model's context of {context}; shorten the chat or "
                                     f"{length_field}")
    reads = tuple((layer, vectors[name].direction(layer)) for name, layer in monitor)
    request = Request(tuple(ids), max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                      seed=secrets.randbits(31) if seed is None else seed, edits=tuple(edits), key=key,
                      reads=reads, guard=guard)
    return ChatCall(request, monitor, None if guard is None else monitor[guard.read][0], stream, len(ids))


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}]", f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: string}}")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:  # JSON can carry a lone surrogate (\ud800); no tokenizer takes it
            raise BadRequest(f"messages[{i}]", f"messages[{i}].content is not valid Unicode text (a lone "
                                               "surrogate)") from None
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] == "assistant":
        raise BadRequest("messages", "the last message must be the user's (or the system's), not the assistant's")
    return out


def _number(obj: dict, field: str, default: float | None, where: str = "") -> float:
    """``obj[field]`` as a finite float; ``default`` when it is missing or null (required when that is None)."""
    value = obj.get(field)
    if value is None:
        if default is None:
            raise BadRequest(where + field, f"{where + field} is required")
        value = default
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise BadRequest(where + field, f"{where + field} must be a finite number, not {str(value)[:40]}")
    return float(value)


def _int(obj: dict, field: str, default: int | None, where: str = "") -> Any:
    """``obj[field]`` as an integer; ``default`` when it is missing or null."""
    value = obj.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(where + field, f"{where + field} must be an integer, not {value!r}")
    return value


def _vector(entry: dict, vectors: dict[str, ServedVector], where: str) -> ServedVector:
    name = entry.get("vector")
    if not isinstance(name, str) or name not in vectors:
        known = ", ".join(sorted(vectors)) or "none"
        raise BadRequest(where + "vector", f"unknown vector {name!r}; this server has: {known}")
    return vectors[name]


def _layer(value: Any, default: int, n_layers: int, where: str) -> int:
    layer = default if value is None else value
    if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer <= n_layers:
        raise BadRequest(where, f"{where} must be a layer between 1 and {n_layers}, not {layer!r}")
    return layer


def _entries(persona: dict, field: str) -> list[dict]:
    value = persona.get(field)
    value = [] if value is None else value
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise BadRequest(f"persona.{field}", f"persona.{field} must be a list of objects")
    _bounded(value, f"persona.{field}")
    return value


def _bounded(value: list, where: str) -> None:
    if len(value) > MAX_ENTRIES:
        raise BadRequest(where, f"{where} has {len(value)} entries; at most {MAX_ENTRIES} are served")


def _or(value: Any, default: Any) -> Any:
    """``value``, or ``default`` where the request left it out or sent null."""
    return default if value is None else value


def _persona(persona: Any, vectors: dict[str, ServedVector], n_layers: int
             ) -> tuple[list[Edit], list[tuple[str, int]], Guard | None]:
    if persona is None:
        return [], [], None
    if not isinstance(persona, dict):
        raise BadRequest("persona", "persona must be an object with steer, cap, monitor and guard")
    unknown = set(persona) - {"steer", "cap", "monitor", "guard"}
    if unknown:
        raise BadRequest("persona", f"unknown persona field(s) {', '.join(repr(x) for x in sorted(unknown))}; use "
                                    "steer, cap, monitor, guard")
    edits: list[Edit] = []
    for i, e in enumerate(_entries(persona, "steer")):
        where = f"persona.steer[{i}]."
        sv = _vector(e, vectors, where)
        coef = _number(e, "coef", None, where)
        if abs(coef) > MAX_COEF:
            raise BadRequest(where + "coef", f"|{where}coef| must be at most {MAX_COEF:g}, not {coef:g}")
        layer = _layer(e.get("layer"), sv.layer, n_layers, where + "layer")
        positions = _or(e.get("positions"), "response")
        if positions not in POSITIONS:
            raise BadRequest(where + "positions", f"{where}positions must be one of {', '.join(POSITIONS)}")
        edits.append(Edit(layer, sv.direction(layer), coef, positions=positions))
    for i, e in enumerate(_entries(persona, "cap")):
        where = f"persona.cap[{i}]."
        sv = _vector(e, vectors, where)
        cap = _number(e, "max", None, where)
        if abs(cap) > MAX_COEF * max(1.0, float(sv.direction().norm())):
            raise BadRequest(where + "max", f"{where}max {cap:g} is out of any useful range")
        layers = _or(e.get("layers"), [sv.layer])
        if not isinstance(layers, list) or not layers:
            raise BadRequest(where + "layers", f"{where}layers must be a non-empty list of layers")
        _bounded(layers, where + "layers")
        for layer in layers:
            layer = _layer(layer, sv.layer, n_layers, where + "layers")
            edits.append(Edit(layer, sv.direction(layer), cap, kind="cap", positions="all"))
    wanted = _or(persona.get("monitor"), [])
    if wanted is True:
        wanted = list(vectors)
    if not isinstance(wanted, list) or not all(isinstance(x, str) for x in wanted):
        raise BadRequest("persona.monitor", "persona.monitor must be true or a list of vector names")
    _bounded(wanted, "persona.monitor")
    wanted = list(dict.fromkeys(wanted))  # a name given twice is read once
    monitor = []
    for i, name in enumerate(wanted):
        sv = _vector({"vector": name}, vectors, f"persona.monitor[{i}].")
        monitor.append((name, sv.layer))
    return edits, monitor, _guard(persona.get("guard"), vectors, monitor)


def _guard(g: Any, vectors: dict[str, ServedVector], monitor: list[tuple[str, int]]) -> Guard | None:
    """The live monitor: its vector is read (added to ``monitor`` when not there) and checked per token."""
    if g is None:
        return None
    if not isinstance(g, dict):
        raise BadRequest("persona.guard", "persona.guard must be {vector, threshold, action, coef}")
    where = "persona.guard."
    sv = _vector(g, vectors, where)
    threshold = _number(g, "threshold", None, where)
    action = _or(g.get("action"), "stop")
    if action not in ("stop", "steer"):
        raise BadRequest(where + "action", f"{where}action must be 'stop' or 'steer', not {action!r}")
    edit = None
    if action == "steer":
        coef = _number(g, "coef", -4.0, where)
        if abs(coef) > MAX_COEF:
            raise BadRequest(where + "coef", f"|{where}coef| must be at most {MAX_COEF:g}, not {coef:g}")
        edit = Edit(sv.layer, sv.direction(), coef, positions="response")
    if (sv.name, sv.layer) not in monitor:
        monitor.append((sv.name, sv.layer))
    return Guard(monitor.index((sv.name, sv.layer)), threshold, action, edit)


def parse_policy(caps: list[str], guard: str | None, vectors: dict[str, ServedVector]) -> dict[str, Any]:
    """The server-wide default persona from ``--cap NAME=MAX`` (repeatable) and ``--guard NAME:THRESHOLD:stop``
    or ``NAME:THRESHOLD:steer[:COEF]``, checked like a request's (a bad one raises :class:`BadRequest`)."""
    policy: dict[str, Any] = {}
    for spec in caps:
        name, eq, value = spec.partition("=")
        try:
            policy.setdefault("cap", []).append({"vector": name, "max": float(value)})
        except ValueError:
            raise BadRequest("--cap", f"--cap {spec!r}: write NAME=MAX (a number)") from None
        if not eq:
            raise BadRequest("--cap", f"--cap {spec!r}: write NAME=MAX")
    if guard:
        parts = guard.split(":")
        try:
            policy["guard"] = {"vector": parts[0], "threshold": float(parts[1]), "action": parts[2],
                               **({"coef": float(parts[3])} if len(parts) > 3 else {})}
        except (IndexError, ValueError):
            raise BadRequest("--guard", f"--guard {guard!r}: write NAME:THRESHOLD:stop or "
                                        "NAME:THRESHOLD:steer[:COEF]") from None
    _persona(policy, vectors, max(v.vector.n_layers for v in vectors.values()) if vectors else 0)
    return policy
