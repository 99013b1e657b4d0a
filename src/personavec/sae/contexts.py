"""Top-activating token contexts of SAE features: a streaming top-k over every answer token of a corpus.

:class:`TopContexts` is fed the per-token activations of a few chosen features batch by batch (as
:func:`collect_contexts` gets them from :func:`~personavec.model.activations.iter_token_states`). For each feature
it keeps the ``k`` highest activations seen so far, at most one per answer (the top tokens of a feature often sit
next to each other in one answer; one context per answer shows more of where it fires), each with a window of
tokens around the firing token and the feature's activation on every token of the window — what a feature card
highlights. Memory is ``features × k × window``, whatever the corpus size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..errors import PersonavecError
from ..model.activations import Encoded, iter_token_states
from ..model.loading import LoadedModel
from .autoencoder import SparseAutoencoder


@dataclass
class Context:
    """One top-activating place of a feature: answer ``row``, token ``position`` (index in the pair's ids), the
    window's token texts and the feature's activation on each; ``centre`` indexes the firing token in the window."""

    activation: float
    row: int
    position: int
    tokens: list[str] = field(default_factory=list)
    activations: list[float] = field(default_factory=list)
    centre: int = 0
    ids: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("ids")
        return d


class TopContexts:
    """The ``k`` top-activating contexts (one per answer) of each of ``features``, kept while streaming."""

    def __init__(self, features: Sequence[int], k: int = 5, window: int = 8) -> None:
        if k < 1 or window < 0:
            raise PersonavecError(f"contexts need k >= 1 and window >= 0, not k={k}, window={window}")
        self.features = [int(f) for f in features]
        self.k, self.window = k, window
        self.kept: list[list[Context]] = [[] for _ in self.features]

    def add(self, acts: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor, encs: Sequence[Encoded]) -> None:
        """One batch: ``acts`` ``[N, len(features)]`` on tokens ``(rows[N], pos[N])``. Every answer in the batch must
        come whole and in position order (what :func:`iter_token_states` yields), so each window is read from the
        batch itself."""
        if acts.shape[0] == 0:
            return
        acts = acts.float()
        spans: dict[int, tuple[int, int]] = {}  # row -> [start, end) of its tokens in the batch
        row_list = rows.tolist()
        for i, r in enumerate(row_list):
            lo, _ = spans.get(r, (i, i))
            spans[r] = (lo, i + 1)
        for j, kept in enumerate(self.kept):
            col = acts[:, j]
            floor = kept[-1].activation if len(kept) >= self.k else 0.0
            n_cand = min(len(col), self.k * 8)
            values, index = col.topk(n_cand)
            taken = {c.row for c in kept}
            fresh: list[Context] = []
            for v, i in zip(values.tolist(), index.tolist()):
                if v <= floor or v <= 0 or len(fresh) >= self.k:
                    break
                r = row_list[i]
                if r in taken:
                    continue
                taken.add(r)
                fresh.append(self._context(v, r, i, spans[r], col, pos, encs))
            if not fresh:
                continue
            merged = {c.row: c for c in kept}
            for c in fresh:  # a row already kept keeps its higher activation
                if c.row not in merged or merged[c.row].activation < c.activation:
                    merged[c.row] = c
            self.kept[j] = sorted(merged.values(), key=lambda c: (-c.activation, c.row, c.position))[: self.k]

    def _context(self, value: float, row: int, i: int, span: tuple[int, int], col: torch.Tensor, pos: torch.Tensor,
                 encs: Sequence[Encoded]) -> Context:
        lo, hi = max(span[0], i - self.window), min(span[1], i + self.window + 1)
        ids = encs[row].ids
        positions = pos[lo:hi].tolist()
        return Context(activation=float(value), row=int(row), position=int(pos[i]),
                       ids=[int(ids[p]) for p in positions], activations=[float(x) for x in col[lo:hi]],
                       centre=i - lo)

    def finish(self, tokenizer: Any) -> dict[int, list[Context]]:
        """``{feature: contexts}``, highest first, with each window's token texts decoded."""
        out = {}
        for f, kept in zip(self.features, self.kept):
            for c in kept:
                c.tokens = token_texts(tokenizer, c.ids)
            out[f] = kept
        return out


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text of each token as it reads inside the run of ``ids`` (a byte-level token that is half a character
    gets its share of the decoded text once the character is complete), so the texts joined are the decoded
    window."""
    out: list[str] = []
    done = ""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(list(ids[:n]))
        if text.startswith(done) and not text.endswith("\ufffd"):
            out.append(text[len(done):])
            done = text
        else:
            out.append("")
    if out and done != tokenizer.decode(list(ids)):  # a window ending mid-character: the rest on its last token
        out[-1] += tokenizer.decode(list(ids))[len(done):]
    return out


@dataclass
class TokenPass:
    """What one streaming pass over the answers' tokens gathers besides the contexts."""

    contexts: dict[int, list[Context]]
    mean_norm: float  # mean L2 norm of the residual over answer tokens at the layer (the norm units' scale)
    n_tokens: int


@torch.no_grad()
def collect_contexts(lm: LoadedModel, sae: SparseAutoencoder, encs: Sequence[Encoded], features: Sequence[int],
                     layer: int, k: int = 5, window: int = 8, batch_size: int = 16,
                     progress: bool | str = False) -> TokenPass:
    """Stream every answer token of ``encs`` at ``layer`` through the SAE and keep the top contexts of
    ``features``; also the mean residual norm over those tokens."""
    top = TopContexts(features, k=k, window=window)
    index = torch.tensor(top.features, dtype=torch.long)
    sae32 = sae.to(torch.float32, "cpu")
    norm_sum, count = 0.0, 0
    for states, rows, pos in iter_token_states(lm, encs, layer, "response", batch_size, progress=progress):
        if not len(rows):
            continue
        norm_sum += float(states.double().norm(dim=-1).sum())
        count += len(rows)
        top.add(sae32.encode(states)[:, index], rows, pos, encs)
    return TokenPass(contexts=top.finish(lm.tokenizer), mean_norm=norm_sum / count if count else float("nan"),
                     n_tokens=count)
