"""Pooled residual activations of (prompt, response) pairs, exactly and in streaming fashion.

Each pair is tokenized once as ``prompt + response``; the prompt/response boundary comes from the
tokenizer's character offsets (a token that straddles the boundary counts as response). Pairs are
batched by length with padding masks and explicit position ids, so batched results equal one-at-a-time
results for left and right padding. Per layer, three poolings are reduced inside the capture hook:

* ``response_avg`` — mean over response tokens (the paper's choice),
* ``prompt_avg``   — mean over prompt tokens,
* ``prompt_last``  — the last prompt token (what a monitor sees before the model speaks).

Means over samples are running sums: memory does not grow with the number of samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import PersonavecError
from ..model.layers import backbone, capture, check_layers, decoder_layers, run_forward
from ..model.loading import LoadedModel, pad_token_id

log = logging.getLogger(__name__)
POOLINGS: tuple[str, ...] = ("response_avg", "prompt_avg", "prompt_last")
#: statistics that are not directions: ``response_norm`` = mean L2 norm of the residual over answer tokens ([B, 1])
STATS: tuple[str, ...] = ("response_norm",)


@dataclass(frozen=True)
class Encoded:
    """Token ids of ``prompt + response``; tokens ``[0, n_prompt)`` are the prompt, the rest the response."""

    ids: tuple[int, ...]
    n_prompt: int

    @property
    def n_response(self) -> int:
        return len(self.ids) - self.n_prompt


def encode_for(lm: LoadedModel, prompts: Sequence[str], responses: Sequence[str],
               max_length: int | None = None) -> list[Encoded]:
    """:func:`encode_pairs` for ``lm``, capped at ``max_length`` tokens (default: the model's context length), so
    no text, however long, is fed to the model beyond what it takes."""
    return encode_pairs(lm.tokenizer, prompts, responses,
                        max_length=max_length if max_length is not None else lm.context_length)


def encode_pairs(tokenizer: Any, prompts: Sequence[str], responses: Sequence[str],
                 max_length: int | None = None) -> list[Encoded]:
    """Tokenize each ``prompt + response`` once and locate the boundary exactly.

    Special tokens are not added: prompts are expected to be chat-templated already (the template
    carries BOS and role markers). ``max_length`` truncates the response end of long pairs (the number of rows
    cut is logged as a warning).
    """
    if len(prompts) != len(responses):
        raise PersonavecError(f"{len(prompts)} prompts but {len(responses)} responses")
    texts = [p + r for p, r in zip(prompts, responses)]
    out: list[Encoded] = []
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for i, (ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            boundary = len(prompts[i])
            n_prompt = len(ids)
            for j, (_start, end) in enumerate(offsets):
                if end > boundary:
                    n_prompt = j
                    break
            out.append(Encoded(tuple(ids), n_prompt))
    else:  # slow tokenizers: the prompt's own ids must be a prefix of the pair's ids
        for p, t in zip(prompts, texts):
            ids = tokenizer(t, add_special_tokens=False)["input_ids"]
            pids = tokenizer(p, add_special_tokens=False)["input_ids"]
            if list(ids[: len(pids)]) != list(pids):
                raise PersonavecError(
                    "prompt/response boundary is ambiguous with this (slow) tokenizer: a token spans it; "
                    "use the model's fast tokenizer")
            out.append(Encoded(tuple(ids), len(pids)))
    if max_length is not None:
        long = sum(len(e.ids) > max_length for e in out)
        if long:
            log.warning("%d of %d rows are longer than %d tokens (--max-length; default: the model's context) and "
                        "were cut to that length", long, len(out), max_length)
        out = [Encoded(e.ids[:max_length], min(e.n_prompt, max_length)) for e in out]
    for i, e in enumerate(out):
        if e.n_prompt == 0:
            raise PersonavecError(f"row {i}: the prompt is empty after tokenization")
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor       # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor    # [B, T]
    weights: dict[str, torch.Tensor]  # pooling -> [B, T] averaging weights (rows sum to 1, or 0 if empty)
    last_prompt: torch.Tensor     # [B] index of the last prompt token


def make_batch(encs: Sequence[Encoded], pad_id: int, padding_side: str = "right",
               device: torch.device | str = "cpu") -> Batch:
    """Pad a list of encoded pairs into tensors with masks, position ids and pooling weights."""
    if padding_side not in ("left", "right"):
        raise PersonavecError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
    B, T = len(encs), max(len(e.ids) for e in encs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    attn = torch.zeros((B, T), dtype=torch.long)
    pmask = torch.zeros((B, T), dtype=torch.float32)
    rmask = torch.zeros((B, T), dtype=torch.float32)
    last = torch.zeros(B, dtype=torch.long)
    for b, e in enumerate(encs):
        n = len(e.ids)
        off = T - n if padding_side == "left" else 0
        ids[b, off:off + n] = torch.tensor(e.ids, dtype=torch.long)
        attn[b, off:off + n] = 1
        pmask[b, off:off + e.n_prompt] = 1.0
        rmask[b, off + e.n_prompt:off + n] = 1.0
        last[b] = off + e.n_prompt - 1
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    weights = {
        "prompt_avg": pmask / pmask.sum(1, keepdim=True).clamp(min=1.0),
        "response_avg": rmask / rmask.sum(1, keepdim=True).clamp(min=1.0),
    }
    dev = torch.device(device)
    return Batch(ids.to(dev), attn.to(dev), pos.to(dev), {k: v.to(dev) for k, v in weights.items()},
                 last.to(dev))


def pool_hidden(hidden: torch.Tensor, batch: Batch, poolings: Sequence[str]) -> dict[str, torch.Tensor]:
    """Reduce ``[B, T, d]`` hidden states to ``[B, d]`` per pooling (``[B, 1]`` for ``response_norm``), float32."""
    h = hidden.float()
    out: dict[str, torch.Tensor] = {}
    for name in poolings:
        if name == "response_norm":
            out[name] = torch.bmm(batch.weights["response_avg"].unsqueeze(1), h.norm(dim=-1, keepdim=True)).squeeze(1)
        elif name == "prompt_last":
            out[name] = h[torch.arange(h.shape[0], device=h.device), batch.last_prompt]
        else:
            out[name] = torch.bmm(batch.weights[name].unsqueeze(1), h).squeeze(1)
    return out


#: the most padded tokens (rows × longest row) one forward pass of a batch of texts holds: long texts go in smaller
#: batches, so memory stays bounded whatever the rows' lengths (a row longer than this goes alone)
TOKEN_BUDGET = 8192


def length_batches(lengths: Sequence[int], batch_size: int, sort: bool = True,
                   max_tokens: int | None = TOKEN_BUDGET) -> list[list[int]]:
    """Index batches of at most ``batch_size`` rows and ``max_tokens`` padded tokens; with ``sort`` the pairs are
    grouped by length (longest first) to cut padding."""
    if batch_size < 1:
        raise PersonavecError("batch size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if sort else list(range(len(lengths)))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        if current and (len(current) >= batch_size or (max_tokens is not None and
                                                        (len(current) + 1) * grown > max_tokens)):
            batches.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        batches.append(current)
    return batches


@torch.no_grad()
def iter_pooled(lm: LoadedModel, encs: Sequence[Encoded], layers: Sequence[int],
                poolings: Sequence[str] = POOLINGS, batch_size: int = 16, padding_side: str = "right",
                stop_early: bool = True, sort_by_length: bool = True, progress: bool | str = False,
                layers_path: str | None = None) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield ``(row indices, {pooling: [B, n_layers_requested, d]})`` batch by batch (float32)."""
    for p in poolings:
        if p not in POOLINGS + STATS:
            raise PersonavecError(f"unknown pooling {p!r}; choose from {', '.join(POOLINGS)}")
    model = lm.model
    n_layers = len(decoder_layers(model, layers_path))
    layers = check_layers(layers, n_layers)
    col = {layer: i for i, layer in enumerate(layers)}
    stack = backbone(model)
    device = lm.device
    pad = pad_token_id(lm.tokenizer)
    batches = length_batches([len(e.ids) for e in encs], batch_size, sort=sort_by_length)
    bar = tqdm(total=len(encs), desc=progress if isinstance(progress, str) else "activations",
               disable=not progress, unit="pair")
    for idx in batches:
        batch = make_batch([encs[i] for i in idx], pad, padding_side, device)
        result: dict[str, torch.Tensor] = {}

        def on_layer(layer: int, hidden: torch.Tensor, batch: Batch = batch,
                     result: dict[str, torch.Tensor] = result) -> None:
            pooled = pool_hidden(hidden, batch, poolings)
            for name, vals in pooled.items():
                if name not in result:
                    result[name] = torch.zeros(vals.shape[0], len(layers), vals.shape[1], device=vals.device)
                result[name][:, col[layer]] = vals

        with capture(model, layers, on_layer, stop_early=stop_early, layers_path=layers_path):
            run_forward(stack, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, use_cache=False)
        bar.update(len(idx))
        yield idx, result
    bar.close()


@dataclass
class PooledMeans:
    """Means over samples of pooled activations: ``means[pooling]`` is ``[L + 1, d]`` (float32).

    Rows of layers that were not requested are zero; ``layers`` lists the computed ones.
    """

    means: dict[str, torch.Tensor]
    layers: list[int]
    count: int
    n_prompt_tokens: int
    n_response_tokens: int
    skipped_empty_response: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def pooled_means(lm: LoadedModel, prompts: Sequence[str], responses: Sequence[str],
                 layers: Sequence[int] | None = None, poolings: Sequence[str] = POOLINGS,
                 batch_size: int = 16, padding_side: str = "right", stop_early: bool = True,
                 max_length: int | None = None, progress: bool | str = False,
                 layers_path: str | None = None) -> PooledMeans:
    """Mean over pairs of each pooling at each layer (all layers ``0..L`` by default), streamed."""
    n_layers = len(decoder_layers(lm.model, layers_path))
    layers = check_layers(range(n_layers + 1) if layers is None else layers, n_layers)
    encs = encode_for(lm, prompts, responses, max_length)
    empty = [i for i, e in enumerate(encs) if e.n_response == 0]
    if empty and ("response_avg" in poolings or "response_norm" in poolings):
        cut = [i for i in empty if len(responses[i].strip())]
        if cut:
            raise PersonavecError(f"{len(cut)} prompts alone fill the --max-length of {len(encs[cut[0]].ids)} tokens "
                                  f"(first at row {cut[0]}), leaving no answer tokens; raise --max-length or drop "
                                  "those rows")
        raise PersonavecError(
            f"{len(empty)} answers are empty (first at row {empty[0]}); drop them before extracting "
            "response averages")
    if not encs:
        raise PersonavecError("no pairs to extract from")
    d = lm.hidden_size
    width = {p: 1 if p in STATS else d for p in poolings}
    sums = {p: torch.zeros(len(layers), width[p], dtype=torch.float64) for p in poolings}
    for _idx, pooled in iter_pooled(lm, encs, layers, poolings, batch_size, padding_side, stop_early,
                                    progress=progress, layers_path=layers_path):
        for p, vals in pooled.items():
            sums[p] += vals.double().sum(0).cpu()
    means = {}
    for p in poolings:
        full = torch.zeros(n_layers + 1, width[p], dtype=torch.float32)
        full[layers] = (sums[p] / len(encs)).float()
        means[p] = full
    return PooledMeans(means=means, layers=layers, count=len(encs),
                       n_prompt_tokens=sum(e.n_prompt for e in encs),
                       n_response_tokens=sum(e.n_response for e in encs))


#: which tokens of a pair :func:`iter_token_states` yields
TOKEN_PARTS = ("response", "prompt", "all")


@torch.no_grad()
def iter_token_states(lm: LoadedModel, encs: Sequence[Encoded], layer: int, part: str = "response",
                      batch_size: int = 16, sort_by_length: bool = True, progress: bool | str = False,
                      layers_path: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per-token residual states at one layer, batch by batch: yields ``(states [N, d] float32, row [N], pos [N])``
    for the tokens of ``part`` of each pair (``row`` indexes ``encs``; ``pos`` is the token's index in its pair), in
    row order then position order within a batch. The forward pass stops after the block that writes ``layer``;
    padding never appears (batched equals one pair at a time)."""
    if part not in TOKEN_PARTS:
        raise PersonavecError(f"part must be one of {', '.join(TOKEN_PARTS)}, not {part!r}")
    model = lm.model
    (layer,) = check_layers([layer], len(decoder_layers(model, layers_path)))
    stack = backbone(model)
    pad = pad_token_id(lm.tokenizer)
    batches = length_batches([len(e.ids) for e in encs], batch_size, sort=sort_by_length)
    bar = tqdm(total=len(encs), desc=progress if isinstance(progress, str) else "activations",
               disable=not progress, unit="pair")
    for idx in batches:
        batch = make_batch([encs[i] for i in idx], pad, "right", lm.device)
        keep = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
        for b, i in enumerate(idx):
            e = encs[i]
            lo, hi = {"response": (e.n_prompt, len(e.ids)), "prompt": (0, e.n_prompt), "all": (0, len(e.ids))}[part]
            keep[b, lo:hi] = True
        order = sorted(range(len(idx)), key=lambda b: idx[b])
        keep_sorted = keep[order]
        got: dict[str, torch.Tensor] = {}

        def on_layer(_layer: int, hidden: torch.Tensor, got: dict[str, torch.Tensor] = got, order: list[int] = order,
                     keep_sorted: torch.Tensor = keep_sorted) -> None:
            got["h"] = hidden[order][keep_sorted.to(hidden.device)].float().cpu()

        with capture(model, [layer], on_layer, stop_early=True, layers_path=layers_path):
            run_forward(stack, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, use_cache=False)
        b_idx, pos = keep_sorted.nonzero(as_tuple=True)
        rows = torch.tensor([idx[order[b]] for b in range(len(idx))], dtype=torch.long)[b_idx]
        bar.update(len(idx))
        yield got["h"], rows, pos
    bar.close()
