"""From a chat-completions request body to an engine :class:`~personavec.engine.decoder.Request`.

Every field is checked here, and a bad one raises :class:`BadRequest` naming it (the server answers 400 with an
OpenAI-style error body). Nothing in a request can name a file: vectors are the ones the server loaded.
"""

from __future__ import annotations

import difflib
import json
import math
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..engine.decoder import Guard, Request
from ..errors import PersonavecError, as_typed
from ..model.chat import chat_ids
from ..model.edits import POSITIONS, STEER_POSITIONS, UNITS, Edit, chosen_setting
from ..model.loading import LoadedModel
from ..vectors.calibration import FROM_TOKEN, at_layer, default_cap, guard_threshold
from ..vectors.vector import PersonaVector

MAX_COEF = 64.0  # |coef| and |max| bound, in units of the raw vector: far beyond any useful steering
MAX_TOKENS = 4096
MAX_ENTRIES = 32  # entries of each persona list (steer, cap, cap.layers, monitor): every one costs every step
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # stop strings of a request, as OpenAI allows
# what a request may set; ``persona`` is this server's extension
FIELDS = ("messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
          "stream_options", "n", "persona")
# OpenAI fields this server does not implement: only the values that change nothing pass (null always does)
UNSERVED: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none",), "parallel_tool_calls": (True, False),
    "functions": ([],), "function_call": ("none",), "response_format": ({"type": "text"},),
    "modalities": (["text"],), "store": (False,), "metadata": ({},), "service_tier": ("auto", "default"),
    "audio": (), "prediction": (), "reasoning_effort": (), "web_search_options": (), "verbosity": ()}
LABELS = ("user", "safety_identifier", "prompt_cache_key")  # OpenAI's ids of a caller: any string, no effect here
# (``model`` too is any string: one model is served)
# the keys of each persona entry: any other is refused, naming it (a key a new form adds goes here)
STEER_FIELDS = ("vector", "coef", "units", "layer", "positions")
CAP_FIELDS = ("vector", "max", "layers")
# ``persona.edits``: any list of edits, composing in list order; each entry's kind and the fields it takes
EDIT_FIELDS = {"add": STEER_FIELDS, "ablate": ("vector", "layers", "positions"),
               "cap": ("vector", "max", "layers", "positions")}
PERSONA_FIELDS = ("steer", "cap", "edits", "monitor", "guard")
GUARD_FIELDS = ("vector", "threshold", "action", "coef", "where", "over")
MONITOR_FIELDS = ("vector", "where")
WHERE = ("before", "after")  # a reading before the request's own edits at the layer (the default) or after them


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
        """What ``GET /v1/persona/vectors`` lists; ``calibration`` (None without one at the served layer): the
        quantiles of the meter's readings of pos and neg answers there, and the default guard threshold and cap
        derived from them (:mod:`personavec.vectors.calibration`)."""
        return {"name": self.name, "trait": self.vector.trait, "layer": self.layer,
                "hidden_size": self.vector.hidden_size, "n_layers": self.vector.n_layers,
                "norm": round(float(self.direction().norm()), 4), "source": self.path,
                "calibration": at_layer(self.vector, self.layer), "steer_default": self.steer_default()}

    def steer_default(self) -> dict[str, Any]:
        """What a ``persona.steer`` entry naming only this vector does: the run's chosen coefficient in its units
        (``coef`` None when the vector has none: an entry must then give it), at the served layer."""
        _, coef, units = chosen_setting(self.vector)
        return {"layer": self.layer, "coef": coef, "units": units if coef is not None else "raw",
                "positions": STEER_POSITIONS}


class Reading(NamedTuple):
    """One reading a request asked for: ``vector`` at ``layer``, taken ``where`` (before or after the request's
    own edits there). Its ``key`` in the response's ``persona`` object: the name, or ``NAME@after``."""

    vector: str
    layer: int
    where: str = "before"

    @property
    def key(self) -> str:
        return self.vector if self.where == "before" else f"{self.vector}@{self.where}"


