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
  whatever else is in the batch; a temperature below ``GREEDY_BELOW`` (1e-5) is greedy;
* the settings are exactly the request's: temperature and nucleus (top-p) sampling, nothing else (no top-k,
  penalties or minimum length inherited from the model's ``generation_config``);
* its **reads** (:class:`Read`) are taken at the position that produced each generated token, before its edits at
  the read layer (default: what the model itself carries) or after them.

Memory stays bounded however long the prompts: a prefill takes waiting requests in order while the padded size
of the group (rows × longest prompt) fits ``prefill_tokens``, and a prompt longer than that is prefilled alone in
chunks of ``prefill_tokens`` tokens (the same answer, edits and reads as in one pass); a request joins the running
batch only while every row's prompt plus answer fits ``cache_tokens`` (rows × longest, the KV cache's size).

Models whose cache is not a plain full-attention one (sliding windows) are served in waves: a batch is filled,
decoded to its end, then the next one starts.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import DynamicLayer

from ..errors import PersonavecError, shown
from ..model.activations import Encoded, make_batch
from ..model.edits import Edit, check_edits, edit_delta
from ..model.layers import cache_kwarg, edit, last_logits, output_cache
from ..model.loading import LoadedModel, pad_token_id, stop_token_ids

# temperatures below this are greedy: dividing logits by them overflows float32 (and nothing could be sampled
# but the most likely token anyway)
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Guard:
    """The live monitor of one request: when its statistic of ``reads[read]`` exceeds ``threshold``, either stop the
    answer there (``action="stop"``, finish ``"persona_guard"``) or switch on ``edit`` for the rest of it
    (``action="steer"``, e.g. a suppressive one at the vector's layer).

    ``over="token"``: the reading of each generated token; ``over="answer"``: the mean of the answer's readings so
    far, checked from its ``from_token``-th token on (one token's reading is noisy: a single word can spike it)."""

    read: int
    threshold: float
    action: str = "stop"
    edit: Edit | None = None
    over: str = "token"
    from_token: int = 1


WHERE = ("before", "after")


class Read(NamedTuple):
    """One reading of a request: the projection on ``direction``'s unit vector of the residual at ``layer``.

    ``where="before"``: the residual at ``layer`` as it arrives, before this request's edits AT ``layer`` act
    (its edits at earlier layers have acted, and so have its edits at any layer on earlier tokens, through
    attention) — what the model itself carries there. ``"after"``: after all of its edits at ``layer``, what
    block ``layer`` receives. Steering at the read layer moves an after-edit reading by coef·‖v̂·v‖ at once and a
    before-edit one only through the tokens it makes the model write."""

    layer: int
    direction: torch.Tensor
    where: str = "before"


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
    # :class:`Read` s (or plain ``(layer, direction[, where])`` tuples): the projection of the residual at ``layer``
    # on the unit direction, read at the position that produced each generated token (the last prompt token for the
    # first), before (default) or after this request's edits at that layer
    reads: tuple[tuple[Any, ...], ...] = ()
    guard: Guard | None = None


@dataclass
class Result:
    key: Any
    request: Request
    token_ids: list[int]  # empty when an endpoint answered
    text: str
    finish: str  # "stop" (end-of-turn token), "length" (max_new_tokens), "persona_guard" or "cancelled"
    n_generated: int | None = None  # an endpoint's count of generated tokens
    readings: list[list[float]] = field(default_factory=list)  # per read of the request: one value per token
    guard_triggered: bool = False

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids) if self.n_generated is None else self.n_generated


