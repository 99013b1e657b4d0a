"""Model internals, in one place: decoder blocks, the layer convention, capture and edit hooks.

Layer convention (used everywhere in personavec):

* layer ``ℓ`` is the residual stream after ``ℓ`` decoder blocks; ``ℓ = 0`` is the input of block 0
  (the embeddings, including any position embeddings or embedding scaling the model applies);
* for ``1 ≤ ℓ ≤ L`` it is the output of block ``ℓ − 1``. At ``ℓ = L`` this is *before* the final norm,
  whereas Hugging Face's ``hidden_states[L]`` is after it — the two agree for every ``ℓ < L``;
* vectors are stored as ``[L + 1, hidden]``;
* an edit "at layer ℓ" acts on the output of block ``ℓ − 1`` (on the input of block 0 for ``ℓ = 0``).

Capture uses forward hooks on the requested blocks only, and can stop the forward pass right after the
highest requested block (no compute is spent on later blocks or on the LM head).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import PersonavecError

# Attribute paths of the decoder-block list in common HF causal LMs, most specific first.
KNOWN_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",                 # Llama, Qwen2/3, Mistral, Mixtral, Gemma 1-3, Phi-3, Phi, OLMo, Granite
    "model.language_model.layers",  # multimodal wrappers (Gemma 3, Llava-style)
    "model.decoder.layers",         # OPT
    "transformer.h",                # GPT-2, GPT-J, GPT-BigCode, Bloom, Falcon, Qwen-1
    "gpt_neox.layers",              # GPT-NeoX, Pythia
    "transformer.blocks",           # MPT
    "transformer.layers",           # ChatGLM-style
    "backbone.layers",              # Mamba-style
)
LAYERS_PATH_ENV = "PERSONAVEC_LAYERS_PATH"


def _get_attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _unwrap(model: nn.Module) -> nn.Module:
    """Strip PEFT and similar wrappers so that known attribute paths apply."""
    seen = 0
    while seen < 4:
        seen += 1
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
            if inner is not model:
                model = inner
                continue
        break
    return model


def _config_int(cfg: Any, keys: Sequence[str]) -> int | None:
    if cfg is None:
        return None
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    for key in keys:
        val = getattr(cfg, key, None)
        if isinstance(val, int) and not isinstance(val, bool):
            return val
    return None


def config_shape(cfg: Any) -> tuple[int | None, int | None, int | None]:
    """(decoder blocks, hidden size, context length) as a model's config states them (None where it does not)."""
    return (_config_int(cfg, ("num_hidden_layers", "n_layer", "num_layers", "n_layers")),
            _config_int(cfg, ("hidden_size", "n_embd", "d_model")),
            _config_int(cfg, ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")))


def _n_layers_from_config(model: nn.Module) -> int | None:
    return config_shape(getattr(model, "config", None))[0]


def decoder_layers(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The ordered list of decoder blocks of a causal LM.

    ``path`` (or the environment variable ``PERSONAVEC_LAYERS_PATH``) overrides the search with an
    attribute path such as ``"model.layers"`` for architectures not known here.
    """
    path = path or os.environ.get(LAYERS_PATH_ENV)
    base = _unwrap(model)
    if path:
        try:
            layers = _get_attr_path(base, path)
        except AttributeError:
            raise PersonavecError(f"layers path {path!r} does not exist on {type(base).__name__}") from None
        if not isinstance(layers, nn.ModuleList):
            raise PersonavecError(f"layers path {path!r} is a {type(layers).__name__}, not a ModuleList")
        return layers
    for known in KNOWN_LAYER_PATHS:
        try:
            layers = _get_attr_path(base, known)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    # Fallback: the longest ModuleList whose length matches the config's layer count.
    want = _n_layers_from_config(base)
    best: nn.ModuleList | None = None
    for _, mod in base.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (want is None or len(mod) == want) and (
                best is None or len(mod) > len(best)):
            best = mod
    if best is None:
        raise PersonavecError(
            f"cannot find the decoder blocks of {type(base).__name__}; pass layers_path='...' "
            f"(or set {LAYERS_PATH_ENV}) to the attribute holding them, e.g. 'model.layers'")
    return best


def hidden_size(model: nn.Module) -> int:
    cfg = _unwrap(model).config
    d = config_shape(cfg)[1]
    if d is None:
        raise PersonavecError(f"cannot read the hidden size from {type(cfg).__name__}")
    return d


def context_length(model: nn.Module, tokenizer: Any = None) -> int | None:
    """The longest sequence the model takes: its config's position limit, else the tokenizer's (None if unknown)."""
    n = config_shape(getattr(_unwrap(model), "config", None))[2]
    if n is None and tokenizer is not None:
        m = getattr(tokenizer, "model_max_length", None)
        n = int(m) if isinstance(m, int) and 0 < m < 10**8 else None
    return n


def check_layers(layers: Sequence[int], n_layers: int) -> list[int]:
    """Validate requested layers (0..L) and return them sorted and unique."""
    out = sorted({int(x) for x in layers})
    bad = [x for x in out if x < 0 or x > n_layers]
    if bad:
        raise PersonavecError(f"layers {bad} are out of range: this model has layers 0..{n_layers}")
    return out


def _hidden_from_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden_in_output(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, tuple):
        return (hidden, *output[1:])
    return hidden


def _hidden_from_inputs(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs["hidden_states"]


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass once the last needed block has run."""


LayerFn = Callable[[int, torch.Tensor], None]


@contextlib.contextmanager
def capture(model: nn.Module, layers: Sequence[int], fn: LayerFn, stop_early: bool = True,
            layers_path: str | None = None) -> Iterator[None]:
    """Call ``fn(layer, hidden)`` with the residual stream at each requested layer during forward passes.

    ``hidden`` is ``[batch, seq, d]`` in the model's dtype; ``fn`` should reduce it right away. With
    ``stop_early`` the forward pass ends after the highest requested layer: run it through
    :func:`run_forward`, which swallows that stop.
    """
    blocks = decoder_layers(model, layers_path)
    wanted = check_layers(layers, len(blocks))
    top = max(wanted) if wanted else 0
    handles = []

    def post_hook(layer: int) -> Callable:
        def hook(_mod: nn.Module, _args: tuple, output: Any) -> None:
            fn(layer, _hidden_from_output(output))
            if stop_early and layer == top:
                raise _StopForward
        return hook

    def pre_hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        fn(0, _hidden_from_inputs(args, kwargs))
        if stop_early and top == 0:
            raise _StopForward

    try:
        for layer in wanted:
            if layer == 0:
                handles.append(blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                handles.append(blocks[layer - 1].register_forward_hook(post_hook(layer)))
        yield
    finally:
        for h in handles:
            h.remove()


def run_forward(model: nn.Module, **inputs: Any) -> Any:
    """Run a forward pass that may be cut short by :func:`capture`'s early stop. Returns None if stopped."""
    try:
        return model(**inputs)
    except _StopForward:
        return None


def backbone(model: nn.Module) -> nn.Module:
    """The decoder stack without the LM head (``model.model`` for Llama-likes), or the model itself."""
    base = _unwrap(model)
    prefix = getattr(base, "base_model_prefix", "")
    inner = getattr(base, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) else base


def last_logits_kwarg(model: nn.Module) -> str | None:
    """The forward argument that limits the LM head to the last positions (``logits_to_keep``), if there is one."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in ("logits_to_keep", "num_logits_to_keep") if name in params), None)


def cache_kwarg(model: nn.Module) -> str:
    """The keyword a model's forward takes its KV cache by (``cache`` in newer transformers)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def last_logits(model: nn.Module) -> dict[str, int]:
    """Forward keyword arguments that keep only the last position's logits (empty if the model has no such
    argument). Computed once per model by its callers: it inspects the forward's signature."""
    keep = last_logits_kwarg(model)
    return {keep: 1} if keep else {}


def output_cache(out: Any) -> Any:
    """The KV cache a forward pass returned (``cache`` in newer transformers, ``past_key_values`` before)."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else out.past_key_values


EditFn = Callable[[torch.Tensor], torch.Tensor]


class _EditChain:
    """The edits active on one block, applied in the order they were entered, by ONE hook.

    The hook is registered with ``prepend=True`` when the first edit arrives, so it runs before any other hook on
    the block (Hugging Face's ``output_hidden_states`` recorder and personavec's capture hooks both see the
    edited stream); later edits join the chain instead of prepending hooks of their own, which would make the
    last edit run first.
    """

    def __init__(self, block: nn.Module, pre: bool) -> None:
        self.fns: list[EditFn] = []
        if pre:
            self.handle = block.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True)
        else:
            self.handle = block.register_forward_hook(self._post_hook, prepend=True)

    def apply(self, hidden: torch.Tensor) -> torch.Tensor:
        for fn in list(self.fns):
            hidden = fn(hidden)
        return hidden

    def _pre_hook(self, _mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (self.apply(args[0]), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = self.apply(kwargs["hidden_states"])
        return args, kwargs

    def _post_hook(self, _mod: nn.Module, _args: tuple, output: Any) -> Any:
        return _replace_hidden_in_output(output, self.apply(_hidden_from_output(output)))


_CHAINS: dict[tuple[int, bool], _EditChain] = {}  # (id of block, pre) -> its active chain


@contextlib.contextmanager
def edit(model: nn.Module, layer: int, fn: EditFn, layers_path: str | None = None,
         first: bool = False) -> Iterator[None]:
    """Replace the residual stream at ``layer`` by ``fn(hidden)`` during forward passes.

    Layer ``ℓ ≥ 1`` edits the output of block ``ℓ − 1``; layer 0 edits the input of block 0. Several edits at one
    layer compose in the order they were entered (the first one entered acts first), and all run before any
    other hook on the block; with ``first`` this one acts before every other edit at the layer, entered before or
    after it (a reader of the residual as it arrives, before the edits). The edit is removed on exit, including
    on exceptions.
    """
    blocks = decoder_layers(model, layers_path)
    check_layers([layer], len(blocks))
    block, pre = (blocks[0], True) if layer == 0 else (blocks[layer - 1], False)
    key = (id(block), pre)
    chain = _CHAINS.get(key)
    if chain is None:
        chain = _CHAINS[key] = _EditChain(block, pre)
    if first:
        chain.fns.insert(0, fn)
    else:
        chain.fns.append(fn)
    try:
        yield
    finally:
        chain.fns.remove(fn)
        if not chain.fns:
            chain.handle.remove()
            del _CHAINS[key]