@dataclass
class ChatCall:
    """A checked request: what the engine runs, which vectors it reads, and how to answer."""

    request: Request
    monitor: list[Reading]  # in the order of request.reads (plain (name, layer[, where]) tuples are taken too)
    guarded: str | None  # the key of the reading the guard watches
    stream: bool
    prompt_tokens: int
    stop: tuple[str, ...] = ()  # the answer ends before the first of these
    usage: bool = False  # a streamed answer ends with a usage chunk (stream_options.include_usage)


def parse_vector_spec(spec: str) -> tuple[str | None, str, int | None]:
    """``NAME=PATH[@LAYER]`` or ``PATH[@LAYER]`` (a served vector, as ``--vector`` takes it) → (name or None, path,
    layer or None)."""
    name, _, rest = spec.rpartition("=") if "=" in spec else (None, "", spec)
    path, layer = rest, None
    head, at, tail = rest.rpartition("@")
    if at and tail.isdigit():
        path, layer = head, int(tail)
    if not path or (name is not None and not name):
        empty = "a vector's name is empty; " if path and name is not None and not name else ""
        raise PersonavecError(f"--vector {as_typed(spec)}: {empty}write NAME=PATH or NAME=PATH@LAYER")
    return name, path, layer


def serve_vectors(specs: list[tuple[str | None, str, int | None]], vecs: list[PersonaVector]
                  ) -> dict[str, ServedVector]:
    """The served vectors by name from :func:`parse_vector_spec`'s specs and the vectors loaded from their paths
    (checked against the model): a name left out is the vector's trait (or its file's stem), a layer left out its
    chosen one; two vectors under one name, or a zero row at the layer, are refused."""
    out: dict[str, ServedVector] = {}
    for (name, path, layer), vec in zip(specs, vecs):
        name = name or (vec.trait if vec.trait != "unknown" else Path(path).stem)
        if name in out:
            raise PersonavecError(f"two vectors are named {as_typed(name)}: name them apart with --vector NAME=PATH")
        layer = vec.chosen_layer if layer is None else layer
        if layer is None:
            raise PersonavecError(f"{path} has no chosen layer: give one as {name}={path}@LAYER")
        if not 1 <= layer <= vec.n_layers:
            raise PersonavecError(f"{path}: layer {layer} is out of range 1..{vec.n_layers}")
        direction = vec.get(layer)
        if not bool(direction.isfinite().all()) or float(direction.norm()) == 0:
            raise PersonavecError(f"{path}: the vector at layer {layer} is zero or not finite; pick another with "
                                  f"{name}={path}@LAYER")
        out[name] = ServedVector(name, vec, layer, str(path))
    return out


