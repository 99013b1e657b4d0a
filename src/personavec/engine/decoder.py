"""The sampling engine: a stream of requests in, answers out as each one finishes (continuous batching).

Each :class:`Request` carries its own prompt, length, sampling settings, seed and steering edits. The engine keeps
up to ``max_batch`` requests decoding together in one padded batch over a shared KV cache; a finished answer
leaves at once and waiting requests are prefilled and join the running batch, so no request waits for the longest
one of its batch. Rows are right-aligned in the cache (each row's newest token in the last column, padding on the
left, masked out) and carry their own position ids, so what a request gets does not depend on its neighbours:

* its **edits** act on its own rows only, at its own positions (``prompt`` = its prefill, ``response`` = its
  generated tokens, ``response_and_last_prompt``, ``all``), composing in list order, by the same formula as
  :func:`personavec.model.edits.steer`;
* it **samples** with its own ``torch.Generator`` seeded by ``Request.seed``, so a sampled answer is the same
  whatever else is in the batch; temperature 0 is greedy;
* the settings are exactly the request's: temperature and nucleus (top-p) sampling, nothing else (no top-k,
  penalties or minimum length inherited from the model's ``generation_config``).

Models whose cache is not a plain full-attention one (sliding windows) are served in waves: a batch is filled,
decoded to its end, then the next one starts.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..model.edits import Edit, edit_delta
from ..model.layers import cache_kwarg, edit
from ..model.loading import LoadedModel, pad_token_id


@dataclass(frozen=True)
class Request:
    """One answer to generate. ``prompt``: chat-formatted text (or token ids); ``messages``: the same chat as
    ``{role, content}`` messages (what an endpoint takes); ``key``: the caller's id."""

    prompt: str | Sequence[int]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    edits: tuple[Edit, ...] = ()
    key: Any = None
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    messages: tuple[dict[str, str], ...] | None = None


@dataclass
class Result:
    key: Any
    request: Request
    token_ids: list[int]  # empty when an endpoint answered
    text: str
    finish: str  # "stop" (an end-of-turn token) or "length" (max_new_tokens reached)
    n_generated: int | None = None  # an endpoint's count of generated tokens

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids) if self.n_generated is None else self.n_generated


@dataclass
class _Row:
    request: Request
    prompt_len: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    finished: bool = False


def stop_token_ids(lm: LoadedModel) -> list[int]:
    """Tokens that end an answer: the tokenizer's end of sequence and the model's declared end-of-turn tokens."""
    from ..model.layers import _unwrap

    declared = getattr(getattr(_unwrap(lm.model), "generation_config", None), "eos_token_id", None)
    ids = [lm.tokenizer.eos_token_id, *(declared if isinstance(declared, list) else [declared])]
    return sorted({int(t) for t in ids if t is not None})