class Feed:
    """A live source of requests for :meth:`Engine.generate`: ``put`` from any thread while the engine runs;
    ``close`` when no more will come. Each request is checked as it is put (a bad one raises there)."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()
        self._closed = False
        self._live: set = set()  # keys put and not yet answered: only these can be cancelled
        self._cancel: set = set()
        self._ready = threading.Condition()

    def put(self, request: Request) -> None:
        check_request(request)
        with self._ready:
            if self._closed:
                raise PersonavecError("this feed is closed: no more requests can join it")
            self._queue.append(request)
            with contextlib.suppress(TypeError):  # an unhashable key cannot be cancelled
                self._live.add(request.key)
            self._ready.notify()

    def cancel(self, key: Any) -> None:
        """The caller of request ``key`` went away: the engine drops it (waiting or running) at its next step, with
        finish ``"cancelled"``, and its slot frees. A key already answered (or never put) is ignored."""
        with self._ready, contextlib.suppress(TypeError):
            if key in self._live:
                self._cancel.add(key)
                self._ready.notify()

    def cancelled(self) -> set:
        with self._ready:
            return set(self._cancel)

    def answered(self, key: Any) -> None:
        """The engine has answered request ``key`` (however it finished): nothing of it is kept."""
        with self._ready, contextlib.suppress(TypeError):
            self._live.discard(key)
            self._cancel.discard(key)

    def give_back(self, requests: Iterable[Request]) -> None:
        """Requests an engine took and did not start (it failed): first in line again, in their order."""
        with self._ready:
            self._queue.extendleft(reversed(list(requests)))
            self._ready.notify()

    def drop_started(self) -> set:
        """After a failed engine run: forget the requests it had started (every one not in line again); returns the
        keys of those still waiting."""
        with self._ready:
            keep = set()
            for r in self._queue:
                with contextlib.suppress(TypeError):
                    keep.add(r.key)
            self._live &= keep
            self._cancel &= keep
            return keep

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()

    @property
    def closed(self) -> bool:
        with self._ready:
            return self._closed

    def take(self, block: bool) -> list[Request]:
        """Everything that has arrived; with ``block``, wait until something arrives or the feed is closed."""
        with self._ready:
            while block and not self._queue and not self._closed:
                self._ready.wait()
            out = list(self._queue)
            self._queue.clear()
            return out


@dataclass
class _Row:
    request: Request
    prompt_len: int
    generator: torch.Generator | None
    edits: dict[int, list[tuple[str, torch.Tensor, float, str]]]  # layer -> (kind, direction, coef, positions)
    reads: dict[int, list[tuple[int, torch.Tensor, str]]]  # layer -> (index of the read, unit direction, where)
    tokens: list[int] = field(default_factory=list)
    readings: list[list[float]] = field(default_factory=list)
    guard_triggered: bool = False
    finished: bool = False


def default_max_batch(lm: LoadedModel) -> int:
    """Rows decoded together: on CUDA as many as a quarter of the free memory holds for a 2 048-token KV cache
    each (at most 256); 64 on CPU."""
    if lm.device.type != "cuda":
        return 64
    free, per_token = _cuda_kv_room(lm)
    return int(max(1, min(256, free // 4 // max(1, per_token * 2048))))


def default_budgets(lm: LoadedModel) -> tuple[int, int]:
    """(prefill_tokens, cache_tokens): on CPU 8 192 padded prompt tokens per prefill and 32 768 cache tokens; on
    CUDA 32 768, and as many cache tokens as a quarter of the free memory holds."""
    if lm.device.type != "cuda":
        return 8192, 32768
    free, per_token = _cuda_kv_room(lm)
    return 32768, int(max(4096, free // 4 // max(1, per_token)))


def _cuda_kv_room(lm: LoadedModel) -> tuple[int, int]:
    """(free bytes on the model's CUDA device, KV-cache bytes per token: keys and values of every layer)."""
    from ..model.layers import config_shape

    free, _ = torch.cuda.mem_get_info(lm.device)
    cfg = getattr(lm.model, "config", None)
    n_layers, hidden, _ = config_shape(cfg)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    heads = getattr(text, "num_attention_heads", 1) or 1
    kv_heads = getattr(text, "num_key_value_heads", heads) or heads
    return free, 2 * (n_layers or 1) * (hidden or 1) * kv_heads // heads * lm.dtype.itemsize


class Engine:
    """Continuous batching with per-request edits and seeds over one loaded model (see the module docstring)."""

    def __init__(self, lm: LoadedModel, max_batch: int | None = None, prefill_tokens: int | None = None,
                 cache_tokens: int | None = None) -> None:
        if max_batch is not None and (not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1):
            raise PersonavecError(f"the engine's max_batch must be a whole number of rows >= 1, not {shown(max_batch)}")
        for name, value in (("prefill_tokens", prefill_tokens), ("cache_tokens", cache_tokens)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise PersonavecError(f"the engine's {name} must be a whole number of tokens >= 1, not {shown(value)}")
        self.lm = lm
        self.max_batch = max_batch or default_max_batch(lm)
        default_prefill, default_cache = default_budgets(lm) if None in (prefill_tokens, cache_tokens) else (0, 0)
        self.prefill_tokens = prefill_tokens or default_prefill
        self.cache_tokens = cache_tokens or default_cache
        self._ids: dict[int, tuple[Request, list[int]]] = {}  # id(request) -> (it, its prompt's token ids)
        self._final_chunk = True  # a chunked prefill's last pass (its last column is the last prompt token)
        self.stop = set(stop_token_ids(lm))
        self.pad = pad_token_id(lm.tokenizer)
        # the model's forward keywords, looked up once (not at every decode step)
        self._last_logits = last_logits(lm.model)
        self._cache_kw = cache_kwarg(lm.model)
        # what the edit hooks need to know about the forward pass under way
        self._rows: list[_Row] = []
        self._prefill = False
        self._widths: list[int] = []
        self._on_token: Callable[[Request, int, list[float]], None] | None = None
        self._pending: list[tuple[list[tuple[int, int]], torch.Tensor]] = []  # reads of the pass under way
        self._cancelled: set = set()  # keys of requests whose caller went away (a live feed's cancel)
        self._feed: Feed | None = None

    # ---- the stream ----
    @torch.no_grad()
    def generate(self, requests: Iterable[Request] | Feed, progress: bool | str = False, total: int | None = None,
                 initial: int = 0, on_token: Callable[[Request, int, list[float]], None] | None = None
                 ) -> Iterator[Result]:
        """Answers to ``requests`` in the order they finish (``total`` and ``initial`` size the progress bar).

        ``requests`` is a list (or any iterable, read at once) or a live :class:`Feed` that other threads fill
        while answers are being generated: what arrives joins the running batch as slots free, and the stream
        ends when the feed is closed and every request is answered. ``on_token(request, token_id, readings)`` is
        told every generated token as it is sampled (an end-of-turn token is not one), with the request's
        ``reads`` at the position that produced it, for streaming.
        """
        feed = requests if isinstance(requests, Feed) else None
        waiting: deque[Request] = deque() if feed is not None else deque(requests)  # type: ignore[arg-type]
        for r in waiting:
            check_request(r)
            guard_edit = [r.guard.edit] if r.guard is not None and r.guard.edit is not None else []
            check_edits([*r.edits, *guard_edit], self.lm.n_layers, self.lm.hidden_size)  # steer()'s own check
            _check_reads(r, self.lm.n_layers, self.lm.hidden_size)
        self._on_token, self._pending, self._cancelled, self._feed = on_token, [], set(), feed
        desc = progress if isinstance(progress, str) else "sampling"
        # new requests join once this many slots are free (or the queue is nearly empty): fewer, fuller prefills
        join_at = max(1, self.max_batch // 4)
        with contextlib.ExitStack() as stack, tqdm(total=total or (None if feed else len(waiting)), initial=initial,
                                                   desc=desc, unit="answer", disable=not progress) as bar:
            hooked: set[int] = set()

            def hook_layers(reqs: Iterable[Request]) -> None:
                """One edit hook per layer any request edits, added as requests with new layers arrive."""
                wanted = {e.layer for r in reqs for e in r.edits} | {int(Read(*x).layer) for r in reqs for x in r.reads}
                wanted |= {r.guard.edit.layer for r in reqs if r.guard is not None and r.guard.edit is not None}
                for layer in sorted(wanted - hooked):
                    stack.enter_context(edit(self.lm.model, layer, self._edit_fn(layer)))
                    hooked.add(layer)

            hook_layers(waiting)
            rows: list[_Row] = []
            cache: Any = None
            mask = torch.zeros(0, 0, dtype=torch.long, device=self.lm.device)
            mergeable = True
            try:
                while True:
                    if feed is not None:
                        arrived = feed.take(block=not rows and not waiting)
                        hook_layers(arrived)
                        waiting.extend(arrived)
                        self._cancelled = feed.cancelled()
                        if self._cancelled:  # a waiting request that was cancelled never starts
                            for r in [r for r in waiting if key_cancelled(r.key, self._cancelled)]:
                                waiting.remove(r)
                                self._ids.pop(id(r), None)  # its tokenized prompt, if the budget check read it
                                feed.answered(r.key)
                                yield Result(r.key, r, [], "", "cancelled")
                    if not (waiting or rows):
                        if feed is None or feed.closed:
                            break
                        continue  # an open feed: wait for what comes next
                    free = self.max_batch - len(rows)
                    new = self._group(waiting, rows, free) if waiting and (not rows or (
                        mergeable and free >= min(join_at, len(waiting)))) else []
                    if new:
                        new_rows, new_cache, new_mask, logits = self._prefill_rows(new)
                        if rows:
                            cache, mask = _merge(cache, mask, new_cache, new_mask)
                            del new_cache  # its rows now live in the merged cache
                        else:
                            cache, mask = new_cache, new_mask
                            mergeable = _mergeable(cache)
                        rows += new_rows
                        yield from self._advance(new_rows, logits, bar)
                    else:
                        logits, mask = self._decode(rows, cache, mask)
                        yield from self._advance(rows, logits, bar)
                    if any(r.finished for r in rows):
                        keep = [i for i, r in enumerate(rows) if not r.finished]
                        rows = [rows[i] for i in keep]
                        if not rows:
                            cache, mask = None, mask[:0, :0]
                            continue
                        idx = torch.tensor(keep, device=mask.device)
                        cache.batch_select_indices(idx)
                        mask = mask[idx]
                        if mergeable:
                            cache, mask = _trim(cache, mask)
            except Exception:
                if feed is not None:  # a failed step: what was taken and not started goes back in line
                    feed.give_back(waiting)
                raise

    # ---- forward passes ----
    def _prompt_ids(self, r: Request) -> list[int]:
        """The prompt's token ids, tokenized once (kept with the request itself, so a reused id() never matches)."""
        held = self._ids.get(id(r))
        if held is None or held[0] is not r:
            ids = list(r.prompt) if not isinstance(r.prompt, str) else \
                self.lm.tokenizer(r.prompt, add_special_tokens=False)["input_ids"]
            held = self._ids[id(r)] = (r, ids)
        return held[1]

    def _group(self, waiting: deque[Request], rows: list[_Row], free: int) -> list[Request]:
        """The waiting requests (in order) to prefill next: while the group's padded prompt fits ``prefill_tokens``
        and, with the running rows, every prompt plus answer fits ``cache_tokens``; at least one when nothing runs
        (a prompt longer than the prefill budget then goes alone, in chunks)."""
        group: list[Request] = []
        longest = 0
        widest = max((r.prompt_len + r.request.max_new_tokens for r in rows), default=0)
        while waiting and len(group) < free:
            r = waiting[0]
            n = len(self._prompt_ids(r))
            grown, wide = max(longest, n), max(widest, n + r.max_new_tokens)
            fits = (len(group) + 1) * grown <= self.prefill_tokens and \
                (len(rows) + len(group) + 1) * wide <= self.cache_tokens
            if not fits and (group or rows):
                break
            group.append(waiting.popleft())
            longest, widest = grown, wide
            if not fits:  # alone, over a budget: nothing joins it
                break
        return group

    def _prefill_rows(self, requests: list[Request]) -> tuple[list[_Row], Any, torch.Tensor, torch.Tensor]:
        ids_list = [self._prompt_ids(r) for r in requests]
        for r in requests:
            self._ids.pop(id(r), None)
        dev = self.lm.device
        rows = [_Row(r, len(x), _generator(r), _row_edits(r, dev), _row_reads(r, dev), readings=[[] for _ in r.reads])
                for r, x in zip(requests, ids_list)]
        if len(requests) == 1 and len(ids_list[0]) > self.prefill_tokens:
            return self._prefill_chunked(rows, ids_list[0])
        batch = make_batch([Encoded(tuple(x), len(x)) for x in ids_list], self.pad, "left", dev)
        self._rows, self._prefill, self._widths = rows, True, [len(x) for x in ids_list]
        # the model makes the cache its architecture needs (sliding windows included)
        out = self.lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, use_cache=True, **self._last_logits)
        return rows, _roomy(output_cache(out)), batch.attention_mask, out.logits[:, -1].float()

    def _prefill_chunked(self, rows: list[_Row], ids: list[int]) -> tuple[list[_Row], Any, torch.Tensor,
                                                                           torch.Tensor]:
        """One prompt longer than the prefill budget, in chunks over a growing cache: every chunk is prompt (edits
        with positions ``all``/``prompt`` act on all of it), the last chunk's last column is the last prompt token
        (``response_and_last_prompt``, and the reads of the first answer token, are taken there only)."""
        dev, n, size = self.lm.device, len(ids), self.prefill_tokens
        cache, out = None, None
        try:
            for start in range(0, n, size):
                end = min(n, start + size)
                self._rows, self._prefill, self._widths = rows, True, [end - start]
                self._final_chunk = end == n
                kw = {self._cache_kw: cache} if cache is not None else {}
                out = self.lm.model(input_ids=torch.tensor([ids[start:end]], device=dev),
                                    attention_mask=torch.ones(1, end, dtype=torch.long, device=dev),
                                    position_ids=torch.arange(start, end, device=dev)[None], use_cache=True,
                                    **kw, **self._last_logits)
                cache = output_cache(out)
                if not self._final_chunk:
                    self._pending = []  # reads are of the last prompt token only
        finally:
            self._final_chunk = True
        mask = torch.ones(1, n, dtype=torch.long, device=dev)
        return rows, _roomy(cache), mask, out.logits[:, -1].float()

    def _decode(self, rows: list[_Row], cache: Any, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token for every row; returns its logits and the attention mask grown by one column."""
        dev = self.lm.device
        ids = torch.tensor([[r.tokens[-1]] for r in rows], dtype=torch.long, device=dev)
        pos = torch.tensor([[r.prompt_len + len(r.tokens) - 1] for r in rows], dtype=torch.long, device=dev)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=mask.dtype, device=dev)], 1)
        self._rows, self._prefill, self._widths = rows, False, [1] * len(rows)
        out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                            **{self._cache_kw: cache}, **self._last_logits)
        return out.logits[:, -1].float(), mask

    # ---- sampling ----
    def _advance(self, rows: list[_Row], logits: torch.Tensor, bar: Any) -> Iterator[Result]:
        """Sample the next token of each row (``logits`` in the same order); yield the answers that finished."""
        per_row: dict[int, dict[int, float]] = {}
        for where, values in self._pending:
            for (b, k), x in zip(where, values.tolist()):
                per_row.setdefault(b, {})[k] = x
        self._pending = []
        for b, (row, token) in enumerate(zip(rows, _next_tokens(rows, logits))):
            req = row.request
            stopped = token in self.stop and not req.ignore_eos
            if not stopped:
                row.tokens.append(token)
                read = [per_row.get(b, {}).get(k, math.nan) for k in range(len(req.reads))]
                for k, x in enumerate(read):
                    row.readings[k].append(x)
                if self._on_token is not None:
                    self._on_token(req, token, read)
            finish = "stop" if stopped else "length" if len(row.tokens) >= req.max_new_tokens else None
            guard = req.guard
            if not stopped and guard is not None and not row.guard_triggered and _crossed(guard, row.readings):
                row.guard_triggered = True
                if guard.action == "stop":
                    finish = "persona_guard"
                elif guard.edit is not None:  # from the next token on
                    row.edits.setdefault(guard.edit.layer, []).append(_edit_entry(guard.edit, logits.device))
            if key_cancelled(req.key, self._cancelled):
                finish = "cancelled"
            if finish is not None:
                row.finished = True
                if self._feed is not None:
                    self._feed.answered(req.key)
                bar.update(1)
                text = self.lm.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
                yield Result(req.key, req, list(row.tokens), text, finish,
                             readings=[list(x) for x in row.readings], guard_triggered=row.guard_triggered)

    # ---- per-request edits ----
    def _edit_fn(self, layer: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(h: torch.Tensor) -> torch.Tensor:
            return self._edit(layer, h)
        return fn

    def _edit(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """Each row's own edits at ``layer``, in list order, at its own positions in this forward pass; its
        before-edit reads are taken first, its after-edit ones last."""
        self._read(layer, h, "before")
        per_row = [r.edits.get(layer, []) for r in self._rows]
        rounds = max((len(x) for x in per_row), default=0)
        t = h.shape[1]
        cols = torch.arange(t, device=h.device)
        for k in range(rounds):
            groups: dict[str, list[tuple[int, torch.Tensor, float, str]]] = {}
            for b, edits in enumerate(per_row):
                if len(edits) > k:
                    kind, direction, coef, positions = edits[k]
                    groups.setdefault(kind, []).append((b, direction, coef, positions))
            for kind, items in groups.items():
                idx = torch.tensor([b for b, *_ in items], device=h.device)
                dirs = torch.stack([d for _, d, _, _ in items])
                coefs = torch.tensor([c for _, _, c, _ in items], device=h.device)
                m = torch.stack([self._positions(b, p, cols, t) for b, _, _, p in items]).to(h.dtype)
                sub = h[idx]
                h = h.index_copy(0, idx, sub + edit_delta(sub, kind, dirs, coefs) * m[:, :, None])
        self._read(layer, h, "after")
        return h

    def _read(self, layer: int, h: torch.Tensor, where: str) -> None:
        """The reads taken ``where`` at ``layer``: the newest position of each reading row (moved off the device
        once per step, in :meth:`_advance`)."""
        reads = [(b, k, v) for b, r in enumerate(self._rows) for k, v, w in r.reads.get(layer, []) if w == where]
        if reads:
            idx = torch.tensor([b for b, _, _ in reads], device=h.device)
            values = (h[idx, -1].float() * torch.stack([v for _, _, v in reads])).sum(-1)
            self._pending.append(([(b, k) for b, k, _ in reads], values))

    def _positions(self, b: int, positions: str, cols: torch.Tensor, t: int) -> torch.Tensor:
        """``[t]`` mask of the columns of row ``b`` that ``positions`` covers in this forward pass."""
        if not self._prefill:  # a decode step: the one column is a generated token
            return torch.full((t,), positions != "prompt", dtype=torch.bool, device=cols.device)
        if positions in ("all", "prompt"):
            return cols >= t - self._widths[b]
        if positions == "response" or not self._final_chunk:  # a chunk before the last holds no last prompt token
            return torch.zeros(t, dtype=torch.bool, device=cols.device)
        return cols == t - 1  # response_and_last_prompt: the last prompt token


def _crossed(guard: Guard, readings: list[list[float]]) -> bool:
    """Whether the guard's statistic of the answer so far (its newest token included) exceeds its threshold."""
    values = readings[guard.read]
    if guard.over == "token":
        return values[-1] > guard.threshold
    return len(values) >= guard.from_token and math.fsum(values) / len(values) > guard.threshold


def guard_crossing(guard: Guard, values: list[float]) -> int | None:
    """How many of ``values`` (the guarded read's readings, in order) the answer had when ``guard`` first triggered
    on them by the engine's rule (:func:`_crossed`), or None when it did not."""
    total = 0.0
    for t, x in enumerate(values, 1):
        total += x
        if (x if guard.over == "token" else total / t if t >= guard.from_token else -math.inf) > guard.threshold:
            return t
    return None


def key_cancelled(key: Any, cancelled: set) -> bool:
    try:
        return key in cancelled
    except TypeError:  # an unhashable key cannot have been cancelled
        return False


def check_request(r: Request) -> None:
    """Refuse settings that cannot be sampled, with the field named."""
    if r.max_new_tokens < 1:
        raise PersonavecError(f"max_new_tokens must be at least 1, not {r.max_new_tokens}")
    if not math.isfinite(r.temperature) or r.temperature < 0:
        raise PersonavecError(f"temperature must be a finite number >= 0, not {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise PersonavecError(f"top_p must be in (0, 1], not {r.top_p}")
    if not 0 <= int(r.seed) < 2**63:
        raise PersonavecError(f"seed must be between 0 and 2**63 - 1, not {r.seed}")
    for i, x in enumerate(r.reads):
        try:
            layer, direction, where = Read(*x)
        except TypeError:
            raise PersonavecError(f"reads[{i}] must be (layer, direction) or (layer, direction, where)") from None
        if int(layer) < 0 or direction.dim() != 1 or not bool(torch.isfinite(direction).all()) \
                or float(direction.norm()) == 0:
            raise PersonavecError(f"a read needs a layer >= 0 and a finite, non-zero 1-D direction (layer {layer})")
        if where not in WHERE:
            raise PersonavecError(f"reads[{i}].where must be 'before' or 'after' (this request's edits at the "
                                  f"layer), not {where}")
    if r.guard is not None:
        g = r.guard
        if not 0 <= g.read < len(r.reads) or not math.isfinite(g.threshold) or g.action not in ("stop", "steer") \
                or (g.action == "steer") != (g.edit is not None) or g.over not in ("token", "answer") \
                or int(g.from_token) < 1:
            raise PersonavecError("a guard needs one of the request's reads, a finite threshold, action 'stop' or "
                                  "'steer' with an edit, over 'token' or 'answer', and from_token >= 1")


def _check_reads(r: Request, n_layers: int, hidden_size: int) -> None:
    """Refuse a read (checked by :func:`check_request`) that does not fit a model of ``n_layers`` blocks and
    ``hidden_size`` dims, before any forward pass."""
    for i, x in enumerate(r.reads):
        layer, direction, _ = Read(*x)
        if int(layer) > n_layers:
            raise PersonavecError(f"reads[{i}] is at layer {layer}, out of range: this model has layers 0..{n_layers}")
        if direction.numel() != hidden_size:
            raise PersonavecError(f"reads[{i}] has {direction.numel()} dims but the model's hidden size is "
                                  f"{hidden_size}; read along a vector extracted from this model")


def _row_edits(r: Request, device: torch.device) -> dict[int, list[tuple[str, torch.Tensor, float, str]]]:
    """A request's edits by layer, in list order, with each direction moved to the device once."""
    out: dict[int, list[tuple[str, torch.Tensor, float, str]]] = {}
    for e in r.edits:
        out.setdefault(e.layer, []).append(_edit_entry(e, device))
    return out


def _edit_entry(e: Edit, device: torch.device) -> tuple[str, torch.Tensor, float, str]:
    """What the edit hook applies for ``e``: (kind, direction on the device in float32, coef, positions)."""
    return e.kind, e.direction.to(device=device, dtype=torch.float32), float(e.coef), e.positions


def _row_reads(r: Request, device: torch.device) -> dict[int, list[tuple[int, torch.Tensor, str]]]:
    out: dict[int, list[tuple[int, torch.Tensor, str]]] = {}
    for k, x in enumerate(r.reads):
        layer, direction, where = Read(*x)
        v = direction.to(device=device, dtype=torch.float32)
        out.setdefault(int(layer), []).append((k, v / v.norm().clamp(min=1e-12), where))
    return out


def _generator(req: Request) -> torch.Generator | None:
    """A request's own random stream (on the CPU: one uniform number per token, whatever the device); None for a
    greedy one."""
    if req.temperature < GREEDY_BELOW:
        return None
    g = torch.Generator()
    g.manual_seed(int(req.seed))
    return g


def _next_tokens(rows: list[_Row], logits: torch.Tensor) -> list[int]:
    """Greedy for rows at temperature 0; otherwise inverse-CDF sampling (temperature, then top-p) with one uniform
    number from the row's own generator. One transfer from the device for the whole batch."""
    sampled = [i for i, r in enumerate(rows) if r.generator is not None]
    tokens = logits.argmax(-1)
    if sampled:
        idx = torch.tensor(sampled, device=logits.device)
        temps = torch.tensor([rows[i].request.temperature for i in sampled], device=logits.device)
        probs = torch.softmax(logits[idx] / temps[:, None], dim=-1)
        # a top-p too small for float32 would become 0 and drop even the most likely token
        top_p = torch.tensor([rows[i].request.top_p for i in sampled], device=logits.device)
        top_p = top_p.clamp(min=torch.finfo(top_p.dtype).tiny)
        if bool((top_p < 1).any()):
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p >= top_p[:, None]  # outside the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        # u in (0, 1]: u = 0 would pick token 0 even where its probability is 0
        u = 1.0 - torch.stack([torch.rand((), generator=rows[i].generator) for i in sampled]).to(logits.device)
        cdf = probs.cumsum(-1)
        picks = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp(max=probs.shape[-1] - 1)
        tokens = tokens.index_copy(0, idx, picks)
    return tokens.tolist()


def _layers(cache: Any) -> list[Any]:
    return list(getattr(cache, "layers", []))


def _mergeable(cache: Any) -> bool:
    """Whether requests may join a running batch: every cache layer is a plain growing one (no sliding window)."""
    layers = _layers(cache)
    return bool(layers) and all(type(layer) in (DynamicLayer, _RoomyLayer) for layer in layers)


class _RoomyLayer(DynamicLayer):
    """A full-attention KV cache layer that appends into spare room at the end of a larger buffer.

    A plain :class:`DynamicLayer` concatenates (copies) its whole cache at every decode step, a third of the decode
    time on CPU; here a step writes one column. ``keys``/``values`` stay views of the buffer (what attention reads);
    when the engine replaces them (rows leaving, padding trimmed, a batch joining) the next append adopts the new
    tensors into a fresh buffer.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized or self.keys.dim() != key_states.dim():
            return super().update(key_states, value_states, *args, **kwargs)
        n, new = self.keys.shape[-2], key_states.shape[-2]
        buf = getattr(self, "_buffer", None)
        if buf is None or not (_heads(self.keys, buf[0]) and _heads(self.values, buf[1])) or n + new > buf[0].shape[-2]:
            room = n + new + max(64, n // 2)
            buf = tuple(_with_room(x, room) for x in (self.keys, self.values))
            self._buffer = buf
        buf[0][..., n:n + new, :] = key_states
        buf[1][..., n:n + new, :] = value_states
        self.keys, self.values = buf[0][..., : n + new, :], buf[1][..., : n + new, :]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        _drop_room(self)


def _drop_room(layer: Any) -> None:
    """Free a layer's buffer once its tensors were replaced (rows left, padding trimmed, a batch joined): the next
    append builds a new one, and the old must not stay alive beside the new tensors until then."""
    if isinstance(layer, _RoomyLayer):
        layer._buffer = None


def _heads(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether ``view`` is the leading columns of ``buffer`` (not replaced since the last append)."""
    return (view.data_ptr() == buffer.data_ptr() and view.shape[:-2] == buffer.shape[:-2]
            and view.stride() == buffer.stride())


def _with_room(x: torch.Tensor, length: int) -> torch.Tensor:
    out = x.new_empty(*x.shape[:-2], length, x.shape[-1])
    out[..., : x.shape[-2], :] = x
    return out


def _roomy(cache: Any) -> Any:
    """The cache with every plain growing layer turned into a :class:`_RoomyLayer` (same tensors, no copy)."""
    layers = getattr(cache, "layers", None)
    for i, layer in enumerate(layers or []):
        if type(layer) is DynamicLayer:
            roomy = _RoomyLayer.__new__(_RoomyLayer)
            roomy.__dict__.update(layer.__dict__)
            layers[i] = roomy
    return cache


def _merge(cache: Any, mask: torch.Tensor, new: Any, new_mask: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """Stack a freshly prefilled batch under the running one, left-padding the narrower to the same width."""
    width = max(mask.shape[1], new_mask.shape[1])
    for old_layer, new_layer in zip(_layers(cache), _layers(new)):
        old_layer.keys = torch.cat([_pad_left(old_layer.keys, width), _pad_left(new_layer.keys, width)], 0)
        old_layer.values = torch.cat([_pad_left(old_layer.values, width), _pad_left(new_layer.values, width)], 0)
        _drop_room(old_layer)
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
            _drop_room(layer)
        mask = mask[:, start:]
    return cache, mask