def parse_chat(body: Any, lm: LoadedModel, vectors: dict[str, ServedVector], key: Any,
               defaults: dict[str, Any] | None = None) -> ChatCall:
    """``defaults``: the server's persona policy (``cap``, ``guard``), used for what a request's ``persona``
    does not set."""
    if not isinstance(body, dict):
        raise BadRequest(None, f"the request body must be a JSON object, not {_shown(body)}")
    _fields(body)
    messages = _messages(body.get("messages"))
    if _int(body, "n", 1) != 1:
        raise BadRequest("n", f"only n = 1 is served, not {_shown(body['n'])}; send several requests for several "
                              "answers")
    length_field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, length_field, DEFAULT_MAX_TOKENS)
    if not 1 <= max_tokens <= MAX_TOKENS:
        raise BadRequest(length_field, f"{length_field} must be between 1 and {MAX_TOKENS}, not {max_tokens}")
    if length_field == "max_completion_tokens" and body.get("max_tokens") is not None and \
            not _same(body["max_tokens"], max_tokens):
        raise BadRequest("max_tokens", f"max_tokens {_shown(body['max_tokens'])} and max_completion_tokens "
                                       f"{max_tokens} say different lengths; send one of them")
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise BadRequest("temperature", f"temperature must be between 0 and 2, not {_shown(body['temperature'])}")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest("top_p", f"top_p must be above 0 and at most 1, not {_shown(body['top_p'])}")
    seed = _int(body, "seed", None)
    if seed is not None and not 0 <= seed < 2**63:
        raise BadRequest("seed", f"seed must be between 0 and {2**63 - 1} (2**63 - 1), not {seed}")
    stream = _or(body.get("stream"), False)
    if not isinstance(stream, bool):
        raise BadRequest("stream", f"stream must be true or false, not {_shown(stream)}")
    usage = _stream_options(body.get("stream_options"), stream)
    stop = _stops(body.get("stop"))
    persona = body.get("persona")
    if defaults and (persona is None or isinstance(persona, dict)):
        persona = {**defaults, **(persona or {})}
    edits, monitor, guard = parse_persona(persona, vectors, lm.n_layers)
    try:  # a control token typed in a message is text: nobody can forge a turn
        ids = chat_ids(lm.tokenizer, messages)
    except PersonavecError as e:
        raise BadRequest("messages", str(e)) from None
    except Exception as e:  # the model's template refuses this chat (e.g. roles that do not alternate)
        raise BadRequest("messages", f"the model's chat template refuses these messages: {str(e)[:200]}") from None
    context = lm.context_length
    if context and len(ids) + max_tokens > context:
        asked = f"{length_field} {max_tokens}" if body.get(length_field) is not None else \
            f"the default {length_field} {max_tokens}"
        if len(ids) < context:
            raise BadRequest(length_field, f"the prompt has {len(ids)} tokens; with {asked} the answer could run "
                                           f"past the model's context of {context} tokens: send {length_field} of "
                                           f"at most {context - len(ids)}, or shorten the chat")
        raise BadRequest("messages", f"the prompt has {len(ids)} tokens, which leaves no room for an answer in the "
                                     f"model's context of {context}; shorten the chat")
    reads = tuple((r.layer, vectors[r.vector].direction(r.layer), r.where) for r in monitor)
    request = Request(tuple(ids), max_new_tokens=max_tokens, temperature=temperature, top_p=top_p,
                      seed=secrets.randbits(31) if seed is None else seed, edits=tuple(edits), key=key,
                      reads=reads, guard=guard)
    return ChatCall(request, monitor, None if guard is None else monitor[guard.read].key, stream, len(ids), stop,
                    usage)


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise BadRequest("messages", "messages must be a non-empty list of {role, content} objects, not "
                                     f"{_shown(value)}")
    out = []
    for i, m in enumerate(value):
        content = _text(m.get("content"), f"messages[{i}].content") if isinstance(m, dict) else None
        if not isinstance(m, dict) or m.get("role") not in ROLES or content is None:
            raise BadRequest(f"messages[{i}]", f"messages[{i}] must be {{role: {'|'.join(ROLES)}, content: string}}, "
                                               f"not {_shown(m, 80)}")
        _known(m, ("role", "content"), f"messages[{i}]")  # a name, tool calls, ...: not served, not ignored
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # JSON can carry a lone surrogate (\ud800); no tokenizer takes it
            raise BadRequest(f"messages[{i}]", f"messages[{i}].content is not valid Unicode text (a lone "
                                               "surrogate)") from None
        out.append({"role": m["role"], "content": content})
    if out[-1]["role"] == "assistant":
        raise BadRequest("messages", "the last message must be the user's (or the system's), not the assistant's")
    return out


def _text(content: Any, where: str) -> str | None:
    """A message's text: a string, or OpenAI's list of text parts (``[{"type": "text", "text": ...}]``) joined;
    None for anything else. A part of another type (an image) is refused, naming it."""
    if isinstance(content, str) or not isinstance(content, list):
        return content if isinstance(content, str) else None
    texts = []
    for k, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise BadRequest(f"{where}[{k}]", f"{where}[{k}] must be a text part {{type: \"text\", text: string}} "
                                              f"(only text is served), not {_shown(part, 80)}")
        _known(part, ("type", "text"), f"{where}[{k}]")
        texts.append(part["text"])
    return "".join(texts)