def default_max_batch(lm: LoadedModel) -> int:
    """Rows decoded together: on CUDA as many as a quarter of the free memory holds for a 2 048-token KV cache
    each (at most 256); 32 on CPU."""
    if lm.device.type != "cuda":
        return 32
    from ..model.layers import config_shape

    free, _ = torch.cuda.mem_get_info(lm.device)
    cfg = getattr(lm.model, "config", None)
    n_layers, hidden, _ = config_shape(cfg)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(text, "num_attention_heads", 1) or 1
    kv_heads = getattr(text, "num_key_value_heads", heads) or heads
    per_token = 2 * (n_layers or 1) * (hidden or 1) * kv_heads // heads * lm.dtype.itemsize
    return int(max(1, min(256, free // 4 // max(1, per_token * 2048))))


class Engine:
    """Continuous batching with per-request edits and seeds over one loaded model (see the module docstring)."""

    def __init__(self, lm: LoadedModel, max_batch: int | None = None) -> None:
        self.lm = lm
        self.max_batch = max_batch or default_max_batch(lm)
        self.stop = set(stop_token_ids(lm))
        self.pad = pad_token_id(lm.tokenizer)
        self._rows: list[_Row] = []
        self._prefill: list[int] = []  # rows (indices into the forward's batch) that are prefilled
        self._cols = 0  # columns of the forward under way
        self._widths: list[int] = []  # per row: its prompt's width in this forward (prefill) or 1

    # ---- the stream ----
    @torch.no_grad()
    def generate(self, requests: Iterable[Request], progress: bool | str = False, total: int | None = None,
                 initial: int = 0) -> Iterator[Result]:
        """Answers to ``requests`` in the order they finish (``total`` and ``initial`` size the progress bar)."""
        waiting: deque[Request] = deque(requests)
        desc = progress if isinstance(progress, str) else "sampling"
        layers = sorted({e.layer for r in waiting for e in r.edits})
        with contextlib.ExitStack() as stack, tqdm(total=total or len(waiting), initial=initial, desc=desc,
                                                   unit="answer", disable=not progress) as bar:
            for layer in layers:
                stack.enter_context(edit(self.lm.model, layer, self._edit_fn(layer)))
            rows: list[_Row] = []
            cache: Any = None
            mask = torch.zeros(0, 0, dtype=torch.long, device=self.lm.device)
            merge = True
            while waiting or rows:
                if waiting and len(rows) < self.max_batch and (merge or not rows):
                    new = [waiting.popleft() for _ in range(min(self.max_batch - len(rows), len(waiting)))]
                    new_rows, new_cache, new_mask, logits = self._prefill_rows(new)
                    if rows:
                        cache, mask = _merge(cache, mask, new_cache, new_mask)
                    else:
                        cache, mask = new_cache, new_mask
                    merge = _mergeable(cache)
                    rows += new_rows
                    first = len(rows) - len(new_rows)
                    yield from self._advance(rows, list(range(first, len(rows))), logits, bar)
                else:
                    logits = self._decode(rows, cache, mask)
                    mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=mask.device)], 1)
                    yield from self._advance(rows, list(range(len(rows))), logits, bar)
                if any(r.finished for r in rows):
                    keep = [i for i, r in enumerate(rows) if not r.finished]
                    rows = [rows[i] for i in keep]
                    if rows:
                        idx = torch.tensor(keep, device=mask.device)
                        cache.batch_select_indices(idx)
                        mask = mask[idx]
                        cache, mask = _trim(cache, mask)
                    else:
                        cache, mask = None, mask[:0, :0]
                        merge = True

    # ---- forward passes ----
    def _prefill_rows(self, requests: list[Request]) -> tuple[list[_Row], Any, torch.Tensor, torch.Tensor]:
        tok = self.lm.tokenizer
        ids_list = [list(r.prompt) if not isinstance(r.prompt, str) else
                    tok(r.prompt, add_special_tokens=False)["input_ids"] for r in requests]
        width = max(len(x) for x in ids_list)
        dev = self.lm.device
        ids = torch.full((len(ids_list), width), self.pad, dtype=torch.long)
        attn = torch.zeros(len(ids_list), width, dtype=torch.long)
        for b, x in enumerate(ids_list):
            ids[b, width - len(x):] = torch.tensor(x, dtype=torch.long)
            attn[b, width - len(x):] = 1
        positions = (attn.cumsum(1) - 1).clamp(min=0)
        rows = [_Row(r, len(x), _generator(r, dev)) for r, x in zip(requests, ids_list)]
        self._rows, self._cols, self._widths = rows, width, [len(x) for x in ids_list]
        self._prefill = list(range(len(rows)))
        # the model makes the cache its architecture needs (sliding windows included)
        out = self.lm.model(input_ids=ids.to(dev), attention_mask=attn.to(dev), position_ids=positions.to(dev),
                            use_cache=True)
        return rows, out.past_key_values, attn.to(dev), out.logits[:, -1].float()

    def _decode(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> torch.Tensor:
        dev = self.lm.device
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=dev)
        pos = torch.tensor([[r.prompt_len + len(r.tokens) - 1] for r in rows], dtype=torch.long, device=dev)
        attn = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=dev)], 1)
        self._rows, self._cols, self._widths, self._prefill = rows, 1, [1] * len(rows), []
        out = self.lm.model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                            **{cache_kwarg(self.lm.model): cache})
        return out.logits[:, -1].float()

    # ---- sampling ----
    def _advance(self, rows: list[_Row], which: list[int], logits: torch.Tensor, bar: Any) -> Iterator[Result]:
        """Sample the next token of each row in ``which`` (``logits`` rows in the same order); yield the answers that
        finished."""
        greedy = logits.argmax(-1).tolist()
        for j, i in enumerate(which):
            row = rows[i]
            req = row.request
            token = greedy[j] if row.generator is None else _sample(logits[j], req.temperature, req.top_p,
                                                                     row.generator)
            stopped = token in self.stop and not req.ignore_eos
            if not stopped:
                row.tokens.append(token)
            if stopped or len(row.tokens) >= req.max_new_tokens:
                row.finished = True
                bar.update(1)
                text = self.lm.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
                yield Result(req.key, req, list(row.tokens), text, "stop" if stopped else "length")

    # ---- per-request edits ----
    def _edit_fn(self, layer: int):
        def fn(h: torch.Tensor) -> torch.Tensor:
            return self._edit(layer, h)
        return fn

    def _edit(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Each row's own edits at ``layer``, in list order, at its own positions in this forward pass."""
        per_row = [[e for e in r.request.edits if e.layer == layer] for r in self._rows]
        rounds = max((len(x) for x in per_row), default=0)
        if not rounds:
            return h
        t = h.shape[1]
        cols = torch.arange(t, device=h.device)
        for k in range(rounds):
            groups: dict[str, list[tuple[int, Edit]]] = {}
            for b, edits in enumerate(per_row):
                if len(edits) > k:
                    groups.setdefault(edits[k].kind, []).append((b, edits[k]))
            for kind, items in groups.items():
                idx = torch.tensor([b for b, _ in items], device=h.device)
                dirs = torch.stack([e.direction.to(device=h.device, dtype=torch.float32) for _, e in items])
                coefs = torch.tensor([float(e.coef) for _, e in items], device=h.device)
                m = torch.stack([self._positions(b, e.positions, cols, t) for b, e in items]).to(h.dtype)
                sub = h[idx]
                h = h.index_copy(0, idx, sub + edit_delta(sub, kind, dirs, coefs) * m[:, :, None])
        return h

    def _positions(self, b: int, positions: str, cols: torch.Tensor, t: int) -> torch.Tensor:
        """``[t]`` mask of the columns of row ``b`` that ``positions`` covers in this forward pass."""
        if b not in self._prefill:  # a decode step: the one column is a generated token
            return torch.full((t,), positions != "prompt", dtype=torch.bool, device=cols.device)
        valid = cols >= t - self._widths[b]
        if positions in ("all", "prompt"):
            return valid
        if positions == "response":
            return torch.zeros_like(valid)
        return cols == t - 1  # response_and_last_prompt: the last prompt token


def _generator(req: Request, device: torch.device) -> torch.Generator | None:
    if req.temperature <= 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(int(req.seed))
    return g


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []))