def _shown(value: Any, limit: int = 40) -> str:
    """``value`` as the request wrote it, in JSON (``"2"`` for a string, ``13.0``, ``true``, ``null``), cut short."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=True)
    except (TypeError, ValueError):
        text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _known(entry: dict, fields: tuple[str, ...], where: str) -> None:
    """Refuse a key of ``entry`` outside ``fields``, naming it, what it may have meant, and the fields there are."""
    for key in entry:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise BadRequest(f"{where}.{key}"[:120], f"{where}: unknown field '{str(key)[:40]}'{hint}; fields: "
                                                     f"{', '.join(fields)}")


def _fields(body: dict) -> None:
    """Refuse a top-level field that this server does not know, or one of OpenAI's it does not implement set to
    a value that would change the answer (a client must not believe it got what it asked for)."""
    for key, value in body.items():
        if value is None or (key in FIELDS and key != "model"):
            continue
        if key in LABELS or key == "model":
            if not isinstance(value, str):
                raise BadRequest(key, f"{key} must be a string, not {_shown(value)}")
        elif key in UNSERVED:
            if not any(_same(value, ok) for ok in UNSERVED[key]):
                allowed = f" (only {' or '.join(_shown(x) for x in UNSERVED[key])}, which changes nothing)" \
                    if UNSERVED[key] else ""
                raise BadRequest(key, f"{key} is not implemented by this server{allowed}; leave it out")
        else:
            close = difflib.get_close_matches(str(key), FIELDS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise BadRequest(str(key)[:120], f"unknown field '{str(key)[:40]}'{hint}; this server takes: "
                                             f"{', '.join(FIELDS)}")


def _same(value: Any, ok: Any) -> bool:
    """JSON equality: ``false`` is not ``0``, ``0.0`` is ``0``."""
    if isinstance(value, bool) or isinstance(ok, bool):
        return isinstance(value, bool) and isinstance(ok, bool) and value == ok
    numbers = isinstance(value, (int, float)) and isinstance(ok, (int, float))
    return (numbers or type(value) is type(ok)) and value == ok


def _stops(value: Any) -> tuple[str, ...]:
    """``stop``: null, a string, or a list of at most ``MAX_STOPS`` strings, none empty."""
    stops = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(x, str) and x for x in stops) or len(stops) > MAX_STOPS:
        raise BadRequest("stop", f"stop must be a string or a list of at most {MAX_STOPS} strings, none empty; not "
                                 f"{_shown(value)}")
    for x in stops:
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("stop", "stop is not valid Unicode text (a lone surrogate)") from None
    return tuple(dict.fromkeys(stops))


def _stream_options(value: Any, stream: bool) -> bool:
    """Whether the stream ends with a usage chunk (``stream_options.include_usage``)."""
    if value is None:
        return False
    if not isinstance(value, dict):
        raise BadRequest("stream_options", f"stream_options must be an object, not {_shown(value)}")
    _known(value, ("include_usage",), "stream_options")
    usage = _or(value.get("include_usage"), False)
    if not isinstance(usage, bool):
        raise BadRequest("stream_options.include_usage", "stream_options.include_usage must be true or false, not "
                                                         f"{_shown(usage)}")
    if not stream:
        raise BadRequest("stream_options", "stream_options is only for streamed answers (stream: true); leave it "
                                           "out (the answer's usage is always in its body)")
    return usage


def _number(obj: dict, field: str, default: float | None, where: str = "") -> float:
    """``obj[field]`` as a finite float; ``default`` when it is missing or null (required when that is None)."""
    value = obj.get(field)
    if value is None:
        if default is None:
            raise BadRequest(where + field, f"{where + field} is required")
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "a string" if isinstance(value, str) else "true or false" if isinstance(value, bool) else "a list" \
            if isinstance(value, list) else "an object" if isinstance(value, dict) else "that"
        raise BadRequest(where + field, f"{where + field} must be a number, not {kind}: {_shown(value)}"
                                        + (f" (write {value.strip()}, without quotes)" if isinstance(value, str)
                                           and _is_number(value) else ""))
    try:
        finite = math.isfinite(float(value))
    except OverflowError:  # an integer too large for a float
        finite = False
    if not finite:
        raise BadRequest(where + field, f"{where + field} must be a finite number, not {_shown(value)}")
    return float(value)


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _int(obj: dict, field: str, default: int | None, where: str = "") -> Any:
    """``obj[field]`` as an integer; ``default`` when it is missing or null."""
    value = obj.get(field)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(where + field, f"{where + field} must be an integer, not {_shown(value)}")
    return value


def _vector(entry: dict, vectors: dict[str, ServedVector], where: str) -> ServedVector:
    name = entry.get("vector")
    if not isinstance(name, str) or name not in vectors:
        known = ", ".join(sorted(vectors)) or "none"
        what = f"{where}vector is required" if name is None else f"{where}vector must be a vector's name (a " \
            f"string), not {_shown(name)}" if not isinstance(name, str) else f"unknown vector {_shown(name)}"
        raise BadRequest(where + "vector", f"{what}; this server has: {known} (GET /v1/persona/vectors lists them)")
    return vectors[name]


def _layer(value: Any, default: int, n_layers: int, where: str) -> int:
    layer = default if value is None else value
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise BadRequest(where, f"{where} must be an integer (a layer from 1 to {n_layers}), not {_shown(layer)}")
    if not 1 <= layer <= n_layers:
        raise BadRequest(where, f"{where} must be a layer from 1 to {n_layers} (the model's {n_layers} blocks), not "
                                f"{layer}")
    return layer


def _entries(persona: dict, field: str) -> list[dict]:
    value = persona.get(field)
    value = [] if value is None else value
    if not isinstance(value, list) or not all(isinstance(x, dict) for x in value):
        raise BadRequest(f"persona.{field}", f"persona.{field} must be a list of objects, not {_shown(value)}")
    _bounded(value, f"persona.{field}")
    return value


def _bounded(value: list, where: str) -> None:
    if len(value) > MAX_ENTRIES:
        raise BadRequest(where, f"{where} has {len(value)} entries; at most {MAX_ENTRIES} are served")


def _or(value: Any, default: Any) -> Any:
    """``value``, or ``default`` where the request left it out or sent null."""
    return default if value is None else value


def _edit(field: str, *args: Any, **kwargs: Any) -> Edit:
    """An Edit; its own check's refusal (a layer where the vector is zero) is a 400 naming ``field``."""
    try:
        return Edit(*args, **kwargs)
    except PersonavecError as e:
        raise BadRequest(field, f"{field}: {e}") from None


def parse_persona(persona: Any, vectors: dict[str, ServedVector], n_layers: int
                  ) -> tuple[list[Edit], list[Reading], Guard | None]:
    """A request's ``persona`` object as the edits it makes (in the order they compose at a layer: ``steer``'s,
    then ``cap``'s, then ``edits``' in list order), the readings it asks for, and its guard; a bad field raises
    :class:`BadRequest` naming it. The one parser of this server and of the vLLM plugin."""
    if persona is None:
        return [], [], None
    if not isinstance(persona, dict):
        raise BadRequest("persona", f"persona must be an object with {', '.join(PERSONA_FIELDS)}, not "
                                    f"{_shown(persona)}")
    _known(persona, PERSONA_FIELDS, "persona")
    edits: list[Edit] = []
    for i, e in enumerate(_entries(persona, "steer")):
        _known(e, STEER_FIELDS, f"persona.steer[{i}]")
        edits.append(_steer_edit(e, vectors, n_layers, f"persona.steer[{i}]."))
    for i, e in enumerate(_entries(persona, "cap")):
        _known(e, CAP_FIELDS, f"persona.cap[{i}]")
        edits.extend(_cap_edits(e, vectors, n_layers, f"persona.cap[{i}]."))
    for i, e in enumerate(_entries(persona, "edits")):
        where = f"persona.edits[{i}]."
        kind = e.get("kind")
        if not isinstance(kind, str) or kind not in EDIT_FIELDS:
            raise BadRequest(where + "kind", f"{where}kind must be one of {', '.join(EDIT_FIELDS)}, not {_shown(kind)}")
        _known(e, ("kind", *EDIT_FIELDS[kind]), where[:-1])
        entry = {k: v for k, v in e.items() if k != "kind"}
        edits.extend([_steer_edit(entry, vectors, n_layers, where)] if kind == "add" else
                     _cap_edits(entry, vectors, n_layers, where) if kind == "cap" else
                     _ablate_edits(entry, vectors, n_layers, where))
    wanted = _or(persona.get("monitor"), [])
    if wanted is True:
        wanted = list(vectors)
    if not isinstance(wanted, list) or not all(isinstance(x, (str, dict)) for x in wanted):
        raise BadRequest("persona.monitor", f"persona.monitor must be true or a list of vector names or "
                                            f"{{vector, where}} objects, not {_shown(wanted)}")
    _bounded(wanted, "persona.monitor")
    monitor: list[Reading] = []
    for i, entry in enumerate(wanted):
        where = f"persona.monitor[{i}]."
        if isinstance(entry, dict):
            _known(entry, MONITOR_FIELDS, where[:-1])
        entry = {"vector": entry} if isinstance(entry, str) else entry
        sv = _vector(entry, vectors, where)
        reading = Reading(sv.name, sv.layer, _where(entry, where))
        if reading not in monitor:  # a reading asked for twice is taken once
            monitor.append(reading)
    return edits, monitor, _guard(persona.get("guard"), vectors, monitor)