def _mergeable(cache: Any) -> bool:
    """Whether requests may join a running batch: every cache layer is a plain growing one (no sliding window)."""
    from transformers.cache_utils import DynamicLayer

    layers = _layers(cache)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _merge(cache: Any, mask: torch.Tensor, new: Any, new_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Stack a freshly prefilled batch under the running one, left-padding the narrower to the same width."""
    width = max(mask.shape[1], new_mask.shape[1])
    for old_layer, new_layer in zip(_layers(cache), _layers(new)):
        old_layer.keys = torch.cat([_pad_left(old_layer.keys, width), _pad_left(new_layer.keys, width)], 0)
        old_layer.values = torch.cat([_pad_left(old_layer.values, width), _pad_left(new_layer.values, width)], 0)
    mask = torch.cat([_pad_left(mask, width, dim=1), _pad_left(new_mask, width, dim=1)], 0)
    return cache, mask


def _pad_left(x: torch.Tensor, width: int, dim: int = -2) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim)


def _trim(cache: Any, mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Drop the leading columns that are padding in every row (left by answers that finished)."""
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    if start > 0:
        for layer in _layers(cache):
            layer.keys = layer.keys[:, :, start:]
            layer.values = layer.values[:, :, start:]
        mask = mask[:, start:]
    return cache, mask