def _steer_edit(e: dict, vectors: dict[str, ServedVector], n_layers: int, where: str) -> Edit:
    """An ``add`` edit: ``persona.steer[i]`` or an ``edits`` entry of kind add."""
    sv = _vector(e, vectors, where)
    default = sv.steer_default()
    units = _or(e.get("units"), default["units"] if e.get("coef") is None else "raw")
    if units not in UNITS:
        raise BadRequest(where + "units", f'{where}units must be "raw" (x the vector) or "norm" (x the typical '
                                          f"residual norm at the layer), not {_shown(units)}")
    if e.get("coef") is None and default["coef"] is None:
        raise BadRequest(where + "coef", f"{where}coef is needed: the vector {sv.name} has no chosen coefficient "
                                         "(its run made none) to default to")
    if e.get("coef") is None and units != default["units"]:
        raise BadRequest(where + "units", f"{where}units: the chosen coefficient {default['coef']:g} of {sv.name} "
                                          f"is in {default['units']} units; send coef too, or leave units out")
    coef = _number(e, "coef", default["coef"], where)
    layer = _layer(e.get("layer"), sv.layer, n_layers, where + "layer")
    positions = _positions(e, STEER_POSITIONS, where)
    try:
        edit = Edit.from_vector(sv.vector, layer, coef, units=units, positions=positions)
    except PersonavecError as err:
        raise BadRequest(where + ("units" if "resid_norm" in str(err) else "layer"), f"{where[:-1]}: {err}"
                         ) from None
    if abs(edit.coef) > MAX_COEF:
        given = _shown(e.get("coef")) if e.get("coef") is not None else f"the vector's chosen {coef:g}"
        raise BadRequest(where + "coef", f"{where}coef must be between {-MAX_COEF:g} and {MAX_COEF:g} in raw units "
                                         f"(x the vector), not {given}"
                                         + (f" {units} (= {edit.coef:g} raw)" if units != "raw" else ""))
    return edit


def _cap_edits(e: dict, vectors: dict[str, ServedVector], n_layers: int, where: str) -> list[Edit]:
    """``cap`` edits, one per layer: ``persona.cap[i]`` or an ``edits`` entry of kind cap."""
    sv = _vector(e, vectors, where)
    positions = _positions(e, "all", where)
    out = []
    for layer in _layer_list(e, sv, n_layers, where):  # each layer's readings have their own scale and bound
        cap = _number(e, "max", _calibrated(sv, default_cap, where + "max", "cap", layer)
                      if e.get("max") is None else None, where)
        norm = float(sv.direction(layer).norm())
        bound = MAX_COEF * max(1.0, norm)
        if abs(cap) > bound:
            raise BadRequest(where + "max", f"{where}max must be between {-bound:g} and {bound:g}, not "
                                            f"{_shown(e.get('max', cap))}: a projection on the unit direction of "
                                            f"{_shown(sv.name)}, bounded by {MAX_COEF:g} × its norm {norm:.4g} at "
                                            f"layer {layer} (the most the largest steering adds)")
        out.append(_edit(where + "layers", layer, sv.direction(layer), cap, kind="cap", positions=positions))
    return out


def _ablate_edits(e: dict, vectors: dict[str, ServedVector], n_layers: int, where: str) -> list[Edit]:
    """``ablate`` edits (the component along v̂ removed), one per layer: an ``edits`` entry of kind ablate."""
    sv = _vector(e, vectors, where)
    positions = _positions(e, "all", where)
    return [_edit(where + "layers", layer, sv.direction(layer), 0.0, kind="ablate", positions=positions)
            for layer in _layer_list(e, sv, n_layers, where)]


def _layer_list(e: dict, sv: ServedVector, n_layers: int, where: str) -> list[int]:
    layers = _or(e.get("layers"), [sv.layer])
    if not isinstance(layers, list) or not layers:
        raise BadRequest(where + "layers", f"{where}layers must be a non-empty list of layers, not {_shown(layers)}")
    _bounded(layers, where + "layers")
    return [_layer(layer, sv.layer, n_layers, where + "layers") for layer in layers]


def _positions(e: dict, default: str, where: str) -> str:
    positions = _or(e.get("positions"), default)
    if positions not in POSITIONS:
        raise BadRequest(where + "positions", f"{where}positions must be one of {', '.join(POSITIONS)}, not "
                                              f"{_shown(positions)}")
    return positions


def _where(entry: dict, where: str) -> str:
    value = _or(entry.get("where"), "before")
    if value not in WHERE:
        raise BadRequest(where + "where", f'{where}where must be "before" (the residual as it arrives, before this '
                                          f'request\'s edits at the layer) or "after" (after them), not '
                                          f"{_shown(value)}")
    return value


def _calibrated(sv: ServedVector, rule: Any, field: str, what: str, layer: int | None = None) -> float:
    """The vector's calibrated default for ``field`` (a guard threshold or a cap) at ``layer`` (default: the served
    one), or a 400 saying it has none."""
    layer = sv.layer if layer is None else layer
    value = rule(sv.vector, layer)
    if value is None:
        has = f"no calibrated {what} at layer {layer} (its eliciting answers are too short for the rule)" \
            if at_layer(sv.vector, layer) is not None else \
            f"no calibration at layer {layer} to take a default {what} from (a run's vector gets one from its " \
            "separation stage, `personavec extract` records one)"
        raise BadRequest(field, f"{field} is required: vector {_shown(sv.name)} has {has}; give a number, a "
                                "projection on the unit direction in raw residual units")
    return value


def _coef(entry: dict, where: str, default: float | None = None) -> float:
    coef = _number(entry, "coef", default, where)
    if abs(coef) > MAX_COEF:
        raise BadRequest(where + "coef", f"{where}coef must be between {-MAX_COEF:g} and {MAX_COEF:g} (in units of "
                                         f"the raw vector), not {_shown(entry.get('coef'))}")
    return coef


def _guard(g: Any, vectors: dict[str, ServedVector], monitor: list[Reading]) -> Guard | None:
    """The live monitor: its vector is read (added to ``monitor`` when not there) and checked per token, before the
    request's edits at the layer unless ``where`` says after; the threshold defaults to the vector's calibrated
    one."""
    if g is None:
        return None
    if not isinstance(g, dict):
        raise BadRequest("persona.guard", f"persona.guard must be {{vector, threshold, action, coef, where}}, not "
                                          f"{_shown(g)}")
    where = "persona.guard."
    _known(g, GUARD_FIELDS, where[:-1])
    sv = _vector(g, vectors, where)
    over = _or(g.get("over"), "answer")
    if over not in ("answer", "token"):
        raise BadRequest(where + "over", f'{where}over must be "answer" (the running mean of the answer\'s readings, '
                                         f'from its {FROM_TOKEN}th token on: the default, what the calibrated '
                                         f'threshold is for) or "token" (each token\'s reading), not {_shown(over)}')
    if over == "token" and g.get("threshold") is None:  # the calibrated default is a running mean's, not a token's
        raise BadRequest(where + "threshold", f'{where}threshold is needed with over "token": the calibrated default '
                                              "is for the answer's running mean (single tokens of ordinary answers "
                                              "pass it); give a number, or leave over out")
    threshold = _number(g, "threshold", _calibrated(sv, guard_threshold, where + "threshold", "threshold")
                        if g.get("threshold") is None else None, where)
    reading = Reading(sv.name, sv.layer, _where(g, where))
    action = _or(g.get("action"), "stop")
    if action not in ("stop", "steer"):
        raise BadRequest(where + "action", f'{where}action must be "stop" or "steer", not {_shown(action)}')
    edit = None
    if action == "steer":
        edit = Edit(sv.layer, sv.direction(), _coef(g, where, -4.0), positions=STEER_POSITIONS)
    elif g.get("coef") is not None:
        raise BadRequest(where + "coef", f'{where}coef is for action "steer" only (a stopped answer is not steered); '
                                         "leave it out, or set action to \"steer\"")
    if reading not in monitor:
        monitor.append(reading)
    return Guard(monitor.index(reading), threshold, action, edit, over=over,
                 from_token=FROM_TOKEN if over == "answer" else 1)


def parse_policy(caps: list[str], guard: str | None, vectors: dict[str, ServedVector]) -> dict[str, Any]:
    """The server-wide default persona from ``--cap NAME[=MAX]`` (repeatable) and
    ``--guard NAME[:THRESHOLD][:stop|steer[:COEF]]``, checked like a request's (a bad one raises
    :class:`BadRequest`). A MAX or THRESHOLD left out (or ``auto``) is the vector's calibrated one."""
    policy: dict[str, Any] = {}
    for spec in caps:
        name, eq, value = spec.partition("=")
        try:
            entry: dict[str, Any] = {"vector": name}
            if eq and value != "auto":
                entry["max"] = float(value)
            policy.setdefault("cap", []).append(entry)
        except ValueError:
            raise BadRequest("--cap", f"--cap {spec}: write NAME=MAX (a number), or NAME for the vector's calibrated "
                                      "cap") from None
    if guard:
        parts = guard.split(":")
        try:
            entry = {"vector": parts[0]}
            if len(parts) > 1 and parts[1] not in ("stop", "steer"):  # a threshold: a number, or auto
                threshold = parts.pop(1)
                if threshold != "auto":
                    entry["threshold"] = float(threshold)
            if len(parts) > 1:
                entry["action"] = parts[1]
            if len(parts) > 2:
                entry["coef"] = float(parts[2])
            if len(parts) > 3:
                raise ValueError
            policy["guard"] = entry
        except ValueError:
            raise BadRequest("--guard", f"--guard {guard}: write NAME[:THRESHOLD][:stop|steer[:COEF]] (THRESHOLD "
                                        "left out or auto: the vector's calibrated one)") from None
    try:
        parse_persona(policy, vectors, max(v.vector.n_layers for v in vectors.values()) if vectors else 0)
    except BadRequest as e:  # named by the flag that set it: persona.cap[1] is the second --cap
        param = e.param or ""
        if param.startswith("persona.guard"):
            flag, spec = "--guard", guard
        elif param.startswith("persona.cap["):
            flag, spec = "--cap", caps[int(param[len("persona.cap["):].split("]")[0])]
        else:
            raise
        raise BadRequest(flag, f"{flag} {spec}: {e.message}") from None
    return policy
